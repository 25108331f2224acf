"""Build a photo-like accuracy set: scikit-image's sample photos and LFW faces plus
Debian wallpapers with a sky/ground or a defined up, split by source picture.

    apt-get install -y mate-backgrounds ukui-wallpapers lomiri-wallpapers-16.04 \
        lomiri-wallpapers-20.04 sway-backgrounds plasma-workspace-wallpapers
    .venv/bin/pip install scikit-image
    .venv/bin/python benchmarks/make_photos.py --out /work/data/photos \
        [--crops 24] [--holdout_share 0.25] [--seed 0] [--overwrite]
    make_records --src /work/data/photos/train --out /work/data/records/photos \
        --group_by '^(.*)__[0-9]+[.](jpg|png)$'
    make_records --src /work/data/photos/holdout \
        --out /work/data/records/photos_holdout --val_fraction 1.0

Sources (one "picture" = one source image; every file name starts with its
picture's key, <source>__<name>, so two packages' 3840x2160.png never collide):
  - WALLPAPERS: pictures from Debian wallpaper packages, chosen by looking at
    all 107 of them (gnome-backgrounds, mate-backgrounds, ukui-wallpapers,
    lomiri-wallpapers*, sway-backgrounds, plasma-workspace-wallpapers,
    desktop-base) for a sky above ground, a horizon, or a subject with a
    defined up (a person, an animal, a plant on its stem, text). Abstract art,
    textures, gradients, top-down close-ups (moss, a bowl seen from above)
    and the Debian/GNOME themes (all abstract) are left out. A package ships
    one picture at several sizes (plasma: contents/images/<W>x<H>.jpg, sway:
    _<W>x<H>[_Portrait]); its largest raster copy is used, once.
  - skimage.data photos with a defined up (SKIMAGE_PHOTOS; textures, cells,
    coins, the moon, the retina and the other half of the stereo pair are
    left out), stored at their own size.
  - skimage.data.lfw_subset(): its first 100 arrays are 25x25 grey face crops
    (upright by nature); the other 100 are random non-face patches and are left
    out. The data gives no identity, so faces are split by index (one person
    can appear on both sides: LFW repeats people; a known leak, small).
Wallpapers and skimage photos give --crops random upright windows each (50-95 %
of the short side, aspect 3:4 to 16:9, no turn, no flip), written at most 512
px on the long side as JPEG quality 92: more training images without making a
picture cross the split. Faces are written once each.

Split: by picture. A stable hash of the picture key puts --holdout_share of the
pictures (and of the faces, by index) in holdout; all crops of a picture go
with it. make_records' own train/val split of train/ should group crops by
picture too: pass the --group_by above.
Built here (2 shared cores, Nov 2026): 820 train images of 107 pictures (31
wallpapers/photos, 76 faces), 336 holdout images of 37 (13, 24), 96 s;
make_records with --group_by: 691 train, 129 val; holdout 336.
"""
import argparse
import csv
import hashlib
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time

import numpy as np
from PIL import Image

