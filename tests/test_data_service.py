"""tf.data service: a dispatcher and workers on 127.0.0.1 serve input_fn's batches."""
import collections
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from upright.pipeline import data_service, inputs


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("rec"))
    helpers.write_records(out, {"train": [helpers.upright_image(i, 20, 24) for i in range(16)],
                                "val": [helpers.upright_image(90 + i, 20, 24) for i in range(3)]},
                          fmt="png", shards_per_split=4)
    return out


@pytest.fixture
def service():
    """A dispatcher and one worker in this process; more workers via add_worker()."""
    dispatcher = data_service.start_dispatcher(0)
    workers = []

    def add_worker():
        workers.append(data_service.start_worker(dispatcher.target, 0, worker_host="127.0.0.1"))

    add_worker()
    yield dispatcher, add_worker
    for w in workers:
        w._stop()
    dispatcher._stop()


def _train(records, **kwargs):
    args = dict(split="train", batch_size=4, image_size=16, training=True, seed=7,
                repeat=False)
    args.update(kwargs)
    return inputs.input_fn(records, **args)


# Random ops of every kind (JPEG re-encoding, per-image choice, noise, affine),
# cheaper to trace than the whole default policy.
POLICY = "sometimes(0.5, jpeg(60,80)); add(-15,15) | multiply(0.8,1.2); " \
         "gaussian_noise(0.02,12.75,0.5); sometimes(0.5, rotate(-2,2))"


def _examples(ds):
    """Multiset of (label, image bytes) over every example of every batch."""
    out = collections.Counter()
    for images, labels in ds.as_numpy_iterator():
        for image, label in zip(images, labels):
            out[(int(label), np.asarray(image, np.float32).tobytes())] += 1
    return out


def test_data_service_serves_what_input_fn_yields(records_dir, service):
    dispatcher, _ = service
    local = _examples(_train(records_dir, policy=POLICY))
    served = _examples(data_service.distribute(_train(records_dir, policy=POLICY),
                                               dispatcher.target, job_name="same-as-local"))
    assert sum(local.values()) == 16      # one epoch, 4 batches of 4
    assert served == local


def test_data_service_device_form_and_shared_job(records_dir, service):
    dispatcher, _ = service
    make = lambda: _train(records_dir, augment_on="device", policy="none")  # noqa: E731
    local = [(x["images"], x["seeds"], y) for x, y in make().as_numpy_iterator()]
    # Two consumers of one job name share ONE stream: together they see each
    # batch once (not twice).
    iterators = [iter(data_service.distribute(make(), dispatcher.target, job_name="shared"))
                 for _ in range(2)]
    got = []
    while iterators:
        for it in list(iterators):
            try:
                got.append(next(it))
            except StopIteration:
                iterators.remove(it)
    assert len(got) == len(local) == 4
    served = sorted((x["seeds"].numpy().tobytes(), x["images"].numpy().tobytes(),
                     y.numpy().tobytes()) for x, y in got)
    assert served == sorted((s.tobytes(), i.tobytes(), y.tobytes()) for i, s, y in local)


def test_data_service_two_workers_read_each_image_once_per_epoch(records_dir, service):
    dispatcher, add_worker = service
    add_worker()

    def upright_images(ds):
        # Turn every image back by its label: the multiset of source images.
        return collections.Counter(
            np.rot90(image, -int(label)).astype(np.float32).tobytes()
            for images, labels in ds.as_numpy_iterator()
            for image, label in zip(images, labels))

    # 16 images in 4 files, 2 per batch: no batch is ever dropped as incomplete.
    local = upright_images(_train(records_dir, policy="none", batch_size=2))
    served = upright_images(data_service.distribute(
        _train(records_dir, policy="none", batch_size=2), dispatcher.target,
        job_name="two-workers"))
    assert sum(local.values()) == 16 and len(local) == 16
    assert served == local


def test_data_service_input_fn_has_no_python_ops(records_dir):
    for ds in (_train(records_dir), _train(records_dir, augment_on="device"),
               inputs.input_fn(records_dir, split="val", batch_size=4, image_size=16,
                               training=False)):
        assert data_service.python_ops(ds) == []


