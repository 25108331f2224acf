"""How well can a person tell which way is up? A blind labelling test on records.

    python benchmarks/blind_ceiling.py make --records records/holdout --out /tmp/blind \
        --key /root/blind_key.json [--split val] [--num 120] [--seed 0] \
        [--image_size 128 --resize squash]
    # a person (or a reviewer who has never seen the pictures upright) opens
    # /tmp/blind/sheet*.png and writes /tmp/blind/answers.txt, one line a tile:
    #   #N EDGE sure|unsure      EDGE: the tile edge that was the picture's top
    python benchmarks/blind_ceiling.py score --key /root/blind_key.json \
        --answers /tmp/blind/answers.txt [--group_by '^(.*)_[0-9]+[.]jpg$']

`make` samples --num stored images of a split and prepares each exactly as the
model sees it (preprocess.preprocess_image at --image_size with --resize: square,
so a tile's shape says nothing about the turn), turns each by a random
quarter turn exactly as the label convention says
(schema.rotate: label k = k quarter turns counter-clockwise, so the picture's
top ends on the left for k=1, the bottom for k=2, the right for k=3), and
draws numbered tiles onto contact sheets. The key (which turn each tile got)
goes to --key, which must lie outside --out: whoever labels sees only the
sheets. `score` prints the labeller's accuracy, with its 95 % interval, on all
tiles and on those marked sure, and per group of source paths.

Why: a model cannot be held to a target that a person looking at the same
pixels cannot reach. When most pictures of a set have no defined up (textures,
flat colour, symmetric patterns), the person's accuracy is a ceiling to report
beside the model's (benchmarks/README.md, "Accuracy on real photos without
pretrained weights, and what limits it").
"""
import argparse
import collections
import json
import math
import os
import random
import re
import sys

import numpy as np
from PIL import Image, ImageDraw

# The tile edge where the picture's top lands after label k's turn.
TOP_EDGE = ("top", "left", "bottom", "right")
ANSWER = re.compile(r"^#(\d+)\s+(top|left|bottom|right)\s+(sure|unsure)\s*$")


def sample_images(records, split, num, rng, image_size, resize):
    """num random (source_id, uint8 [S, S, 3]) of a split, as the model sees them."""
    import tensorflow as tf
    from upright.pipeline import preprocess, recordio, schema
    files = recordio.shard_paths(records, split, recordio.load_info(records))
    serialized = [s.numpy() for s in tf.data.TFRecordDataset(files)]   # no decoding yet
    out = []
    for index in rng.sample(range(len(serialized)), min(num, len(serialized))):
        record = schema.decode_example(serialized[index])
        pixels = preprocess.preprocess_image(record.encoded, image_size, resize)
        out.append((record.source_id, tf.cast(tf.round(pixels), tf.uint8).numpy()))
    return out