# package: picture keys (file stem, or plasma folder name) kept, with why.
WALLPAPERS = {
    "lomiri-wallpapers-16.04": {
        "Bridge_by_Sander_Klootwijk": "sky above a beach, bridge cables",
        "Dragonfly_by_Bolly": "tree branches against the sky",
        "Picture_1A_by_freespace": "brushes standing in a jar",
        "Wine_by_Jakkub_Mede": "a room: floor, table, bottle",
        "aitzgorri_by_Aitzol_Berasategi": "mountains, sky, meadow",
        "free_by_Peter_Nerlich": "lamps hanging from a ceiling, a bird",
        "friends_by_Aitzol_Berasategi": "two dogs at a window",
        "life_by_Aitzol_Berasategi": "a stream in a forest",
        "picosdeeuropa_by_Aitzol_Berasategi": "mountains under clouds, a path",
        "seeding_by_Clements_Engelhardt": "dandelions on stems",
        "sunset_by_Aitzol_Berasategi": "sun over a horizon",
    },
    "lomiri-wallpapers-20.04": {
        "Infinite-Sea_by_Aury88": "the Milky Way over a sea horizon",
        "Kleiber_by_Lukas_Baubkus": "a bird on an upright tree trunk",
    },
    "mate-backgrounds": {
        "Aqua": "a drop splashing on a water surface, side view",
        "Dune": "grass against the sea and sky",
        "GreenMeadow": "grass blades growing up",
        "Storm": "storm clouds over a road",
    },
    "plasma-workspace-wallpapers": {
        "Altai": "mountains over a lake",
        "Autumn": "a painted tree, a child on grass",
        "BytheWater": "a pier, water and a far shore",
        "ColdRipple": "a pier in fog",
        "DarkestHour": "a dark lake horizon",
        "EveningGlow": "boats on a shore at sunset",
        "FallenLeaf": "leaves on the ground, blurred background",
        "FlyingKonqui": "a cartoon dragon, bubbles rising",
        "Path": "a forest path",
        "SafeLanding": "an illustrated landscape with a rocket",
        "summer_1am": "a lake horizon at dusk",
    },
    "sway-backgrounds": {"Sway_Wallpaper_Blue": "a logo with the word SWAY"},
    "ukui-wallpapers": {
        "calla": "a calla flower on its stem",
        "firstgeneration": "a cartoon character's face",
        "goldfish": "a goldfish swimming",
        "the-mouse": "a mouse's face, ears up",
    },
}
# skimage.data function: why it has an up. (cat = chelsea, motorcycle_right = the
# same scene as motorcycle_left: left out.)
SKIMAGE_PHOTOS = {
    "astronaut": "portrait", "camera": "a man with a camera on a tripod",
    "chelsea": "a cat", "coffee": "a cup on a saucer", "rocket": "a rocket at its launch pad",
    "horse": "a horse silhouette", "stereo_motorcycle": "a motorcycle (left view only)",
    "page": "a scanned page of text", "text": "a photo of lettering",
    "logo": "the scikit-image logo with text", "clock": "a wall clock",
}
RASTER = re.compile(r"\.(jpe?g|png|webp)$", re.I)
MAX_SIDE = 512


def picture_key(package, path):
    """The picture a wallpaper file shows: its plasma folder, or its stem without size."""
    folder = re.match(r"/usr/share/wallpapers/([^/]+)/", path)
    if folder:
        return folder.group(1)
    stem = os.path.splitext(os.path.basename(path))[0]
    return re.sub(r"(_\d+x\d+)?(_Portrait)?$", "", stem)


def list_wallpapers():
    """{(package, key): largest raster path}; exits naming a package that is missing."""
    found, missing = {}, []
    for package, keep in WALLPAPERS.items():
        listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
        if listing.returncode:
            missing.append(package)
            continue
        for path in listing.stdout.split():
            if RASTER.search(path) and os.path.isfile(path):
                key = picture_key(package, path)
                if key in keep and "_dark" not in path:
                    with Image.open(path) as image:
                        pixels = image.width * image.height
                    best = found.get((package, key))
                    if best is None or pixels > best[1]:
                        found[(package, key)] = (path, pixels)
    if missing:
        sys.exit("make_photos: packages missing: apt-get install -y " + " ".join(missing))
    absent = [f"{p}:{k}" for p, keep in WALLPAPERS.items() for k in keep if (p, k) not in found]
    if absent:
        sys.exit(f"make_photos: pictures not found in their packages: {absent}")
    return {k: v[0] for k, v in sorted(found.items())}


def load_skimage():
    """(photos {name: uint8 array}, faces [uint8 25x25]); exits if scikit-image is missing."""
    try:
        from skimage import data
    except ImportError:
        sys.exit("make_photos: scikit-image is missing: .venv/bin/pip install scikit-image")
    photos = {}
    for name in SKIMAGE_PHOTOS:
        pixels = getattr(data, name)()
        photos[name] = pixels[0] if name == "stereo_motorcycle" else pixels
    faces = data.lfw_subset()[:100]          # the first 100 are faces, the rest are not
    return photos, [np.round(face * 255).astype(np.uint8) for face in faces]


