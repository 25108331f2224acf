"""Distribution: the tf.distribute strategy of --strategy, and the multi-worker
helpers (TF_CONFIG, who is the chief, where each worker writes).

    # on every machine, with its own index:
    export TF_CONFIG="$(python -c 'from upright.pipeline import cluster; \\
        print(cluster.tf_config(["host0:12345", "host1:12345"], index=0))')"
    train --flagfile=b1.flags --strategy=multi_worker --model_dir=/shared/runs/b1

tf.distribute.MultiWorkerMirroredStrategy reads the standard TF_CONFIG
environment variable ({"cluster": {"worker": [...]}, "task": {"type": "worker",
"index": i}}); every worker runs the same program, the variables are mirrored
and gradients are all-reduced, so every worker holds identical weights after
every step. Worker 0 is the chief (unless the cluster names a "chief" task).

Writing: every worker must run the same callbacks and saves (Keras saving and
BackupAndRestore take part in collective ops), but only the chief's files are
the run's output. `worker_dir` gives each non-chief worker its own folder, so
that two workers never write the same file (on a shared filesystem they would
otherwise overwrite each other's half-written checkpoints): BackupAndRestore
then keeps one backup per worker, and a restarted cluster resumes each worker
from its own backup, all at the same epoch.

Input: each worker's input pipeline gets its share of the shard files from its
tf.distribute.InputContext (inputs.input_fn(input_context=...)); the records
need at least as many shards as there are workers (make_records --num_shards).
"""
import json
import os
import socket

from upright.pipeline import fileio

WORKERS_SUBDIR = "workers"
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")


def make_strategy(name: str):
    """tf.distribute strategy for --strategy.

    auto: MirroredStrategy when several GPUs are visible, else the default
    (no distribution: one device, plain datasets). A TPU is used only when asked
    for (--strategy=tpu), since finding one needs a cluster resolver.
    """
    import tensorflow as tf
    if name == "auto":
        gpus = tf.config.list_logical_devices("GPU")
        if len(gpus) > 1:
            return tf.distribute.MirroredStrategy()
        return tf.distribute.get_strategy()
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        patch_keras_for_multi_worker()   # Keras 3.15 fit() fails with >1 worker
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu="")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {name!r}")


def resolve_augment_on(value: str) -> str:
    """'auto' -> 'device' when an accelerator is visible, else 'host'."""
    import tensorflow as tf
    if value != "auto":
        return value
    accelerators = tf.config.list_physical_devices("GPU") + tf.config.list_physical_devices("TPU")
    return "device" if accelerators else "host"


def free_ports(count: int, host: str = "127.0.0.1") -> list:
    """`count` distinct TCP ports free on `host` now (for tests and local clusters)."""
    sockets, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def tf_config(workers: list, index: int) -> str:
    """The TF_CONFIG JSON for worker `index` of the cluster `workers` ["host:port", ...]."""
    if not 0 <= index < len(workers):
        raise ValueError(f"worker index {index} not in [0, {len(workers)})")
    return json.dumps({"cluster": {"worker": list(workers)},
                       "task": {"type": "worker", "index": int(index)}})


