"""make_records at scale: --num_shards, and the Beam runner against the local one."""
import json
import os
import subprocess
import sys

import pytest

from tests import helpers
from upright.pipeline import inputs, recordio, records, records_inspect, schema

try:
    import apache_beam  # noqa: F401
    HAVE_BEAM = True
except ImportError:
    HAVE_BEAM = False

needs_beam = pytest.mark.skipif(
    not HAVE_BEAM, reason="apache_beam is not installed (pip install '.[beam]')")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """16 distinct JPEG and PNG images, one sideways by EXIF, one not an image."""
    src = tmp_path_factory.mktemp("src")
    os.makedirs(src / "sub")
    for i in range(16):
        fmt = "png" if i % 4 == 0 else "jpeg"
        where = src / "sub" if i % 3 == 0 else src
        helpers.write_image_file(str(where / f"img{i:02d}.{'png' if fmt == 'png' else 'jpg'}"),
                                 helpers.distinct_image(100 + i, 40 + i, 56), fmt=fmt)
    (src / "notes.txt").write_text("not an image")
    return str(src)


def _examples(out, split):
    import tensorflow as tf
    return [schema.decode_example(s.numpy())
            for s in tf.data.TFRecordDataset(recordio.shard_paths(out, split))]


def test_num_shards_writes_that_many_per_split(folder, tmp_path):
    out = str(tmp_path / "rec")
    info = records.make_records(src=folder, out=out, workers=1, progress=False,
                                num_shards=3, val_fraction=0.3)
    for split in schema.SPLITS:
        entry = info["splits"][split]
        assert len(entry["shards"]) == 3
        assert sum(entry["shard_examples"]) == entry["num_examples"]
        assert min(entry["shard_examples"]) >= 1
    assert info["arguments"]["num_shards"] == 3
    # Three pipelines read disjoint, complete thirds of the train split.
    import tensorflow as tf
    seen = []
    for pid in range(3):
        ctx = tf.distribute.InputContext(num_input_pipelines=3, input_pipeline_id=pid)
        seen.append(inputs.shard_files(recordio.shard_paths(out, "train"), ctx))
    assert sorted(sum(seen, [])) == sorted(recordio.shard_paths(out, "train"))


def test_num_shards_more_than_images_is_refused(folder, tmp_path):
    with pytest.raises(records.MakeRecordsError, match="num_shards=40.*lower --num_shards"):
        records.make_records(src=folder, out=str(tmp_path / "rec"), workers=1,
                             progress=False, num_shards=40)


def test_fewer_shards_than_pipelines_names_the_flag(tmp_path):
    import tensorflow as tf
    out = str(tmp_path / "rec")
    helpers.write_records(out, {"train": [helpers.upright_image(i) for i in range(4)],
                                "val": [helpers.upright_image(9)]})
    ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=0)
    with pytest.raises(ValueError, match=r"make_records --num_shards=2"):
        inputs.input_fn(out, split="train", batch_size=2, image_size=8, training=True,
                        seed=0, input_context=ctx)


