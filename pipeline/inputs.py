"""The tf.data input function: records folder -> batches for training or validation.

    from upright import pipeline
    ds = pipeline.input_fn("records/photos", split="train", batch_size=32,
                           image_size=128, training=True, seed=0)
    for images, labels in ds.take(1):
        ...  # images float32 [32, 128, 128, 3] in [0, 255]; labels int32 [32] in [0, 4)

Two streams, built by two short functions that read like the chain they build:

* training (`_train_dataset`): shard files -> shuffled file order -> parallel
  interleave -> shuffled serialized examples -> repeat -> per-image parse,
  decode, resize -> batch (drop_remainder) -> per-image seeds -> random quarter
  turn (the label) -> pixel augmentation -> prefetch.
* validation (`_eval_dataset`): files in order -> decode, resize -> every image
  in all four orientations (labels 0, 1, 2, 3 in turn) -> batch (keeps the last,
  smaller batch) -> prefetch. 4 x N examples, the same ones in the same order on
  every run.

Values: images are float32 in [0, 255] (not rescaled: Keras EfficientNet
includes its own rescaling layer); labels are int32 in [0, 4) with the
project's convention (label k = tf.image.rot90(upright, k), see schema.py).

Randomness: one integer `seed`. From it (and the input pipeline id under
tf.distribute) numpy's SeedSequence derives independent seeds for the file
order, the example shuffle and the augmentation key; the augmentation key is
folded with the batch index to give every batch its own stateless key, from
which every image gets its own int32 [2] seed. So the stream is byte-identical
across runs and processes for the same seed, and shuffling without a seed is
refused unless asked for (`allow_unseeded_shuffle=True`). (As with every
tf.data shuffle, TensorFlow's global seed, if the program sets one with
tf.random.set_seed or keras.utils.set_random_seed, also enters the two shuffle
orders; the labels and augmentation depend on `seed` alone.)

Decode + resize is preprocess.preprocess_image, shared with serving. Resizing
commutes with rot90 for every `resize` option (see preprocess.resize_image):
the model must not be able to read the label from how an image was resized.
JPEG records are cropped to whole 16 x 16 coding blocks and decoded without
libjpeg's "fancy" chroma upsampling: both are needed for
the decoded pixels to carry no trace of where the stored image's top-left was.
tests/test_shortcuts.py shows a small CNN reading the label from either trace
(100 % and 55-58 % validation accuracy on orientation-free noise) and staying
at chance without them.

A damaged shard (truncated, or bytes flipped) stops the stream with
tf.errors.DataLossError at the damaged record; wrap the consumer in
`naming_damaged_records` to get an error naming the shard file and record.

No py_function and no Python generators: every stage is a TensorFlow graph
(the pipeline can be serialized, e.g. for tf.data service). Importing this
module touches no flags and no global state.
"""

import contextlib
import os
import re

import numpy as np
import tensorflow as tf

from upright.pipeline import fileio, preprocess, recordio, schema

RESIZE_METHODS = schema.RESIZE_METHODS
AUGMENT_PLACEMENTS = schema.AUGMENT_PLACEMENTS
AUTOTUNE = tf.data.AUTOTUNE

