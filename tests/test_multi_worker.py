"""Multi-worker training: two worker processes on 127.0.0.1 end with identical weights."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import helpers
from upright.pipeline import cluster

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_two_workers(argv_for, *, timeout):
    """Runs `python <argv_for(index)>` as two MultiWorkerMirroredStrategy workers
    on 127.0.0.1 (index 0 is the chief).

    Fails the test with the worker's output tail if either exits non-zero; kills
    both on a timeout, so a hang fails instead of blocking CI. Returns the
    workers' outputs.
    """
    workers = [f"127.0.0.1:{p}" for p in cluster.free_ports(2)]
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=cluster.tf_config(workers, index),
                   TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen(
            [sys.executable, *argv_for(index)], cwd=ROOT,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-4000:]
    return outputs


def test_multi_worker_tf_config_and_worker_dirs(tmp_path):
    config = json.loads(cluster.tf_config(["127.0.0.1:1", "127.0.0.1:2"], 1))
    assert config == {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                      "task": {"type": "worker", "index": 1}}
    env0 = {"TF_CONFIG": cluster.tf_config(["a:1", "b:2"], 0)}
    env1 = {"TF_CONFIG": cluster.tf_config(["a:1", "b:2"], 1)}
    assert cluster.task(env0) == {"type": "worker", "index": 0, "num_workers": 2,
                                  "is_chief": True}
    assert not cluster.task(env1)["is_chief"]
    assert cluster.task({})["is_chief"]
    assert cluster.worker_dir(str(tmp_path), env0) == str(tmp_path)
    assert cluster.worker_dir(str(tmp_path), env1) == str(tmp_path / "workers" / "worker-1")
    assert os.path.isdir(tmp_path / "workers" / "worker-1")
    with_chief = {"TF_CONFIG": json.dumps({"cluster": {"chief": ["c:1"], "worker": ["a:1"]},
                                           "task": {"type": "worker", "index": 0}})}
    assert not cluster.task(with_chief)["is_chief"]
    with pytest.raises(ValueError, match="TF_CONFIG"):
        cluster.task({"TF_CONFIG": "{not json"})
    with pytest.raises(ValueError):
        cluster.tf_config(["a:1"], 1)
    ports = cluster.free_ports(3)
    assert len(set(ports)) == 3


def test_multi_worker_two_processes_end_with_identical_weights(tmp_path):
    records = str(tmp_path / "rec")
    # 4 shards: each of the 2 workers reads 2 whole files.
    helpers.write_records(records, {"train": [helpers.upright_image(i, 20, 24) for i in range(16)],
                                    "val": [helpers.upright_image(50, 20, 24)]},
                          shards_per_split=4)
    run_two_workers(lambda index: [os.path.join(HERE, "multi_worker_main.py"), records,
                                   str(tmp_path / f"w{index}.npz"), "4"], timeout=600)
    w0, w1 = (np.load(tmp_path / f"w{i}.npz") for i in range(2))
    assert int(w0["replicas"]) == int(w1["replicas"]) == 2
    # Each worker built one input pipeline, its own.
    assert list(w0["pipelines"]) == [0] and list(w1["pipelines"]) == [1]
    names = sorted(k for k in w0.files if k.startswith("arr_"))
    # conv kernel, bias; BN gamma, beta, moving mean, variance; dense kernel, bias
    assert len(names) == 8
    for name in names:
        np.testing.assert_array_equal(w0[name], w1[name])
    # Training moved the weights away from the (broadcast) initial ones.
    assert not np.allclose(w0["arr_0"], w0["initial_kernel"])
    # The logs are global means (the same on every worker), so callbacks agree.
    np.testing.assert_array_equal(w0["loss"], w1["loss"])
    np.testing.assert_array_equal(w0["accuracy"], w1["accuracy"])


def test_train_tool_multi_worker_two_workers_on_loopback(tmp_path):
    """`train --strategy=multi_worker` itself, two workers on 127.0.0.1, CI-sized
    (tiny backbone at 16 px, one stage of one epoch of 2 steps; the timeout only
    catches a hang). Both finish; the chief writes the model into --model_dir,
    worker 1 into model_dir/workers/worker-1; every weight agrees between them,
    BatchNorm moving statistics included (the trainer averages those across
    workers each epoch: cluster.average_non_trainable_callback), and training
    moved the weights away from the seeded initial ones."""
    records = str(tmp_path / "rec")
    # 4 shards: each of the 2 workers reads 2 whole files.
    helpers.write_records(records, {"train": [helpers.upright_image(i, 20, 24) for i in range(16)],
                                    "val": [helpers.upright_image(60 + i, 20, 24)
                                            for i in range(4)]},
                          shards_per_split=4)
    model_dir = tmp_path / "run"
    args = [f"--records={records}", f"--model_dir={model_dir}", "--strategy=multi_worker",
            "--backbone=tiny", "--weights=none", "--image_size=16", "--batch_size=8",
            "--head=linear", "--seed=3", "--augment_policy=none", "--augment_on=host",
            "--stage1_epochs=0", "--stage2_epochs=1", "--steps_per_epoch=2",
            "--validation_steps=1", "--noexport", "--verbose=0"]
    outputs = run_two_workers(lambda index: ["-m", "upright.tools.train", *args], timeout=600)
    assert all("[train] done: val accuracy" in out for out in outputs), outputs[0][-2000:]
    dirs = [model_dir, model_dir / "workers" / "worker-1"]
    for d in dirs:
        metrics = json.loads((d / "metrics.json").read_text())
        assert metrics["stages"]["2"]["epochs_run_this_process"] == 1
        assert metrics["final"]["val_examples"] == 16
    assert json.loads((model_dir / "config.json").read_text())["strategy"] == "multi_worker"
    from upright.pipeline import model as model_lib
    import keras
    keras.utils.set_random_seed(3)   # the run's initial weights
    model = model_lib.build_model(backbone="tiny", image_size=16, weights=None, head="linear")
    initial = model.get_weights()
    weights = [np.load(d / "stages" / "stage2.weights.npz") for d in dirs]
    assert len(weights[0].files) == len(weights[1].files) == len(model.weights)
    for i, v in enumerate(model.weights):
        np.testing.assert_allclose(weights[0][f"arr_{i}"], weights[1][f"arr_{i}"],
                                   rtol=1e-6, atol=1e-7, err_msg=v.path)
    assert not np.allclose(weights[0]["arr_0"], initial[0])
    # The chief's model.keras is the trained model (one epoch: the best is the last).
    kept = keras.saving.load_model(model_dir / "model.keras", compile=False)
    for i, w in enumerate(kept.get_weights()):
        np.testing.assert_allclose(w, weights[0][f"arr_{i}"], rtol=1e-6, atol=1e-7)
