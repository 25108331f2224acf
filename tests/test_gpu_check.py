"""The accelerator check runs end to end on CPU with tiny sizes (so it cannot rot)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_smoke_prints_the_table(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, TF_CPP_MIN_LOG_LEVEL="2",
               CUDA_VISIBLE_DEVICES="", PATH=os.environ.get("PATH", ""))
    done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--smoke",
                           "--work_dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "augment_on mixed xla" in out and "input fn alone" in out
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["augment_on"] for r in result["rows"]] == ["host", "device"]
    for row in result["rows"]:
        assert "error" not in row, row
        assert row["images_per_s"] > 0 and 0 <= row["input_wait"] < 1
    assert 0 < result["rows"][1]["augment_share"]
    assert all(r["images_per_s"] > 0 for r in result["input_fn"])
    assert result["rows"][1]["xla"] is True   # device placement compiles with XLA