def input_fn(records: str, *, split: str, batch_size: int, image_size: int,
             training: bool, seed=None, allow_unseeded_shuffle: bool = False,
             resize: str = "squash", policy: str = "default",
             augment_on: str = "host", input_context=None,
             shuffle_buffer: int = 2048, repeat=None,
             cycle_length: int = 16, skip_batches: int = 0) -> tf.data.Dataset:
    """Batches of images and orientation labels from a make_records folder.

    Args:
      records: folder written by make_records (shards + info.json). info.json is
        checked first (schema version, convention, shard files present).
      split: "train" or "val" (any split listed in info.json).
      batch_size: GLOBAL batch size. With `input_context` each input pipeline
        yields batches of input_context.get_per_replica_batch_size(batch_size)
        (which requires batch_size to divide by the number of replicas).
      image_size: S; images come out S x S.
      training: True -> shuffled, repeated, augmented stream with random labels;
        False -> deterministic validation stream, each image in all 4
        orientations, no augmentation.
      seed: int; the only source of randomness of the training stream. Ignored
        when training=False (nothing is random there).
      allow_unseeded_shuffle: with training=True and seed=None, draw a fresh
        seed from the OS instead of raising ValueError.
      resize: "squash" (default, like the source article: S x S regardless of
        aspect), "pad" (keep aspect, symmetric bars of value 0) or "crop"
        (centre crop). All three commute with rot90.
      policy: augmentation spec for augment.parse_policy ("default", "none",
        or a spec string). Training only.
      augment_on: "host" -> the whole policy runs in tf.data and the dataset
        yields (images, labels); "device" -> only the host part of the policy
        (augment.split_policy) runs here and the dataset yields
        ({"images": images, "seeds": int32 [B, 2]}, labels) for a model whose
        first layer is augment.AugmentLayer(policy).
      input_context: tf.distribute.InputContext or None. When given, this
        pipeline reads only its share of the shard FILES (file i goes to
        pipeline i % num_input_pipelines); raises ValueError if the split has
        fewer shards than pipelines.
      shuffle_buffer: examples in the shuffle buffer (serialized, before
        decoding, so memory is about shuffle_buffer x stored image size).
      repeat: None -> repeat forever when training, once otherwise.
      cycle_length: shard files read in parallel (training).
      skip_batches: training only: the stream starts this many batches in
        (a resumed run). Skipped batches are decoded, never augmented; the
        batches after them are exactly those of the unskipped stream.

    Returns:
      tf.data.Dataset of (images float32 [B, S, S, 3] in [0, 255],
      labels int32 [B] in [0, 4)) -- or the dict form for augment_on="device".
      Training batches all have B = per-pipeline batch size (drop_remainder);
      validation yields 4 x N examples (N = num_examples of the split, or of
      this pipeline's files) and its last batch may be smaller.
    """
    # Long only by its docstring (the argument reference, kept with the function
    # people call); the body is the checks and the choice of stream builder.
    _check_arguments(resize=resize, augment_on=augment_on, batch_size=batch_size,
                     image_size=image_size)
    info = recordio.load_info(records)
    files = recordio.shard_paths(records, split, info)
    pipeline_id = 0
    if input_context is not None:
        files = shard_files(files, input_context, split=split)
        pipeline_id = input_context.input_pipeline_id
        batch_size = input_context.get_per_replica_batch_size(batch_size)
    if training:
        return _train_dataset(
            files, batch_size=batch_size, image_size=image_size,
            seeds=derive_seeds(_training_seed(seed, allow_unseeded_shuffle), pipeline_id),
            resize=resize, policy=policy, augment_on=augment_on,
            shuffle_buffer=shuffle_buffer, repeat=True if repeat is None else repeat,
            cycle_length=cycle_length, skip_batches=skip_batches)
    return _eval_dataset(files, batch_size=batch_size, image_size=image_size,
                         resize=resize, repeat=False if repeat is None else repeat)


def _check_arguments(*, resize, augment_on, batch_size, image_size) -> None:
    """Raises ValueError for an input_fn argument out of its range (see input_fn)."""
    if resize not in RESIZE_METHODS:
        raise ValueError(f"resize must be one of {RESIZE_METHODS}, got {resize!r}")
    if augment_on not in AUGMENT_PLACEMENTS:
        raise ValueError(f"augment_on must be one of {AUGMENT_PLACEMENTS}, got {augment_on!r}")
    if batch_size < 1 or image_size < 1:
        raise ValueError(f"batch_size and image_size must be >= 1, got {batch_size}, {image_size}")


def _training_seed(seed, allow_unseeded_shuffle: bool):
    """The training stream's seed: `seed` as given (an int >= 0), or, when it is
    None and allow_unseeded_shuffle is True, a fresh one from the OS in
    [0, 2**63). Raises ValueError for a negative seed, or for None without
    allow_unseeded_shuffle (an unseeded shuffle makes runs irreproducible)."""
    if seed is None:
        if not allow_unseeded_shuffle:
            raise ValueError(
                "input_fn(training=True) needs a seed: shuffling without one makes runs "
                "irreproducible. Pass seed=<int>, or allow_unseeded_shuffle=True to "
                "draw one at random.")
        seed = int(np.random.SeedSequence().entropy % (2**63))
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    return seed


