"""bench_input: how fast the input pipeline and the augmentation run here.

Measures, in ONE run on the same records and cores, images/s of:
  1. decode + resize only (parse, decode, resize to S, batch);
  2. + random quarter turn (input_fn, training=True, policy "none");
  3. + the full augmentation policy in host placement (input_fn, training=True);
  4. the policy alone on decoded batches, and each op alone (the cost table);
  5. the albumentations baseline: its equivalent ops per image in worker
     processes, the way users pair it with tf.data today (needs the [bench]
     extra), on the same decoded images -- and the ratio of 4 to 5.
Each row also gives images per CPU-second of this process and its children,
which is steadier than wall time on a shared machine.

    bench_input --records records/photos --image_size 128
    bench_input --records records/photos --ops=false --albumentations=false
"""
import os
import sys
import time

from absl import app
from absl import flags

from upright import tools

_RECORDS = flags.DEFINE_string("records", None, "Records folder written by make_records.")
_SPLIT = flags.DEFINE_string("split", "train", "Split to read.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 128, "Output side S.", lower_bound=8)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Batch size.", lower_bound=1)
_BATCHES = flags.DEFINE_integer("batches", 30, "Batches timed per row (after warm-up).", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 5, "Batches skipped before timing.", lower_bound=0)
_POLICY = flags.DEFINE_string("policy", "default", "Augmentation policy spec.")
_OPS = flags.DEFINE_boolean("ops", True, "Also print the per-op cost table.")
_ALBU = flags.DEFINE_boolean("albumentations", True,
                             "Also run the albumentations baseline (pip install -e '.[bench]').")
_PROCESSES = flags.DEFINE_integer("processes", os.cpu_count(),
                                  "Worker processes of the albumentations baseline.", lower_bound=1)
flags.mark_flag_as_required("records")


def _cpu_seconds():
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def time_dataset(ds, *, batches, warmup):
    """(images/s wall, images per CPU-second) over `batches` batches of ds."""
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    n = 0
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        x, _ = next(it)
        x = x["images"] if isinstance(x, dict) else x
        n += int(x.shape[0])
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    return n / wall, n / max(cpu, 1e-9)


def decode_only_dataset(records, split, image_size, batch_size):
    """parse + decode + resize + batch: the floor under every other row."""
    import tensorflow as tf
    from upright.pipeline import preprocess, recordio, schema
    files = recordio.shard_paths(records, split)

    def load(serialized):
        encoded = schema.parse_example(serialized)["encoded"]
        image = preprocess.preprocess_image(encoded, image_size)
        return image, tf.zeros([], tf.int32)

    return (tf.data.TFRecordDataset(files).repeat()
            .map(load, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size, drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE))


