"""pipeline/train.py and tools/train.py: the staged fit, resume, NaN, flags.

Real code paths on tiny real records (32 px, the "tiny" backbone, 2 steps per epoch).
"""
import dataclasses
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests import helpers
from upright.pipeline import model as model_lib
from upright.pipeline import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A cheap policy with a host-only step (jpeg) and per-image OneOf choices.
POLICY = "add(-20,20)|multiply; gaussian_noise; sometimes(0.5, jpeg(60,80))"


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("records") / "rec")
    helpers.write_records(out, {
        "train": [helpers.upright_image(i, 40, 48) for i in range(24)],
        "val": [helpers.upright_image(1000 + i, 40, 48) for i in range(5)],
    })
    return out


def tiny_config(records, model_dir, **overrides):
    config = train.TrainConfig(
        records=records, model_dir=model_dir, batch_size=8, image_size=32, seed=3,
        augment_policy=POLICY, augment_on="host", backbone="tiny", weights=None,
        head="dense", dropout=0.25,
        stage1_epochs=1, stage1_lr=1e-2, stage1_freeze_below_block=3,
        stage1_train_batchnorm=False,
        stage2_epochs=2, stage2_lr=1e-3, stage2_freeze_below_block=0,
        steps_per_epoch=2, export=False, verbose=0)
    return dataclasses.replace(config, **overrides)


@pytest.fixture(scope="module")
def reference(records, tmp_path_factory):
    """One uninterrupted run, shared by several tests. Exports too."""
    model_dir = str(tmp_path_factory.mktemp("runs") / "reference")
    config = tiny_config(records, model_dir, export=True)
    metrics = train.train_and_evaluate(config)
    return config, metrics


def _weights_by_name(model, weights):
    """{variable path: array} for a get_weights() list of `model`."""
    return {v.path: w for v, w in zip(model.weights, weights)}


def _npz(path):
    with np.load(path) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


def test_end_to_end_writes_a_usable_model_dir(reference):
    config, metrics = reference
    d = config.model_dir
    for name in ("config.json", "model.keras", "model_info.json", "metrics.json",
                 "history.csv", "checkpoints/best.keras", "checkpoints/best.json",
                 "stages/stage1.done.json", "stages/stage2.done.json"):
        assert os.path.exists(os.path.join(d, name)), name
    assert not os.listdir(os.path.join(d, "backup")), "backups are removed after each stage"
    # metrics.json: per stage and final numbers.
    assert json.load(open(os.path.join(d, "metrics.json"))) == json.loads(json.dumps(metrics))
    assert set(metrics["stages"]) == {"1", "2"}
    assert metrics["stages"]["1"]["freeze_below_block"] == 3
    final = metrics["final"]
    assert final["val_examples"] == 4 * 5
    assert set(final["per_class_accuracy"]) == {"0", "90", "180", "270"}
    assert np.isclose(np.mean(list(final["per_class_accuracy"].values())), final["val_accuracy"])
    # model.keras is the best epoch's classifier, and scores what best.json says.
    assert np.isclose(final["val_accuracy"], metrics["best"]["val_accuracy"], atol=1e-6)
    assert metrics["model"]["keras_bytes"] == os.path.getsize(os.path.join(d, "model.keras"))
    assert metrics["model"]["params"] > 0 and metrics["train_images_per_s"] > 0
    loaded = keras.saving.load_model(os.path.join(d, "model.keras"), compile=False)
    assert loaded.input_shape == (None, 32, 32, 3) and loaded.output_shape == (None, 4)
    info = json.load(open(os.path.join(d, "model_info.json")))
    assert info["image_size"] == 32 and info["resize"] == "squash"
    assert info["convention"]["class_names"] == ["0", "90", "180", "270"]
    # history.csv: one row per epoch, stage column.
    rows = open(os.path.join(d, "history.csv")).read().splitlines()
    header = rows[0].split(",")
    stages = [r.split(",")[header.index("stage")] for r in rows[1:]]
    assert stages == ["1", "2", "2"]
    # serve.py exports (another part's module; called once it exists).
    assert os.path.exists(os.path.join(d, "export", "saved_model.pb"))
    assert metrics["model"]["tflite_bytes"] == os.path.getsize(os.path.join(d, "model.tflite"))