def num_examples(records: str, split: str) -> int:
    """Number of stored images in `split` (from info.json). Validation yields 4x this."""
    info = recordio.load_info(records)
    recordio.shard_paths(records, split, info)  # clear error for an unknown split
    return int(info["splits"][split]["num_examples"])


def source_ids(records: str, split: str) -> list:
    """The split's source ids (paths relative to make_records' --src), as bytes,
    in the order the evaluation stream (input_fn(training=False)) yields the
    images: example i of that stream is image i // 4, turned i % 4 quarter turns.
    Reads only the id feature, no pixels."""
    files = recordio.shard_paths(records, split, recordio.load_info(records))
    spec = {schema.SOURCE_ID: tf.io.FixedLenFeature([], tf.string, default_value="")}
    ds = tf.data.TFRecordDataset(files).map(
        lambda s: tf.io.parse_single_example(s, spec)[schema.SOURCE_ID])
    with naming_damaged_records(records, split):
        return [bytes(x) for x in ds.as_numpy_iterator()]


@contextlib.contextmanager
def naming_damaged_records(records: str, split: str):
    """Turns a damaged-shard error inside the block into one naming the file and record.

        with inputs.naming_damaged_records("records/photos", "train"):
            model.fit(inputs.input_fn("records/photos", split="train", ...), ...)

    TFRecordDataset checks every record's length and CRCs and stops with
    tf.errors.DataLossError at the first damaged one, within the read of that
    record (never a hang; `ignore_errors` is never used), but its message gives
    only a byte offset ("corrupted record at 13541"), not the file. This
    context catches that error and re-reads the split's shards (plain
    sequential reads, stopping at the first damaged record) to name it.
    Nothing of this runs inside the tf.data graph, which stays free of
    py_function and serializable.

    Raises:
      recordio.RecordsError: "<shard path>: record <i> is damaged ...".
    """
    try:
        yield
    except tf.errors.InvalidArgumentError as e:
        found = re.search(_TOO_LARGE + r"\]\s*\[(-?\d+)\]\s*\[(\d+)\]", e.message or str(e))
        if not found:
            raise
        pixels, limit = int(found.group(1)), int(found.group(2))
        what = ("is neither JPEG nor PNG" if pixels < 0 else
                f"declares {pixels / 1e6:.0f} MP > limit {limit / 1e6:.0f} MP")
        raise recordio.RecordsError(
            f"{records!r}: split {split!r}: a record's image {what} (refused before "
            "decoding; make_records never stores such images): remake the records") from None
    except tf.errors.DataLossError as e:
        located = find_damaged_record(_listed_shards(records, split))
        if located is None:
            raise
        path, index, message = located
        raise recordio.RecordsError(
            f"{path}: record {index} is damaged (truncated or corrupted shard: {message}); "
            "restore the file or run make_records again") from e


def _listed_shards(records, split):
    """The split's shard paths from info.json, without load_info's checks (which
    would refuse a shard truncated meanwhile before naming its record)."""
    try:
        names = fileio.load_json(os.path.join(records, schema.INFO_FILE))["splits"][split]["shards"]
        for index, name in enumerate(names):   # never a name leading outside the folder
            schema.check_shard_name(name, split, index, len(names))
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [os.path.join(records, name) for name in names]


def find_damaged_record(paths):
    """The first damaged record of the given shard files, or None.

    Returns:
      (path, index of the first record that does not read, TensorFlow's message).
    """
    for path in paths:
        try:
            for _ in recordio.read_shard(path):
                pass
        except recordio.DamagedShard as damaged:
            e = damaged.error
            if not isinstance(e, tf.errors.DataLossError):
                raise e
            text = re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\].*", "",
                          (e.message or str(e)).strip().splitlines()[0])
            return path, damaged.index, text or "data loss"
    return None


