import json
import os

import numpy as np
import pytest
import tensorflow as tf

from upright.pipeline import recordio, schema
from tests import helpers


def test_schema_round_trip_and_tf_parse(tmp_path):
    img = helpers.upright_image(0, 20, 30)
    info = helpers.write_records(str(tmp_path), {"train": [img] * 5, "val": [img]},
                                 shards_per_split=2)
    assert info["splits"]["train"]["shard_examples"] == [2, 3]
    paths = recordio.shard_paths(str(tmp_path), "train")
    assert [os.path.basename(p) for p in paths] == [
        "train.tfrecord-00000-of-00002", "train.tfrecord-00001-of-00002"]
    serialized = next(iter(tf.data.TFRecordDataset(paths[0])))
    rec = schema.decode_example(serialized.numpy())
    assert (rec.format, rec.height, rec.width, rec.source_id) == ("png", 20, 30, "train/00000.png")
    parsed = schema.parse_example(serialized)
    assert parsed["height"].numpy() == 20 and parsed["width"].numpy() == 30
    np.testing.assert_array_equal(tf.io.decode_png(parsed["encoded"]).numpy(), img)


def test_encode_is_deterministic():
    rec = schema.Record(b"\x00\x01", "png", 1, 2, "dir/é ü.png", "ab" * 32)
    assert schema.encode_example(rec) == schema.encode_example(rec)
    assert schema.decode_example(schema.encode_example(rec)) == rec


def test_load_info_refuses_incomplete_and_foreign(tmp_path):
    with pytest.raises(recordio.RecordsError, match="does not exist"):
        recordio.load_info(str(tmp_path / "nope"))
    with pytest.raises(recordio.RecordsError, match="no info.json"):
        recordio.load_info(str(tmp_path))
    helpers.write_records(str(tmp_path), {"train": [helpers.upright_image(1, 8, 8)]})
    os.remove(tmp_path / "train.tfrecord-00000-of-00001")
    with pytest.raises(recordio.RecordsError, match="missing"):
        recordio.load_info(str(tmp_path))
    info = json.loads((tmp_path / "info.json").read_text())
    info["schema_version"] = 99
    (tmp_path / "info.json").write_text(json.dumps(info))
    with pytest.raises(recordio.RecordsError, match="schema version 99"):
        recordio.load_info(str(tmp_path))


def test_durable_replace_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path,
                                                                               monkeypatch):
    synced = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src, dst):
        synced.append(("rename", os.path.basename(src), os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    tmp, path = tmp_path / "x.tmp", tmp_path / "x.json"
    tmp.write_text("{}")
    recordio.durable_replace(str(tmp), str(path))
    assert synced == [str(tmp), ("rename", "x.tmp", "x.json"), str(tmp_path)]
    assert path.read_text() == "{}" and not tmp.exists()


def test_durable_replace_never_raises_after_the_rename(tmp_path, monkeypatch):
    """Once the file is renamed in it is committed: a folder sync the filesystem
    refuses is skipped quietly, any other failure is a warning, never an
    exception (the trainer's clean-up on error would delete the committed file)."""
    import errno
    calls = []

    def refusing_fsync(fd):
        calls.append(fd)
        raise OSError(errno.EINVAL, "Invalid argument")

    def failing_fsync(fd):
        raise OSError(errno.EIO, "I/O error")

    for fake, warns in ((refusing_fsync, False), (failing_fsync, True)):
        tmp, path = tmp_path / "x.tmp", tmp_path / "x.json"
        tmp.write_text("new")
        real = os.fsync
        # The file's own sync is real; only the folder's fails.
        monkeypatch.setattr(os, "fsync", lambda fd, fake=fake: (
            fake(fd) if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")) else real(fd)))
        if warns:
            with pytest.warns(RuntimeWarning, match="syncing its folder failed"):
                recordio.durable_replace(str(tmp), str(path))
        else:
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                recordio.durable_replace(str(tmp), str(path))
        assert path.read_text() == "new" and not tmp.exists()
        monkeypatch.undo()
    assert calls   # the refused sync was tried
