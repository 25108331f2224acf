"""Benchmark: EfficientNet-Lite0 beside EfficientNetB0 on this machine's CPU.

    python benchmarks/bench_backbones.py [--sizes 224,128] [--train_steps 3] [--profile] [--bf16]

In one run, for each backbone and image size (the project's classifier with the
linear head, random weights: size and speed do not depend on the values):
  export: TFLite file size (serve.export_tflite: float16 weights, float32 compute)
          and single-image CPU latency of that file (median of --repeats runs,
          --threads interpreter threads), and Keras's single-image latency;
  train:  training images/s at batch --batch, the compiled Keras train step
          (Adam, as train.py compiles it) on a cached batch, for a partial
          fine-tune (blocks 1-6 frozen with their BN: only block 7, top and
          head train), for full fine-tuning (everything trains) and for full
          fine-tuning with every BatchNorm layer frozen (inference mode), which
          is cpu.flags' stage 2;
  bf16 (--bf16): Lite0 training images/s for cpu.flags' stage 2 (every block
          trains, BatchNorm in inference mode) at the first size under Keras' mixed_bfloat16
          policy beside float32, alternating (float32, bf16, float32, bf16) so
          that load falls on both alike; prints the ratio;
  profile (--profile): one traced training step of each backbone at the first
          size, with the time per TensorFlow op type, top 12.
Then the Lite0 / B0 ratios. Also printed: the load average (other processes on
the machine slow every number down alike, ratios less so).
"""
import argparse
import collections
import glob
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BACKBONES = ("efficientnetb0", "efficientnet_lite0")


def build(backbone, size):
    from upright.pipeline import model as model_lib
    return model_lib.build_model(backbone=backbone, image_size=size, weights=None,
                                 head="linear")


def bench_export(backbone, size, repeats, threads, workdir):
    from upright.pipeline import serve
    import tensorflow as tf
    model = build(backbone, size)
    path = os.path.join(workdir, f"{backbone}_{size}.tflite")
    nbytes = serve.export_tflite(model, path, image_size=size)
    interpreter = serve._tflite_interpreter(path)
    try:
        interpreter = type(interpreter)(model_path=path, num_threads=threads)
    except TypeError:
        pass
    runner = interpreter.get_signature_runner()
    (name,) = list(runner.get_input_details())
    image = np.random.default_rng(0).uniform(0, 255, (1, size, size, 3)).astype(np.float32)
    times = []
    for i in range(repeats + 3):
        t = time.perf_counter()
        runner(**{name: image})
        if i >= 3:
            times.append(time.perf_counter() - t)
    predict = tf.function(lambda x: model(x, training=False))
    keras_times = []
    for i in range(repeats + 3):
        t = time.perf_counter()
        predict(image).numpy()
        if i >= 3:
            keras_times.append(time.perf_counter() - t)
    return {"tflite_mb": nbytes / 1e6, "tflite_ms": 1e3 * statistics.median(times),
            "tflite_min_ms": 1e3 * min(times),
            "keras_ms": 1e3 * statistics.median(keras_times),
            "params_m": model.count_params() / 1e6}