def derive_seeds(seed: int, pipeline_id: int = 0) -> dict:
    """Independent seeds for every random stage, from one integer (CLU style).

    Returns:
      {"files": int, "examples": int (tf.data shuffle seeds, >= 0),
       "augment": int64 [2] key for tf.random stateless ops}.
    Each input pipeline (tf.distribute) gets its own stream via the SeedSequence
    spawn key, so replicas never see the same augmentation.
    """
    state = np.random.SeedSequence(int(seed), spawn_key=(int(pipeline_id),)).generate_state(
        4, dtype=np.uint64)
    state = (state >> np.uint64(1)).astype(np.int64)  # non-negative int64
    return {"files": int(state[0]), "examples": int(state[1]),
            "augment": state[2:4].copy()}


def shard_files(files: list, input_context, *, split: str = "") -> list:
    """This input pipeline's share of the shard files (every n-th file).

    Raises:
      ValueError when there are fewer files than input pipelines: sharding by
      example instead would make every pipeline read every file.
    """
    n = input_context.num_input_pipelines
    if len(files) < n:
        raise ValueError(
            f"split {split!r} has {len(files)} shard file(s) but there are {n} input "
            f"pipelines; each pipeline reads whole files, so the records need at least {n} "
            f"shards (a multiple of {n} balances them): remake them with "
            f"`make_records --num_shards={n}` (or a multiple of {n})")
    return list(files[input_context.input_pipeline_id::n])


