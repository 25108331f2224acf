"""benchmarks/build_documents_model.py end to end with the tiny backbone on a few
rendered pages (slow: about 3-4 minutes on 2 CPU cores; run with -m slow):
records -> train -> TFLite checked -> installed folder that orient loads by name."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_build_installs_a_builtin_that_orient_loads(tmp_path):
    pages = tmp_path / "pages"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "render_test_pages.py"),
                    "--out", str(pages), "--num", "24"], check=True, timeout=300)
    installed = tmp_path / "models" / "documents"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "build_documents_model.py"),
         "--src", str(pages), "--flagfile", os.path.join(ROOT, "demo.flags"),
         "--backbone", "tiny", "--work", str(tmp_path / "work"), "--install_dir", str(installed),
         "--", "--stage1_epochs=1", "--stage2_epochs=1", "--image_size=32"],
        capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(installed)) == ["model.tflite", "model_info.json"]
    info = json.loads((installed / "model_info.json").read_text())
    assert info["image_size"] == 32 and info["convention"]["rotation"]
    build = info["build"]
    assert build["backbone"] == "tiny" and build["seconds"]["train"] > 0
    assert build["command"].startswith("python benchmarks/build_documents_model.py --src")
    assert build["records_counts"]
    proc = subprocess.run([sys.executable, "-m", "upright.tools.orient", "--model", "documents",
                           str(pages / "page_0000.png")], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, UPRIGHT_MODELS_DIR=str(installed.parent)))
    assert proc.returncode == 0, proc.stderr
    assert "page_0000.png" in proc.stdout
