"""Faults and hostile input (CI part): kills, concurrent runs, damaged shards,
a full disk, hostile file names and a short image fuzz.

The long campaigns (every kill step, 20+ timed kills, thousands of fuzz inputs)
are in test_faults_slow.py under the `slow` marker.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import tensorflow as tf
from PIL import Image

from upright.pipeline import inputs, recordio, records, records_inspect, schema
from tests import fault_tools, helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD_BYTES = 6000   # several shards per split even for tiny test folders


def make_folder(src, seeds, size=(48, 64)):
    os.makedirs(src, exist_ok=True)
    for seed in seeds:
        helpers.write_image_file(os.path.join(src, f"img{seed:03d}.jpg"),
                                 helpers.distinct_image(seed, *size))


def driver(*args, timeout=180, **popen):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-m", "tests.fault_tools", *map(str, args)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            **popen)


def run_driver(*args, timeout=180):
    proc = driver(*args)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.decode("utf-8", "replace")


class KillBench:
    """A folder with a complete earlier output ("old"), a bigger source for the
    next run, and the byte snapshots of both complete outputs."""

    def __init__(self, base):
        self.base = base
        self.old_src, self.src = base / "old_src", base / "src"
        make_folder(self.old_src, range(10))
        make_folder(self.src, range(4, 22))
        refs = {}
        steps_file = base / "steps.txt"
        for name, src in (("old", self.old_src), ("new", self.src)):
            rc, err = run_driver("make", src, base / f"ref_{name}", "--count-steps",
                                 steps_file, "--shard-bytes", SHARD_BYTES)
            assert rc == 0, err
            refs[name] = fault_tools.snapshot(base / f"ref_{name}")
        assert len(refs["new"]) > 4, "want several shards per split"
        self.refs = refs
        # Steps of a run over the old output (it also removes the old files),
        # and its duration: timed kills are drawn within it.
        out = self.fresh_out("count")
        start = time.monotonic()
        rc, err = run_driver("make", self.src, out, "--count-steps", steps_file,
                             "--shard-bytes", SHARD_BYTES)
        self.duration = time.monotonic() - start
        assert rc == 0, err
        self.steps = int(steps_file.read_text())

    def fresh_out(self, name):
        """OUT holding the complete old output."""
        import shutil
        out = self.base / name
        shutil.copytree(self.base / "ref_old", out)
        assert fault_tools.snapshot(out) == self.refs["old"]
        return out

    def check_after_kill(self, out):
        """The folder is the old output, the new output, or refused by every reader;
        then a rerun gives the new output byte for byte. Returns the state."""
        assert fault_tools.lock_is_free(out), "the killed run's lock outlived it"
        state, message = fault_tools.state_of(out, self.refs)
        if state == "refused":
            assert str(out) in message or "no info.json" in message, message
            with pytest.raises(recordio.RecordsError):
                records_inspect.inspect_records(str(out))
        else:
            records_inspect.inspect_records(str(out))
        rc, err = run_driver("make", self.src, out, "--shard-bytes", SHARD_BYTES)
        assert rc == 0, err
        assert fault_tools.snapshot(out) == self.refs["new"]
        leftovers = sorted(n for n in os.listdir(out) if n != records.LOCK_FILE
                           and n not in self.refs["new"])
        assert leftovers == [], leftovers
        return state


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return KillBench(tmp_path_factory.mktemp("kill"))


def kill_at_step(bench, step, name):
    out = bench.fresh_out(name)
    proc = driver("make", bench.src, out, "--kill-at-step", step, "--shard-bytes", SHARD_BYTES)
    proc.communicate(timeout=180)
    assert proc.returncode == -signal.SIGKILL
    return bench.check_after_kill(out)


def kill_after(bench, seconds, name):
    """SIGKILL after `seconds`; returns (state after the kill, whether it was
    still running when killed)."""
    out = bench.fresh_out(name)
    proc = driver("make", bench.src, out, "--shard-bytes", SHARD_BYTES)
    killed = False
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        killed = True
    proc.communicate(timeout=180)
    return bench.check_after_kill(out), killed


def test_kill_during_the_swap_and_at_a_random_moment(bench):
    # The swap's steps are the last ones: the previous info.json goes first.
    states = {kill_at_step(bench, bench.steps - 3, "swap")}
    rng = random.Random(6)
    states.add(kill_after(bench, rng.uniform(0.3, 0.9) * bench.duration, "timed")[0])
    assert "refused" in states


# ---------------------------------------------------------------- two runs at once


def test_two_runs_into_one_folder_never_mix(tmp_path):
    concurrent_pair(tmp_path)


def concurrent_pair(tmp_path):
    """Two make_records processes started together into one OUT; returns their
    sorted exit codes ([0, 1]: one was refused; [0, 0]: they did not overlap)."""
    a, b = tmp_path / "a", tmp_path / "b"
    make_folder(a, range(0, 30))
    make_folder(b, range(100, 130))
    refs = {}
    for name, src in (("a", a), ("b", b)):
        rc, err = run_driver("make", src, tmp_path / f"ref_{name}")
        assert rc == 0, err
        refs[name] = fault_tools.snapshot(tmp_path / f"ref_{name}")
    out = tmp_path / "out"
    procs = [driver("make", src, out) for src in (a, b)]
    results = [(p.wait(timeout=180), p.stderr.read().decode()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes in ([0, 0], [0, 1]), results
    if codes == [0, 1]:
        refused = next(err for rc, err in results if rc == 1)
        assert "another make_records run (pid" in refused and "is writing into" in refused
    state, _ = fault_tools.state_of(out, refs)
    assert state in ("a", "b")
    assert sorted(os.listdir(out)) == sorted(refs[state])   # no lock file left behind
    return codes


# ---------------------------------------------------------------- damaged shards


@pytest.fixture(scope="module")
def good_records(tmp_path_factory):
    out = tmp_path_factory.mktemp("damaged") / "rec"
    helpers.write_records(str(out), {
        "train": [helpers.upright_image(i, 32, 32) for i in range(24)],
        "val": [helpers.upright_image(i, 32, 32) for i in range(100, 112)]},
        shards_per_split=3)
    return out


def record_starts(data: bytes) -> list:
    """Byte offsets where the records of a TFRecord file start (length, crc, data, crc)."""
    import struct
    starts, at = [], 0
    while at < len(data):
        starts.append(at)
        at += 8 + 4 + struct.unpack("<Q", data[at:at + 8])[0] + 4
    return starts


def damage(shard, how) -> int:
    """Damages a shard file in place; returns the index of the damaged record."""
    data = bytearray(open(shard, "rb").read())
    starts = record_starts(bytes(data))
    if how == "flip":
        at = len(data) // 2
        data[at] ^= 0x5A
    else:
        data = data[:len(data) - 37]
        at = len(data)
    with open(shard, "wb") as f:
        f.write(bytes(data))
    return max(i for i, s in enumerate(starts) if s <= at)


def damaged_copy(good, tmp_path, split, how):
    import shutil
    out = tmp_path / f"{split}_{how}"
    shutil.copytree(good, out)
    shard = recordio.shard_paths(str(out), split)[1]
    return out, shard, damage(shard, how)


def dataset(out, split, training):
    return inputs.input_fn(str(out), split=split, batch_size=4, image_size=16,
                           training=training, seed=0, repeat=False, policy="none")


def read_all(out, split, training, ds=None):
    with inputs.naming_damaged_records(str(out), split):
        ds = ds if ds is not None else dataset(out, split, training)
        return sum(1 for _ in ds)


@pytest.mark.parametrize("how", ["flip", "truncate"])
@pytest.mark.parametrize("training", [True, False])
def test_damaged_shard_gives_an_error_naming_file_and_record(good_records, tmp_path, how,
                                                              training):
    import shutil
    split = "train" if training else "val"
    out = tmp_path / "rec"
    shutil.copytree(good_records, out)
    # Damaged while the input pipeline reads the folder: built on the good files.
    ds = dataset(out, split, training)
    shard = recordio.shard_paths(str(out), split)[1]
    index = damage(shard, how)
    with pytest.raises(recordio.RecordsError) as caught:
        read_all(out, split, training, ds)
    message = str(caught.value)
    assert message.startswith(f"{shard}: record {index} is damaged"), message
    # A truncated shard is refused before any record is read when the folder
    # is opened again: its size no longer matches info.json.
    if how == "truncate":
        with pytest.raises(recordio.RecordsError, match=f"{shard}: damaged shard.*bytes"):
            dataset(out, split, training)
    else:
        with pytest.raises(recordio.RecordsError, match=f"{shard}: record {index} is damaged"):
            read_all(out, split, training)


def test_damaged_shard_never_hangs_in_a_fresh_process(good_records, tmp_path):
    """The whole read in a subprocess with a hard timeout: a hang fails the test."""
    out, shard, _ = damaged_copy(good_records, tmp_path, "train", "flip")
    code = ("import sys; from tests import test_faults as t; "
            "t.read_all(sys.argv[1], 'train', True)")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "RecordsError" in proc.stderr and shard in proc.stderr


# ---------------------------------------------------------------- full disk


def test_file_size_limit_while_writing_keeps_the_earlier_output(tmp_path):
    """RLIMIT_FSIZE makes every write past N bytes fail (EFBIG) in the real
    writers (Python's scratch file, TensorFlow's TFRecordWriter): the same
    paths a full disk takes, without root."""
    src = tmp_path / "src"
    make_folder(src, range(12))
    out = tmp_path / "out"
    records.make_records(src=str(src), out=str(out), workers=1, progress=False)
    before = fault_tools.snapshot(out)
    make_folder(src, range(12, 40), size=(200, 260))
    for limit in (20_000, 60_000):   # scratch file / shard writer
        code = textwrap_limit(limit)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
        proc = subprocess.run([sys.executable, "-c", code, str(src), str(out)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
        assert "the previous output there (if any) is untouched" in proc.stderr
        assert fault_tools.snapshot(out) == before
        assert sorted(os.listdir(out)) == sorted(before)       # no lock file left behind


def textwrap_limit(limit):
    return (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "from upright.tools import make_records\n"
        "sys.argv = ['make_records', '--src', sys.argv[1], '--out', sys.argv[2],\n"
        "            '--workers', '1', '--progress=false', '--max_side', '0']\n"
        "make_records.run()\n")


def _mount_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)
    return proc.returncode == 0


def _used_bytes(path):
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
@pytest.mark.parametrize("phase", ["scratch", "shards"])
def test_real_full_disk_keeps_the_earlier_output(tmp_path, phase):
    """A real filesystem that fills up: while reading (the scratch file) or while
    TensorFlow writes the new shards beside the earlier output."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "4m"):
        pytest.skip("mount -t tmpfs is not allowed here")
    try:
        src = tmp_path / "src"
        make_folder(src, range(8))
        out = disk / "out"
        records.make_records(src=str(src), out=str(out), workers=1, progress=False)
        before = fault_tools.snapshot(out)
        make_folder(src, range(8, 40), size=(240, 320))
        # Stored byte for byte (RGB JPEGs, max_side=0): scratch = source bytes.
        new_bytes = sum(f.stat().st_size for f in src.iterdir())
        room = new_bytes // 2 if phase == "scratch" else new_bytes + new_bytes // 2
        size = _used_bytes(disk) + room
        assert subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)]).returncode == 0
        with pytest.raises(records.MakeRecordsError) as caught:
            records.make_records(src=str(src), out=str(out), workers=1, progress=False,
                                 max_side=0)
        message = str(caught.value)
        assert "No space left on device" in message, message
        assert "the previous output there (if any) is untouched" in message
        if phase == "shards":
            assert "tfrecord" in message, message    # TensorFlow's writer hit it
        assert fault_tools.snapshot(out) == before
        assert sorted(os.listdir(out)) == sorted(before)       # no lock file left behind
        records_inspect.inspect_records(str(out))
    finally:
        subprocess.run(["umount", str(disk)])