def test_stage1_keeps_frozen_blocks_exactly_and_stage2_changes_them(reference):
    config, _ = reference
    # The run's initial weights: same seed, same construction.
    keras.utils.set_random_seed(config.seed)
    model = model_lib.build_model(backbone="tiny", image_size=32, weights=None,
                                  head="dense", dropout=config.dropout)
    initial = _weights_by_name(model, model.get_weights())
    after1 = _weights_by_name(model, _npz(os.path.join(config.model_dir, "stages",
                                                       "stage1.weights.npz")))
    after2 = _weights_by_name(model, _npz(os.path.join(config.model_dir, "stages",
                                                       "stage2.weights.npz")))
    frozen = [p for p in initial if p.split("/")[0] in
              ("block1_conv", "block1_bn", "block2_conv", "block2_bn")]
    assert len(frozen) == 2 + 4 + 2 + 4 - 2   # convs: kernel; BN: gamma, beta, mean, var
    for path in frozen:   # blocks 1-2, BatchNorm statistics included, bit for bit
        np.testing.assert_array_equal(after1[path], initial[path], err_msg=path)
    for path in ("block3_conv/kernel", "block4_bn/moving_mean", "head_dense/kernel",
                 "head_logits/bias"):
        assert not np.allclose(after1[path], initial[path]), path
    for path in ("block1_conv/kernel", "block2_conv/kernel", "block1_bn/moving_mean"):
        assert not np.allclose(after2[path], after1[path]), path


def test_killed_and_resumed_run_matches_uninterrupted(reference, tmp_path, monkeypatch):
    config, metrics = reference
    resumed = dataclasses.replace(config, model_dir=str(tmp_path / "resumed"), export=False)
    add_stage = train._callback("AddStage")
    original = add_stage.on_epoch_end

    def crash(self, epoch, logs=None):
        # Dies at the end of stage 2 epoch 1, after the best-checkpoint callback and
        # before the backup: as if killed while the epoch was being saved.
        if self.stage == 2 and epoch == 1:
            raise KeyboardInterrupt("simulated kill")
        original(self, epoch, logs)

    monkeypatch.setattr(add_stage, "on_epoch_end", crash)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(resumed)
    d = resumed.model_dir
    assert os.path.exists(os.path.join(d, "stages", "stage1.done.json"))
    assert not os.path.exists(os.path.join(d, "stages", "stage2.done.json"))
    meta = json.load(open(os.path.join(d, "backup", "stage2", "training_metadata.json")))
    assert meta["epoch"] == 1
    monkeypatch.setattr(add_stage, "on_epoch_end", original)
    again = train.train_and_evaluate(resumed)   # the same command again
    assert again["stages"]["2"]["resumed_at_epoch"] == 1
    assert again["stages"]["2"]["epochs_run_this_process"] == 1
    for stage in ("stage1", "stage2"):
        a = _npz(os.path.join(config.model_dir, "stages", f"{stage}.weights.npz"))
        b = _npz(os.path.join(d, "stages", f"{stage}.weights.npz"))
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    for stage in ("1", "2"):
        assert np.isclose(again["stages"][stage]["val_loss"],
                          metrics["stages"][stage]["val_loss"], rtol=1e-4)
    assert again["final"]["val_accuracy"] == pytest.approx(metrics["final"]["val_accuracy"])
    # A finished run started again only redoes the final step.
    third = train.train_and_evaluate(resumed)
    assert third["stages"] == again["stages"]


