"""Writing and opening a records folder: shards plus info.json, all or nothing.

A records folder written by make_records looks like

    OUT/train.tfrecord-00000-of-00002
    OUT/train.tfrecord-00001-of-00002
    OUT/val.tfrecord-00000-of-00001
    OUT/info.json            # written last; readers trust nothing without it

Shards are written under temporary names and renamed when complete; info.json
is written last, also through a rename, so a folder killed at any moment either
keeps its previous complete output or holds nothing a reader accepts
(`load_info` checks info.json against the shard files).

info.json (schema version 1):
    schema_version   int, == schema.SCHEMA_VERSION
    convention       schema.convention()
    splits           {split: {"num_examples": int, "shards": [file names],
                              "shard_examples": [int per shard],
                              "shard_bytes": [int per shard]}}
                     (shard_bytes: optional for readers; when present, load_info
                     refuses a shard of another size: truncated or changed)
    anything else    provenance written by the producer (source, flags, image
                     statistics, skipped files, duplicates); readers ignore it.
"""
import json
import os

from upright.pipeline import fileio
from upright.pipeline import schema

TMP_SUFFIX = ".incomplete"


class RecordsError(ValueError):
    """A records folder is missing, incomplete or does not match its info.json."""


def write_split(out_dir: str, split: str, examples, num_shards: int) -> dict:
    """Writes serialized examples into num_shards shard files, atomically.

    Args:
      out_dir: existing directory.
      split: one of schema.SPLITS.
      examples: list of serialized tf.train.Example bytes, in their final order.
      num_shards: >= 1. Example i goes to shard i * num_shards // len(examples),
        so shards are contiguous runs of the list and differ in size by <= 1.
    Returns:
      the split's entry for info.json: num_examples, shards, shard_examples,
      shard_bytes.
    """
    import tensorflow as tf
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    n = len(examples)
    names, counts, sizes = [], [], []
    for index in range(num_shards):
        lo, hi = index * n // num_shards, (index + 1) * n // num_shards
        name = schema.shard_name(split, index, num_shards)
        tmp = os.path.join(out_dir, name + TMP_SUFFIX)
        # TensorFlow's writer opens by name and follows links: it gets a new
        # file of ours (a leftover or a planted link there is unlinked first).
        os.close(fileio.create_file(tmp, replace=True))
        with tf.io.TFRecordWriter(tmp) as writer:
            for serialized in examples[lo:hi]:
                writer.write(serialized)
        fileio.fsync_file(tmp)
        sizes.append(os.path.getsize(tmp))
        os.replace(tmp, os.path.join(out_dir, name))
        names.append(name)
        counts.append(hi - lo)
    return {"num_examples": n, "shards": names, "shard_examples": counts,
            "shard_bytes": sizes}


def write_info(out_dir: str, splits: dict, **provenance) -> dict:
    """Writes info.json last and atomically. Returns the written dict."""
    info = {
        "schema_version": schema.SCHEMA_VERSION,
        "convention": schema.convention(),
        "splits": splits,
        **provenance,
    }
    fileio.write_json(os.path.join(out_dir, schema.INFO_FILE), info, indent=2,
                      sort_keys=True, ensure_ascii=False)
    return info


def load_info(records_dir: str) -> dict:
    """Reads and checks info.json of a records folder.

    Checks: the folder and info.json exist, the schema version matches, the
    convention is the project's, and every listed shard file exists (and has
    the size info.json gives, when it gives one: a cheap check that catches
    truncated shards before any record is read).
    Raises:
      RecordsError with a message that says what is wrong and what to do.
    """
    path = os.path.join(records_dir, schema.INFO_FILE)
    if not os.path.isdir(records_dir):
        raise RecordsError(f"records folder {records_dir!r} does not exist")
    if not os.path.exists(path):
        raise RecordsError(
            f"{records_dir!r} has no {schema.INFO_FILE}: it is not a complete "
            "make_records output (an interrupted run leaves none); run make_records again")
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise RecordsError(f"cannot read {path}: {e}") from None
    version = info.get("schema_version")
    if version != schema.SCHEMA_VERSION:
        raise RecordsError(
            f"{path}: schema version {version!r}, this code reads version "
            f"{schema.SCHEMA_VERSION}; remake the records with this version's make_records")
    if info.get("convention", {}).get("class_names") != list(schema.CLASS_NAMES):
        raise RecordsError(f"{path}: rotation convention differs from this code's")
    for split, entry in info.get("splits", {}).items():
        sizes = entry.get("shard_bytes") or [None] * len(entry.get("shards", []))
        for name, size in zip(entry.get("shards", []), sizes):
            shard = os.path.join(records_dir, name)
            if not os.path.exists(shard):
                raise RecordsError(
                    f"{records_dir!r}: shard {name} of split {split!r} listed in "
                    f"{schema.INFO_FILE} is missing")
            actual = os.path.getsize(shard)
            if size is not None and actual != size:
                raise RecordsError(
                    f"{shard}: damaged shard (truncated or changed): {actual} bytes, "
                    f"{schema.INFO_FILE} says {size}; run make_records again")
    return info


def shard_paths(records_dir: str, split: str, info: dict = None) -> list:
    """Full paths of a split's shards, in order. Loads info.json if not given."""
    info = info if info is not None else load_info(records_dir)
    if split not in info["splits"]:
        raise RecordsError(f"{records_dir!r} has no split {split!r}; "
                           f"it has {sorted(info['splits'])}")
    return [os.path.join(records_dir, n) for n in info["splits"][split]["shards"]]
