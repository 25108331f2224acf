"""The commands as a person meets them: run as installed console scripts in a
subprocess, asserting on the lines they print and their exit codes."""
import ast
import os
import re
import subprocess
import sys

import pytest

from tests import helpers
from upright import tools

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
     "train: error: cannot open flagfile '/nonexistent/recipe.flags': no such file, and no "
     "shipped recipe of that name (b0, b1, base, cpu, demo, documents, lite0, photos_cpu)"),
    ("evaluate", [], "evaluate: error: --model and --records are required"),
    ("evaluate", ["--batch_size=0"],
     "evaluate: error: flag --batch_size=0: 0 is not a positive integer"),
    ("inspect_records", [], "inspect_records: error: give exactly one records folder: "
                            "inspect_records OUT"),
    ("orient", ["--model=runs/x"], "orient: error: give at least one image file or folder"),
    ("make_records", ["--nosuchflag"], "make_records: error: Unknown command line flag "
                                       "'nosuchflag'"),
    ("make_records", [], "make_records: error: --src is required"),
])
def test_usage_error_is_one_line_then_usage_exit_two(name, args, error):
    proc = command(name, *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert lines[0] == error, lines
    assert len(lines) == 2 and lines[1].startswith(f"usage: {name} ") and "--help" in lines[1]
    assert "#" not in lines[1]   # the docstring example's comment stays in the docstring
    assert proc.stdout == ""


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Records of 24 distinct tiny images, made by the make_records command."""
    base = tmp_path_factory.mktemp("console")
    src = base / "src"
    src.mkdir()
    for seed in range(24):
        helpers.write_image_file(str(src / f"img{seed:02d}.png"),
                                 helpers.distinct_image(seed, 40, 48), "png")
    made = command("make_records", "--src", src, "--out", base / "rec", "--workers", 1,
                   "--noprogress")
    assert made.returncode == 0, made.stderr[-2000:]
    return base / "rec"


def test_a_training_run_prints_no_tensorflow_or_absl_log_line(records, tmp_path):
    seen = command("inspect_records", records)
    assert seen.returncode == 0 and log_lines(seen) == [], seen.stderr[-2000:]
    model_dir = tmp_path / "run"
    # demo.flags with its export (SavedModel + TFLite: the noisiest part), short.
    # From a folder without recipes: demo.flags is the shipped one.
    trained = command("train", "--flagfile=demo.flags", f"--records={records}",
                      f"--model_dir={model_dir}", "--image_size=32", "--stage1_epochs=1",
                      "--stage2_epochs=1", "--steps_per_epoch=1", "--batch_size=8",
                      cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert log_lines(trained) == [], log_lines(trained)[:5]
    last = (trained.stdout + trained.stderr).strip().splitlines()[-1]
    assert last == (f"[train] model in {model_dir}; next: evaluate --model {model_dir} "
                    f"--records {records}")
    again = command("train", "--flagfile=demo.flags", f"--records={records}",
                    f"--model_dir={model_dir}", "--image_size=32", "--stage1_epochs=1",
                    "--stage2_epochs=1", "--steps_per_epoch=1", "--batch_size=8",
                    cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.startswith("[train] already complete: "), \
        again.stdout
    # -v 1 brings the native start-up lines back.
    loud = command("inspect_records", "-v", "1", records)
    assert loud.returncode == 0 and log_lines(loud), loud.stderr[-2000:]


def test_nested_flagfiles_resolve_relative_to_the_file_that_names_them(tmp_path):
    recipes = tmp_path / "elsewhere" / "recipes"
    recipes.mkdir(parents=True)
    (recipes / "base.flags").write_text("# shared\n--image_size=48\n--head=linear\n")
    (recipes / "mine.flags").write_text("--flagfile=base.flags\n// a comment\n\n"
                                        "--image_size=40\n")
    (tmp_path / "base.flags").write_text("--image_size=99\n")   # in the cwd: not used
    argv = tools.expand_flagfiles(["train", f"--flagfile={recipes / 'mine.flags'}",
                                   "--seed=3", "--flagfile", "b0.flags"])
    b0 = tools.expand_flagfiles(["train", f"--flagfile={tools.recipes_dir()}/b0.flags"])
    assert argv == ["train", "--image_size=48", "--head=linear", "--image_size=40",
                    "--seed=3", *b0[1:]]
    # b0.flags includes b1.flags, which includes base.flags: all shipped files.
    assert "--backbone=efficientnetb0" in b0 and "--backbone=efficientnetb1" in b0
    assert "--batch_size=32" in b0
    (recipes / "loop.flags").write_text("--flagfile=loop.flags\n")
    with pytest.raises(tools.FlagfileError, match="includes itself"):
        tools.expand_flagfiles(["train", f"--flagfile={recipes / 'loop.flags'}"])


def test_train_help_lists_the_shipped_recipes():
    proc = command("train", "--help")
    for name in tools.recipe_names():
        assert re.search(rf"^  {name}\.flags +\S", proc.stdout, re.M), name


def test_chance_warning_says_when_a_model_guesses():
    from upright.pipeline import evaluation
    # 400 examples: guessing is 0.25 +- 2 x 0.0217.
    assert "within chance (0.25 +- 0.043)" in evaluation.chance_warning(0.29, 400, 1.0)
    assert evaluation.chance_warning(0.30, 400, 1.0) is None
    assert evaluation.chance_warning(0.60, 40, 1.0) is None
    assert "within chance" in evaluation.chance_warning(0.35, 40, 1.0)
    for edge in (0.05, 20.0):
        assert "end of its range" in evaluation.chance_warning(0.9, 400, edge)
    # Every val example right: the fit sharpens to the low end, nothing is wrong.
    assert evaluation.chance_warning(1.0, 716, 0.05) is None
    assert "end of its range" in evaluation.chance_warning(1.0, 716, 20.0)


def test_orient_says_where_copies_went_and_fails_when_nothing_was_read(tmp_path):
    import numpy as np
    size = 16
    model_dir = helpers.write_model_dir(str(tmp_path / "model"), helpers.corner_model(size), size)
    src = tmp_path / "src"
    src.mkdir()
    helpers.write_image_file(str(src / "a.png"),
                             np.rot90(helpers.quadrant_marker_image(4, 32), 3).copy(), "png")
    fixed = command("orient", "--model", model_dir, src, "--fix", "--dst", tmp_path / "out")
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert fixed.stdout.strip().splitlines()[-1] == f"upright copies in {tmp_path / 'out'}"
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = command("orient", "--model", model_dir, empty)
    assert nothing.returncode == 1
    assert nothing.stderr.splitlines() == [f"orient: error: no image files in {empty}"]
    (empty / "x.jpg").write_bytes(b"not an image")
    unreadable = command("orient", "--model", model_dir, empty)
    assert unreadable.returncode == 1
    assert unreadable.stderr.splitlines() == [
        "orient: error: none of the 1 files could be read (errors above)"]
    assert "not an image" in unreadable.stdout


def _on_a_terminal(args, cwd):
    """Runs a console command with a pseudo-terminal as stdout and stderr; returns
    (exit code, everything it printed)."""
    import pty
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP")}
    proc = subprocess.Popen([os.path.join(BIN, args[0]), *map(str, args[1:])], stdout=slave,
                            stderr=slave, stdin=subprocess.DEVNULL, cwd=cwd, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:   # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=900), b"".join(chunks).decode("utf-8", "replace")


def test_training_progress_per_step_on_a_terminal_per_epoch_otherwise(records, tmp_path):
    args = ["train", "--flagfile=demo.flags", f"--records={records}", "--image_size=32",
            "--stage1_epochs=1", "--stage2_epochs=0", "--steps_per_epoch=3", "--batch_size=4",
            "--noexport"]
    code, shown = _on_a_terminal([*args, f"--model_dir={tmp_path / 'tty'}"], tmp_path)
    assert code == 0, shown[-3000:]
    # Keras' progress bar, redrawn during the epoch (it may skip a redraw within
    # 50 ms), each with the time left.
    bars = re.findall(r"([123])/3\S* \S*\u2501+", shown)
    assert len(bars) >= 2 and bars[0] != "3" and bars[-1] == "3", (bars, shown[-2000:])
    assert "[train] stage 1: epochs 1..1 of 1," in shown
    piped = command(*args, f"--model_dir={tmp_path / 'pipe'}", cwd=tmp_path)
    assert piped.returncode == 0
    epoch_lines = [line for line in piped.stdout.splitlines() if line.startswith("3/3 - ")]
    assert len(epoch_lines) == 1 and "\u2501" not in piped.stdout, piped.stdout
    assert "stage:" not in piped.stdout   # the stage is no metric
