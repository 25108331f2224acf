"""Render simple upright text pages with Pillow, for smoke runs of the document
scripts (build_documents_model.py, bench_tesseract.py). NOT the training set of
the built-in model (issue 14 asks for varied fonts, layouts, scripts and scan
artefacts): plain paragraphs in the system's DejaVu/Liberation fonts.

    python benchmarks/render_test_pages.py --out /tmp/pages --num 12 [--seed 0]
"""
import argparse
import glob
import io
import os
import random
import sys

from PIL import Image, ImageDraw, ImageFont

WORDS = ("the of and to in is was for on that with as by at from this be are an "
         "page scanned document orientation upright quarter turn rotation model text "
         "letter invoice report section table figure summary results method data "
         "printed line column paragraph reader number total amount date address").split()
FONT_GLOBS = ("/usr/share/fonts/truetype/dejavu/DejaVu*.ttf",
              "/usr/share/fonts/truetype/liberation/Liberation*.ttf")


def fonts() -> list:
    found = sorted(f for g in FONT_GLOBS for f in glob.glob(g) if "Mono" not in f)
    if not found:
        sys.exit("render_test_pages: no TrueType fonts found (apt-get install fonts-dejavu-core)")
    return found


def render_page(rng: random.Random, font_files, width=850, height=1100) -> Image.Image:
    """One white page with a heading and paragraphs of black text, upright."""
    page = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(page)
    font_file = rng.choice(font_files)
    size = rng.randint(16, 26)
    font = ImageFont.truetype(font_file, size)
    heading = ImageFont.truetype(font_file, int(size * 1.6))
    margin, y = rng.randint(50, 90), rng.randint(50, 90)
    draw.text((margin, y), " ".join(rng.choice(WORDS) for _ in range(4)).title(), font=heading,
              fill="black")
    y += int(size * 3)
    while y < height - margin - size:
        line, x_max = [], width - 2 * margin
        while True:
            word = rng.choice(WORDS)
            if draw.textlength(" ".join(line + [word]), font=font) > x_max:
                break
            line.append(word)
        if rng.random() < 0.12:   # paragraph end: a short line, then a gap
            line = line[:rng.randint(2, max(2, len(line) - 1))]
        draw.text((margin, y), " ".join(line), font=font, fill="black")
        y += int(size * (2.6 if rng.random() < 0.12 else 1.4))
    return page


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--num", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rng, font_files = random.Random(args.seed), fonts()
    from upright.pipeline import fileio
    for i in range(args.num):
        buffer = io.BytesIO()
        render_page(rng, font_files).save(buffer, "PNG")
        fileio.write_bytes(os.path.join(args.out, f"page_{i:04d}.png"), buffer.getvalue(),
                           durable=False)
    print(f"{args.num} pages in {args.out}")


if __name__ == "__main__":
    main()
