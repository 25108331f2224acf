"""Build a clip-art accuracy set from Debian's openclipart-png, split by category folder.

    apt-get install -y openclipart-png
    .venv/bin/python benchmarks/make_clipart.py --out /work/data/clipart \
        [--max_side 512] [--seed 0] [--overwrite]
    make_records --src /work/data/clipart/train --out /work/data/records/clipart
    make_records --src /work/data/clipart/holdout \
        --out /work/data/records/clipart_holdout --val_fraction 1.0
    # (add --group_by '^(.*)/[^/]+$' to the first make_records to split its val by folder too)

Reads the PNGs of /usr/share/openclipart/png/<category>/.../*.png (8,121
in 165 folders in 0.18+dfsg-19) and writes OUT/train/<folder>/<name>.png and
OUT/holdout/<folder>/<name>.png (folder path kept, so the same file name in two
folders never collides) plus OUT/manifest.csv (split, file, source, sha1,
size) and OUT/duplicates.csv (each copy removed, its twin, why).

What it keeps: folders whose pictures have a defined up (RULES below, the first
matching prefix decides, each with its reason): animals, people, buildings,
food, plants, vehicles, household and office objects, pictograms and road signs,
clocks, maps, flags. Dropped: shapes, stars, arrows, callouts, patterns,
gradients, borders, UI icon themes, playing cards (printed 180-degree
symmetric), moons and planets, LEDs, coins, snowflakes, mixed/unsorted folders.
Pictures under 32 px on their long side (no visible up) and over 40 MP (one
decode would take gigabytes) are skipped and counted.

Each kept picture is composited on white (70 %) or a light random colour, and
scaled down (LANCZOS) to --max_side on its long side; smaller ones keep their
size. The background colour is drawn from a hash of the source path and
--seed, so a rebuild gives the same files.

Split: by category folder. HOLDOUT_FOLDERS (a spread over animals, people,
food, plants, vehicles, signs, flags, objects; about 20 % of kept pictures) go
to holdout, every other kept folder to train, so holdout categories are unseen.
The same picture filed twice under two names (identical bytes: sha1) is
written once, in train when one copy is there. Then make_records' own
near-duplicate test (imageio.signature, neardup.group_near_duplicates: the same
picture re-saved or resized) runs over both splits together, and every held-out
picture grouped with a training one is removed, so no picture crosses the
split. It also groups a few nearly blank pictures (thin outlines on white):
those are removed from holdout too, a cautious loss. OUT/duplicates.csv lists
every removal.
Built here (2 shared cores, Nov 2026): 2,158 train pictures (83 folders), 603
holdout (24 folders), 58 folders dropped, 120 s; make_records: 1,729 train,
419 val (10 more exact duplicates stored once), 601 holdout.
"""
import argparse
import csv
import hashlib
import os
import random
import shutil
import sys
import time

from PIL import Image

from upright.pipeline import imageio, neardup