def decoded_sample(records, split, image_size, count):
    """uint8 numpy [count, S, S, 3]: decoded, resized images of the records."""
    import numpy as np
    ds = decode_only_dataset(records, split, image_size, count)
    images, _ = next(iter(ds))
    return np.clip(np.round(images.numpy()), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- per-op cost table

def _leaves(op):
    """(label, op) for every leaf op of a policy, in order."""
    from upright.pipeline import augment, augment_ops
    if isinstance(op, (augment.Sequential, augment.OneOf)):
        out = []
        for child in op.ops:
            out.extend(_leaves(child))
        return out
    return [] if isinstance(op, augment_ops.Identity) else [(op.spec(), op)]


def time_op(op, images, seeds, *, num_batches=20, warmup=3, num_parallel_calls=None):
    """Speed of `op` mapped over batches inside a tf.data pipeline.

    images float32 [B, S, S, 3] in [0, 255] (already decoded: one batch reused,
    with fresh seeds for every batch); seeds int32 [B, 2].
    Returns (images per second of wall time, CPU milliseconds per image). The
    CPU time counts this process only, so it stays meaningful when other
    processes share the cores; cores / (CPU s per image) bounds images/s.
    """
    import tensorflow as tf
    images = tf.convert_to_tensor(images, tf.float32)
    seeds = tf.convert_to_tensor(seeds, tf.int32)
    labels = tf.zeros(tf.shape(images)[:1], tf.int32)
    batch = int(images.shape[0])

    def make(i):
        step = tf.cast(i, tf.int32) * tf.constant([1, 7919], tf.int32)
        return images, labels, seeds + step

    ds = (tf.data.Dataset.range(warmup + num_batches)
          .map(make)
          .map(op, num_parallel_calls=num_parallel_calls or tf.data.AUTOTUNE)
          .prefetch(2))
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        next(it)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    n = batch * num_batches
    return n / wall, 1000.0 * cpu / n


def benchmark_ops(images, seeds, *, spec="default", num_batches=20, warmup=10,
                  num_parallel_calls=None, leaves=True):
    """A per-op cost table for a policy: list of (label, images/s, CPU ms/image).

    Rows: rotate90_random; every leaf op alone on all images (if `leaves`);
    every top-level step as it sits in the policy (a OneOf/Sometimes costs
    only its chosen share); the host part, the device part and the whole
    policy; then rotate90_random + whole policy (what input_fn runs per batch
    after decoding). Measured inside tf.data (batch-level map, parallel calls)
    on the given decoded batch, e.g. 64 images at S = 128. The warm-up
    batches also absorb XLA compilation (one per bucketed group size).
    """
    from upright.pipeline import augment, augment_ops
    policy = augment.parse_policy(spec)
    rows = []

    def add(label, op):
        rows.append((label, *time_op(op, images, seeds, num_batches=num_batches, warmup=warmup,
                                      num_parallel_calls=num_parallel_calls)))

    add("rotate90_random", augment.rotate90_random)
    if leaves:
        for label, op in _leaves(policy):
            add(f"alone: {label}", op)
    for step in policy.ops:
        add(f"step: {step.spec()}", step)
    host, device = augment.split_policy(policy)
    add("host part", host)
    add("device part", device)
    add(f"policy {spec!r}", policy)

    @augment_ops.plain
    def rotate_and_augment(x, y, s):
        return policy(*augment.rotate90_random(x, y, s), s)

    add(f"rotate90_random + policy {spec!r}", rotate_and_augment)
    return rows


def format_cost_table(rows) -> str:
    """The rows of benchmark_ops as an aligned text table."""
    lines = [f"{'images/s':>9} {'CPU ms/img':>10}  op"]
    lines += [f"{ips:9.0f} {cpu:10.3f}  {label}" for label, ips, cpu in rows]
    return "\n".join(lines)


def run_benchmark(*, records, split, image_size, batch_size, batches, warmup, policy,
                  ops, albumentations, processes, out=sys.stdout):
    import numpy as np
    import tensorflow as tf
    from upright.pipeline import augment, inputs

    def row(label, ips, per_cpu, note=""):
        print(f"{label:<58} {ips:>9.0f} {per_cpu:>11.0f}  {note}", file=out, flush=True)

    print(f"records {records} ({split}), S={image_size}, batch {batch_size}, "
          f"{os.cpu_count()} cores, TensorFlow {tf.__version__}", file=out)
    print(f"{'pipeline':<58} {'images/s':>9} {'img/CPU-s':>11}", file=out)
    kw = dict(batches=batches, warmup=warmup)
    row("1. decode + resize", *time_dataset(
        decode_only_dataset(records, split, image_size, batch_size), **kw))
    common = dict(split=split, batch_size=batch_size, image_size=image_size,
                  training=True, seed=0)
    row("2. + random quarter turn (input_fn, policy none)", *time_dataset(
        inputs.input_fn(records, policy="none", **common), **kw))
    full = time_dataset(inputs.input_fn(records, policy=policy, **common), **kw)
    row(f"3. + policy {policy!r}, host placement (input_fn)", *full)

    images = decoded_sample(records, split, image_size, batch_size)
    seeds = np.random.default_rng(0).integers(0, 2**31 - 1, [batch_size, 2], dtype=np.int32)
    alone, alone_cpu_ms = time_op(augment.parse_policy(policy), images.astype(np.float32),
                                   seeds, num_batches=batches, warmup=warmup)
    row(f"4. policy {policy!r} alone, decoded batches", alone, 1000.0 / alone_cpu_ms)
    if albumentations:
        try:
            from upright.tools import albu_baseline
            import albumentations as unused_albumentations  # noqa: F401
        except ImportError as e:
            print(f"5. albumentations baseline skipped: {e} (pip install -e '.[bench]')", file=out)
        else:
            base, base_cpu_ms = albu_baseline.images_per_second(
                images, processes=processes, rounds=max(1, batches // 4))
            row(f"5. albumentations, per image, {processes} processes", base, 1000.0 / base_cpu_ms)
            print(f"ratio 4/5 (policy vs albumentations, same images and cores): "
                  f"{alone / base:.2f}x wall, {base_cpu_ms / alone_cpu_ms:.2f}x per CPU-second "
                  f"(target >= 1.5x)", file=out)
    print(f"full host pipeline (row 3): {full[0]:.0f} images/s (target >= 600 at S=128)", file=out)
    if ops:
        print(f"\nper-op cost, decoded batches of {batch_size} at S={image_size} "
              f"(a OneOf step pays only for its chosen share):", file=out)
        rows = benchmark_ops(images.astype(np.float32), seeds, spec=policy,
                             num_batches=max(5, batches // 2), warmup=warmup)
        print(format_cost_table(rows), file=out, flush=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from upright.pipeline import recordio
    try:
        recordio.load_info(_RECORDS.value)
    except recordio.RecordsError as e:
        print(f"bench_input: error: {e}", file=sys.stderr)
        return 2
    run_benchmark(records=_RECORDS.value, split=_SPLIT.value, image_size=_IMAGE_SIZE.value,
                  batch_size=_BATCH_SIZE.value, batches=_BATCHES.value, warmup=_WARMUP.value,
                  policy=_POLICY.value, ops=_OPS.value, albumentations=_ALBU.value,
                  processes=_PROCESSES.value)
    return 0


def run():
    tools.run_tool(main, __name__)


if __name__ == "__main__":
    run()