def compiled(backbone, size, freeze_below_block, freeze_all_batchnorm=False):
    import keras
    from upright.pipeline import model as model_lib
    model = build(backbone, size)
    model_lib.set_trainable(model, freeze_below_block=freeze_below_block,
                            train_batchnorm=False)
    if freeze_all_batchnorm:   # BN in inference mode: no batch moments, no BN gradients
        for layer in model_lib.get_backbone(model).layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    model.compile(optimizer=keras.optimizers.Adam(1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(), jit_compile="auto")
    return model


def bench_train(backbone, size, batch, steps, freeze_below_block, freeze_all_batchnorm=False):
    model = compiled(backbone, size, freeze_below_block, freeze_all_batchnorm)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    y = rng.integers(0, 4, batch)
    model.train_on_batch(x, y)      # traces and compiles
    t = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return batch * steps / (time.perf_counter() - t)


def bench_bf16(size, batch, steps, rounds=2):
    """Lite0 stage-2 training images/s, {policy: [per round]}, policies alternating."""
    import keras
    speeds = collections.defaultdict(list)
    try:
        for _ in range(rounds):
            for policy in ("float32", "mixed_bfloat16"):
                keras.mixed_precision.set_global_policy(policy)
                speeds[policy].append(bench_train("efficientnet_lite0", size, batch, steps, 0,
                                                  freeze_all_batchnorm=True))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return speeds


def profile_step(backbone, size, batch, workdir, top=12):
    """{op type: ms} of one training step (all layers train), from the TF profiler."""
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    model = compiled(backbone, size, 0)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    y = rng.integers(0, 4, batch)
    model.train_on_batch(x, y)
    logdir = os.path.join(workdir, f"profile_{backbone}_{size}")
    tf.profiler.experimental.start(logdir)
    t = time.perf_counter()
    model.train_on_batch(x, y)
    step_s = time.perf_counter() - t
    tf.profiler.experimental.stop()
    (path,) = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    by_type = collections.Counter()
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        names = {i: m.name for i, m in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                name = names.get(event.metadata_id, "")
                # TF op events are "scope/name:OpType"; others (executor, python) skipped.
                if ":" in name and "/" in name.split(":")[0]:
                    by_type[name.rsplit(":", 1)[1]] += event.duration_ps / 1e9
    return step_s, by_type.most_common(top)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="224,128")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--train_steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--skip_train", action="store_true")
    parser.add_argument("--bf16", action="store_true",
                        help="also time Lite0's stage 2 under mixed_bfloat16 beside float32")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"cpus {os.cpu_count()}, load average at start {os.getloadavg()[0]:.1f}")
    rows = {}
    with tempfile.TemporaryDirectory() as workdir:
        for size in sizes:
            for backbone in BACKBONES:
                row = bench_export(backbone, size, args.repeats, args.threads, workdir)
                if not args.skip_train:
                    row["train_stage1"] = bench_train(backbone, size, args.batch,
                                                      args.train_steps, 7)
                    row["train_all"] = bench_train(backbone, size, args.batch,
                                                   args.train_steps, 0)
                    row["train_all_bn_frozen"] = bench_train(backbone, size, args.batch,
                                                             args.train_steps, 0, True)
                rows[(backbone, size)] = row
                print(f"{backbone:19s} {size:4d}px " + "  ".join(
                    f"{k} {v:.2f}" for k, v in row.items()), flush=True)
        print("\n| backbone | size | params M | TFLite MB | TFLite ms (median / min) | Keras ms"
              + (" | train img/s stage1 | all | all, BN frozen |" if not args.skip_train
                 else " |"))
        for (backbone, size), r in rows.items():
            line = (f"| {backbone} | {size} | {r['params_m']:.2f} | {r['tflite_mb']:.2f} | "
                    f"{r['tflite_ms']:.1f} / {r['tflite_min_ms']:.1f} | {r['keras_ms']:.1f} |")
            if "train_all" in r:
                line += (f" {r['train_stage1']:.1f} | {r['train_all']:.1f} | "
                         f"{r['train_all_bn_frozen']:.1f} |")
            print(line)
        print("\nratios Lite0 / B0:")
        for size in sizes:
            a, b = rows[("efficientnet_lite0", size)], rows[("efficientnetb0", size)]
            print(f"  {size}px: " + ", ".join(f"{k} {a[k] / b[k]:.2f}" for k in a))
        if args.bf16:
            speeds = bench_bf16(sizes[0], args.batch, args.train_steps)
            f32, bf16 = (statistics.median(speeds[p]) for p in ("float32", "mixed_bfloat16"))
            print(f"\nLite0 {sizes[0]}px stage 2 (every block, BN frozen), train img/s per round: "
                  + "; ".join(f"{p} " + ", ".join(f"{v:.1f}" for v in speeds[p])
                              for p in ("float32", "mixed_bfloat16"))
                  + f"; bf16 / float32 {bf16 / f32:.2f}")
        if args.profile:
            for backbone in BACKBONES:
                step_s, top = profile_step(backbone, sizes[0], args.batch, workdir)
                total = sum(ms for _, ms in top)
                print(f"\nprofile {backbone} {sizes[0]}px batch {args.batch}: step "
                      f"{step_s:.2f} s traced; op types by CPU time (ms, summed over threads):")
                for op, ms in top:
                    print(f"  {op:40s} {ms:9.1f}  {100 * ms / total:5.1f}%")
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