SOURCE = "/usr/share/openclipart/png"
# (folder prefix, keep, reason); the first prefix that matches a folder decides.
RULES = (
    ("animals", True, "animals drawn standing, swimming or flying: head up, feet down"),
    ("buildings", True, "houses, monuments and furniture stand on the ground"),
    ("buttons", False, "three UI widgets"),
    ("computer/hardware", True, "monitors, printers, laptops stand on a desk"),
    ("computer/icons", False, "UI icon themes: round badges, arrows, pages, symmetric glyphs"),
    ("computer/buttons", False, "arrows and round buttons: no up, or a misleading one"),
    ("computer/connectors", False, "plugs and sockets seen face-on: symmetric"),
    ("computer/diagrams", False, "network diagrams and clouds"),
    ("computer/folders", False, "folder icons: their up is a small tab"),
    ("computer/games", False, "tiny game glyphs (Pac-Man, Tetris) without an up"),
    ("computer/network", False, "four mixed glyphs"),
    ("computer", False, "mixed icons and mouse cursors"),
    ("containers", True, "boxes, bags and baskets standing on their base"),
    ("decorations", False, "ornaments, corners, knots: no up"),
    ("education", True, "books, flasks, pencils and school objects drawn upright"),
    ("electronics", True, "devices, batteries and bulbs drawn upright"),
    ("food", True, "dishes, drinks and fruit drawn as served"),
    ("geography/astronomy", False, "moon phases and planets: round, no up"),
    ("geography", True, "maps and landmarks: north up by convention"),
    ("logos", True, "logos with lettering"),
    ("office", True, "desk objects and telephones drawn upright"),
    ("people/clothing/jewelry", False, "rings: no up"),
    ("people", True, "people, faces, body parts, clothes: head up"),
    ("plants", True, "plants, flowers and trees grow up"),
    ("recreation/games/cards", False, "playing cards are printed 180-degree symmetric"),
    ("recreation/games/chess", True, "chess pieces stand upright"),
    ("recreation/games", False, "dice, balls and boards: symmetric"),
    ("recreation", True, "holiday, music, party, sports and toy objects drawn upright"),
    ("science/astronomy", False, "moons and planets: round, no up"),
    ("science", True, "lab objects and medicine bottles drawn upright"),
    ("shapes", False, "geometric shapes, arrows, callouts, flowchart symbols, jigsaw, stars"),
    ("signs_and_symbols/flags", True, "flags: hoist on the left, a defined up; semaphore people"),
    ("signs_and_symbols/clocks", True, "clock faces: 12 at the top"),
    ("signs_and_symbols/map_symbols", True, "pictograms (taxi, train, no smoking) drawn upright"),
    ("signs_and_symbols/awards", True, "trophies and ribbons"),
    ("signs_and_symbols/disability", True, "the wheelchair pictogram"),
    ("signs_and_symbols/hazard", True, "skull and bottles upright"),
    ("signs_and_symbols/led", False, "LED lamps: round or bar-shaped, symmetric"),
    ("signs_and_symbols/money", False, "coins, gems and chains: mostly symmetric"),
    ("signs_and_symbols/weather", False, "snowflakes, suns and clouds: mostly symmetric"),
    ("signs_and_symbols", False, "mixed symbols, stars and bar codes"),
    ("special", False, "gradients, patterns, borders and page examples: no up"),
    ("tools", True, "hand tools, kitchenware and weapons drawn as held or standing"),
    ("transportation/boating", True, "boats on the water; a few tacking diagrams"),
    ("transportation", True, "vehicles on their wheels, road signs and AIGA pictograms upright"),
    ("unsorted", False, "mixed, unclassified"),
)
# Kept folders whose pictures are held out (unseen categories).
HOLDOUT_FOLDERS = (
    "animals/dinosaurs", "animals/fish", "animals/mammals/big_cats", "animals/mammals/horses",
    "buildings/homes", "electronics/bulb", "food/desserts", "food/vegetables",
    "office/telephone", "people/clothing/hats", "people/smilies", "people/stickmen",
    "plants/trees", "plants/trees/evergreen", "recreation/music", "recreation/toys",
    "signs_and_symbols/clocks", "signs_and_symbols/flags/asia",
    "signs_and_symbols/flags/europe/france", "signs_and_symbols/flags/oceania/australia",
    "tools/weapons", "transportation/roadsigns", "transportation/vehicles",
    "transportation/vehicles/hummers",
)
MIN_SIDE, MAX_PIXELS = 32, 40_000_000


def rule_for(folder):
    for prefix, keep, reason in RULES:
        if folder == prefix or folder.startswith(prefix + "/"):
            return prefix, keep, reason
    return None, False, "no rule"


def list_folders(source):
    """{folder relative to source: [png file names]}, sorted."""
    folders = {}
    for root, dirs, files in os.walk(source):
        dirs.sort()
        names = sorted(n for n in files if n.lower().endswith(".png"))
        if names:
            folders[os.path.relpath(root, source)] = names
    return folders


def background(path, seed):
    """White for 70 % of pictures, else a light colour; fixed by the path and seed."""
    rng = random.Random(f"{seed}:{path}")
    if rng.random() < 0.7:
        return (255, 255, 255)
    return tuple(rng.randint(215, 255) for _ in range(3))


