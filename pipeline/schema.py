"""The record format and the rotation convention: the one place that owns them.

Every record is a `tf.train.Example` with the feature keys below. Writers call
`encode_example`; readers call `parse_example` (inside tf.data) or
`decode_example` (plain Python, for tools and tests). Nothing else in the
project spells a feature key.

Rotation convention (fixed, stored in info.json and in every exported model):
label k in {0, 1, 2, 3} means the image was turned k quarter turns
COUNTER-clockwise from upright, exactly `tf.image.rot90(upright, k)` and
`np.rot90(upright, k)`. To repair an image with predicted k, turn it k quarter
turns clockwise: `rot90(image, -k)`.

This module imports TensorFlow lazily so that image-reading worker processes
(which only need the constants) start fast.
"""
import dataclasses

SCHEMA_VERSION = 1

# Feature keys: the common TensorFlow object-detection / TFDS conventions.
ENCODED = "image/encoded"        # bytes: the stored JPEG or PNG
FORMAT = "image/format"          # bytes: b"jpeg" or b"png"
HEIGHT = "image/height"          # int64: height of the stored image, pixels
WIDTH = "image/width"            # int64: width of the stored image, pixels
SOURCE_ID = "image/source_id"    # bytes: path relative to the source folder, UTF-8
SHA256 = "image/key/sha256"      # bytes: hex digest of the source file's bytes

FORMATS = ("jpeg", "png")

NUM_CLASSES = 4
CLASS_NAMES = ("0", "90", "180", "270")
# Degrees counter-clockwise that label k stands for, and the turn that repairs it.
ANGLES_CCW = (0, 90, 180, 270)
CONVENTION = ("label k: the image was turned k quarter turns counter-clockwise "
                            "from upright (tf.image.rot90(upright, k), np.rot90(upright, k)); "
                            "repair with rot90(image, -k), i.e. k quarter turns clockwise")

# How a stored image becomes the model's S x S input (preprocess.resize_image; all
# three commute with rot90), recorded in model_info.json and the export.
RESIZE_METHODS = ("squash", "pad", "crop")
# JPEG codes 8 x 8 blocks, and 16 x 16 macroblocks with 4:2:0 chroma subsampling
# (Pillow's default). An image whose sides are whole macroblocks has a block grid
# that maps onto itself under rot90; a partial last block row/column would sit on
# a different edge for each label and give the model a shortcut. preprocess crops
# stored images to whole blocks; imageio.open_for_model frames its input the same.
JPEG_BLOCK = 16
# Where the augmentation policy runs: in tf.data ("host") or in the model
# ("device", augment.AugmentLayer).
AUGMENT_PLACEMENTS = ("host", "device")

INFO_FILE = "info.json"
SPLITS = ("train", "val")


def convention() -> dict:
    """The convention as stored in info.json and in exported models."""
    return {
            "num_classes": NUM_CLASSES,
            "class_names": list(CLASS_NAMES),
            "angles_ccw": list(ANGLES_CCW),
            "rotation": "counter-clockwise",
            "description": CONVENTION,
    }


def shard_name(split: str, index: int, num_shards: int) -> str:
    """TFDS-style shard file name, e.g. 'train.tfrecord-00003-of-00008'."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not 0 <= index < num_shards:
        raise ValueError(f"shard index {index} not in [0, {num_shards})")
    return f"{split}.tfrecord-{index:05d}-of-{num_shards:05d}"


def check_shard_name(name, split: str, index: int, num_shards: int) -> None:
    """Refuses a shard name that is not exactly shard_name(split, index, num_shards).

    info.json comes with records others may have made: a name such as
    '../../x' or '/etc/x' would make readers open a file outside the records
    folder. Only the plain names this module writes are accepted.
    Raises:
      ValueError saying what was expected.
    """
    expected = shard_name(split, index, num_shards)
    if name != expected:
        shown = name.encode("unicode_escape").decode("ascii") if isinstance(name, str) else name
        raise ValueError(f"shard name {shown!r} is not {expected!r}"
                         " (shard names are plain file names of the schema's pattern)")


@dataclasses.dataclass(frozen=True)
class Record:
    """One stored image, as plain Python values."""
    encoded: bytes
    format: str        # "jpeg" or "png"
    height: int
    width: int
    source_id: str     # path relative to the source folder
    sha256: str        # hex digest of the source file's bytes


def encode_example(record: Record) -> bytes:
    """Serializes `record` as a tf.train.Example, byte-identical across runs.

    `deterministic=True` fixes the order of the proto's map field (the feature
    dict), which otherwise may differ between processes.
    """
    from tensorflow.core.example import example_pb2, feature_pb2
    if record.format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {record.format!r}")

    def b(value: bytes):
        return feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[value]))

    def i(value: int):
        return feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=[value]))

    example = example_pb2.Example(features=feature_pb2.Features(feature={
            ENCODED: b(record.encoded),
            FORMAT: b(record.format.encode()),
            HEIGHT: i(record.height),
            WIDTH: i(record.width),
            SOURCE_ID: b(record.source_id.encode("utf-8", "surrogateescape")),
            SHA256: b(record.sha256.encode("ascii")),
    }))
    return example.SerializeToString(deterministic=True)


def decode_example(serialized: bytes) -> Record:
    """Parses one serialized example in plain Python (tools and tests)."""
    from tensorflow.core.example import example_pb2
    example = example_pb2.Example.FromString(serialized)
    f = example.features.feature
    missing = [k for k in (ENCODED, FORMAT, HEIGHT, WIDTH, SOURCE_ID, SHA256)
                          if k not in f]
    if missing:
        raise ValueError(f"example lacks feature(s) {missing}")
    return Record(
            encoded=f[ENCODED].bytes_list.value[0],
            format=f[FORMAT].bytes_list.value[0].decode(),
            height=int(f[HEIGHT].int64_list.value[0]),
            width=int(f[WIDTH].int64_list.value[0]),
            source_id=f[SOURCE_ID].bytes_list.value[0].decode("utf-8", "surrogateescape"),
            sha256=f[SHA256].bytes_list.value[0].decode("ascii"),
    )


def feature_spec() -> dict:
    """The tf.io parsing spec for `tf.io.parse_single_example`/`parse_example`."""
    import tensorflow as tf
    return {
            ENCODED: tf.io.FixedLenFeature([], tf.string),
            FORMAT: tf.io.FixedLenFeature([], tf.string),
            HEIGHT: tf.io.FixedLenFeature([], tf.int64),
            WIDTH: tf.io.FixedLenFeature([], tf.int64),
            SOURCE_ID: tf.io.FixedLenFeature([], tf.string, default_value=""),
            SHA256: tf.io.FixedLenFeature([], tf.string, default_value=""),
    }


def parse_example(serialized):
    """Parses one serialized example inside a tf.data graph.

    Args:
        serialized: scalar tf.string.
    Returns:
        dict with "encoded" (tf.string), "height", "width" (tf.int64, of the
        stored image) and "source_id" (tf.string).
    """
    import tensorflow as tf
    f = tf.io.parse_single_example(serialized, feature_spec())
    return {"encoded": f[ENCODED], "height": f[HEIGHT], "width": f[WIDTH],
                    "source_id": f[SOURCE_ID]}


def rotate(images, k):
    """Turns images k quarter turns counter-clockwise: the label-k image.

    Args:
        images: [H, W, C] or [B, H, W, C] tensor or array.
        k: python int or scalar int tensor.
    """
    import tensorflow as tf
    return tf.image.rot90(images, k)
