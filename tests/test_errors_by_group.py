"""benchmarks/errors_by_group.py: per-group accuracy over runs, from evaluate's own CSV."""
import os
import subprocess
import sys

import numpy as np

from upright.pipeline import evaluation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "errors_by_group.py")
IDS = [b"001_sparse_a.jpg", b"002_single_a.jpg", b"003_single_b.jpg"]


def write_run(run_dir, wrong):
    """A run folder whose CSV (written by evaluation.write_image_rows) has the
    examples `wrong` (indices into the 12 = 3 images x 4 turns) predicted wrong."""
    labels = np.tile(np.arange(4), len(IDS))
    pred = labels.copy()
    pred[list(wrong)] = (pred[list(wrong)] + 2) % 4
    probs = np.full((len(labels), 4), 0.1, np.float32)
    probs[np.arange(len(labels)), pred] = 0.7
    os.makedirs(run_dir)
    evaluation.write_image_rows(os.path.join(run_dir, "eval_holdout_images.csv"),
                                IDS, probs, labels)


def test_groups_and_most_often_wrong(tmp_path):
    # Run a: the sparse page wrong at 0 and 180; run b: wrong at 180, and one
    # single page wrong at 90.
    write_run(tmp_path / "a", wrong=[0, 2])
    write_run(tmp_path / "b", wrong=[2, 5])
    done = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "a"), str(tmp_path / "b"),
                           str(tmp_path / "missing"), "--group", "^[0-9]+_([a-z]+)_"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "run | all | single | sparse | all but sparse"
    assert lines[1] == "a | 0.8333 | 1.000 | 0.500 | 1.0000"
    assert lines[2] == "b | 0.8333 | 0.875 | 0.750 | 0.8750"
    assert lines[3] == "pooled | 0.8333 | 0.938 | 0.625 | 0.9375"
    assert lines[4] == "rows per run and group: single 8, sparse 4"
    # The sparse page at 180 is wrong in both runs, so it leads the list.
    assert lines[6] == "  001_sparse_a.jpg 180: 2"
    assert sorted(lines[7:]) == ["  001_sparse_a.jpg 0: 1", "  002_single_a.jpg 90: 1"]


def test_refuses_a_pattern_without_capture_and_folders_without_csv(tmp_path):
    write_run(tmp_path / "a", wrong=[])
    done = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "a"), "--group", "sparse"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "needs one capture" in done.stderr
    done = subprocess.run([sys.executable, SCRIPT, str(tmp_path), "--group", "(x)"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no eval_holdout_images.csv" in done.stderr
