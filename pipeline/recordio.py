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
import os
import struct

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
    n = len(examples)
    sizes = [write_shard(out_dir, schema.shard_name(split, index, num_shards),
                         examples[lo:hi])
             for index, (lo, hi) in enumerate(shard_bounds(n, num_shards))]
    return split_entry(split, n, sizes)


def split_entry(split: str, n: int, sizes: list) -> dict:
    """A split's info.json entry: n examples in len(sizes) shards cut by
    `shard_bounds`, shard i of sizes[i] bytes."""
    bounds = shard_bounds(n, len(sizes))
    return {"num_examples": n,
            "shards": [schema.shard_name(split, i, len(sizes)) for i in range(len(sizes))],
            "shard_examples": [hi - lo for lo, hi in bounds], "shard_bytes": list(sizes)}


def shard_bounds(n: int, num_shards: int) -> list:
    """[(lo, hi)] per shard: example i of n goes to shard i * num_shards // n.

    The one place that decides which examples a shard holds: make_records'
    local writer and its Beam workers both cut a split here."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    return [(index * n // num_shards, (index + 1) * n // num_shards)
            for index in range(num_shards)]


def write_shard(out_dir: str, name: str, examples, *, tmp_name: str = None) -> int:
    """Writes one shard file `name` (serialized examples, an iterable) atomically.

    Written under `tmp_name` (default name + TMP_SUFFIX), fsynced, then renamed:
    the name only ever holds a complete shard. Beam workers pass a tmp_name of
    their own, so that two attempts at one shard (a retry, a speculative copy)
    never write into one file. Returns the shard's size in bytes.
    """
    import tensorflow as tf
    tmp = os.path.join(out_dir, tmp_name or name + TMP_SUFFIX)
    # TensorFlow's writer opens by name and follows links: it gets a new
    # file of ours (a leftover or a planted link there is unlinked first).
    os.close(fileio.create_file(tmp, replace=True))
    with tf.io.TFRecordWriter(tmp) as writer:
        for serialized in examples:
            writer.write(serialized)
    fileio.fsync_file(tmp)
    size = os.path.getsize(tmp)
    os.replace(tmp, os.path.join(out_dir, name))
    return size


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
    """Reads and checks info.json of a records folder and the framing of its shards.

    Records are shared: info.json and the shards may come from someone else, so
    nothing in them is trusted before it is checked.
      * info.json: a regular file of at most fileio.MAX_JSON_BYTES, valid JSON of
        the types below (else one line, never a traceback); the schema version
        and the convention are this code's.
      * shard names: exactly the names schema.shard_name gives for their split,
        position and count, so no name ('../../x', '/etc/x') leads outside the
        folder.
      * every shard: a regular file (a FIFO or a device never blocks: opened
        with O_NONBLOCK, then fstat), of the size info.json gives when it gives
        one, whose framing holds (`check_framing`): every record's length lies
        inside the file and its length CRC is right. TensorFlow's reader trusts
        a length with a valid CRC and crashes on a huge one; after this check it
        only meets lengths inside the file (its data CRCs it checks itself).
      * counts: each shard holds the records info.json says, and the split's
        num_examples is their sum (a forged count cannot plan a run of 10^12
        examples).
    Cost: one 12-byte read per record (a seek, no data read).
    Raises:
      RecordsError with a message that says what is wrong and what to do.
    """
    path = os.path.join(records_dir, schema.INFO_FILE)
    if not os.path.isdir(records_dir):
        raise RecordsError(f"records folder {fileio.show(records_dir)!r} does not exist")
    if not os.path.lexists(path):
        raise RecordsError(
            f"{fileio.show(records_dir)!r} has no {schema.INFO_FILE}: it is not a complete "
            "make_records output (an interrupted run leaves none); run make_records again")
    try:
        info = fileio.load_json(path)
    except (OSError, ValueError) as e:
        raise RecordsError(f"cannot read {fileio.show(path)}: {_reason(e)}") from None
    if not isinstance(info, dict):
        raise RecordsError(f"{fileio.show(path)}: not a JSON object")
    version = info.get("schema_version")
    if type(version) is not int or version != schema.SCHEMA_VERSION:
        raise RecordsError(
            f"{fileio.show(path)}: schema version {version!r:.40}, this code reads version "
            f"{schema.SCHEMA_VERSION}; remake the records with this version's make_records")
    convention = info.get("convention")
    if not isinstance(convention, dict) or \
            convention.get("class_names") != list(schema.CLASS_NAMES):
        raise RecordsError(f"{fileio.show(path)}: rotation convention differs from this code's")
    splits = info.get("splits")
    if not isinstance(splits, dict):
        raise RecordsError(f"{fileio.show(path)}: 'splits' is not a JSON object")
    for split, entry in splits.items():
        _check_split(records_dir, path, split, entry)
    return info


def _check_split(records_dir, path, split, entry) -> None:
    where = f"{fileio.show(path)}: split {fileio.show(split)!r}"
    if split not in schema.SPLITS:
        raise RecordsError(f"{where}: unknown split (expected one of {schema.SPLITS})")
    if not isinstance(entry, dict):
        raise RecordsError(f"{where} is not a JSON object")
    names = entry.get("shards")
    if not isinstance(names, list):
        raise RecordsError(f"{where}: 'shards' is not a list")
    columns = {}
    for key in ("shard_examples", "shard_bytes"):
        value = entry.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or len(value) != len(names) or \
                not all(_is_count(v) for v in value):
            raise RecordsError(f"{where}: '{key}' is not a list of {len(names)} "
                               "non-negative integers, one per shard")
        columns[key] = value
    num_examples = entry.get("num_examples")
    if not _is_count(num_examples):
        raise RecordsError(f"{where}: 'num_examples' is not a non-negative integer")
    total = 0
    for index, name in enumerate(names):
        try:
            schema.check_shard_name(name, split, index, len(names))
        except ValueError as e:
            raise RecordsError(f"{where}: {e}") from None
        shard = os.path.join(records_dir, name)
        size = columns.get("shard_bytes", [None] * len(names))[index]
        count = check_framing(shard, expected_bytes=size, split=split)
        want = columns.get("shard_examples", [None] * len(names))[index]
        if want is not None and count != want:
            raise RecordsError(f"{shard}: holds {count} records, {schema.INFO_FILE} says "
                               f"{want}; run make_records again")
        total += count
    if total != num_examples:
        raise RecordsError(f"{where}: its shards hold {total} records, 'num_examples' "
                           f"says {num_examples}; run make_records again")


def _is_count(value) -> bool:
    return type(value) is int and value >= 0


def _reason(e) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


# TFRecord framing: uint64 length, uint32 masked CRC-32C of the length bytes,
# the data, uint32 masked CRC-32C of the data (all little-endian).
_HEADER = 12
_FOOTER = 4


def check_framing(shard: str, *, expected_bytes: int = None, split: str = "") -> int:
    """Walks a shard's record headers by seeking; returns its number of records.

    Refuses (RecordsError, one line naming the file, and the record index when
    one is damaged): a missing file, anything but a regular file (opened
    non-blocking: a FIFO or a device never hangs), a size other than
    expected_bytes, a length field whose CRC is wrong or whose record would
    end past the end of the file. Data CRCs are not read here (that would read
    every byte); TensorFlow's reader checks them, and inspect_records reads
    every record through it.
    """
    try:
        fd = fileio.open_regular(shard)
    except FileNotFoundError:
        raise RecordsError(f"{fileio.show(os.path.dirname(shard))!r}: shard "
                           f"{os.path.basename(shard)} of split {split!r} listed in "
                           f"{schema.INFO_FILE} is missing") from None
    except OSError as e:
        raise RecordsError(f"{fileio.show(shard)}: cannot read the shard: {_reason(e)}") from None
    try:
        size = os.fstat(fd).st_size
        if expected_bytes is not None and size != expected_bytes:
            raise RecordsError(
                f"{shard}: damaged shard (truncated or changed): {size} bytes, "
                f"{schema.INFO_FILE} says {expected_bytes}; run make_records again")
        offset, index = 0, 0
        while offset < size:
            header = os.pread(fd, _HEADER, offset)
            problem = None
            if len(header) < _HEADER:
                problem = f"{size - offset} bytes left, less than a record header"
            else:
                length, crc = struct.unpack("<QI", header)
                if masked_crc32c(header[:8]) != crc:
                    problem = "the length field's CRC is wrong"
                elif length > size - offset - _HEADER - _FOOTER:
                    problem = (f"length field {length} runs past the end of the "
                               f"{size}-byte file")
            if problem:
                raise RecordsError(
                    f"{shard}: record {index} is damaged (truncated or corrupted shard: "
                    f"{problem}); restore the file or run make_records again")
            offset += _HEADER + length + _FOOTER
            index += 1
        return index
    finally:
        os.close(fd)


def _crc32c_table():
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C (Castagnoli) of data; pure Python, for short data."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class DamagedShard(Exception):
    """read_shard stopped at record `index` of `path`: TensorFlow's `error` (an OpError)."""

    def __init__(self, path, index, error):
        super().__init__(f"{path}: record {index}: {error}")
        self.path, self.index, self.error = path, index, error


def read_shard(path):
    """Yields (index, serialized bytes) of every record of one shard, in order.

    TFRecordDataset checks each record's length and CRCs, so a truncated or
    corrupted shard ends in an error at the damaged record, never a hang; the
    one scan that inspect_records and inputs.naming_damaged_records both use.
    Raises:
      DamagedShard: the first record that does not read (`index` good ones before it).
    """
    import tensorflow as tf
    index = 0
    iterator = iter(tf.data.TFRecordDataset(path))
    while True:
        try:
            serialized = next(iterator)
        except StopIteration:
            return
        except tf.errors.OpError as e:
            raise DamagedShard(path, index, e) from None
        yield index, serialized.numpy()
        index += 1


def shard_paths(records_dir: str, split: str, info: dict = None) -> list:
    """Full paths of a split's shards, in order. Loads info.json if not given."""
    info = info if info is not None else load_info(records_dir)
    if split not in info["splits"]:
        raise RecordsError(f"{records_dir!r} has no split {split!r}; "
                           f"it has {sorted(info['splits'])}")
    return [os.path.join(records_dir, n) for n in info["splits"][split]["shards"]]