def test_zero_epoch_stage_is_skipped_device_placement_and_a_strategy(records, tmp_path):
    # One short run covers four things: a 0-epoch stage, augment_on="device"
    # (AugmentLayer in the trained model, not in the saved one), the
    # tf.distribute path (distribute_datasets_from_function, InputContext) and
    # mixed precision (the saved model is float32).
    config = tiny_config(records, str(tmp_path / "run"), stage1_epochs=0, stage2_epochs=1,
                         augment_on="device", strategy="mirrored", mixed_precision=True)
    metrics = train.train_and_evaluate(config)
    assert metrics["stages"]["1"] == {"skipped": True, "epochs": 0}
    assert metrics["stages"]["2"]["epochs_run_this_process"] == 1
    assert not os.path.exists(os.path.join(config.model_dir, "stages", "stage1.done.json"))
    assert metrics["best"]["stage"] == 2
    saved = keras.saving.load_model(os.path.join(config.model_dir, "model.keras"), compile=False)
    assert [layer.name for layer in saved.layers][:2] == ["images", "backbone"]
    assert saved.input_shape == (None, 32, 32, 3)
    assert {layer.dtype_policy.name for layer in saved.layers} == {"float32"}
    assert keras.config.dtype_policy().name == "float32"   # global policy restored


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_best_model(records, tmp_path):
    config = tiny_config(records, str(tmp_path / "run"), stage2_lr=1e35, augment_policy="none")
    with pytest.raises(train.TrainingDiverged,
                       match=r"training loss became (nan|inf) in stage 2, epoch 0") as e:
        train.train_and_evaluate(config)
    best = os.path.join(config.model_dir, "checkpoints", "best.keras")
    assert f"the best model so far in {best}" in str(e.value)
    assert "Lower --stage2_lr" in str(e.value) and "\n" not in str(e.value)
    probs = keras.saving.load_model(best, compile=False)(np.zeros((1, 32, 32, 3), np.float32))
    assert np.isfinite(np.asarray(probs)).all()
    assert not os.path.exists(os.path.join(config.model_dir, "model.keras"))


def test_restart_with_a_different_config_is_refused(records, tmp_path):
    config = tiny_config(records, str(tmp_path / "run"))
    train._pin_config(config)
    with pytest.raises(train.ConfigError, match="different config.*stage1_lr"):
        train._pin_config(dataclasses.replace(config, stage1_lr=0.5))
    train._pin_config(dataclasses.replace(config, verbose=1))   # harmless differences pass


def test_train_stream_equals_input_fn_host_placement_and_resumes(records):
    from upright.pipeline import inputs
    config = tiny_config(records, "unused")
    ours = [(x.numpy(), y.numpy()) for x, y in train.train_stream(config, stage=1).take(4)]
    theirs = inputs.input_fn(records, split="train", batch_size=8, image_size=32,
                             training=True, seed=train.stream_seed(config.seed, 1),
                             policy=POLICY, augment_on="host")
    for (x, y), (x2, y2) in zip(ours, theirs.take(4)):
        np.testing.assert_array_equal(x, x2.numpy())
        np.testing.assert_array_equal(y, y2.numpy())
    assert len({tuple(y) for _, y in ours}) > 1
    # Resumed after 2 batches: the same batches 2 and 3.
    resumed = train.train_stream(config, stage=1, skip_batches=2).take(2)
    for (x, y), (x2, y2) in zip(ours[2:], resumed):
        np.testing.assert_array_equal(x, x2.numpy())
        np.testing.assert_array_equal(y, y2.numpy())


def test_stream_seeds_differ_per_stage_and_epoch():
    seeds = {train.stream_seed(0, s, e) for s in (1, 2) for e in range(-1, 50)}
    assert len(seeds) == 102
    assert train.stream_seed(0, 1, 3) == train.stream_seed(0, 1, 3)


# ---------------------------------------------------------------- tools/train.py

def _tool(*args, cwd=REPO):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "upright.tools.train", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def _error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("train: error:")]


def test_bad_flags_give_one_clear_line(records, tmp_path):
    wrong = tmp_path / "wrong.weights.h5"
    source = model_lib.build_model(backbone="tiny", image_size=32, head="linear")
    model_lib.get_backbone(source).save_weights(str(wrong))
    base = [f"--records={records}", f"--model_dir={tmp_path / 'run'}", "--backbone=tiny",
            "--weights=none", "--image_size=32", "--stage1_freeze_below_block=2"]
    cases = [
        (["--backbone=vgg16"], "unknown backbone 'vgg16'; known:"),
        ([f"--records={tmp_path / 'missing'}"], "does not exist"),
        (["--image_size=8"], "image size 8 is too small for backbone 'tiny'"),
        (["--backbone=mobilenetv3small", f"--weights={wrong}"], "does not fit backbone"),
        (["--stage1_epochs=0", "--stage2_epochs=0"], "nothing to train"),
        (["--stage1_lr=0"], "stage1_lr must be > 0"),
        (["--stage1_freeze_below_block=9"], "outside [0, 5]"),
    ]
    for extra, message in cases:
        result = _tool(*base, *extra)
        lines = _error_lines(result)
        assert result.returncode == 2, (extra, result.stderr[-2000:])
        assert len(lines) == 1 and message in lines[0], (extra, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "run"), "nothing is written before validation passes"