# ---------------------------------------------------------------- hostile paths


HOSTILE_NAMES = [
    b"with space.jpg", b"quote's.jpg", b'double"quote.jpg', b"new\nline.jpg",
    b"tab\there.jpg", b"back\\slash.jpg", b"bad\xff\xfeutf8.jpg", "日本語 写真.jpg".encode(),
    b"-leading-dash.jpg", b"a" * 251 + b".jpg",                 # 255 bytes: the limit
    "é".encode() * 125 + b".jpg",                               # 254 bytes, 129 characters
]


def hostile_folder(base):
    """SRC with hostile names, a deep path, links to a file and a folder outside SRC."""
    src = os.fsencode(base / "src")
    outside = os.fsencode(base / "outside")
    os.makedirs(os.path.join(outside, b"pics"))
    deep = os.path.join(src, *[b"d" * 200] * 12)                # a path of about 2,450 bytes
    os.makedirs(deep)
    names = [os.path.join(src, n) for n in HOSTILE_NAMES] + [os.path.join(deep, b"deep.jpg")]
    for seed, path in enumerate(names):
        helpers.write_image_file(path, helpers.distinct_image(seed, 40, 56))
    helpers.write_image_file(os.path.join(outside, b"out.jpg"), helpers.distinct_image(50, 40, 56))
    helpers.write_image_file(os.path.join(outside, b"pics", b"p.jpg"),
                             helpers.distinct_image(51, 40, 56))
    os.symlink(os.path.join(outside, b"out.jpg"), os.path.join(src, b"link to outside.jpg"))
    os.symlink(os.path.join(outside, b"pics"), os.path.join(src, b"linked pics"))
    return src, names


