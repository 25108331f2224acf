"""tf.data service: move the input pipeline's pixel work off the training host.

    # on one or more CPU hosts (blocking; see tools/data_service.py):
    dispatcher = data_service.start_dispatcher(5050)
    worker = data_service.start_worker("grpc://dispatcher-host:5050", 5051)

    # in the trainer, on the dataset that input_fn (or train.train_stream) built:
    ds = data_service.maybe_distribute(ds, "grpc://dispatcher-host:5050",
                                       job_name="upright-stage1-seed0")

This is TensorFlow's own engine (tf.data.experimental.service): the trainer
serializes the dataset graph and sends it to the dispatcher; every worker runs
that graph (read, decode, resize, rotate, augment) and streams finished batches
back over gRPC. Nothing runs in Python on the workers, which is why the input
pipeline must contain no py_function and no Python generator
(`python_ops` finds them; `distribute` refuses such a dataset).

Processing mode: "distributed_epoch" (tf.data.experimental.service.ShardingPolicy
.DYNAMIC). The dispatcher hands out the pipeline's source elements -- the shard
FILES of input_fn's from_tensor_slices, and the batch counter of its enumerate --
one at a time to whichever worker asks, so each file is read by exactly one
worker per epoch and each batch index (hence each batch's augmentation seeds)
is used once, however many workers there are. "parallel_epochs" would instead
run the whole seeded pipeline on every worker: with the same seed, N workers
send N copies of every batch. Workers may join or leave at any time (DYNAMIC
needs no fixed worker list). Costs: batches arrive in the order workers finish
them (the trainer's stream is no longer in a reproducible order, though each
epoch still covers the same files); and an epoch has at least as many files as
workers only if make_records wrote enough shards (--num_shards).

Shared job name: every consumer that passes the same job_name (e.g. the
replicas of a multi-worker run, or a restarted trainer) reads from ONE job, so
the batches are divided among them instead of each consumer starting its own
copy of the stream. Give each stream its own name (stage, seed, model_dir).
"""
import re

# Dataset ops that call back into Python: a tf.data service worker cannot run them.
PYTHON_OPS = ("PyFunc", "PyFuncStateless", "EagerPyFunc", "GeneratorDataset")
PROCESSING_MODE = "distributed_epoch"
_ADDRESS_RE = re.compile(r"^(grpc://)?([^:/]+):(\d+)$")


def check_address(address: str, *, default_protocol: bool = True) -> str:
    """'grpc://host:port' or 'host:port' -> 'grpc://host:port' (ValueError if neither)."""
    match = _ADDRESS_RE.match(address or "")
    if not match or not 0 < int(match.group(3)) < 65536:
        raise ValueError(f"tf.data service address must look like grpc://HOST:PORT, "
                         f"got {address!r}")
    return f"grpc://{match.group(2)}:{match.group(3)}" if default_protocol else address


def start_dispatcher(port: int = 0, work_dir: str = None):
    """Starts a tf.data service dispatcher in this process (serving in background threads).

    Args:
      port: TCP port; 0 picks a free one (read it from `.target`).
      work_dir: folder where the dispatcher journals its state; with it the
        dispatcher runs in fault-tolerant mode and a restarted dispatcher
        continues the jobs it had (None: state in memory only).
    Returns:
      tf.data.experimental.service.DispatchServer; `.target` is
      "grpc://localhost:PORT", `.join()` blocks until it is stopped.
    """
    import tensorflow as tf
    config = tf.data.experimental.service.DispatcherConfig(
        port=int(port), work_dir=work_dir, fault_tolerant_mode=work_dir is not None)
    return tf.data.experimental.service.DispatchServer(config)


def start_worker(dispatcher_address: str, port: int = 0, worker_host: str = "localhost"):
    """Starts a tf.data service worker in this process, registered with the dispatcher.

    Args:
      dispatcher_address: "grpc://HOST:PORT" (or "HOST:PORT") of the dispatcher.
      port: this worker's TCP port; 0 picks a free one.
      worker_host: the name under which the dispatcher tells clients to reach
        this worker (must resolve from the trainers: use the host's name or IP
        when they run elsewhere).
    Returns:
      tf.data.experimental.service.WorkerServer; `.join()` blocks.
    """
    import tensorflow as tf
    host_port = check_address(dispatcher_address)[len("grpc://"):]
    config = tf.data.experimental.service.WorkerConfig(
        dispatcher_address=host_port, worker_address=f"{worker_host}:%port%", port=int(port))
    return tf.data.experimental.service.WorkerServer(config)


def python_ops(dataset) -> list:
    """Names of the ops in the dataset's graph (and its functions) that call Python.

    Looks at the serialized GraphDef that tf.data would send to a service
    worker: nodes and every function of its library (map/interleave bodies).
    Returns:
      sorted list of distinct op names from PYTHON_OPS found ([] = serializable).
    """
    import tensorflow as tf
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(dataset._as_serialized_graph().numpy())
    ops = {node.op for node in graph_def.node}
    for function in graph_def.library.function:
        ops.update(node.op for node in function.node_def)
    return sorted(ops & set(PYTHON_OPS))


def distribute(dataset, service_address: str, job_name: str, *,
               processing_mode: str = PROCESSING_MODE):
    """The same dataset, produced by the tf.data service workers.

    Args:
      dataset: a tf.data.Dataset with no Python ops (see python_ops).
      service_address: "grpc://HOST:PORT" of the dispatcher.
      job_name: shared by every consumer that must read one job (see module doc).
      processing_mode: "distributed_epoch" (default, see module doc) or
        "parallel_epochs".
    Returns:
      tf.data.Dataset with the same element spec, read from the service.
    Raises:
      ValueError: bad address or job name, or the dataset calls Python.
    """
    import tensorflow as tf
    address = check_address(service_address)
    if not job_name:
        raise ValueError("job_name must be a non-empty string shared by the consumers")
    found = python_ops(dataset)
    if found:
        raise ValueError(f"the dataset calls Python ({', '.join(found)}): a tf.data service "
                         "worker cannot run it; replace py_function/from_generator with "
                         "TensorFlow ops")
    return dataset.apply(tf.data.experimental.service.distribute(
        processing_mode=processing_mode, service=address, job_name=job_name))


def maybe_distribute(dataset, address: str = "", job_name: str = ""):
    """distribute(dataset, address, job_name) when an address is given, else dataset."""
    if not address:
        return dataset
    return distribute(dataset, address, job_name)


def job_name(*parts) -> str:
    """A job name shared by every consumer of one stream, e.g. job_name(model_dir,
    stage, seed): 'upright-' + 16 hex digits of a hash of the parts (stable
    across processes and machines, unlike Python's hash())."""
    import hashlib
    text = "\x1f".join(str(p) for p in parts)
    return "upright-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
