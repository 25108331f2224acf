"""inspect_records and the contact sheet: check a records folder record by record, and look at it.

    summary = records_inspect.inspect_records("records/photos")
    records_inspect.draw_contact_sheet("records/photos", "sheet.png", num_images=8)

The folder is one that records.make_records wrote; this module only reads it
(info.json through recordio.load_info, the shards with TensorFlow's reader).
"""
import collections
import dataclasses
import io
import os
import re
import statistics

import numpy as np

from upright.pipeline import fileio, recordio, schema


def inspect_records(records_dir: str) -> dict:
    """Reads every record of every shard and checks it against info.json.

    Checks: info.json (schema version, convention, listed shards exist), each
    shard reads to its end without a truncated or corrupted record, the number
    of records per shard and per split, every record has the schema's keys and
    a known format, every image decodes (with TensorFlow's decoder, as the
    input pipeline will) to 3 channels at its stated height and width, no
    sha256 appears twice (within or across splits).
    Returns:
      {"splits": {split: {"num_examples", "num_shards", "bytes"}}, "formats":
       {format: count}, "stored_height"/"stored_width": {min, median, max}}.
    Raises:
      recordio.RecordsError: the first problem, naming the shard file.
    """
    info = recordio.load_info(records_dir)
    import tensorflow as tf
    if "val" not in info["splits"]:
        raise recordio.RecordsError(f"{records_dir!r}: info.json has no split 'val'")
    seen = _Seen()
    summary = {"splits": {}}
    for split in info["splits"]:
        summary["splits"][split] = _check_split(records_dir, split, info["splits"][split],
                                                seen, tf)
    summary["formats"] = dict(sorted(seen.formats.items()))
    if seen.heights:
        for key, values in (("stored_height", seen.heights), ("stored_width", seen.widths)):
            summary[key] = {"min": min(values), "median": statistics.median(values),
                            "max": max(values)}
    return summary


@dataclasses.dataclass
class _Seen:
    """What inspect_records has read so far, over all splits."""
    sources: dict = dataclasses.field(default_factory=dict)   # {sha256: source_id}
    formats: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    heights: list = dataclasses.field(default_factory=list)   # stored height of each record
    widths: list = dataclasses.field(default_factory=list)


def _check_split(records_dir, split, entry, seen, tf) -> dict:
    """Reads and checks every shard of one split against its info.json `entry`;
    adds its records to `seen` (_Seen).
    -> {"num_examples", "num_shards", "bytes"} of the split. Raises
    recordio.RecordsError: an unknown split, shard counts that do not match the
    shards, a duplicate sha256, or a count that differs from info.json.
    """
    if split not in schema.SPLITS:
        raise recordio.RecordsError(f"{records_dir!r}: info.json has an unknown split {split!r}")
    shards = entry.get("shards", [])
    expected = entry.get("shard_examples", [None] * len(shards))
    if len(expected) != len(shards):
        raise recordio.RecordsError(
            f"{records_dir!r}: info.json lists {len(shards)} {split} shards but "
            f"{len(expected)} shard counts")
    total, size = 0, 0
    for name, want in zip(shards, expected):
        path = os.path.join(records_dir, name)
        size += os.path.getsize(path)
        count = _check_shard(path, seen, tf)
        if want is not None and count != want:
            raise recordio.RecordsError(
                f"{path}: holds {count} records, info.json says {want}")
        total += count
    if total != entry.get("num_examples"):
        raise recordio.RecordsError(
            f"{records_dir!r}: split {split!r} holds {total} records, info.json "
            f"says {entry.get('num_examples')}")
    return {"num_examples": total, "num_shards": len(shards), "bytes": size}


def _check_shard(path, seen, tf) -> int:
    """Reads and checks every record of the shard file `path` (_check_record)
    and adds them to `seen` (_Seen). -> the number of records. Raises
    recordio.RecordsError: a damaged shard or record, a duplicate sha256."""
    count = 0
    for index, serialized in _read_shard(path):
        record = _check_record(path, index, serialized, tf)
        if record.sha256 in seen.sources:
            raise recordio.RecordsError(
                f"{path}: record {index} ({record.source_id!r}) has the same "
                f"sha256 as {seen.sources[record.sha256]!r}")
        seen.sources[record.sha256] = record.source_id
        seen.formats[record.format] += 1
        seen.heights.append(record.height)
        seen.widths.append(record.width)
        count += 1
    return count


def _read_shard(path):
    """Yields (index, serialized) of a shard; a bad file raises RecordsError."""
    try:
        yield from recordio.read_shard(path)
    except recordio.DamagedShard as damaged:
        e = damaged.error
        message = (e.message or str(e)).strip().splitlines()[0]
        raise recordio.RecordsError(
            f"{path}: damaged after {damaged.index} good record(s) (truncated or corrupted "
            f"shard): {message}; run make_records again") from None


