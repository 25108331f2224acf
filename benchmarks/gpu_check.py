"""The accelerator check: training images/s, input wait and augmentation cost in one table.

    bash benchmarks/gpu_check.sh                  # on a GPU machine, < 8 minutes
    python benchmarks/gpu_check.py --smoke        # CPU, tiny sizes, about a minute

Makes records from generated demo scenes (pipeline/demo.py, no downloads), then
for augment_on in {host, device} x mixed precision {off, on} x XLA {off, on}
builds the backbone with random weights (speed does not depend on them) and
times training steps of the real input_fn stream against steps on one batch
held in memory:
  images/s        batch / step time with the real stream
  compute/s       batch / step time on the cached batch (no input work)
  input wait      max(0, 1 - t_cached / t_real): the share of a step spent
                  waiting for the input pipeline (target < 5 % with device)
  augment         the augmentation's seconds per batch / t_real (target < 10 %).
                  device: the AugmentLayer alone on the cached batch, compiled
                  as the step is (XLA: its static schedule); host: the policy
                  alone as tf.data runs it (grouped schedule), which runs on
                  the CPU beside the step: it costs a step only through
                  input wait, but says how busy it keeps the host
  step ms         t_real in milliseconds (the figure to compare placements by)
Then the input fn alone (no model): batches/s and images/s of both forms.
XLA with augment_on=device compiles the AugmentLayer with the step (the xla
column says "fell back" if Keras turned XLA off because a layer cannot compile).
--rows picks rows, e.g. --rows host:0:0,device:0:1 (augment_on:mixed:xla).
Writes the table to stdout and all numbers to --work_dir/gpu_check.json.
"""
import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FULL = dict(backbone="efficientnetb1", image_size=128, batch_size=256, images=3072,
            steps=15, warmup=3, input_batches=30)
SMOKE = dict(backbone="tiny", image_size=32, batch_size=8, images=32, steps=2, warmup=1,
             input_batches=3)
# The smoke test runs every code path once, cheaply: two of the eight rows and a
# short policy that still has a host part (JPEG) and a device part.
SMOKE_ROWS = (("host", False, False), ("device", True, True))
SMOKE_POLICY = "sometimes(0.5, jpeg(60,80)); add(-15,15) | multiply(0.8,1.2)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes for a CPU smoke test")
    p.add_argument("--work_dir", default=None, help="where images and records go "
                   "(default: a temporary folder, removed)")
    for key, value in FULL.items():
        p.add_argument(f"--{key}", type=type(value), default=None,
                       help=f"default {value} ({SMOKE[key]} with --smoke)")
    p.add_argument("--rows", default=None,
                   help="comma-separated augment_on:mixed:xla rows, e.g. host:0:0,device:0:1 "
                   "(default: all eight; two with --smoke)")
    p.add_argument("--policy", default=None,
                   help="augmentation policy spec (default: default; a short one with --smoke)")
    args = p.parse_args(argv)
    base = SMOKE if args.smoke else FULL
    if args.policy is None:
        args.policy = SMOKE_POLICY if args.smoke else "default"
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def parse_rows(text):
    """"host:0:0,device:0:1" -> [("host", False, False), ("device", False, True)]."""
    rows = []
    for item in text.split(","):
        augment_on, mixed, xla = item.strip().split(":")
        if augment_on not in ("host", "device"):
            raise SystemExit(f"gpu_check: error: --rows: augment_on {augment_on!r} "
                             "is not host or device")
        rows.append((augment_on, mixed.lower() in ("1", "true"), xla.lower() in ("1", "true")))
    return rows


def make_records(work_dir, count, image_size):
    from upright.pipeline import demo, records
    src, out = os.path.join(work_dir, "images"), os.path.join(work_dir, "records")
    if not os.path.exists(os.path.join(out, "info.json")):
        demo.make_demo_images(src, count=count, seed=0, min_side=max(64, image_size),
                              max_side=max(96, 2 * image_size))
        records.make_records(src=src, out=out, val_fraction=0.1, progress=False,
                             max_side=2 * image_size, workers=None if count > 64 else 1)
    return out


def train_stream(args, records, augment_on, policy):
    from upright.pipeline import inputs
    return inputs.input_fn(records, split="train", batch_size=args.batch_size,
                           image_size=args.image_size, training=True, seed=0,
                           policy=policy, augment_on=augment_on, shuffle_buffer=512)


def build(args, augment_on, mixed, xla):
    import keras
    from upright.pipeline import augment
    from upright.pipeline import model as model_lib
    keras.config.set_dtype_policy("mixed_float16" if mixed else "float32")
    classifier = model_lib.build_model(backbone=args.backbone, image_size=args.image_size,
                                       weights=None)
    layer = None
    model = classifier
    if augment_on == "device":
        s = args.image_size
        x = {"images": keras.Input((s, s, 3), dtype="float32", name="images"),
             "seeds": keras.Input((2,), dtype="int32", name="seeds")}
        layer = augment.AugmentLayer(args.policy, name="augment")
        model = keras.Model(x, classifier(layer(x)))
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(), jit_compile=xla)
    # Keras falls back to no XLA (with a warning) when a layer cannot compile.
    return model, layer, bool(getattr(model, "jit_compile", xla))


def time_steps(model, ds, steps, warmup):
    it = iter(ds)
    for _ in range(warmup):
        model.train_on_batch(*next(it))
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = model.train_on_batch(*next(it))
    float(loss if not isinstance(loss, (list, tuple)) else loss[0])  # wait for the device
    return (time.perf_counter() - t0) / steps