def test_data_service_catches_py_function_and_generators(records_dir):
    ds = _train(records_dir)
    with_py = ds.map(lambda x, y: (x, tf.py_function(lambda v: v, [y], tf.int32)))
    assert data_service.python_ops(with_py) == ["EagerPyFunc"]
    with_numpy = ds.map(lambda x, y: (x, tf.numpy_function(lambda v: v, [y], tf.int32)))
    assert data_service.python_ops(with_numpy) == ["PyFunc"]
    gen = tf.data.Dataset.from_generator(lambda: iter(range(3)),
                                         output_signature=tf.TensorSpec([], tf.int64))
    assert "GeneratorDataset" in data_service.python_ops(gen)
    with pytest.raises(ValueError, match="calls Python.*EagerPyFunc"):
        data_service.distribute(with_py, "grpc://localhost:5050", job_name="x")


def test_data_service_addresses():
    assert data_service.check_address("localhost:5050") == "grpc://localhost:5050"
    assert data_service.check_address("grpc://10.0.0.2:1") == "grpc://10.0.0.2:1"
    for bad in ("", "localhost", "http://h:1", "grpc://h:0", "h:99999"):
        with pytest.raises(ValueError, match="grpc://HOST:PORT"):
            data_service.check_address(bad)
    ds = tf.data.Dataset.range(3)
    assert data_service.maybe_distribute(ds, "", "") is ds
    name = data_service.job_name("/runs/b1", 1, 0)
    assert name == data_service.job_name("/runs/b1", 1, 0)
    assert name != data_service.job_name("/runs/b1", 2, 0)
    assert name.startswith("upright-") and len(name) == 24
    with pytest.raises(ValueError, match="job_name"):
        data_service.distribute(ds, "grpc://localhost:5050", job_name="")


def _start_tool(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen([sys.executable, "-m", "upright.tools.data_service", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _first_line(proc, timeout=60):
    """The tool's first stdout line (it prints once serving)."""
    start = time.time()
    line = proc.stdout.readline()
    assert line, (proc.poll(), proc.stderr.read() if proc.poll() is not None else "",
                  time.time() - start)
    return line.strip()


@pytest.mark.slow   # two TensorFlow subprocesses: about 20-35 s on 2 cores
def test_data_service_tool_dispatcher_and_worker_serve(records_dir):
    dispatcher = _start_tool("--role=dispatcher", "--port=0")
    worker = None
    try:
        line = _first_line(dispatcher)
        assert line.startswith("data_service: dispatcher at grpc://")
        target = line.split(" at ")[1]
        worker = _start_tool("--role=worker", f"--dispatcher={target}", "--port=0",
                             "--worker_host=127.0.0.1")
        assert _first_line(worker).startswith("data_service: worker on port ")
        local = _examples(_train(records_dir, policy="none"))
        served = _examples(data_service.distribute(_train(records_dir, policy="none"), target,
                                                   job_name="tool"))
        assert served == local
    finally:
        for proc in (worker, dispatcher):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
    assert dispatcher.returncode == 0


def test_data_service_tool_bad_flags_one_line():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    # tools.run_tool: one "data_service: error: ..." line, then a short usage line, exit 2.
    for args, message in (
            (["--role=worker", "--port=5051"],
             "--role=worker needs --dispatcher=grpc://HOST:PORT"),
            (["--role=worker", "--port=5051", "--dispatcher=nonsense"],
             "tf.data service address must look like grpc://HOST:PORT, got 'nonsense'"),
            (["--role=dispatcher"], "--role (dispatcher or worker) and --port are required")):
        done = subprocess.run([sys.executable, "-m", "upright.tools.data_service", *args],
                              capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 2, args
        assert "Traceback" not in done.stderr
        lines = done.stderr.strip().splitlines()
        assert lines[0] == f"data_service: error: {message}", lines
        assert lines[1:] == ["usage: data_service --role=dispatcher --port=5050   "
                             "(all flags: data_service --help)"], lines