def held_out(key, share):
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 16**8 < share


def crops(image, count, rng):
    """count random upright windows of image (50-95 % of its short side)."""
    out = []
    for _ in range(count):
        aspect = rng.choice((3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9, 9 / 16, 2 / 3))
        side = rng.uniform(0.5, 0.95) * min(image.size)
        w, h = side * math.sqrt(aspect), side / math.sqrt(aspect)
        scale = min(1.0, image.width / w, image.height / h)
        w, h = max(16, round(w * scale)), max(16, round(h * scale))
        x, y = rng.randint(0, image.width - w), rng.randint(0, image.height - h)
        out.append(bounded(image.crop((x, y, x + w, y + h))))
    return out


def bounded(image):
    scale = MAX_SIDE / max(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)),
                              max(1, round(image.height * scale))), Image.Resampling.LANCZOS)
    return image


def write(out, split, name, image, writer, source, seen):
    rel = os.path.join(split, name)
    if rel in seen:      # the failure of the earlier corpus: never overwrite a picture
        sys.exit(f"make_photos: two pictures map to {rel}")
    seen.add(rel)
    if name.endswith(".png"):
        image.save(os.path.join(out, rel), "PNG")
    else:
        image.save(os.path.join(out, rel), "JPEG", quality=92)
    writer.writerow([split, rel, source, f"{image.width}x{image.height}"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for train/, holdout/, manifest.csv")
    parser.add_argument("--crops", type=int, default=24, help="crops per wallpaper or photo")
    parser.add_argument("--holdout_share", type=float, default=0.25,
                        help="share of pictures (by hashed key) held out")
    parser.add_argument("--seed", type=int, default=0, help="seeds the crop windows")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT/train, OUT/holdout and OUT/manifest.csv")
    args = parser.parse_args()
    start = time.perf_counter()
    Image.MAX_IMAGE_PIXELS = 200_000_000     # 8K wallpapers, from installed packages
    wallpapers = list_wallpapers()
    photos, faces = load_skimage()
    for split in ("train", "holdout"):
        folder = os.path.join(args.out, split)
        if os.path.exists(folder) and os.listdir(folder):
            if not args.overwrite:
                sys.exit(f"make_photos: {folder} is not empty (use --overwrite)")
            shutil.rmtree(folder)
        os.makedirs(folder)
    pictures = [(f"{package}__{key}", path) for (package, key), path in wallpapers.items()]
    pictures += [(f"skimage__{name}", name) for name in photos]
    counts = {"train": [0, 0], "holdout": [0, 0]}      # pictures, files
    seen = set()
    with open(os.path.join(args.out, "manifest.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "file", "source", "size"])
        for key, source in pictures:
            split = "holdout" if held_out(key, args.holdout_share) else "train"
            if key.startswith("skimage__"):
                image = Image.fromarray(photos[source]).convert("RGB")
                source = f"skimage.data.{source}()"
            else:
                with Image.open(source) as opened:
                    image = opened.convert("RGB")
            rng = random.Random(f"{args.seed}:{key}")
            for n, crop in enumerate(crops(image, args.crops, rng)):
                write(args.out, split, f"{key}__{n:02d}.jpg", crop, writer, source, seen)
            counts[split][0] += 1
            counts[split][1] += args.crops
        for index, face in enumerate(faces):
            key = f"lfw__{index:03d}"
            split = "holdout" if held_out(key, args.holdout_share) else "train"
            write(args.out, split, f"{key}__00.png", Image.fromarray(face), writer,
                  f"skimage.data.lfw_subset()[{index}]", seen)
            counts[split][0] += 1
            counts[split][1] += 1
    print(f"make_photos: train {counts['train'][1]} images of {counts['train'][0]} pictures, "
          f"holdout {counts['holdout'][1]} images of {counts['holdout'][0]} pictures "
          f"({len(wallpapers)} wallpapers, {len(photos)} skimage photos, {len(faces)} faces), "
          f"{time.perf_counter() - start:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