def prepare(path, max_side, seed):
    """RGB picture on its background, long side <= max_side; None if skipped, with why."""
    with Image.open(path) as image:
        if max(image.size) < MIN_SIDE:
            return None, "smaller than %d px" % MIN_SIDE
        if image.width * image.height > MAX_PIXELS:
            return None, "over %d MP" % (MAX_PIXELS // 1_000_000)
        rgba = image.convert("RGBA")
    flat = Image.new("RGBA", rgba.size, background(path, seed) + (255,))
    flat.alpha_composite(rgba)
    flat = flat.convert("RGB")
    scale = max_side / max(flat.size)
    if scale < 1:
        flat = flat.resize((max(1, round(flat.width * scale)), max(1, round(flat.height * scale))),
                           Image.Resampling.LANCZOS)
    return flat, None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for train/, holdout/, manifest.csv")
    parser.add_argument("--source", default=SOURCE, help="openclipart-png's png folder")
    parser.add_argument("--max_side", type=int, default=512, help="longest side written")
    parser.add_argument("--seed", type=int, default=0, help="seeds the background colours")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT/train, OUT/holdout and OUT/manifest.csv")
    args = parser.parse_args()
    start = time.perf_counter()
    if not os.path.isdir(args.source):
        sys.exit(f"make_clipart: {args.source} not found: apt-get install -y openclipart-png")
    Image.MAX_IMAGE_PIXELS = None      # size is checked in prepare() before decoding
    folders = list_folders(args.source)
    unknown = sorted(set(HOLDOUT_FOLDERS) - {f for f in folders if rule_for(f)[1]})
    if unknown:
        sys.exit(f"make_clipart: HOLDOUT_FOLDERS not kept or not found: {unknown}")
    for split in ("train", "holdout"):
        folder = os.path.join(args.out, split)
        if os.path.exists(folder) and os.listdir(folder):
            if not args.overwrite:
                sys.exit(f"make_clipart: {folder} is not empty (use --overwrite)")
            shutil.rmtree(folder)
    os.makedirs(args.out, exist_ok=True)
    # Train first, so that a picture filed in a train and a holdout folder stays in train.
    order = sorted(folders, key=lambda f: (f in HOLDOUT_FOLDERS, f))
    seen, skipped, rows, signatures, removals = {}, {}, [], [], []
    kept_folders = {"train": 0, "holdout": 0}
    for folder in order:
        if not rule_for(folder)[1]:
            continue
        split = "holdout" if folder in HOLDOUT_FOLDERS else "train"
        kept_folders[split] += 1
        for name in folders[folder]:
            path = os.path.join(args.source, folder, name)
            with open(path, "rb") as source:
                digest = hashlib.sha1(source.read()).hexdigest()
            try:
                image, why = prepare(path, args.max_side, args.seed)
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                image, why = None, f"unreadable ({type(error).__name__})"
            if image is None:
                skipped[why] = skipped.get(why, 0) + 1
                continue
            source = os.path.join(folder, name)
            if digest in seen:
                why = "duplicate across splits" if seen[digest][0] != split else "duplicate"
                skipped[why] = skipped.get(why, 0) + 1
                removals.append([source, seen[digest][1], "bytes", why])
                continue
            seen[digest] = (split, source)
            rel = os.path.join(split, folder, os.path.splitext(name)[0] + ".png")
            os.makedirs(os.path.dirname(os.path.join(args.out, rel)), exist_ok=True)
            image.save(os.path.join(args.out, rel), "PNG")
            rows.append([split, rel, source, digest, f"{image.width}x{image.height}"])
            signatures.append(imageio.signature(image))
    # make_records' near-duplicate groups over both splits: no group may span them.
    gone = set()
    for group in neardup.group_near_duplicates(signatures):
        kept_train = [rows[i][2] for i in group if rows[i][0] == "train"]
        if kept_train:
            for i in group:
                if rows[i][0] == "holdout":
                    gone.add(i)
                    os.remove(os.path.join(args.out, rows[i][1]))
                    removals.append([rows[i][2], kept_train[0], "near-duplicate",
                                     "duplicate across splits"])
    skipped["near-duplicate across splits"] = len(gone)
    rows = [row for i, row in enumerate(rows) if i not in gone]
    counts = {split: sum(row[0] == split for row in rows) for split in ("train", "holdout")}
    with open(os.path.join(args.out, "manifest.csv"), "w", newline="") as f:
        csv.writer(f).writerows([["split", "file", "source", "sha1", "size"]] + rows)
    with open(os.path.join(args.out, "duplicates.csv"), "w", newline="") as f:
        csv.writer(f).writerows([["removed", "twin kept", "same", "why"]] + removals)
    dropped = sum(1 for f in folders if not rule_for(f)[1])
    print(f"make_clipart: train {counts['train']} pictures ({kept_folders['train']} folders), "
          f"holdout {counts['holdout']} ({kept_folders['holdout']} folders), "
          f"{dropped} folders dropped, skipped "
          + (", ".join(f"{n} {why}" for why, n in sorted(skipped.items())) or "none")
          + f", {time.perf_counter() - start:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