def _run_tool(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "upright.tools.make_records", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_make_records_tool_num_shards_flag(folder, tmp_path):
    out = tmp_path / "rec"
    done = _run_tool(f"--src={folder}", f"--out={out}", "--num_shards=2", "--workers=1",
                     "--noprogress")
    assert done.returncode == 0, done.stderr
    info = json.loads((out / "info.json").read_text())
    assert [len(info["splits"][s]["shards"]) for s in schema.SPLITS] == [2, 2]
    bad = _run_tool(f"--src={folder}", f"--out={tmp_path / 'x'}", "--num_shards=-1")
    assert bad.returncode != 0 and "num_shards" in bad.stderr


@pytest.mark.skipif(HAVE_BEAM, reason="checks the message shown when Beam is missing")
def test_beam_runner_without_apache_beam_says_how_to_install(folder, tmp_path):
    done = _run_tool(f"--src={folder}", f"--out={tmp_path / 'rec'}", "--runner=beam",
                     "--noprogress")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert "pip install" in lines[-1] and "beam" in lines[-1]


@pytest.fixture(scope="module")
def messy(tmp_path_factory, folder):
    """`folder` plus an exact duplicate, a resized near-duplicate, a truncated
    JPEG (skipped) and a file name that is not UTF-8."""
    import shutil
    from PIL import Image
    src = tmp_path_factory.mktemp("messy")
    shutil.copytree(folder, src, dirs_exist_ok=True)
    shutil.copy(src / "img01.jpg", src / "zz copy.jpg")
    Image.fromarray(helpers.distinct_image(102, 42, 56)).resize((28, 21)).save(
        src / "zz small.jpg", quality=80)
    data = helpers.encode(helpers.distinct_image(30, 64, 64), "jpeg")
    (src / "cut.jpg").write_bytes(data[:len(data) // 2])
    helpers.write_image_file(os.path.join(os.fsencode(src), b"caf\xe9.jpg"),
                             helpers.distinct_image(21, 30, 40))
    return str(src)


def _assert_same_output(local, beam, info_local, info_beam):
    """Same examples, shard files byte for byte, and info.json but for how it ran."""
    for split in schema.SPLITS:
        a, b = _examples(local, split), _examples(beam, split)
        assert [r.source_id for r in a] == [r.source_id for r in b]
        assert a == b      # same stored bytes, formats, sizes, digests, order
        # Same examples in the same order and shard count: the shard files too.
        for pa, pb in zip(recordio.shard_paths(local, split), recordio.shard_paths(beam, split)):
            with open(pa, "rb") as fa, open(pb, "rb") as fb:
                assert fa.read() == fb.read()
    # info.json: equal except the arguments that choose how the work ran.
    info_local, info_beam = json.loads(json.dumps(info_local)), json.loads(json.dumps(info_beam))
    assert info_local["arguments"].pop("runner") == "local"
    assert info_beam["arguments"].pop("runner") == "beam"
    info_local["arguments"].pop("workers"), info_beam["arguments"].pop("workers")
    info_local.pop("source"), info_beam.pop("source")
    assert info_local == info_beam
    assert sorted(os.listdir(local)) == sorted(os.listdir(beam))   # no scratch, no staging


@needs_beam
def test_beam_and_local_make_the_same_records(folder, tmp_path):
    local, beam = str(tmp_path / "local"), str(tmp_path / "beam")
    info_local = records.make_records(src=folder, out=local, workers=1, progress=False,
                                      num_shards=2, val_fraction=0.3)
    info_beam = records.make_records(src=folder, out=beam, progress=False, num_shards=2,
                                     val_fraction=0.3, runner="beam",
                                     beam_options=["--runner=DirectRunner"])
    assert info_local["counts"]["stored"] == 16
    _assert_same_output(local, beam, info_local, info_beam)
    assert records_inspect.inspect_records(beam)["splits"]["train"]["num_examples"] == \
        info_local["counts"]["train"]


@needs_beam
def test_beam_plans_duplicates_groups_and_skips_as_local(messy, tmp_path):
    """The plan on the workers' metadata: the exact duplicate stored once, the
    near-duplicate in its picture's group and split, the damaged file skipped
    with local mode's reason, shards sized by the stored bytes."""
    local, beam = str(tmp_path / "local"), str(tmp_path / "beam")
    kwargs = dict(src=messy, progress=False, val_fraction=0.3, max_skipped_fraction=0.2)
    info_local = records.make_records(out=local, workers=1, **kwargs)
    info_beam = records.make_records(out=beam, runner="beam", beam_options=[
        "--direct_num_workers=2", "--direct_running_mode=multi_threading"], **kwargs)
    c = info_beam["counts"]
    assert (c["stored"], c["duplicates"], c["skipped"]) == (18, 1, 1)
    assert ["img02.jpg", "zz small.jpg"] in info_beam["near_duplicate_groups"]
    assert info_beam["skipped"][0]["path"] == "cut.jpg"
    _assert_same_output(local, beam, info_local, info_beam)


@needs_beam
def test_beam_launcher_never_holds_image_bytes(folder, tmp_path, monkeypatch):
    """The launcher plans on metadata: no scratch file, no spooling, no local
    shard writer, and every result it plans on has empty stored bytes. Each
    check fails if the stored images came back (as before issue 13 part 2).
    The DirectRunner here runs the workers in this process: the patched
    functions are the launcher's own (workers use recordio.write_shard)."""
    from upright.pipeline import fileio, records_read
    created, planned = [], []
    real_create, real_plan = fileio.create_file, records._plan

    def create_file(path, **kwargs):
        created.append(os.fsdecode(path))
        return real_create(path, **kwargs)

    def plan(results, *args, **kwargs):
        planned.extend(r for r in results if r.status == "ok")
        assert all(r.image.encoded == b"" for r in results if r.status == "ok")
        return real_plan(results, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("stored image bytes passed through the launcher")

    monkeypatch.setattr(fileio, "create_file", create_file)
    monkeypatch.setattr(records, "_plan", plan)
    for module, name in ((records, "spool_result"), (records_read, "spool_result"),
                         (recordio, "write_split"), (records, "_LazyExamples")):
        monkeypatch.setattr(module, name, refuse)
    out, work = str(tmp_path / "rec"), tmp_path / "work"
    work.mkdir()
    info = records.make_records(src=folder, out=out, progress=False, runner="beam",
                                beam_options=["--runner=DirectRunner",
                                              f"--make_records_temp={work}"])
    assert len(planned) == info["counts"]["stored"] == 16
    assert not [p for p in created if os.path.basename(p) == records.SCRATCH_FILE]
    # The workers' store files, in the work folder asked for, removed at the end.
    assert [p for p in created if p.startswith(str(work)) and p.endswith(".stored")]
    assert os.listdir(work) == []
    assert records_inspect.inspect_records(out)["splits"]["train"]["num_examples"] == \
        info["counts"]["train"]


@needs_beam
def test_beam_work_folder_must_be_a_shared_path(folder, tmp_path):
    with pytest.raises(records.MakeRecordsError, match="--make_records_temp=<shared folder>"):
        records.make_records(src=folder, out=str(tmp_path / "rec"), progress=False,
                             runner="beam", beam_options=["--temp_location=gs://bucket/tmp"])


@needs_beam
def test_beam_pipeline_failure_leaves_the_previous_output(folder, tmp_path, monkeypatch):
    """A shard the workers cannot write: one-line refusal, previous output intact."""
    from upright.pipeline import records_beam
    out = tmp_path / "rec"
    records.make_records(src=folder, out=str(out), workers=1, progress=False)
    before = helpers.listing(out)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(records_beam.recordio, "write_shard", full_disk)
    with pytest.raises(records.MakeRecordsError,
                       match=r"Beam pipeline failed.*No space left.*previous output.*untouched"):
        records.make_records(src=folder, out=str(out), progress=False, runner="beam",
                             beam_options=["--runner=DirectRunner"])
    assert helpers.listing(out) == before


@needs_beam
def test_beam_runner_through_the_tool(folder, tmp_path):
    out = tmp_path / "rec"
    done = _run_tool(f"--src={folder}", f"--out={out}", "--runner=beam",
                     "--beam_pipeline_options=--direct_num_workers=2 "
                     "--direct_running_mode=multi_threading", "--noprogress")
    assert done.returncode == 0, done.stderr
    info = json.loads((out / "info.json").read_text())
    assert info["counts"]["stored"] == 16 and info["arguments"]["runner"] == "beam"
    assert not any(n.startswith(".make_records.scratch") for n in os.listdir(out))
