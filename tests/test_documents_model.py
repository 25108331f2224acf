"""The shipped `documents` model, as a fresh install uses it: no training, no
network, no UPRIGHT_MODELS_DIR.

Pages are drawn here with the TrueType font that ships inside Pillow (Aileron,
`ImageFont.load_default(size=...)`): a font the model never saw in training
(benchmarks/make_documents.py renders with system fonts), on clean white pages
without scan artefacts. `orient --model documents --fix`, at its default
--min_confidence and without --tta, must put every turned page upright, as PNG
files and as PDF pages (/Rotate, content untouched).
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from upright.pipeline import builtin

TEXT = ("Orientation models read the shape of letters: ascenders rise above the line, "
        "descenders fall below it, and capitals start sentences on the left. Scanned "
        "pages arrive turned by a quarter turn or upside down, and a tool that knows "
        "which way is up can turn them back without reading a single word. ")


def draw_page(seed: int) -> np.ndarray:
    """An upright [1100, 850, 3] uint8 page: a heading and four paragraphs."""
    rng = np.random.default_rng(seed)
    page = Image.new("RGB", (850, 1100), "white")
    draw = ImageDraw.Draw(page)
    body = ImageFont.load_default(size=int(rng.integers(18, 26)))
    y = 70
    draw.text((70, y), f"Section {seed + 1}: scanned pages", font=ImageFont.load_default(36),
              fill="black")
    y += 70
    for paragraph in range(4):
        for line in textwrap.wrap(TEXT[paragraph * 37:] + TEXT, 60)[:6]:
            draw.text((70, y), line, font=body, fill="black")
            y += int(body.size * 1.5)
        y += 24
    return np.asarray(page)


@pytest.fixture(scope="module")
def pages():
    return [draw_page(seed) for seed in range(2)]


def run_orient(args):
    env = {k: v for k, v in os.environ.items() if k != builtin.ENV_MODELS_DIR}
    return subprocess.run([sys.executable, "-m", "upright.tools.orient", "--model",
                           "documents", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def test_the_documents_model_ships_with_the_package():
    folder = builtin.resolve("documents")
    assert folder.startswith(builtin.package_models_dir())
    for name in builtin.REQUIRED_FILES:
        assert os.path.isfile(os.path.join(folder, name))
    # Small enough for a wheel (issue 14: under ~10 MB).
    assert os.path.getsize(os.path.join(folder, "model.tflite")) < 10e6


def test_fixes_a_folder_of_turned_pages(tmp_path, pages):
    src, dst = tmp_path / "scans", tmp_path / "fixed"
    src.mkdir()
    for i, page in enumerate(pages):
        for k in range(4):
            Image.fromarray(np.ascontiguousarray(np.rot90(page, k))).save(
                src / f"page{i}_turned{k}.png")
    proc = run_orient([str(src), "--fix", "--dst", str(dst)])
    assert proc.returncode == 0, proc.stderr
    # Quiet by default: no TFLite interpreter or TensorFlow log line reaches the user.
    assert "TensorFlow Lite" not in proc.stdout + proc.stderr, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"upright copies in {dst}"
    for i, page in enumerate(pages):
        # Upright pages need nothing: --fix writes copies of the pages it turns.
        assert not (dst / f"page{i}_turned0.png").exists()
        for k in range(1, 4):
            fixed = np.asarray(Image.open(dst / f"page{i}_turned{k}.png").convert("RGB"))
            np.testing.assert_array_equal(fixed, page, err_msg=f"page {i} turned {k}")


def test_fixes_a_pdf_with_turned_pages(tmp_path, pages):
    import pypdf   # the pdf extra (in the test extra)
    turns = [0, 1, 2, 3, 2, 1]   # quarter turns ccw of each PDF page's content
    images = [Image.fromarray(np.ascontiguousarray(np.rot90(pages[i % 2], k)))
              for i, k in enumerate(turns)]
    images[0].save(tmp_path / "scan.pdf", "PDF", save_all=True, append_images=images[1:])
    proc = run_orient([str(tmp_path / "scan.pdf"), "--fix", "--dst", str(tmp_path / "out")])
    assert proc.returncode == 0, proc.stderr
    fixed = pypdf.PdfReader(str(tmp_path / "out" / "scan.pdf"))
    # Content turned k ccw is shown upright by /Rotate 90k (clockwise).
    assert [p.rotation for p in fixed.pages] == [90 * k for k in turns]
    source = pypdf.PdfReader(str(tmp_path / "scan.pdf"))
    for before, after in zip(source.pages, fixed.pages):
        assert before.get_contents().get_data() == after.get_contents().get_data()