def test_hostile_names_and_outside_links_through_make_records(tmp_path):
    src, names = hostile_folder(tmp_path)
    out = tmp_path / "out"
    info = records.make_records(src=os.fsdecode(src), out=str(out), workers=2, progress=False)
    assert info["skipped"] == [] and info["ignored"] == []
    assert info["counts"]["stored"] == len(names) + 2
    stored = {os.fsencode(r.source_id) for split in schema.SPLITS
              for r in (schema.decode_example(s.numpy()) for s in
                        tf.data.TFRecordDataset(recordio.shard_paths(str(out), split)))}
    want = {os.path.relpath(p, src) for p in names} | {b"link to outside.jpg",
                                                        b"linked pics/p.jpg"}
    assert stored == want                                 # exact path bytes come back
    # info.json is valid UTF-8 JSON; undecodable bytes are shown as \xNN.
    text = (out / "info.json").read_bytes().decode("utf-8")
    json.loads(text)
    links = {e["path"]: e["target"] for e in info["links_outside_source"]}
    assert links == {"link to outside.jpg": str(tmp_path / "outside" / "out.jpg"),
                     "linked pics": str(tmp_path / "outside" / "pics")}
    assert info["counts"]["links_outside_source"] == 2
    records_inspect.inspect_records(str(out))


