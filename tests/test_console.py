"""The commands as a person meets them: run as installed console scripts in a
subprocess, asserting on the lines they print and their exit codes."""
import ast
import os
import re
import subprocess
import sys

import pytest

from tests import helpers

BIN = os.path.dirname(sys.executable)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# TensorFlow's native log lines and absl's Python INFO lines share this shape:
# "I1130 10:31:36.59 ... file.py:156] ..." / "I0000 00:00:1796.. 15737 port.cc:153] ...".
LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] |absl::InitializeLog")


def command(name, *args, cwd=None):
    exe = os.path.join(BIN, name)
    assert os.path.exists(exe), f"{name} is not installed beside {sys.executable}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP")}
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=900)


def log_lines(proc):
    return [line for line in (proc.stdout + proc.stderr).splitlines() if LOG_LINE.search(line)]


@pytest.mark.parametrize("name", ["make_records", "inspect_records", "train", "evaluate",
                                  "orient", "make_demo_images"])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_exits_zero_with_docstring_and_flags(name, flag):
    proc = command(name, flag)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The tool's own docstring (read from its source: importing two tools would
    # define their flags twice in this process).
    with open(os.path.join(REPO, "tools", f"{name}.py")) as f:
        doc = ast.get_docstring(ast.parse(f.read()))
    assert proc.stdout.startswith(doc.splitlines()[0]), proc.stdout[:300]
    assert "Flags" in proc.stdout or "flags:" in proc.stdout
    assert log_lines(proc) == []


@pytest.mark.parametrize("name,args,error", [
    ("train", ["--resize=bogus"],
     "train: error: flag --resize=bogus: value should be one of <squash|pad|crop>"),
    ("train", ["--flagfile=/nonexistent/recipe.flags"],
     "train: error: Unable to open flagfile: [Errno 2] No such file or directory: "
     "'/nonexistent/recipe.flags'"),
    ("evaluate", [], "evaluate: error: --model and --records are required"),
    ("evaluate", ["--batch_size=0"],
     "evaluate: error: flag --batch_size=0: 0 is not a positive integer"),
    ("inspect_records", [], "inspect_records: error: give exactly one records folder: "
                            "inspect_records OUT"),
    ("orient", ["--model=runs/x"], "orient: error: give at least one image file or folder"),
    ("make_records", ["--nosuchflag"], "make_records: error: Unknown command line flag "
                                       "'nosuchflag'"),
])
def test_usage_error_is_one_line_then_usage_exit_two(name, args, error):
    proc = command(name, *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert lines[0] == error, lines
    assert len(lines) == 2 and lines[1].startswith(f"usage: {name} ") and "--help" in lines[1]
    assert proc.stdout == ""


def test_a_training_run_prints_no_tensorflow_or_absl_log_line(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for seed in range(24):
        helpers.write_image_file(str(src / f"img{seed:02d}.png"),
                                 helpers.distinct_image(seed, 40, 48), "png")
    records = tmp_path / "rec"
    made = command("make_records", "--src", src, "--out", records, "--workers", 1,
                   "--noprogress")
    assert made.returncode == 0, made.stderr[-2000:]
    seen = command("inspect_records", records)
    assert seen.returncode == 0 and log_lines(seen) == [], seen.stderr[-2000:]
    model_dir = tmp_path / "run"
    # demo.flags with its export (SavedModel + TFLite: the noisiest part), short.
    trained = command("train", f"--flagfile={REPO}/demo.flags", f"--records={records}",
                      f"--model_dir={model_dir}", "--image_size=32", "--stage1_epochs=1",
                      "--stage2_epochs=1", "--steps_per_epoch=1", "--batch_size=8",
                      cwd=REPO)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert log_lines(trained) == [], log_lines(trained)[:5]
    assert str(model_dir) in (trained.stdout + trained.stderr).strip().splitlines()[-1]
    # -v 1 brings the native start-up lines back.
    loud = command("inspect_records", "-v", "1", records)
    assert loud.returncode == 0 and log_lines(loud), loud.stderr[-2000:]
