"""The make_records and inspect_records commands: exit codes and messages."""
import json
import os
import subprocess
import sys

import pytest

from tests import helpers


def tool(name, *args, cwd=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", f"upright.tools.{name}", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def error_line(proc):
    """The last stderr line, after making sure no traceback was printed."""
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A folder 'photos' and the result of `make_records --src photos` run in its parent."""
    base = tmp_path_factory.mktemp("tool")
    src = base / "photos"
    src.mkdir()
    for seed in range(16):
        helpers.write_image_file(src / f"{seed}.jpg", helpers.distinct_image(seed, 30, 40))
    (src / "broken.jpg").write_text("not a jpeg")
    proc = tool("make_records", "--src", src, "--workers", 2, "--progress=false", cwd=base)
    return base, proc


def test_make_records_writes_the_default_out_and_a_summary(made):
    base, proc = made
    assert proc.returncode == 0, proc.stderr
    assert "wrote 16 images" in proc.stdout
    assert "skipped broken.jpg: not an image" in proc.stdout
    assert os.path.exists(base / "records" / "photos" / "info.json")
    info = json.loads((base / "records" / "photos" / "info.json").read_text())
    assert info["arguments"]["near_duplicate_threshold"] == 4.0
    assert info["near_duplicate_threshold"] == 4.0 and "largest group 1" in proc.stdout


def test_make_records_bad_arguments_exit_2_with_one_line(tmp_path):
    proc = tool("make_records", "--src", tmp_path / "nope")
    assert proc.returncode == 2
    expected = f"make_records: error: source folder {tmp_path / 'nope'} does not exist"
    assert error_line(proc) == expected
    proc = tool("make_records", "--src", tmp_path, "--out", tmp_path / "rec")
    assert proc.returncode == 2 and "inside the source folder" in error_line(proc)
    proc = tool("make_records", "--src", tmp_path, "--jpeg_quality", 0)
    assert proc.returncode == 2 and "jpeg_quality must be in [1, 100]" in error_line(proc)


def test_make_records_refusals_exit_1(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "readme.txt").write_text("hello")
    proc = tool("make_records", "--src", src, "--out", tmp_path / "out")
    assert proc.returncode == 1 and "no images could be read" in error_line(proc)
    for seed in range(4):
        helpers.write_image_file(src / f"{seed}.jpg", helpers.distinct_image(seed, 20, 20))
    (src / "zero.png").write_bytes(b"")
    proc = tool("make_records", "--src", src, "--out", tmp_path / "out", "--progress=false")
    assert proc.returncode == 1
    assert "skipped zero.png: zero bytes" in proc.stderr
    assert "1 of 5 image files (20%) were skipped" in error_line(proc)
    assert not os.path.exists(tmp_path / "out" / "info.json")


def test_corrupt_exif_is_a_counted_note_not_a_warning_on_stderr(tmp_path):
    """Pillow's 'Corrupt EXIF data' UserWarning (raised in the reader processes)
    used to reach stderr without a file name, through the progress bar."""
    src = tmp_path / "src"
    src.mkdir()
    for seed in range(3):
        helpers.write_image_file(src / f"{seed}.jpg", helpers.distinct_image(seed, 30, 40))
    picture = helpers.distinct_image(7, 30, 40)
    (src / "bad exif.jpg").write_bytes(helpers.with_corrupt_exif(helpers.encode(picture)))
    out = tmp_path / "out"
    proc = tool("make_records", "--src", src, "--out", out, "--workers", 2, "--progress=false")
    assert proc.returncode == 0, proc.stderr
    assert "EXIF" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    assert "wrote 4 images" in proc.stdout
    assert "corrupt EXIF data ignored in 1 (stored as their pixels show): bad exif.jpg" \
        in proc.stdout
    with open(out / "info.json") as f:
        info = json.load(f)
    assert info["counts"]["corrupt_exif_ignored"] == 1
    assert info["corrupt_exif_ignored"] == ["bad exif.jpg"]
    assert info["counts"]["stored"] == 4   # the image is still used


def test_make_records_help_explains():
    proc = tool("make_records", "--help")
    assert proc.returncode in (0, 1)   # absl's --help exits 1 after printing
    for text in ("make_records --src photos/", "--max_side", "--val_fraction", "--[no]overwrite",
                 "--max_skipped_fraction", "--workers", "--jpeg_quality",
                 "--near_duplicate_threshold"):
        assert text in proc.stdout


def test_inspect_records_good_then_corrupted(made, tmp_path):
    base, _ = made
    out = base / "records" / "photos"
    sheet = tmp_path / "sheet.png"
    proc = tool("inspect_records", out, f"--contact_sheet={sheet}", "--contact_sheet_images=2")
    assert proc.returncode == 0, proc.stderr
    assert "OK: every record" in proc.stdout and sheet.exists()
    shard = next(p for p in sorted(os.listdir(out)) if p.startswith("train.tfrecord"))
    data = (out / shard).read_bytes()
    (out / shard).write_bytes(data[:len(data) - 50])
    proc = tool("inspect_records", out)
    assert proc.returncode == 1
    line = error_line(proc)
    assert line.startswith("inspect_records: error:") and shard in line and "damaged" in line
    proc = tool("inspect_records", tmp_path / "nothing")
    assert proc.returncode == 1 and "does not exist" in error_line(proc)