def _check_record(path, index, serialized, tf) -> schema.Record:
    try:
        record = schema.decode_example(serialized)
    except Exception as e:
        raise recordio.RecordsError(
            f"{path}: record {index} is not a valid example: {e}") from None
    where = f"{path}: record {index} ({record.source_id!r})"
    if record.format not in schema.FORMATS:
        raise recordio.RecordsError(f"{where}: unknown image/format {record.format!r}")
    # The header first: TensorFlow's decoder allocates whatever size it declares.
    declared = _declared_pixels(record.encoded)
    if declared > RECORD_MAX_PIXELS:
        raise recordio.RecordsError(
            f"{where}: image declares {declared / 1e6:.0f} MP > limit "
            f"{RECORD_MAX_PIXELS / 1e6:.0f} MP; not decoded (make_records never stores it)")
    try:
        image = tf.io.decode_image(record.encoded, channels=3, expand_animations=False)
    except tf.errors.OpError as e:
        raise recordio.RecordsError(
            f"{where}: image does not decode: {e.message.splitlines()[0]}") from None
    height, width = int(image.shape[0]), int(image.shape[1])
    if (height, width) != (record.height, record.width):
        raise recordio.RecordsError(
            f"{where}: image decodes to {height}x{width}, record says "
            f"{record.height}x{record.width}")
    return record


RECORD_MAX_PIXELS = 128_000_000   # = inputs.MAX_RECORD_PIXELS, without importing TensorFlow


def _declared_pixels(encoded: bytes) -> int:
    """Width x height from the image header (Pillow reads no pixels); 0 if unknown."""
    import warnings
    from PIL import Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(encoded)) as image:
                return image.size[0] * image.size[1]
    except Image.DecompressionBombError as e:   # Pillow's own limit, above ours
        found = re.search(r"\((\d+) pixels\)", str(e))
        return int(found.group(1)) if found else 2**62
    except Exception:
        return 0      # not an image Pillow knows: TensorFlow's decoder says so next


def draw_contact_sheet(records_dir: str, path: str, *, num_images: int = 6,
                       thumb_side: int = 160) -> int:
    """Draws sample images, each in its four orientations with their labels.

    Row r shows one stored image turned k = 0, 1, 2, 3 quarter turns
    counter-clockwise (np.rot90, the label-k input), captioned with k and the
    class name. Samples are spread evenly over train and val.
    Returns:
      the number of images drawn.
    """
    from PIL import Image, ImageDraw
    info = recordio.load_info(records_dir)
    records = []
    present = [split for split in schema.SPLITS if split in info["splits"]]
    for i, split in enumerate(present):   # spread evenly over the splits present
        share = (num_images + i) // len(present)
        records += [(split, r) for r in _sample_records(records_dir, info, split, share)]
    caption, pad = 18, 6
    cell = thumb_side + 2 * pad
    header = 22
    sheet = Image.new("RGB", (cell * schema.NUM_CLASSES, header + len(records) * (cell + caption)),
                      (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 4), "label k: turned k quarter turns counter-clockwise from upright",
              fill=(255, 255, 255))
    for row, (split, record) in enumerate(records):
        image = np.asarray(Image.open(io.BytesIO(record.encoded)).convert("RGB"))
        top = header + row * (cell + caption)
        for k in range(schema.NUM_CLASSES):
            turned = Image.fromarray(np.ascontiguousarray(np.rot90(image, k)))
            turned.thumbnail((thumb_side, thumb_side), Image.Resampling.LANCZOS)
            left = k * cell
            sheet.paste(turned, (left + pad + (thumb_side - turned.width) // 2,
                                 top + pad + (thumb_side - turned.height) // 2))
            draw.text((left + pad, top + cell),
                      f"k={k} ({schema.CLASS_NAMES[k]})  {split}", fill=(255, 255, 160))
    # Pillow picks the format from the name's suffix, which the temporary name keeps.
    with fileio.replacing(path, suffix=os.path.splitext(path)[1]) as tmp:
        sheet.save(tmp)
    return len(records)


def _sample_records(records_dir, info, split, count):
    """`count` records spread evenly over a split, decoded (plain Python)."""
    import tensorflow as tf
    n = info["splits"][split]["num_examples"]
    if count <= 0 or n == 0:
        return []
    wanted = sorted({int(i * n / min(count, n)) for i in range(min(count, n))})
    picked, index = [], 0
    for path in recordio.shard_paths(records_dir, split, info):
        for serialized in tf.data.TFRecordDataset(path):
            if wanted and index == wanted[0]:
                picked.append(schema.decode_example(serialized.numpy()))
                wanted.pop(0)
            index += 1
        if not wanted:
            break
    return picked