def task(environ=None) -> dict:
    """This process's place in the cluster, from TF_CONFIG.

    Returns:
      {"type": "worker" | "chief" | ..., "index": int, "num_workers": int
       (workers + chief), "is_chief": bool}; without TF_CONFIG a single chief.
    Raises:
      ValueError: TF_CONFIG is not valid JSON or lacks cluster/task.
    """
    environ = os.environ if environ is None else environ
    raw = environ.get("TF_CONFIG", "")
    if not raw.strip():
        return {"type": "chief", "index": 0, "num_workers": 1, "is_chief": True}
    try:
        config = json.loads(raw)
        cluster, me = config["cluster"], config["task"]
        kind, index = me["type"], int(me["index"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"TF_CONFIG is not a valid cluster description ({e}); expected "
                         '{"cluster": {"worker": ["host:port", ...]}, '
                         '"task": {"type": "worker", "index": 0}}') from None
    num = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
    is_chief = kind == "chief" or (kind == "worker" and index == 0 and "chief" not in cluster)
    return {"type": kind, "index": index, "num_workers": num, "is_chief": is_chief}


def worker_dir(model_dir: str, environ=None) -> str:
    """Where this worker writes: model_dir for the chief, else
    model_dir/workers/<type>-<index> (created)."""
    me = task(environ)
    if me["is_chief"]:
        return model_dir
    # Created without following a link planted inside model_dir (fileio).
    return fileio.make_dirs(model_dir, os.path.join(WORKERS_SUBDIR,
                                                    f"{me['type']}-{me['index']}"))


def patch_keras_for_multi_worker():
    """Works around two Keras 3 (3.15) bugs that stop fit() with 2+ workers.

    Under MultiWorkerMirroredStrategy with more than one worker (one worker takes
    local shortcuts, so single-process tests pass) Keras' symbolic build
    (_local_batch_build) and its step logs' reduction (_scalar_mean_reduce)
    fail; each helper says how and what it does instead. Both fixes act only
    under a multi-worker collective strategy; everything else keeps Keras'
    behaviour. Process-wide and idempotent: call it once before fit() (e.g.
    where the strategy is made).
    """
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer as tf_trainer
    if getattr(tf_trainer, "_upright_multi_worker_patched", False):
        return
    multi_worker = tf_trainer._collective_all_reduce_multi_worker
    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _local_batch_build(
        tf, tf_trainer.TensorFlowTrainer._maybe_symbolic_build, multi_worker)
    tf_trainer.reduce_per_replica = _scalar_mean_reduce(
        tf, tf_trainer.reduce_per_replica, multi_worker)
    tf_trainer._upright_multi_worker_patched = True


def _local_batch_build(tf, keras_build, multi_worker):
    """A Trainer._maybe_symbolic_build that works with 2+ workers.

    Keras' (`keras_build`) reads one batch of the distributed dataset and, only
    to learn its shapes and dtypes, calls strategy.reduce("MEAN", batch) on the
    whole (images, labels) structure; the collective reduce cannot take a
    structure: "Attempt to convert a value (PerReplica:{...}) ... to a Tensor".
    The replacement passes keras_build the first local replica's batch instead
    (same shapes and dtypes, no communication) when `multi_worker(strategy)`
    (Keras' _collective_all_reduce_multi_worker) says the strategy is one.
    """
    def local(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return value.values[0]
        return value

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if (iterator is not None and data_batch is None
                and self._distribute_strategy is not None
                and multi_worker(self._distribute_strategy)):
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(local, next(it))
                break
            iterator = None
        return keras_build(self, iterator=iterator, data_batch=data_batch)

    return _maybe_symbolic_build


def _scalar_mean_reduce(tf, keras_reduce, multi_worker):
    """A reduce_per_replica that works with 2+ workers.

    Keras' (`keras_reduce`, for the train/test step's logs) reduces every value
    with strategy.reduce("MEAN", v, axis=0), which fails on the scalar loss and
    metric values: "Invalid reduction dimension 0 for input with 0 dimensions".
    The replacement averages scalars over all replicas (axis=None) under a
    multi-worker strategy (`multi_worker(strategy)`), so every worker logs the
    same global value and callbacks (EarlyStopping, ReduceLROnPlateau, best
    checkpoint) decide alike on every worker; anything else goes to keras_reduce.
    """
    def reduce_per_replica(values, strategy, reduction):
        if not multi_worker(strategy) or reduction not in ("auto", "mean"):
            return keras_reduce(values, strategy, reduction)

        def reduce_one(v):
            # With one local replica the step's outputs are plain tensors.
            first = v.values[0] if isinstance(v, tf.distribute.DistributedValues) else v
            if getattr(first, "shape", None) is not None and first.shape.rank == 0:
                return strategy.reduce("MEAN", v, axis=None)
            return keras_reduce(v, strategy, reduction)

        return tf.nest.map_structure(reduce_one, values)

    return reduce_per_replica


def average_non_trainable_weights(model, strategy):
    """Sets every floating non-trainable weight to its mean over all workers.

    Gradients are all-reduced, so trainable weights are identical on every
    worker; BatchNorm's moving mean and variance are not (Keras 3 updates them
    from each worker's own batches), so without this the workers' saved models
    differ. Call it at every epoch end, on every worker (it is a collective
    op): `AverageNonTrainableWeights` does. No-op outside a multi-worker strategy.
    """
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer as tf_trainer
    if not tf_trainer._collective_all_reduce_multi_worker(strategy):
        return
    variables = [v for v in model.non_trainable_variables if "float" in str(v.dtype)]
    if not variables:
        return

    def replica_mean():
        context = tf.distribute.get_replica_context()
        return [context.all_reduce("MEAN", tf.identity(v.value)) for v in variables]

    means = strategy.run(tf.function(replica_mean))
    for v, mean in zip(variables, means):
        v.assign(strategy.experimental_local_results(mean)[0])


def average_non_trainable_callback(model, strategy):
    """A keras Callback that runs average_non_trainable_weights at each epoch end
    (put it before callbacks that save the model)."""
    import keras

    class AverageNonTrainableWeights(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            average_non_trainable_weights(model, strategy)

    return AverageNonTrainableWeights()