def _train_dataset(files, *, batch_size, image_size, seeds, resize, policy,
                   augment_on, shuffle_buffer, repeat, cycle_length, skip_batches=0):
    # Imported here so that evaluation and serving never need the augmentation code.
    from upright.pipeline import augment
    op = augment.parse_policy(policy)
    host_op = op
    if augment_on == "device":
        host_op, _ = augment.split_policy(op)

    ds = tf.data.Dataset.from_tensor_slices(files)
    # Shuffle the file order before repeat, so every epoch reads each file once,
    # in its own (seeded) order.
    ds = ds.shuffle(len(files), seed=seeds["files"], reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    # Parallel reads, but deterministic=True keeps the round-robin order fixed:
    # the same seed gives the same stream.
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(cycle_length, len(files)),
                       block_length=1, num_parallel_calls=AUTOTUNE, deterministic=True)
    # Shuffle serialized examples (small) rather than decoded images (large), after
    # repeat so the buffer never drains at an epoch boundary.
    ds = ds.shuffle(shuffle_buffer, seed=seeds["examples"], reshuffle_each_iteration=True)
    # Per-image work before batch: stored images differ in size.
    ds = ds.map(lambda s: _parse_and_preprocess(s, image_size, resize),
                num_parallel_calls=AUTOTUNE, deterministic=True)
    # Static batch shape for the accelerator: drop the last partial batch.
    ds = ds.batch(batch_size, drop_remainder=True)
    # The batch index makes every batch's random key distinct and reproducible.
    ds = ds.enumerate()
    # A resumed run skips here: after the index (the seeds stay those of the
    # unskipped stream), before augmentation (skipping costs decoding only).
    if skip_batches:
        ds = ds.skip(skip_batches)
    key = tf.constant(seeds["augment"], tf.int64)

    def augment_batch(index, images):
        image_seeds = batch_image_seeds(key, index, tf.shape(images)[0])
        labels = tf.zeros(tf.shape(images)[:1], tf.int32)
        images, labels = augment.rotate90_random(images, labels, image_seeds)
        images, labels = host_op(images, labels, image_seeds)
        if augment_on == "device":
            return {"images": images, "seeds": image_seeds}, labels
        return images, labels

    ds = ds.map(augment_batch, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.with_options(_options())
    # Overlap the input pipeline with the training step.
    return ds.prefetch(AUTOTUNE)


def _eval_dataset(files, *, batch_size, image_size, resize, repeat):
    # Files and examples in stored order: the same examples in the same order on
    # every run (sequential reads; validation sets are small).
    ds = tf.data.TFRecordDataset(files)
    ds = ds.map(lambda s: _parse_and_preprocess(s, image_size, resize),
                num_parallel_calls=AUTOTUNE, deterministic=True)
    # Every image in all four orientations, labels 0..3: each class equally present.
    ds = ds.map(all_orientations, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.unbatch()
    # Keep the last, smaller batch: the number of scored examples (4 x N) must not
    # depend on the batch size.
    ds = ds.batch(batch_size, drop_remainder=False)
    if repeat:
        ds = ds.repeat()
    # No autotuning here: deleting an iterator waits for its autotune thread's
    # sleep (up to a minute) to end, and Keras drops the val iterator at every
    # epoch: that left both cores idle for 30-40 s in most of cpu.flags'
    # fine-tuning epochs (benchmarks/README.md, "Idle stalls between epochs").
    # AUTOTUNE then means as many parallel calls as cores (at most 16).
    ds = ds.with_options(_options(autotune=False))
    return ds.prefetch(AUTOTUNE)


def all_orientations(image):
    """One image [S, S, 3] -> its four orientations [4, S, S, 3], labels int32 [0, 1, 2, 3]."""
    images = tf.stack([tf.image.rot90(image, k) for k in range(schema.NUM_CLASSES)])
    return images, tf.range(schema.NUM_CLASSES, dtype=tf.int32)


def batch_image_seeds(key, batch_index, batch_size):
    """One stateless seed per image of a batch: int32 [B, 2].

    key: int64 [2] (derive_seeds()["augment"]); batch_index: int64 scalar.
    The key is folded with the batch index, then B seeds are drawn from it.
    """
    batch_key = tf.random.experimental.stateless_fold_in(key, batch_index)
    return tf.random.stateless_uniform([batch_size, 2], seed=batch_key, minval=None,
                                       maxval=None, dtype=tf.int32)


def _options(autotune=True):
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = autotune
    return options


def _parse_and_preprocess(serialized, image_size, resize):
    encoded = guard_record_image(schema.parse_example(serialized)["encoded"])
    return preprocess.preprocess_image(encoded, image_size, resize)


# Records may come from someone else: an image's header can declare any size,
# and TensorFlow's decoders allocate what it declares (a 1.17 MB PNG of
# 20000 x 20000 took 6.8 GB). make_records stores JPEG or PNG within its
# --max_pixels (default 128 MP; its stored sides are bounded by --max_side),
# so a record image beyond that is refused before decoding, in the graph.
MAX_RECORD_PIXELS = 128_000_000
_TOO_LARGE = "RECORD_IMAGE_TOO_LARGE"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def guard_record_image(encoded, max_pixels: int = MAX_RECORD_PIXELS):
    """encoded (scalar tf.string), passed on only if its header declares a JPEG or
    PNG of at most max_pixels; otherwise the read fails (InvalidArgumentError
    with _TOO_LARGE, which naming_damaged_records turns into a RecordsError).
    Reads the header only: extract_jpeg_shape for JPEG, the IHDR width and
    height (bytes 16..23, big-endian) for PNG. Other formats are refused: make_records
    never stores them."""
    padded = tf.strings.join([encoded, tf.constant(b"\0" * 24)])   # substr needs the bytes

    def png_pixels():
        raw = tf.cast(tf.io.decode_raw(tf.strings.substr(padded, 16, 8), tf.uint8), tf.int64)
        width = raw[0] * 2**24 + raw[1] * 2**16 + raw[2] * 2**8 + raw[3]
        height = raw[4] * 2**24 + raw[5] * 2**16 + raw[6] * 2**8 + raw[7]
        return width * height

    def jpeg_pixels():
        shape = tf.cast(tf.io.extract_jpeg_shape(encoded), tf.int64)
        return shape[0] * shape[1]

    is_png = tf.equal(tf.strings.substr(padded, 0, 8), _PNG_MAGIC)
    pixels = tf.cond(tf.io.is_jpeg(encoded), jpeg_pixels,
                     lambda: tf.cond(is_png, png_pixels,
                                     lambda: tf.constant(-1, tf.int64)))
    ok = tf.logical_and(pixels >= 0, pixels <= max_pixels)
    check = tf.debugging.Assert(ok, [tf.constant(_TOO_LARGE), pixels, tf.constant(max_pixels,
                                                                                   tf.int64)])
    with tf.control_dependencies([check]):
        return tf.identity(encoded)
