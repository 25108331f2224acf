"""Attacks by planted links (issue 16, items 1-4): entries placed in the folders
the tools write into, as someone who filled those folders would, never on the
command line. Each test runs the real tool path and checks that the victim
outside is untouched and the tool either succeeded safely or said one line."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from upright.pipeline import evaluation, orient, records, records_inspect, serve
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VICTIM_BYTES = b"someone else's file\n"
S = 16


def victim_file(tmp_path, name="victim.txt"):
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    victim = outside / name
    victim.write_bytes(VICTIM_BYTES)
    return victim


def victim_dir(tmp_path):
    """A folder outside with files in it; returns (folder, its listing)."""
    folder = tmp_path / "victim_dir"
    (folder / "inner").mkdir(parents=True)
    (folder / "keep.txt").write_bytes(b"keep")
    (folder / "inner" / "deep.txt").write_bytes(b"deep")
    return folder, helpers.listing(folder)





def one_clear_line(stderr):
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    return lines[0]


# ---------------------------------------------------------------- make_records


def image_folder(src, count=6):
    src.mkdir()
    for i in range(count):
        helpers.write_image_file(str(src / f"img{i}.jpg"), helpers.distinct_image(i, 40, 56))


def make(src, out):
    return records.make_records(src=str(src), out=str(out), workers=1, progress=False,
                                val_fraction=0.5)


def test_make_records_staging_link_empties_nothing(tmp_path):
    """1: OUT/.make_records.new -> a folder: only the link is removed (rm -rf's rule)."""
    src = tmp_path / "src"
    image_folder(src)
    target, before = victim_dir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(target, out / records.STAGING_DIR)
    info = make(src, out)
    assert info["counts"]["stored"] == 6
    assert helpers.listing(target) == before
    assert not os.path.lexists(out / records.STAGING_DIR)
    records_inspect.inspect_records(str(out))


@pytest.mark.parametrize("name", [records.SCRATCH_FILE, records.LOCK_FILE])
def test_make_records_scratch_and_lock_links_are_replaced_not_written_through(tmp_path, name):
    """2: OUT/.make_records.scratch or .lock -> a file: the link is removed, the
    run uses its own new file, the victim keeps its bytes."""
    src = tmp_path / "src"
    image_folder(src)
    victim = victim_file(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(victim, out / name)
    info = make(src, out)
    assert info["counts"]["stored"] == 6
    assert victim.read_bytes() == VICTIM_BYTES
    # Neither the scratch file nor the lock outlives the run.
    assert not os.path.lexists(out / records.SCRATCH_FILE)
    assert not os.path.lexists(out / records.LOCK_FILE)
    records_inspect.inspect_records(str(out))


def test_a_refused_make_records_leaves_no_lock_but_never_removes_a_live_one(tmp_path):
    import fcntl
    empty, out = tmp_path / "empty", tmp_path / "out"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(records.MakeRecordsError) as caught:
        make(empty, out)
    assert caught.value.refused
    assert os.listdir(out) == []                          # refused: nothing left
    # A lock another live run holds is its file: a refused run leaves it alone.
    src = tmp_path / "src"
    image_folder(src)
    fd = os.open(out / records.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(records.MakeRecordsError, match="another make_records run"):
            make(src, out)
        assert os.path.exists(out / records.LOCK_FILE)
        assert os.fstat(fd).st_ino == os.stat(out / records.LOCK_FILE).st_ino
    finally:
        os.close(fd)


# ---------------------------------------------------------------- orient --fix


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return helpers.write_model_dir(str(tmp_path_factory.mktemp("model")),
                                   helpers.corner_model(S), S)


@pytest.fixture(scope="module")
def predictor(model_dir):
    return serve.load_model_dir(model_dir)


def turned_folder(src, rels):
    """Images turned 90 degrees (the stub model is sure: --fix writes them all)."""
    for seed, rel in enumerate(rels):
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image = np.ascontiguousarray(np.rot90(helpers.quadrant_marker_image(seed, 32), 1))
        helpers.write_image_file(str(path), image, "png")


def fix_config(model_dir, src, dst):
    return orient.OrientConfig(model_dir=model_dir, paths=(str(src),), fix=True, dst=str(dst),
                               progress=False, min_confidence=0.3)


def test_orient_fix_never_writes_through_a_subfolder_link_or_a_planted_temp_name(
        tmp_path, model_dir, predictor):
    """3: DST/sub -> a folder outside, and links at the old predictable temporary
    names DST/.orient-<pid>.tmp (for every pid): the copy for sub/ is refused
    (one error row), every other copy lands as a regular file, victims untouched."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    turned_folder(src, ["top.png", "sub/inner.png", "other/x.png"])
    target, before = victim_dir(tmp_path)
    victim = victim_file(tmp_path)
    dst.mkdir()
    os.symlink(target, dst / "sub")
    for folder in (dst, dst / "other"):
        folder.mkdir(exist_ok=True)
        for pid in range(1, 32769):
            os.symlink(victim, folder / f".orient-{pid}.tmp")
    result = orient.run(fix_config(model_dir, src, dst), predictor=predictor)
    rows = {os.path.relpath(r["path"], src): r for r in result["rows"]}
    assert rows["sub/inner.png"]["status"] == "error"
    assert "symbolic link" in rows["sub/inner.png"]["message"]
    assert "\n" not in rows["sub/inner.png"]["message"]
    for rel in ("top.png", "other/x.png"):
        assert rows[rel]["status"] == "ok", rows[rel]
        assert helpers.is_regular(dst / rel)
        with Image.open(dst / rel) as im:   # upright: the marker is back top-left
            assert np.array_equal(np.asarray(im.convert("RGB")),
                                  helpers.quadrant_marker_image(
                                      ["top.png", "sub/inner.png", "other/x.png"].index(rel), 32))
    assert helpers.listing(target) == before
    assert victim.read_bytes() == VICTIM_BYTES


def test_orient_fix_refuses_a_manifest_link_with_one_line(tmp_path, model_dir, predictor):
    """3: DST/.orient_done.jsonl -> a file: refused before anything is written."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    turned_folder(src, ["a.png"])
    victim = victim_file(tmp_path)
    dst.mkdir()
    os.symlink(victim, dst / orient.MANIFEST)
    with pytest.raises(orient.OrientError, match="link or not a regular file"):
        orient.run(fix_config(model_dir, src, dst), predictor=predictor)
    assert sorted(os.listdir(dst)) == [orient.MANIFEST]
    # The console command: exit 2, one line, no traceback.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "upright.tools.orient", "--model", model_dir,
                           "--fix", "--dst", str(dst), str(src)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    line = one_clear_line(proc.stderr)
    assert line.startswith("orient: error: ") and orient.MANIFEST in line
    assert victim.read_bytes() == VICTIM_BYTES
    assert sorted(os.listdir(dst)) == [orient.MANIFEST]


# ---------------------------------------------------------------- evaluate


def test_evaluate_replaces_links_planted_in_the_model_folder(tmp_path):
    """4: M/eval_val_confusion.png, M/eval_val.json.tmp, M/eval_val_images.csv.tmp
    (and the result names themselves) -> files outside: replaced, never written."""
    recs = str(tmp_path / "records")
    helpers.write_records(recs, {"train": [helpers.quadrant_marker_image(9)],
                                 "val": [helpers.quadrant_marker_image(i) for i in range(3)]})
    model = helpers.write_model_dir(str(tmp_path / "model"), helpers.corner_model(S), S)
    planted = ["eval_val_confusion.png", "eval_val.json.tmp", "eval_val_images.csv.tmp",
               "eval_val.json", "eval_val_images.csv", "eval_val_reliability.png"]
    victims = {name: victim_file(tmp_path, f"victim{i}") for i, name in enumerate(planted)}
    for name, victim in victims.items():
        os.symlink(victim, os.path.join(model, name))
    result = evaluation.evaluate(model, recs, split="val", batch_size=4, plots=True)
    assert result["num_examples"] == 12
    for victim in victims.values():
        assert victim.read_bytes() == VICTIM_BYTES
    for name in ("eval_val_confusion.png", "eval_val.json", "eval_val_images.csv",
                 "eval_val_reliability.png"):
        assert helpers.is_regular(os.path.join(model, name)), name
    with Image.open(os.path.join(model, "eval_val_confusion.png")) as im:
        assert im.format == "PNG"
    # The old fixed temporary names are not used: those links are left as they were.
    assert os.path.islink(os.path.join(model, "eval_val.json.tmp"))


# ---------------------------------------------------------------- records folders (9, 10, 6, 8)


def run_tool(tool, *args, timeout=300):
    """A console tool in a fresh process; a timeout only a hang reaches."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", f"upright.tools.{tool}", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def small_records(tmp_path_factory):
    recs = str(tmp_path_factory.mktemp("records") / "recs")
    helpers.write_records(recs, {"train": [helpers.quadrant_marker_image(i) for i in range(3)],
                                 "val": [helpers.quadrant_marker_image(i) for i in range(3, 5)]})
    return recs


def records_copy(small_records, tmp_path):
    import shutil
    out = tmp_path / "recs"
    shutil.copytree(small_records, out)
    return out


def edit_info(out, change):
    import json
    info = json.loads((out / "info.json").read_text())
    info = change(info) or info
    (out / "info.json").write_text(json.dumps(info))


@pytest.mark.parametrize("escape", ["../../outside/x.tfrecord", "ABSOLUTE"])
def test_shard_names_that_leave_the_records_folder_are_refused(small_records, tmp_path,
                                                               escape):
    """9: info.json lists '../../x.tfrecord' or an absolute path, pointing at a
    valid shard outside: refused by name before anything is read."""
    out = records_copy(small_records, tmp_path)
    (tmp_path / "outside").mkdir()
    foreign = tmp_path / "outside" / "x.tfrecord"
    foreign.write_bytes((out / "val.tfrecord-00000-of-00001").read_bytes())
    name = str(foreign) if escape == "ABSOLUTE" else escape

    def change(info):
        info["splits"]["val"]["shards"] = [name]
    edit_info(out, change)
    with pytest.raises(records.recordio.RecordsError, match="shard name .* is not 'val.tfrecord"):
        records_inspect.inspect_records(str(out))
    with pytest.raises(records.recordio.RecordsError, match="shard name"):
        evaluation.evaluate(helpers.write_model_dir(str(tmp_path / "m"), helpers.corner_model(S),
                                                    S), str(out), split="val", plots=False)
    proc = run_tool("inspect_records", str(out))
    assert proc.returncode == 1
    assert one_clear_line(proc.stderr).startswith("inspect_records: error: ")


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("text", [
    "[]", '"info"', DEEP, "{\"schema_version\": true}",
    '{"schema_version": 1, "convention": [], "splits": {}}',
    "\xff\xfe not json",
])
def test_info_json_of_wrong_types_gives_one_line(small_records, tmp_path, text):
    """10: info.json that is not an object, of wrong types, or nested 100,000 deep."""
    out = records_copy(small_records, tmp_path)
    (out / "info.json").write_bytes(text.encode("latin-1") if text.startswith("\xff")
                                    else text.encode())
    with pytest.raises(records.recordio.RecordsError):
        records.recordio.load_info(str(out))


@pytest.mark.parametrize("field, value", [
    ("splits", []), ("val", "x"), ("shards", "val.tfrecord-00000-of-00001"),
    ("num_examples", "2"), ("num_examples", 10**12), ("num_examples", -1),
    ("shard_examples", [2.0]), ("shard_bytes", [None, 3]), ("shards", [7]),
])
def test_info_json_fields_of_wrong_types_or_counts_are_refused(small_records, tmp_path,
                                                                field, value):
    """10 and 8: fields of the wrong type, and a num_examples the shards do not hold
    (10**12 would plan billions of steps), each one RecordsError line."""
    out = records_copy(small_records, tmp_path)

    def change(info):
        if field == "splits":
            info["splits"] = value
        elif field == "val":
            info["splits"]["val"] = value
        else:
            info["splits"]["val"][field] = value
    edit_info(out, change)
    with pytest.raises(records.recordio.RecordsError) as caught:
        records.recordio.load_info(str(out))
    assert "\n" not in str(caught.value)
    proc = run_tool("inspect_records", str(out)) if field == "num_examples" and \
        value == 10**12 else None
    if proc is not None:
        assert proc.returncode == 1
        assert "num_examples" in one_clear_line(proc.stderr)


def test_a_huge_record_length_with_a_valid_crc_is_refused_before_tensorflow_reads(
        small_records, tmp_path):
    """6: a record whose length field says 2**40 with a correct length CRC (TensorFlow's
    reader crashes on it): the framing check refuses it, in a fresh process, one line."""
    import struct
    out = records_copy(small_records, tmp_path)
    shard = out / "val.tfrecord-00000-of-00001"
    data = bytearray(shard.read_bytes())
    length = struct.pack("<Q", 2**40)
    data[:12] = length + struct.pack("<I", records.recordio.masked_crc32c(length))
    shard.write_bytes(bytes(data))
    with pytest.raises(records.recordio.RecordsError, match="record 0 is damaged.*length field"):
        records.recordio.load_info(str(out))
    for tool, args in (("inspect_records", [str(out)]),
                       ("evaluate", ["--model", helpers.write_model_dir(
                           str(tmp_path / "m"), helpers.corner_model(S), S),
                           "--records", str(out), "--split", "val"])):
        proc = run_tool(tool, *args)
        assert proc.returncode in (1, 2), (tool, proc.returncode, proc.stderr[-2000:])  # no signal
        assert "record 0 is damaged" in one_clear_line(proc.stderr)


def test_the_crc_matches_tensorflows_own_framing(small_records):
    import struct
    data = open(os.path.join(small_records, "train.tfrecord-00000-of-00001"), "rb").read()
    length_bytes = data[:8]
    assert struct.unpack("<I", data[8:12])[0] == records.recordio.masked_crc32c(length_bytes)
    (length,) = struct.unpack("<Q", length_bytes)
    body_crc = struct.unpack("<I", data[12 + length:16 + length])[0]
    assert body_crc == records.recordio.masked_crc32c(data[12:12 + length])


def test_a_fifo_given_as_a_shard_never_hangs(small_records, tmp_path):
    """6: the shard replaced by a FIFO nobody writes: refused at once, one line."""
    out = records_copy(small_records, tmp_path)
    shard = out / "train.tfrecord-00000-of-00001"
    shard.unlink()
    os.mkfifo(shard)
    with pytest.raises(records.recordio.RecordsError, match="not a regular file"):
        records.recordio.load_info(str(out))
    proc = run_tool("inspect_records", str(out))
    assert proc.returncode == 1
    assert "a FIFO" in one_clear_line(proc.stderr)


# ---------------------------------------------------------------- tracebacks (10)


def nested_folders(top, depth):
    """A chain of `depth` nested folders with an image at the bottom, built with
    a descriptor per level (the full path is far beyond PATH_MAX). The caller
    removes it with remove_nested in a `finally`: left behind, it would break
    the recursive clean-up of every later pytest run on the machine."""
    top.mkdir(parents=True, exist_ok=True)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        with open(os.open("deep.jpg", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
            f.write(b"\xff\xd8 not really")
    finally:
        os.close(fd)


def remove_nested(top):
    """Removes the chain level by level (shutil.rmtree, and so pytest's own clean-up,
    recurses once per level): the child is moved up beside it, then it is removed."""
    names = [top.parent / ".peel_a", top.parent / ".peel_b"]
    current, turn = top, 0
    while True:
        for entry in os.listdir(current):
            if entry != "d":
                os.unlink(current / entry)
        if not os.path.exists(current / "d"):
            os.rmdir(current)
            return
        os.rename(current / "d", names[turn])
        os.rmdir(current)
        current, turn = names[turn], 1 - turn


def test_ten_thousand_nested_folders_are_skipped_with_a_reason(tmp_path, model_dir,
                                                               predictor):
    """10: make_records and orient walk a chain deeper than Python's recursion
    limit (the issue's 10,000 behaves the same: nothing past the depth limit is
    opened): no RecursionError, the folder past the limit is reported, the real
    images are read."""
    src = tmp_path / "src"
    image_folder(src)
    nested_folders(src / "chain", sys.getrecursionlimit() + 500)
    try:
        info = records.make_records(src=str(src), out=str(tmp_path / "out"), workers=1,
                                    progress=False, val_fraction=0.5, max_skipped_fraction=0.5)
        assert info["counts"]["stored"] == 6
        reasons = [s["reason"] for s in info["skipped"]]
        assert any("nested deeper than" in r for r in reasons), reasons
        result = orient.run(orient.OrientConfig(model_dir=model_dir, paths=(str(src),),
                                                progress=False), predictor=predictor)
        errors = [r for r in result["rows"] if r["status"] == "error"]
        assert len(errors) == 1 and "nested deeper than" in errors[0]["message"]
        assert sum(r["status"] == "ok" for r in result["rows"]) == 6
    finally:
        remove_nested(src / "chain")


@pytest.mark.parametrize("text", [
    "[]", "[" * 100_000 + "]" * 100_000,
    '{"convention": "x", "image_size": 16}',
    '{"image_size": "16"}', '{"image_size": 10000000}', '{"resize": 3}',
    '{"temperature": 0}', '{"temperature": -1}', '{"temperature": "1"}',
    '{"temperature": NaN}',
])
def test_model_info_of_wrong_types_gives_one_line(tmp_path, text):
    """10: model_info.json that is not an object, nested 100,000 deep, or whose
    fields have the wrong type or range (temperature 0 divides by zero later)."""
    import json
    model = helpers.write_model_dir(str(tmp_path / "m"), helpers.corner_model(S), S)
    info_path = os.path.join(model, "model_info.json")
    if text.startswith("{"):
        good = json.load(open(info_path))
        good.update(json.loads(text))
        text = json.dumps(good)
    with open(info_path, "w") as f:
        f.write(text)
    with pytest.raises(serve.ModelDirError) as caught:
        serve.load_model_dir(model)
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------- terminal injection (11)

EVIL_NAMES = ["\x1b[2J\x1b[Hcleared.jpg", "two\nlines.jpg", "bell\x07\r.jpg", "\u202eevil.jpg"]


def no_control_characters(text):
    import unicodedata
    for line in text.splitlines():
        assert not any(unicodedata.category(c) in ("Cc", "Cf") for c in line), repr(line)


def test_names_with_escapes_and_newlines_are_printed_escaped(tmp_path, model_dir, predictor):
    """11: file names holding an ANSI clear-screen, a newline, a bell and carriage
    return, a right-to-left override: make_records' skipped list and orient's table
    and summary print them escaped, one line per file."""
    src = tmp_path / "src"
    image_folder(src)
    for name in EVIL_NAMES:
        (src / name).write_bytes(b"\xff\xd8 not an image")   # skipped, with its name shown
    info = records.make_records(src=str(src), out=str(tmp_path / "out"), workers=1,
                                progress=False, val_fraction=0.5, max_skipped_fraction=0.9)
    text = records.format_summary(info)
    no_control_characters(text)
    assert "\\x1b[2J" in text and "two\\nlines.jpg" in text
    result = orient.run(orient.OrientConfig(model_dir=model_dir, paths=(str(src),),
                                            progress=False), predictor=predictor)
    table = orient.format_table(result["rows"], width=200)
    no_control_characters(table)
    assert len(table.splitlines()) == len(result["rows"]) + 1
    assert "two\\nlines.jpg" in table and "\\u202eevil.jpg" in table
    no_control_characters(orient.format_summary(result["summary"]))


def test_show_keeps_printable_names_and_escapes_the_rest():
    from upright.pipeline import fileio
    assert fileio.show("photos/été 2024/日本.jpg") == "photos/été 2024/日本.jpg"
    assert fileio.show(b"caf\xe9.jpg") == "caf\\xe9.jpg"       # not UTF-8
    assert fileio.show("a\x1b[31mb\n") == "a\\x1b[31mb\\n"
    assert fileio.show(3) == 3


# ---------------------------------------------------------------- unbounded reads (7)


def test_orient_skips_a_fifo_and_a_link_to_dev_zero_in_src(tmp_path, model_dir):
    """7: SRC/z.jpg -> /dev/zero (endless) and SRC/f.jpg a FIFO nobody writes
    (blocks an open forever): the real command ends, both rows say why."""
    src = tmp_path / "src"
    turned_folder(src, ["a.png"])
    os.symlink("/dev/zero", src / "z.jpg")
    os.mkfifo(src / "f.jpg")
    import json
    report = tmp_path / "report.json"
    proc = run_tool("orient", "--model", model_dir, f"--report={report}", str(src))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {os.path.basename(r["path"]): r for r in json.loads(report.read_text())["rows"]}
    assert rows["f.jpg"]["message"] == "unreadable: not a regular file (a FIFO)"
    assert rows["z.jpg"]["message"] == "unreadable: not a regular file (a character device)"
    assert rows["a.png"]["status"] == "ok"
    assert "Traceback" not in proc.stderr


def test_make_records_reader_never_blocks_on_a_file_swapped_after_the_walk(tmp_path):
    """7: the walk saw regular files; before the reader opens them they become a
    FIFO, a link to /dev/zero and a link to a FIFO (read_one is what the worker
    processes run per file): each is skipped with a reason, in a fresh process."""
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "fifo.jpg")
    os.mkfifo(tmp_path / "outside_fifo")
    os.symlink("/dev/zero", src / "zero.jpg")
    os.symlink(tmp_path / "outside_fifo", src / "link.png")
    os.mkfifo(src / "noext")
    code = ("import sys; from upright.pipeline import records as r\n"
            "for rel in (b'fifo.jpg', b'zero.jpg', b'link.png', b'noext'):\n"
            "    res = r.read_one(rel, src_b=sys.argv[1].encode(), options=r.ReadOptions())\n"
            "    print(rel.decode(), res.status, res.reason)\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", code, str(src)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert out["fifo.jpg"] == "skipped unreadable: not a regular file (a FIFO)"
    assert out["zero.jpg"] == "skipped unreadable: not a regular file (a character device)"
    assert out["link.png"] == "skipped unreadable: not a regular file (a FIFO)"
    assert out["noext"].startswith("ignored ")


def test_read_bytes_reads_at_most_the_cap(tmp_path, monkeypatch):
    from upright.pipeline import imageio
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff\xd8" + b"\0" * 1000)
    monkeypatch.setattr(imageio, "MAX_FILE_BYTES", 100)
    with pytest.raises(imageio.SkipImage, match="too large: 1002 bytes > 100"):
        imageio.read_bytes(str(big))


# ---------------------------------------------------------------- code in a model folder (5)


def crafted_saved_model(folder, kind, marker, private):
    """A model folder without model.keras whose export/ runs `kind` when its
    signatures (or, for the loader, its functions) are called: tf.io.write_file
    of `marker`, tf.io.read_file of `private` copied into `marker`, or a
    Python function (PyFunc) that writes `marker`."""
    import tensorflow as tf

    class Evil(tf.Module):
        def __init__(self):
            super().__init__()
            self.v = tf.Variable(1.0)

        @tf.function(input_signature=[])
        def convention(self):
            if kind == "write_file":
                tf.io.write_file(str(marker), "written at load time")
            elif kind == "read_file":
                tf.io.write_file(str(marker), tf.io.read_file(str(private)))
            else:
                tf.numpy_function(lambda: open(str(marker), "w").write("python") and 0.0,
                                  [], tf.float64)
            return {"convention_json": tf.constant("{}")}

        @tf.function(input_signature=[tf.TensorSpec([None, S, S, 3], tf.float32)])
        def predict_images(self, images):
            return {"probabilities": tf.nn.softmax(tf.reduce_mean(images, [1, 2, 3])[:, None]
                                                   * tf.ones([4]) * self.v)}

    module = Evil()
    export = os.path.join(folder, "export")
    tf.saved_model.save(module, export, signatures={"convention": module.convention,
                                                    "predict_images": module.predict_images})
    import json
    with open(os.path.join(folder, "model_info.json"), "w") as f:
        json.dump({"image_size": S, "resize": "squash", "convention": schema_convention()}, f)
    return folder


def schema_convention():
    from upright.pipeline import schema
    return schema.convention()


@pytest.mark.parametrize("kind, op", [("write_file", "WriteFile"), ("read_file", "ReadFile"),
                                      ("py_func", "PyFunc")])
def test_a_saved_model_with_file_or_python_ops_is_refused_before_loading(tmp_path, kind, op):
    """5: a model folder with export/saved_model.pb (no model.keras) whose functions
    write a file, copy a private file, or run Python: refused by the op scan,
    before TensorFlow loads it; the marker is never written. Orient says one line."""
    private = victim_file(tmp_path, "private.txt")
    marker = tmp_path / "outside" / "marker.txt"
    model = crafted_saved_model(str(tmp_path / "model"), kind, marker, private)
    with pytest.raises(serve.ModelDirError, match=f"refusing to load SavedModel .*'{op}"):
        serve.load_model_dir(model)
    assert not marker.exists()
    src = tmp_path / "src"
    turned_folder(src, ["a.png"])
    proc = run_tool("orient", "--model", model, str(src))
    assert proc.returncode == 2
    line = one_clear_line(proc.stderr)
    assert line.startswith("orient: error: refusing to load SavedModel") and "--trust_model" in line
    assert not marker.exists()
    assert private.read_bytes() == VICTIM_BYTES
    if kind == "write_file":    # --trust_model bypasses the scan: the user's explicit choice
        proc = run_tool("orient", "--model", model, "--trust_model", str(src))
        assert marker.exists() and proc.returncode == 2
        one_clear_line(proc.stderr)


def test_the_projects_own_exports_pass_the_op_scan(tmp_path):
    """5: real exports (the tiny backbone through export_saved_model, every resize,
    a temperature) pass the scan and load with their info from assets, no signature called."""
    from upright.pipeline import model as model_lib
    for resize in ("squash", "pad"):
        net = model_lib.build_model(backbone="tiny", image_size=S, weights=None)
        export = serve.export_saved_model(net, str(tmp_path / resize), image_size=S,
                                          resize=resize, temperature=1.5)
        serve.check_saved_model_ops(export)
        loaded = serve.load_model_dir(export)
        assert (loaded.image_size, loaded.resize, loaded.info["temperature"]) == (S, resize, 1.5)
        probs = loaded.predict_images(np.zeros([2, S, S, 3], np.float32))
        assert probs.shape == (2, 4)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["efficientnetb0", "mobilenetv3small", "resnet50"])
def test_every_backbone_family_export_passes_the_op_scan(tmp_path, backbone):
    from upright.pipeline import model as model_lib
    net = model_lib.build_model(backbone=backbone, image_size=32, weights=None)
    serve.check_saved_model_ops(serve.export_saved_model(net, str(tmp_path / "e"),
                                                         image_size=32, temperature=2.0))


# ---------------------------------------------------------------- two runs, one DST (12)


def test_a_second_orient_run_never_overwrites_another_runs_copy(tmp_path, model_dir, predictor):
    """12: runs from two source folders with the same relative name into one DST:
    the second refuses that file with a reason, the first copy stays; a file
    orient did not write is left alone too; the first source's rerun still works."""
    first, second, dst = tmp_path / "first", tmp_path / "second", tmp_path / "dst"
    turned_folder(first, ["same.png"])
    turned_folder(second, ["same.png", "mine.png"])
    with Image.open(second / "same.png") as im:        # make the second one differ
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(second / "same.png")
    result = orient.run(fix_config(model_dir, first, dst), predictor=predictor)
    assert result["rows"][0]["status"] == "ok"
    copy = (dst / "same.png").read_bytes()
    (dst / "mine.png").write_bytes(b"the user's own file")
    result = orient.run(fix_config(model_dir, second, dst), predictor=predictor)
    rows = {os.path.basename(r["path"]): r for r in result["rows"]}
    assert rows["same.png"]["status"] == "error"
    assert "written by an earlier run for" in rows["same.png"]["message"]
    assert "not overwritten" in rows["same.png"]["message"]
    assert "not written by orient" in rows["mine.png"]["message"]
    assert (dst / "same.png").read_bytes() == copy
    assert (dst / "mine.png").read_bytes() == b"the user's own file"
    again = orient.run(fix_config(model_dir, first, dst), predictor=predictor)
    assert again["rows"][0]["status"] == "done"


# ---------------------------------------------------------------- resource bombs (8)


def records_with(tmp_path, encoded):
    """A records folder whose one val record holds `encoded` (claimed 32 x 32)."""
    from upright.pipeline import recordio, schema
    out = str(tmp_path / "bomb_records")
    os.makedirs(out)
    good = helpers.encode(helpers.quadrant_marker_image(1), "png")
    entries = {
        "train": recordio.write_split(out, "train", [schema.encode_example(schema.Record(
            good, "png", 32, 32, "good.png", "0" * 64))], 1),
        "val": recordio.write_split(out, "val", [schema.encode_example(schema.Record(
            encoded, "png", 32, 32, "bomb.png", "1" * 64))], 1)}
    recordio.write_info(out, entries)
    return out


def test_a_huge_png_inside_a_record_is_refused_before_decoding(tmp_path):
    """8: a record holding a PNG whose header declares 20000 x 20000 (400 MP, 1.2 GB
    decoded): evaluate (decoding in the tf.data graph) and inspect_records refuse it
    from the header, one RecordsError line, nothing allocated."""
    out = records_with(tmp_path, helpers.png_header_only(20000, 20000))
    model = helpers.write_model_dir(str(tmp_path / "m"), helpers.corner_model(S), S)
    with pytest.raises(records.recordio.RecordsError, match="declares 400 MP > limit 128 MP"):
        evaluation.evaluate(model, out, split="val", batch_size=4, plots=False)
    with pytest.raises(records.recordio.RecordsError, match="declares 400 MP > limit 128 MP"):
        records_inspect.inspect_records(out)


def test_a_record_image_that_is_neither_jpeg_nor_png_is_refused_in_the_graph(tmp_path):
    import io as io_lib
    buffer = io_lib.BytesIO()
    Image.fromarray(helpers.quadrant_marker_image(2)).save(buffer, "BMP")
    out = records_with(tmp_path, buffer.getvalue())
    model = helpers.write_model_dir(str(tmp_path / "m"), helpers.corner_model(S), S)
    with pytest.raises(records.recordio.RecordsError, match="neither JPEG nor PNG"):
        evaluation.evaluate(model, out, split="val", batch_size=4, plots=False)


def test_a_jpeg_with_thousands_of_scans_is_skipped_unread(tmp_path, model_dir, predictor):
    """8: a JPEG whose start-of-scan markers number 4,000 (each scan is a pass of
    the decoder over the whole image): skipped with a reason by make_records and
    orient before any decoding."""
    from upright.pipeline import imageio
    src = tmp_path / "src"
    image_folder(src)
    data = helpers.encode(helpers.distinct_image(7, 40, 56), "jpeg")
    (src / "scans.jpg").write_bytes(data[:2] + b"\xff\xfe\x00\x02" + b"\xff\xda" * 4000
                                    + data[2:])
    info = records.make_records(src=str(src), out=str(tmp_path / "out"), workers=1,
                                progress=False, val_fraction=0.5, max_skipped_fraction=0.5)
    reasons = {s["path"]: s["reason"] for s in info["skipped"]}
    assert reasons["scans.jpg"] == (f"too much work to decode: 4001 JPEG scans > limit "
                                    f"{imageio.MAX_JPEG_SCANS}")
    result = orient.run(orient.OrientConfig(model_dir=model_dir, paths=(str(src),),
                                            progress=False), predictor=predictor)
    rows = {os.path.basename(r["path"]): r for r in result["rows"]}
    assert rows["scans.jpg"]["status"] == "error" and "JPEG scans" in rows["scans.jpg"]["message"]


def rle8_bmp(width, height):
    """An 8-bit run-length-encoded BMP of one colour: a few bytes per row."""
    import struct
    row = b""
    left = width
    while left:
        run = min(255, left)
        row += bytes([run, 1])
        left -= run
    rle = (row + b"\x00\x00") * height + b"\x00\x01"
    palette = b"\x00\x00\x00\x00" + b"\xff\xff\xff\x00" * 255
    offset = 14 + 40 + len(palette)
    header = b"BM" + struct.pack("<IHHI", offset + len(rle), 0, 0, offset)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(rle), 2835, 2835,
                       256, 0)
    return header + info + palette + rle


def test_an_rle_bmp_is_not_written_back_many_times_larger(tmp_path):
    """8: orient --fix on a 3000 x 3000 RLE BMP of ~80 KB (9 MB uncompressed): the
    copy is refused with a reason instead of landing 100 times larger in DST."""
    model = helpers.write_model_dir(str(tmp_path / "m"),
                                    helpers.fixed_output_model(S, [0.01, 0.97, 0.01, 0.01]), S)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "rle.bmp").write_bytes(rle8_bmp(3000, 3000))
    assert os.path.getsize(src / "rle.bmp") < 100_000
    result = orient.run(fix_config(model, src, dst), predictor=serve.load_model_dir(model))
    (row,) = result["rows"]
    assert row["status"] == "error", row
    assert "BMP copy would be 9.0 MB from 0.1 MB" in row["message"]
    assert not os.path.exists(dst / "rle.bmp")
