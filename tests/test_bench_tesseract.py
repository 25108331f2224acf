"""benchmarks/bench_tesseract.py: exact scoring on small arrays, Tesseract's
"Rotate:" read as the clockwise repair, and one real run on rendered pages."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESSERACT = shutil.which("tesseract")


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks",
                                                                      f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load("bench_tesseract")


def test_score_counts_no_answer_as_wrong_and_the_0_vs_180_confusion():
    labels = [0, 1, 2, 3, 0, 2, 0, 2]
    answers = [0, 1, 0, 3, 2, -1, -1, 2]
    result = bench.score(labels, answers, seconds=2.0)
    assert result["accuracy"] == 4 / 8
    assert result["answered"] == 6 / 8 and result["answered_accuracy"] == 4 / 6
    assert result["pages_per_s"] == 4.0
    assert result["upright_answered_180"] == "1/3" and result["upside_down_answered_0"] == "1/3"
    assert result["confusion_true_by_answer"][2][0] == 1


@pytest.mark.skipif(not TESSERACT, reason="tesseract not installed")
def test_tesseract_rotate_is_the_clockwise_repair_and_the_script_runs(tmp_path):
    pages = tmp_path / "pages"
    render = load("render_test_pages")
    render.main(["--out", str(pages), "--num", "1", "--seed", "3"])
    upright = np.asarray(Image.open(pages / "page_0000.png").convert("RGB"))
    for k in (0, 1, 2, 3):
        path = str(tmp_path / f"k{k}.png")
        Image.fromarray(np.ascontiguousarray(np.rot90(upright, k))).save(path)
        assert bench.tesseract_answer(path) == k
    model = helpers.write_model_dir(str(tmp_path / "model"), helpers.corner_model(16), 16)
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_tesseract.py"),
                           "--pages", str(pages), "--model", model, "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "tesseract --psm 0" in proc.stdout and "upside-down answered 0" in proc.stdout
    results = json.loads(out.read_text())["results"]
    assert results["tesseract --psm 0"]["accuracy"] == 1.0 and results["tesseract --psm 0"]["images"] == 4
    assert results["model (threshold off)"]["answered"] == 1.0