def time_augment(layer, batch, steps, xla):
    """Seconds per batch of the AugmentLayer alone (training mode), compiled as
    the train step is: jit_compile=xla (XLA: the static schedule)."""
    import tensorflow as tf
    features = batch[0]
    call = tf.function(lambda f: layer(f, training=True), jit_compile=bool(xla))
    call(features).numpy()
    t0 = time.perf_counter()
    for _ in range(steps):
        out = call(features)
    out.numpy()
    return (time.perf_counter() - t0) / steps


def time_host_augment(args, batch, steps):
    """Seconds per batch of rotate90_random + the whole policy as tf.data runs
    it for augment_on=host (grouped schedule), on one decoded batch."""
    import tensorflow as tf
    from upright.pipeline import augment
    policy = augment.parse_policy(args.policy)
    images, labels = batch
    seeds = tf.reshape(tf.range(2 * images.shape[0], dtype=tf.int32), [-1, 2])
    call = tf.function(lambda x, y, s: policy(*augment.rotate90_random(x, y, s), s)[0])
    call(images, labels, seeds).numpy()
    t0 = time.perf_counter()
    for i in range(steps):
        out = call(images, labels, seeds + i)
    out.numpy()
    return (time.perf_counter() - t0) / steps


def measure(args, records, augment_on, mixed, xla):
    import keras
    row = {"augment_on": augment_on, "mixed_precision": mixed, "xla": xla}
    try:
        model, layer, row["xla"] = build(args, augment_on, mixed, xla)
        if xla and not row["xla"]:
            row["xla"] = "fell back"
        stream = train_stream(args, records, augment_on, args.policy)
        cached = stream.take(1).cache().repeat()
        t_cached = time_steps(model, cached, args.steps, args.warmup)
        t_real = time_steps(model, stream, args.steps, args.warmup)
        row.update(images_per_s=args.batch_size / t_real,
                   compute_images_per_s=args.batch_size / t_cached,
                   input_wait=max(0.0, 1.0 - t_cached / t_real),
                   step_ms=1000.0 * t_real)
        batch = next(iter(cached))
        if layer is not None:
            row["augment_s"] = time_augment(layer, batch, args.steps, row["xla"] is True)
        else:
            row["augment_s"] = time_host_augment(args, batch, args.steps)
        row["augment_share"] = row["augment_s"] / t_real
    except Exception as e:   # e.g. XLA cannot compile the AugmentLayer: report, go on
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:100]}"
    finally:
        keras.config.set_dtype_policy("float32")
        keras.backend.clear_session()
    return row


def input_only(args, records, augment_on):
    stream = train_stream(args, records, augment_on, args.policy)
    it = iter(stream)
    for _ in range(2):
        next(it)
    t0 = time.perf_counter()
    for _ in range(args.input_batches):
        next(it)
    seconds = (time.perf_counter() - t0) / args.input_batches
    return {"augment_on": augment_on, "batches_per_s": 1 / seconds,
            "images_per_s": args.batch_size / seconds}


def format_header(device, args) -> str:
    return (f"gpu_check: {args.backbone} at {args.image_size}, batch {args.batch_size}, "
            f"policy {args.policy!r}, device {device}\n"
            f"{'augment_on':<10} {'mixed':<5} {'xla':<9} {'images/s':>9} "
            f"{'compute/s':>9} {'input wait':>10} {'augment':>8} {'step ms':>8}")


def format_row(r) -> str:
    head = f"{r['augment_on']:<10} {str(r['mixed_precision']):<5} {str(r['xla']):<9} "
    if "error" in r:
        return head + f"n/a: {r['error']}"
    share = f"{100 * r['augment_share']:7.1f}%" if "augment_share" in r else f"{'-':>8}"
    return head + (f"{r['images_per_s']:9.1f} {r['compute_images_per_s']:9.1f} "
                   f"{100 * r['input_wait']:9.1f}% {share} {r['step_ms']:8.1f}")


def format_input_row(r) -> str:
    return (f"  augment_on={r['augment_on']:<6} {r['images_per_s']:9.1f} images/s "
            f"({r['batches_per_s']:.2f} batches/s)")


def main(argv=None):
    args = parse_args(argv)
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    device = (tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
              if gpus else "CPU")
    if not gpus and not args.smoke:
        print("gpu_check: no GPU visible to TensorFlow; the full check is meant for a GPU "
              "(use --smoke on CPU)", file=sys.stderr)
    started = time.time()
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(work_dir, exist_ok=True)
    records = make_records(work_dir, args.images, args.image_size)
    t_records = time.time() - started
    configs = parse_rows(args.rows) if args.rows else SMOKE_ROWS if args.smoke else [
        (augment_on, mixed, xla) for augment_on in ("host", "device")
        for mixed in (False, True) for xla in (False, True)]
    # One line per row as soon as it is measured: a run cut short keeps its rows.
    print(format_header(device, args), flush=True)
    rows = []
    for config in configs:
        rows.append(measure(args, records, *config))
        print(format_row(rows[-1]), flush=True)
    print("input fn alone (no model):", flush=True)
    inputs_rows = []
    for augment_on in ("host", "device"):
        inputs_rows.append(input_only(args, records, augment_on))
        print(format_input_row(inputs_rows[-1]), flush=True)
    total = time.time() - started
    print(f"gpu_check: records {t_records:.0f} s, total {total:.0f} s")
    with open(os.path.join(work_dir, "gpu_check.json"), "w") as f:
        json.dump({"device": device, "args": vars(args), "rows": rows, "input_fn": inputs_rows,
                   "seconds_total": total, "seconds_records": t_records}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