@pytest.mark.parametrize("flagfile, backbone, head", [
    ("b1.flags", "efficientnetb1", "dense"), ("b0.flags", "efficientnetb0", "linear"),
    ("demo.flags", None, None)])
def test_shipped_flagfiles_parse_and_validate(records, flagfile, backbone, head):
    result = _tool(f"--flagfile={flagfile}", f"--records={records}", "--dry_run")
    assert result.returncode == 0, result.stderr[-2000:]
    if backbone:
        assert f"backbone = '{backbone}'" in result.stdout
        assert f"head = '{head}'" in result.stdout
        assert "stage1_freeze_below_block = 5" in result.stdout


def test_tool_trains_and_its_flags_file_replays(records, tmp_path):
    model_dir = tmp_path / "run"
    result = _tool(f"--records={records}", f"--model_dir={model_dir}", "--backbone=tiny",
                   "--weights=none", "--image_size=32", "--batch_size=8", "--head=linear",
                   "--stage1_epochs=0", "--stage2_epochs=1", "--steps_per_epoch=1",
                   "--augment_policy=none", "--noexport", "--verbose=0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val accuracy" in result.stdout
    flags_file = model_dir / "flags.txt"
    text = flags_file.read_text()
    assert "--backbone=tiny" in text and "--noexport" in text and "--stage1_epochs=0" in text
    replay = _tool(f"--flagfile={flags_file}", "--dry_run", cwd=str(tmp_path))
    assert replay.returncode == 0, replay.stderr[-2000:]
    config = json.loads((model_dir / "config.json").read_text())
    for key, value in config.items():
        assert f"{key} = {value!r}" in replay.stdout, key


@pytest.mark.slow
def test_demo_recipe_learns_orientation_of_held_out_scenes(tmp_path):
    """The demo.flags recipe on the built-in demo scenes: >= 90 % on val, all 4 turns."""
    from upright.pipeline import demo, records as records_lib
    demo.make_demo_images(str(tmp_path / "scenes"), count=600, seed=0)
    records_lib.make_records(src=str(tmp_path / "scenes"), out=str(tmp_path / "rec"),
                             progress=False)
    config = train.TrainConfig(
        records=str(tmp_path / "rec"), model_dir=str(tmp_path / "run"), backbone="tiny",
        weights=None, image_size=64, head="dense",
        stage1_epochs=3, stage1_lr=3e-3, stage1_freeze_below_block=2,
        stage2_epochs=7, stage2_lr=1e-3, export=False, verbose=0)
    metrics = train.train_and_evaluate(config)
    assert metrics["final"]["val_accuracy"] >= 0.9
    assert min(metrics["final"]["per_class_accuracy"].values()) >= 0.8


@pytest.mark.slow
def test_sigkilled_tool_resumes_in_stage_2_and_matches(records, tmp_path):
    """A real kill: SIGKILL the train command once stage 2 has a backup, rerun it."""
    import signal
    import time
    args = [f"--records={records}", "--backbone=tiny", "--weights=none", "--image_size=32",
            "--batch_size=8", "--stage1_epochs=1", "--stage1_freeze_below_block=3",
            "--stage2_epochs=6", "--steps_per_epoch=3", f"--augment_policy={POLICY}",
            "--noexport", "--verbose=0", "--seed=5"]
    assert _tool(*args, f"--model_dir={tmp_path / 'whole'}").returncode == 0
    killed = tmp_path / "killed"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen([sys.executable, "-m", "upright.tools.train", *args,
                             f"--model_dir={killed}"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = killed / "backup" / "stage2" / "training_metadata.json"
    deadline = time.time() + 240
    def backup_epoch():
        try:
            return json.loads(meta.read_text()).get("epoch", 0)
        except (OSError, ValueError):   # not there yet, or being written
            return 0

    while time.time() < deadline and proc.poll() is None:
        if backup_epoch() >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert _tool(f"--flagfile={killed / 'flags.txt'}").returncode == 0
    again = json.loads((killed / "metrics.json").read_text())
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert again["stages"]["2"]["resumed_at_epoch"] >= 2
    assert again["stages"]["2"]["val_loss"] == pytest.approx(whole["stages"]["2"]["val_loss"],
                                                             rel=1e-4)
    a = _npz(str(tmp_path / "whole" / "stages" / "stage2.weights.npz"))
    b = _npz(str(killed / "stages" / "stage2.weights.npz"))
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