def make(records, split, out, key_path, num, seed, tile, columns, per_sheet,
         image_size=128, resize="squash"):
    from upright.pipeline import schema
    out, key_path = os.path.realpath(out), os.path.realpath(key_path)
    if key_path.startswith(out + os.sep):
        sys.exit("blind_ceiling: --key must lie outside --out (the labeller sees --out)")
    rng = random.Random(seed)
    images = sample_images(records, split, num, rng, image_size, resize)
    os.makedirs(out, exist_ok=True)
    key, sheets = [], []
    rows = math.ceil(per_sheet / columns)
    for start in range(0, len(images), per_sheet):
        sheet = Image.new("RGB", (columns * (tile + 12), rows * (tile + 26)), "white")
        draw = ImageDraw.Draw(sheet)
        for i, (source_id, pixels) in enumerate(images[start:start + per_sheet]):
            k = rng.randrange(schema.NUM_CLASSES)
            # Shown at tile size (bilinear), never smaller than the model's input.
            thumb = Image.fromarray(np.asarray(schema.rotate(pixels, k))).resize(
                (max(tile, image_size),) * 2, Image.Resampling.BILINEAR)
            n = start + i + 1
            x, y = (i % columns) * (tile + 12), (i // columns) * (tile + 26)
            draw.text((x, y + 4), f"#{n}", fill="black")
            draw.rectangle([x - 1, y + 19, x + thumb.width, y + 20 + thumb.height], outline="red")
            sheet.paste(thumb, (x, y + 20))
            key.append({"n": n, "source_id": source_id, "label": k, "top_edge": TOP_EDGE[k]})
        path = os.path.join(out, f"sheet{len(sheets) + 1}.png")
        sheet.save(path)
        sheets.append(path)
    os.makedirs(os.path.dirname(key_path) or ".", exist_ok=True)
    with open(key_path, "w") as f:
        json.dump({"records": os.path.abspath(records), "split": split, "seed": seed,
                   "image_size": image_size, "resize": resize, "tiles": key}, f, indent=1)
    print(f"{len(key)} tiles on {len(sheets)} sheets in {out}; key in {key_path}")
    print(f"labeller: write {os.path.join(out, 'answers.txt')}, one line a tile: "
          "'#N top|left|bottom|right sure|unsure' (the edge that was the picture's top)")


def read_answers(path, known):
    """{tile number: (edge, sure)}; exits naming the line of a malformed answer,
    a second answer for one tile, or a tile number not in the key (`known`)."""
    answers = {}
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            m = ANSWER.match(line.strip().lower())
            if not m:
                sys.exit(f"blind_ceiling: {path}:{line_number}: expected '#N EDGE sure|unsure', "
                         f"got {line.strip()!r}")
            n = int(m[1])
            if n in answers or n not in known:
                sys.exit(f"blind_ceiling: {path}:{line_number}: tile #{n} "
                         f"{'answered twice' if n in answers else 'is not in the key'}")
            answers[n] = (m[2], m[3] == "sure")
    return answers


def wilson(correct, n, z=1.96):
    """95 % Wilson score interval of a proportion (low, high)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def score(key_path, answers_path, group_by=None):
    """Returns {"all": (correct, n), "sure": (correct, n), "groups": {key: (correct, n)}}."""
    with open(key_path) as f:
        tiles = json.load(f)["tiles"]
    answers = read_answers(answers_path, {t["n"] for t in tiles})
    missing = [t["n"] for t in tiles if t["n"] not in answers]
    if missing:
        sys.exit(f"blind_ceiling: no answer for tiles {missing[:10]}"
                 f"{' ...' if len(missing) > 10 else ''}")
    from upright.pipeline import splits
    pattern = splits.compile_group_by(group_by)
    totals = {"all": [0, 0], "sure": [0, 0]}
    groups = collections.defaultdict(lambda: [0, 0])
    for t in tiles:
        edge, sure = answers[t["n"]]
        right = int(edge == t["top_edge"])
        for name in ("all", "sure") if sure else ("all",):
            totals[name][0] += right
            totals[name][1] += 1
        if pattern:
            # The same key make_records --group_by takes from a path.
            g = splits.group_key(pattern, os.fsencode(t["source_id"]))
            g = "(no match)" if g is None else g
            groups[g][0] += right
            groups[g][1] += 1
    return {"all": tuple(totals["all"]), "sure": tuple(totals["sure"]),
            "groups": {g: tuple(v) for g, v in sorted(groups.items())}}


def format_score(result):
    def line(name, c, n):
        lo, hi = wilson(c, n)
        pct = f"{100 * c / n:5.1f} %" if n else "  n/a"
        return f"{name:<24} {c:4d} / {n:<4d} {pct}   95 % interval {100 * lo:.0f}-{100 * hi:.0f} %"
    c, n = result["all"]
    sure_c, sure_n = result["sure"]
    lines = [line("all tiles", c, n),
             line("tiles marked sure", sure_c, sure_n),
             f"marked sure: {sure_n} of {n} ({100 * sure_n / max(n, 1):.1f} %); chance is 25 %"]
    for g, (gc, gn) in result["groups"].items():
        lines.append(line(f"  {g}", gc, gn))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="contact sheets of randomly turned images + a hidden key")
    m.add_argument("--records", required=True)
    m.add_argument("--split", default="val")
    m.add_argument("--out", required=True, help="folder for the sheets (what the labeller sees)")
    m.add_argument("--key", required=True, help="key JSON, outside --out")
    m.add_argument("--num", type=int, default=120)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--tile", type=int, default=256, help="tile side on the sheet, pixels")
    m.add_argument("--image_size", type=int, default=128,
                   help="the model's input side: images are prepared as it sees them")
    m.add_argument("--resize", default="squash", choices=["squash", "pad", "crop"],
                   help="the model's resize method")
    m.add_argument("--columns", type=int, default=6)
    m.add_argument("--per_sheet", type=int, default=24)
    s = sub.add_parser("score", help="the labeller's accuracy against the key")
    s.add_argument("--key", required=True)
    s.add_argument("--answers", required=True)
    s.add_argument("--group_by", default=None,
                   help="regex on source ids; accuracy per first capture group")
    args = ap.parse_args()
    if args.command == "make":
        make(args.records, args.split, args.out, args.key, args.num, args.seed, args.tile,
             args.columns, args.per_sheet, args.image_size, args.resize)
    else:
        print(format_score(score(args.key, args.answers, args.group_by)))


if __name__ == "__main__":
    main()