def _bind_read_only(src, mount_point):
    os.makedirs(mount_point, exist_ok=True)
    for args in (["mount", "--bind", src, mount_point],
                 ["mount", "-o", "remount,ro,bind", mount_point]):
        if subprocess.run(args, capture_output=True).returncode != 0:
            subprocess.run(["umount", mount_point], capture_output=True)
            return False
    return True


@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only bind mount needs root")
def test_read_only_source_and_read_only_out(tmp_path):
    """As root, chmod does not stop writes: a read-only bind mount does."""
    src, names = hostile_folder(tmp_path)
    ro = tmp_path / "ro"
    if not _bind_read_only(os.fsdecode(src), str(ro)):
        pytest.skip("bind mounts are not allowed here")
    try:
        with pytest.raises(OSError):
            (ro / "probe").write_bytes(b"")                 # really read-only
        out = tmp_path / "out"
        info = records.make_records(src=str(ro), out=str(out), workers=1, progress=False)
        assert info["counts"]["stored"] == len(names) + 2 and info["skipped"] == []
        # An OUT on a read-only filesystem: one clear line, exit 2, no traceback.
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        proc = subprocess.run([sys.executable, "-m", "upright.tools.make_records", "--src",
                               str(tmp_path / "outside"), "--out", str(ro / "rec")],
                              capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr, proc.stderr
        assert "Read-only file system" in proc.stderr.strip().splitlines()[-1]
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


def test_hostile_names_through_orient(tmp_path):
    from upright.pipeline import orient, serve
    import numpy as np
    src, names = hostile_folder(tmp_path)
    model_dir = helpers.write_model_dir(str(tmp_path / "model"), helpers.corner_model(16), 16)
    predictor = serve.load_model_dir(model_dir)
    # Every file turned 90 degrees: the stub model is sure of it, so --fix writes all.
    for seed, path in enumerate(names):
        img = np.rot90(helpers.quadrant_marker_image(seed, 32), 1)
        helpers.write_image_file(path, np.ascontiguousarray(img), "png")
    dst = tmp_path / "fixed"
    for report in ("r.csv", "r.json"):
        config = orient.OrientConfig(model_dir=model_dir, paths=(os.fsdecode(src),), fix=True,
                                     dst=str(dst), report=str(tmp_path / report),
                                     progress=False, min_confidence=0.3)
        result = orient.run(config, predictor=predictor)
        errors = [(r["path"], r["message"]) for r in result["rows"] if r["status"] == "error"]
        assert errors == []
        # orient follows links to files; links to folders are not walked (os.walk
        # without followlinks: no loop can trap it); name such a folder explicitly.
        assert len(result["rows"]) == len(names) + 1
        assert all(r["action"] == "turn" for r in result["rows"])
    for path in names:
        rel = os.path.relpath(path, src)
        fixed = os.path.join(os.fsencode(dst), rel)
        assert os.path.exists(fixed), rel
        with open(fixed, "rb") as f:   # upright now: the marker is back at the top-left
            assert np.array_equal(np.asarray(Image.open(f).convert("RGB")),
                                  helpers.quadrant_marker_image(names.index(path), 32))
    assert "bad\\xff\\xfeutf8.jpg" in (tmp_path / "r.csv").read_text(encoding="utf-8")


# ---------------------------------------------------------------- image fuzzing


# The reader's design bound for one input (tests/README.md, "Hostile image
# files"): a file just
# under --max_pixels costs Pillow 3-7 bytes a pixel, 0.4-0.9 GB at 128 MP.
READER_PEAK_MB = 1024


def run_fuzz_campaign(tmp_path, examples, seed, per_input_seconds=300, max_rss_mb=3072,
                      timeout=1800):
    """The fuzzer in a subprocess (watchdog per input, address-space limit);
    returns its JSON report. A hang or crash fails with the saved input named.
    The watchdog and the timeout are hang guards, far above the milliseconds an
    input takes even on a loaded machine: speed is for benchmarks, not tests."""
    report = tmp_path / f"fuzz_{seed}.json"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fault_tools", "fuzz", "--examples", str(examples),
         "--seed", str(seed), "--report", str(report), "--per-input-seconds",
         str(per_input_seconds), "--max-rss-mb", str(max_rss_mb)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert report.exists(), (
        f"the fuzzer died (rc {proc.returncode}); input kept in "
        f"{tmp_path / 'current_input.bin'}:\n{proc.stderr[-3000:]}")
    stats = json.loads(report.read_text())
    assert stats["failures"] == [], json.dumps(stats["failures"][:5], indent=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert stats["examples"] == examples
    return stats


def test_fuzz_image_reader_fast(tmp_path):
    stats = run_fuzz_campaign(tmp_path, examples=300, seed=20261128)
    # Every kind of hostile input was drawn, some were stored, some skipped.
    assert set(stats["kinds"]) == {"header_noise", "truncated", "bitflip", "huge_dims",
                                   "odd_exif", "exif_mutated"}
    assert stats["stored"] > 30 and stats["skipped"] > 30
    assert stats["tf_checked"] == min(stats["stored"], 400)
    # Memory that one hostile input made the reader hold, over what the process
    # held just before it (the process's lifetime peak would count TensorFlow
    # and pytest's own pages inherited through fork, and so depend on the suite).
    assert stats["input_peak_mb"] < READER_PEAK_MB, stats["input_peak"]


def test_fuzz_memory_probe_sees_one_inputs_allocation():
    """The per-input peak the fuzzer reports is real: 64 MB touched after a reset
    shows as 64 MB more, and a reset forgets it again."""
    script = ("from tests import fault_tools as t\n"
              "base = t.reset_peak_rss_mb()\n"
              "block = bytearray(64 << 20)\n"
              "block[::4096] = b'x' * len(block[::4096])\n"
              "grew = t.peak_rss_mb() - base\n"
              "del block\n"
              "again = t.reset_peak_rss_mb()\n"
              "print(grew, t.peak_rss_mb() - again)\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr[-2000:]
    grew, after_reset = map(float, out.stdout.split())
    assert 60 <= grew < 70, grew
    assert after_reset < 4, after_reset
