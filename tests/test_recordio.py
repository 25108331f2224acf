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
