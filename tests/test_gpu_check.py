"""The accelerator check runs end to end on CPU with tiny sizes (so it cannot rot)."""
import argparse
import json
import os
import subprocess
import sys

import pytest

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
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    # The smoke sizes and rows, as the JSON records them.
    assert result["device"] == "CPU"
    args = result["args"]
    assert args["smoke"] is True and args["policy"] == gpu_check.SMOKE_POLICY
    assert {k: args[k] for k in gpu_check.SMOKE} == gpu_check.SMOKE
    batch = args["batch_size"]
    rows = result["rows"]
    assert [(r["augment_on"], r["mixed_precision"]) for r in rows] == \
        [("host", False), ("device", True)]
    assert rows[0]["xla"] is False
    for row in rows:
        assert "error" not in row, row
        speed, compute = row["images_per_s"], row["compute_images_per_s"]
        assert 0 < speed < float("inf") and 0 < compute < float("inf")
        # input_wait = 1 - t_cached / t_real, floored at 0: the share of a step
        # spent waiting for the input stream.
        assert row["input_wait"] == pytest.approx(max(0.0, 1 - speed / compute), abs=1e-12)
        assert 0 <= row["input_wait"] < 1
        # step_ms is the real step's time; augment_share the augmentation's part of it.
        assert row["step_ms"] == pytest.approx(1000.0 * batch / speed, rel=1e-9)
        assert row["augment_share"] == pytest.approx(
            row["augment_s"] / (row["step_ms"] / 1000.0), rel=1e-9)
        assert 0 < row["augment_share"] < float("inf")
    assert rows[1]["xla"] is True   # device placement compiles with XLA
    assert [r["augment_on"] for r in result["input_fn"]] == ["host", "device"]
    for row in result["input_fn"]:
        assert row["batches_per_s"] > 0
        assert row["images_per_s"] == pytest.approx(batch * row["batches_per_s"], rel=1e-12)
    assert 0 <= result["seconds_records"] <= result["seconds_total"]
    # The printed table is these numbers, one line per row, in order.
    lines = out.splitlines()
    header = gpu_check.format_header("CPU", argparse.Namespace(**args)).splitlines()
    start = lines.index(header[0])
    assert lines[start + 1] == header[1]
    assert lines[start + 2:start + 4] == [gpu_check.format_row(r) for r in rows]
    assert lines[start + 4] == "input fn alone (no model):"
    assert lines[start + 5:start + 7] == [gpu_check.format_input_row(r)
                                          for r in result["input_fn"]]
    assert lines[start + 7].startswith("gpu_check: records ")
