"""pipeline/train.py, callbacks.py, resume.py and tools/train.py: the staged
fit, resume, NaN, flags.

Real code paths on tiny real records (32 px, the "tiny" backbone, 2 steps per epoch).
"""
import contextlib
import dataclasses
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests import helpers
from upright.pipeline import callbacks, configs, resume, streams, train, trainer_models
from upright.pipeline import model as model_lib

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
    """A TrainConfig for the tiny runs; overrides by flat name (stage2_lr=...)."""
    config = configs.replace(
        train.TrainConfig(), records=records, model_dir=model_dir, batch_size=8, image_size=32, seed=3,
        augment_policy=POLICY, augment_on="host", backbone="tiny", weights=None,
        head="dense", dropout=0.25,
        stage1_epochs=1, stage1_lr=1e-2, stage1_freeze_below_block=3,
        stage1_train_batchnorm=False,
        stage2_epochs=2, stage2_lr=1e-3, stage2_freeze_below_block=0,
        steps_per_epoch=2, export=False, verbose=0)
    return configs.replace(config, **overrides)


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
    assert header[:2] == ["stage", "epoch"] and "val_accuracy" in header
    assert [tuple(r.split(",")[:2]) for r in rows[1:]] == [("1", "1"), ("2", "1"), ("2", "2")]
    # The kept checkpoint's epoch is 1-based like the rows, and a row of history.
    best = json.load(open(os.path.join(d, "checkpoints", "best.json")))
    assert (str(best["stage"]), str(best["epoch"])) in [tuple(r.split(",")[:2]) for r in rows[1:]]
    # serve.py exports (another part's module; called once it exists).
    assert os.path.exists(os.path.join(d, "export", "saved_model.pb"))
    assert metrics["model"]["tflite_bytes"] == os.path.getsize(os.path.join(d, "model.tflite"))


def _val_probs(model, config):
    """The model's own probabilities on the val split in all four orientations."""
    from upright.pipeline import inputs
    ds = inputs.input_fn(config.records, split="val", batch_size=config.batch_size,
                         image_size=config.image_size, training=False, resize=config.resize)
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    images, labels = np.concatenate(images), np.concatenate(labels)
    return images, np.asarray(model.predict_on_batch(images), np.float64), labels


def test_fitted_temperature_reaches_model_info_export_and_orient(reference, tmp_path):
    """The calibration temperature, fitted on val from model.keras's own
    probabilities, is the one in model_info.json, the one the SavedModel applies,
    and the one orient --min_confidence judges by."""
    from upright.pipeline import evaluation, imageio, orient, serve
    config, _ = reference
    d = config.model_dir
    model = keras.saving.load_model(os.path.join(d, "model.keras"), compile=False)
    images, raw, labels = _val_probs(model, config)
    t = evaluation.fit_temperature(raw, labels)
    # Far enough from 1 that T and 1/T are told apart (this run: about 1.78).
    assert abs(np.log(t)) > 0.2, t
    info = json.load(open(os.path.join(d, "model_info.json")))
    assert info["temperature"] == pytest.approx(t, rel=1e-6)
    calibrated = evaluation.apply_temperature(raw, t)
    export = os.path.join(d, "export")
    for source in (d, export):   # model.keras + model_info.json, and the SavedModel
        np.testing.assert_allclose(serve.load_model_dir(source).predict_images(images),
                                   calibrated, atol=1e-5, err_msg=source)
    # orient on one picture, with --min_confidence halfway between the raw and
    # the calibrated confidence: only the calibrated one decides.
    folder = tmp_path / "pictures"
    folder.mkdir()
    path = str(folder / "a.png")
    helpers.write_image_file(path, helpers.upright_image(1000, 40, 48), "png")
    # What orient feeds a squash model: the picture read straight to S x S.
    x = imageio.open_for_model(path, image_size=config.image_size).decode()[None]
    raw_one = np.asarray(model.predict_on_batch(x), np.float64)
    cal_one = evaluation.apply_temperature(raw_one, t)[0]
    raw_conf, cal_conf = raw_one.max(), cal_one.max()
    assert abs(raw_conf - cal_conf) > 1e-3, (raw_conf, cal_conf)
    middle = (raw_conf + cal_conf) / 2
    sure = cal_conf >= middle                     # False when T > 1 (softer)
    k = int(np.argmax(cal_one))
    for source in (d, export):
        row, = orient.run(orient.OrientConfig(model_dir=source, paths=(str(folder),),
                                              min_confidence=middle, progress=False))["rows"]
        assert row["confidence"] == pytest.approx(cal_conf, abs=2e-6), source
        assert row["action"] == ("unsure" if not sure else "none" if k == 0 else "turn"), source


def test_kept_model_is_the_best_epoch_of_history(records, tmp_path):
    """A run whose val accuracy goes down, up, down (seeded, so the same each
    time): model.keras and best.json are the epoch with the highest val_accuracy
    in history.csv, not the first, the last or the worst."""
    config = tiny_config(records, str(tmp_path / "run"), stage1_epochs=0, stage2_epochs=4,
                         stage2_lr=3e-2, augment_policy="none")
    metrics = train.train_and_evaluate(config)
    rows = open(os.path.join(config.model_dir, "history.csv")).read().splitlines()
    header = rows[0].split(",")
    val = [float(r.split(",")[header.index("val_accuracy")]) for r in rows[1:]]
    best_epoch = int(np.argmax(val))
    # The run must have this shape for the check to mean anything (this seed:
    # 0.50, 0.35, 0.55, 0.50).
    assert 0 < best_epoch < len(val) - 1 and min(val) < val[0] < max(val), val
    assert metrics["best"] == {"val_accuracy": pytest.approx(val[best_epoch]), "stage": 2,
                               "epoch": best_epoch + 1}   # 1-based, as printed
    kept = keras.saving.load_model(os.path.join(config.model_dir, "model.keras"), compile=False)
    _, probs, labels = _val_probs(kept, config)
    assert np.mean(probs.argmax(1) == labels) == pytest.approx(val[best_epoch], abs=1e-6)


def test_training_learns_an_easy_orientation_task(tmp_path):
    """The real trainer on an easy task (a bright quadrant marks the top-left):
    a seeded run of 16 steps takes the tiny model from chance to >= 90 % on
    held-out pictures, in every orientation."""
    records = str(tmp_path / "rec")
    helpers.write_records(records, {
        "train": [helpers.quadrant_marker_image(i) for i in range(64)],
        "val": [helpers.quadrant_marker_image(1000 + i) for i in range(16)]})
    config = configs.from_flat(train.TrainConfig, dict(
        records=records, model_dir=str(tmp_path / "run"), batch_size=16, image_size=32,
        seed=0, augment_policy="none", augment_on="host", backbone="tiny", weights=None,
        head="linear", stage1_epochs=0, stage2_epochs=2, stage2_lr=1e-2,
        stage2_freeze_below_block=0, steps_per_epoch=8, export=False, verbose=0))
    keras.utils.set_random_seed(config.seed)   # the run's own starting point
    untrained = model_lib.build_model(backbone="tiny", image_size=32, weights=None,
                                      head="linear")
    _, probs, labels = _val_probs(untrained, config)
    assert np.mean(probs.argmax(1) == labels) <= 0.5
    metrics = train.train_and_evaluate(config)
    final = metrics["final"]
    assert final["val_examples"] == 64
    assert final["val_accuracy"] >= 0.9, metrics
    assert min(final["per_class_accuracy"].values()) >= 0.9, final["per_class_accuracy"]


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
    add_stage = callbacks.History
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
    # A finished run started again says so and touches nothing.
    before = {name: os.stat(os.path.join(d, name)).st_mtime_ns
              for name in ("model.keras", "model_info.json", "metrics.json")}
    third = train.train_and_evaluate(resumed)
    assert third.pop("already_complete") is True
    assert third == json.loads(json.dumps(again))
    assert before == {name: os.stat(os.path.join(d, name)).st_mtime_ns for name in before}
    # Asked for exports it does not have (it ran with export=False), it redoes the end.
    exported = train.train_and_evaluate(dataclasses.replace(resumed, export=True))
    assert "already_complete" not in exported and exported["model"]["tflite_bytes"] > 0
    assert exported["stages"] == again["stages"]


# Validation under a strategy reads to the end of its files; Keras' warning
# that the input "ran out" would be a false alarm to the user (an error here).
@pytest.mark.filterwarnings("error:Your input ran out of data:UserWarning")
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


def _device_step(records, tmp_path, monkeypatch, mixed):
    """One Keras train step of the device-placed training model under
    --jit_compile=true (the full default policy, 32 px, batch 4, "tiny").
    Returns (model, batch, loss, [schedule of every AugmentLayer trace])."""
    import tensorflow as tf
    from upright.pipeline import augment, augment_schedule
    config = tiny_config(records, str(tmp_path / "run"), batch_size=4, augment_on="device",
                         augment_policy="default", jit_compile="true", mixed_precision=mixed)
    traces = []
    real = augment.AugmentLayer.resolved_schedule
    monkeypatch.setattr(augment.AugmentLayer, "resolved_schedule",
                        lambda self: traces.append((augment_schedule.in_xla_context(), real(self)))
                        or traces[-1][1])
    keras.config.set_dtype_policy("mixed_float16" if mixed else "float32")
    try:
        classifier = trainer_models.build_classifier(config, None)
        model = trainer_models.training_model(classifier, config, "device")
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(),
                      jit_compile=trainer_models.jit(config.jit_compile))
        batch = next(iter(streams.train_stream(config, stage=1, augment_on="device")))
        loss = float(model.train_on_batch(*batch))
    finally:
        keras.config.set_dtype_policy("float32")
    assert isinstance(model.get_layer("augment"), augment.AugmentLayer)
    return model, classifier, batch, loss, traces


def test_device_augmentation_compiles_the_train_step_with_xla(records, tmp_path, monkeypatch):
    import tensorflow as tf
    model, _, batch, loss, traces = _device_step(records, tmp_path, monkeypatch, mixed=False)
    # Keras kept XLA (it falls back to jit_compile=False, with a warning, when
    # a layer has supports_jit False) ...
    assert model.jit_compile is True and np.isfinite(loss)
    # ... and traced the AugmentLayer inside its jit_compile=True step function
    # (must-compile: an op without an XLA kernel would have raised), where the
    # layer took the static schedule.
    assert traces and all(t == (True, "static") for t in traces), traces
    # The train step (augmentation, backbone, gradients, Adam) lowers to one
    # XLA module, which holds the augmentation (frequency_blend's FFT).
    hlo = tf.function(model.train_step, jit_compile=True).experimental_get_compiler_ir(
        batch)(stage="hlo")
    assert "fft(" in hlo and "convolution(" in hlo


def test_device_augmentation_with_mixed_precision_under_xla(records, tmp_path, monkeypatch):
    # Augmentation in float32, the backbone in float16: one compiled step runs
    # and its loss is finite.
    model, classifier, _, loss, traces = _device_step(records, tmp_path, monkeypatch, mixed=True)
    assert model.jit_compile is True and np.isfinite(loss)
    assert traces and all(t == (True, "static") for t in traces)
    assert model.get_layer("augment").compute_dtype == "float32"
    assert {layer.compute_dtype for layer in classifier.layers[1:-1]} == {"float16"}, \
        {layer.name: layer.compute_dtype for layer in classifier.layers}


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
    resume.pin_config(config.model_dir, configs.flatten(config))
    with pytest.raises(resume.ConfigMismatch, match="different config.*stage1_lr"):
        resume.pin_config(config.model_dir, configs.flatten(configs.replace(config, stage1_lr=0.5)))
    with pytest.raises(train.ConfigError, match="different config.*stage1_lr"):
        train.check_config(configs.replace(config, stage1_lr=0.5))   # so --dry_run sees it
    resume.pin_config(config.model_dir, configs.flatten(configs.replace(config, verbose=1)))


def test_train_stream_equals_input_fn_host_placement_and_resumes(records):
    from upright.pipeline import inputs
    config = tiny_config(records, "unused")
    ours = [(x.numpy(), y.numpy()) for x, y in streams.train_stream(config, stage=1).take(4)]
    theirs = inputs.input_fn(records, split="train", batch_size=8, image_size=32,
                             training=True, seed=resume.stream_seed(config.seed, 1),
                             policy=POLICY, augment_on="host")
    for (x, y), (x2, y2) in zip(ours, theirs.take(4)):
        np.testing.assert_array_equal(x, x2.numpy())
        np.testing.assert_array_equal(y, y2.numpy())
    assert len({tuple(y) for _, y in ours}) > 1
    # Resumed after 2 batches: the same batches 2 and 3.
    resumed = streams.train_stream(config, stage=1, skip_batches=2).take(2)
    for (x, y), (x2, y2) in zip(ours[2:], resumed):
        np.testing.assert_array_equal(x, x2.numpy())
        np.testing.assert_array_equal(y, y2.numpy())


def test_stream_seeds_differ_per_stage_and_epoch():
    seeds = {resume.stream_seed(0, s, e) for s in (1, 2) for e in range(-1, 50)}
    assert len(seeds) == 102
    assert resume.stream_seed(0, 1, 3) == resume.stream_seed(0, 1, 3)


# ---------------------------------------------------------------- tools/train.py

def _tool(*args, cwd=REPO, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "upright.tools.train", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


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
    ("lite0.flags", "efficientnet_lite0", "dense"),
    ("cpu.flags", "efficientnet_lite0", "linear"),
    ("demo.flags", None, None)])
def test_shipped_flagfiles_parse_and_validate(records, flagfile, backbone, head, tmp_path):
    # --model_dir here: the recipe's own (runs/...) may hold the user's demo run.
    result = _tool(f"--flagfile={flagfile}", f"--records={records}",
                   f"--model_dir={tmp_path / 'run'}", "--dry_run")
    assert result.returncode == 0, result.stderr[-2000:]
    if backbone:
        assert f"backbone = '{backbone}'" in result.stdout
        assert f"head = '{head}'" in result.stdout
        # The article's stage 1 (blocks 1-4 frozen); cpu.flags freezes the whole backbone.
        frozen = 9 if flagfile == "cpu.flags" else 5
        assert f"stage1_freeze_below_block = {frozen}" in result.stdout


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
        stage1=train.StageConfig(epochs=3, lr=3e-3, freeze_below_block=2),
        stage2=train.StageConfig(epochs=7, lr=1e-3), export=False, verbose=0)
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


# ---------------------------------------------------------------- faults (issue 6)
# Real SIGKILLs at named moments (tests/fault_tools.py, kill_training_at), a
# full disk under model_dir, and a damaged shard met while training.


def _run_killed(code_args, kill_at, timeout=240):
    """Runs train_and_evaluate(tiny_config(*code_args)) in a fresh process that
    SIGKILLs itself at `kill_at`; returns the CompletedProcess."""
    code = ("import sys; from tests import fault_tools, test_train as t; "
            "from upright.pipeline import train; fault_tools.kill_training_at(sys.argv[3]); "
            "train.train_and_evaluate(t.tiny_config(sys.argv[1], sys.argv[2]))")
    code_args = [*code_args, kill_at]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-c", code, *code_args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _snapshot(folder, names):
    return {name: open(os.path.join(folder, name), "rb").read() for name in names}


def _assert_same_run(model_dir, reference_dir, metrics, reference_metrics):
    for stage in ("stage1", "stage2"):
        a = _npz(os.path.join(reference_dir, "stages", f"{stage}.weights.npz"))
        b = _npz(os.path.join(model_dir, "stages", f"{stage}.weights.npz"))
        assert len(a) == len(b)
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    for stage in ("1", "2"):
        for key in ("val_loss", "val_accuracy"):
            assert metrics["stages"][stage][key] == pytest.approx(
                reference_metrics["stages"][stage][key], rel=1e-4), (stage, key)
    assert metrics["final"]["val_accuracy"] == pytest.approx(
        reference_metrics["final"]["val_accuracy"])
    assert metrics["best"]["val_accuracy"] == pytest.approx(
        reference_metrics["best"]["val_accuracy"])


def _limited_tool(limit_bytes, *args):
    """tools/train.py with RLIMIT_FSIZE: every write past limit_bytes fails (EFBIG),
    the path a full disk takes, without root."""
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes}))\n"
            "from upright.tools import train\n"
            "sys.argv = ['train'] + sys.argv[1:]\n"
            "train.run()\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _config_flags(config):
    """tools/train.py flags that build exactly `config` (see tiny_config)."""
    return [f"--records={config.records}", f"--model_dir={config.model_dir}",
            f"--batch_size={config.batch_size}", f"--image_size={config.image_size}",
            f"--seed={config.seed}", f"--augment_policy={config.augment_policy}",
            f"--augment_on={config.augment_on}", f"--backbone={config.backbone}",
            "--weights=none", f"--head={config.head}", f"--dropout={config.dropout}",
            f"--stage1_epochs={config.stage1.epochs}", f"--stage1_lr={config.stage1.lr}",
            f"--stage1_freeze_below_block={config.stage1.freeze_below_block}",
            "--nostage1_train_batchnorm",
            f"--stage2_epochs={config.stage2.epochs}", f"--stage2_lr={config.stage2.lr}",
            f"--stage2_freeze_below_block={config.stage2.freeze_below_block}",
            f"--steps_per_epoch={config.steps_per_epoch}", "--noexport", "--verbose=0"]


KEPT = ["stages/stage1.done.json", "stages/stage1.weights.npz",
        "checkpoints/best.keras", "checkpoints/best.json"]


def _tmp_leftovers(model_dir):
    return [os.path.join(root, n) for root, _, names in os.walk(model_dir)
            for n in names if ".tmp" in n]


@contextlib.contextmanager
def _small_disk(tmp_path):
    """-> (model_dir, fill(), make_room()): model_dir on a 64 MB tmpfs when root may
    mount one (fill() shrinks it to 100 KB of free room), else on tmp_path with
    fill() = None (use RLIMIT_FSIZE instead)."""
    from tests.test_faults import _mount_tmpfs
    disk = tmp_path / "disk"
    mounted = os.geteuid() == 0 and _mount_tmpfs(disk, "64m")

    def remount(size):
        assert subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)]).returncode == 0

    def fill():
        st = os.statvfs(disk)
        remount((st.f_blocks - st.f_bfree) * st.f_frsize + 100_000)

    try:
        yield str(disk / "run"), (fill if mounted else None), (lambda: remount("64m"))
    finally:
        if mounted:   # lazily: this process may still hold a TensorBoard event file there
            subprocess.run(["umount", "-l", str(disk)])


@contextlib.contextmanager
def _file_size_limit(limit):
    """In this process: every write past `limit` bytes fails with EFBIG."""
    import resource
    import signal
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_sigkill_between_stages_then_full_disk_then_rerun_matches(reference, records, tmp_path):
    """A real SIGKILL after stage 1's done marker, before stage 2's first epoch;
    then the same run on a disk with no room left: OutputError (one line), the
    earlier files byte for byte, no temporary files; then, with room again, the
    same run finishes and equals the uninterrupted run."""
    ref_config, ref_metrics = reference
    with _small_disk(tmp_path) as (model_dir, fill, make_room):
        killed = _run_killed([records, model_dir], "between_stages")
        assert killed.returncode == -9, killed.stderr[-2000:]
        before = _snapshot(model_dir, KEPT)
        assert not os.path.exists(os.path.join(model_dir, "backup", "stage1"))
        assert not os.path.exists(os.path.join(model_dir, "backup", "stage2"))
        config = tiny_config(records, model_dir)
        if fill:       # a real full filesystem: room for a few KB, not for a backup
            fill()
            limit, reason = contextlib.nullcontext(), "No space left on device"
        else:          # no root: every write past 100 KB fails
            limit, reason = _file_size_limit(100_000), "File too large"
        with limit, pytest.raises(resume.OutputError) as caught:
            train.train_and_evaluate(config)
        message = str(caught.value)
        assert message.startswith(f"cannot write into model_dir {model_dir}")
        assert reason in message and "\n" not in message, message
        assert _snapshot(model_dir, KEPT) == before
        assert not _tmp_leftovers(model_dir)
        if fill:
            make_room()
        again = train.train_and_evaluate(config)   # the same run, room again
        assert again["stages"]["1"] == json.loads(before["stages/stage1.done.json"])
        assert again["stages"]["2"]["resumed_at_epoch"] == 0
        _assert_same_run(model_dir, ref_config.model_dir, again, ref_metrics)


@pytest.mark.slow
def test_full_disk_through_the_tool_gives_one_line_and_keeps_files(reference, records,
                                                                   tmp_path):
    """tools/train.py resumed mid-stage 2 on a full disk: `train: error: ...`,
    exit 1, no traceback (h5py's destructor noise included); the stage 2 backup
    of epoch 1, the best checkpoint and stage 1's files stay byte for byte;
    with room again the same command finishes and equals the uninterrupted run."""
    ref_config, ref_metrics = reference
    with _small_disk(tmp_path) as (model_dir, fill, make_room):
        killed = _run_killed([records, model_dir], "stage2_epoch1")
        assert killed.returncode == -9, killed.stderr[-2000:]
        backup = ["backup/stage2/training_metadata.json", "backup/stage2/epoch1.weights.h5"]
        before = _snapshot(model_dir, KEPT + backup)
        flags = _config_flags(tiny_config(records, model_dir))
        if fill:
            fill()
            full, reason = _limited_tool(2**40, *flags), "No space left on device"
        else:
            full, reason = _limited_tool(100_000, *flags), "File too large"
        assert full.returncode == 1, full.stderr[-3000:]
        lines = _error_lines(full)
        assert len(lines) == 1 and reason in lines[0], full.stderr[-3000:]
        assert f"cannot write into model_dir {model_dir}" in lines[0]
        assert "Traceback" not in full.stderr and "Exception ignored" not in full.stderr, \
            full.stderr[-3000:]
        assert _snapshot(model_dir, KEPT + backup) == before
        assert not _tmp_leftovers(model_dir)
        if fill:
            make_room()
        again = _tool(*flags)
        assert again.returncode == 0, again.stderr[-3000:]
        metrics = json.loads(open(os.path.join(model_dir, "metrics.json")).read())
        assert metrics["stages"]["2"]["resumed_at_epoch"] == 1
        _assert_same_run(model_dir, ref_config.model_dir, metrics, ref_metrics)


@pytest.fixture(scope="module")
def sharded_records(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sharded") / "rec")
    helpers.write_records(out, {
        "train": [helpers.upright_image(i, 40, 48) for i in range(24)],
        "val": [helpers.upright_image(1000 + i, 40, 48) for i in range(8)],
    }, shards_per_split=3)
    return out


def _damaged_copy(sharded_records, tmp_path, split, how, legacy=False):
    """A copy of the records with shard 1 of `split` damaged; -> (folder, shard, record).
    legacy: info.json without shard_bytes (written before that field existed), so
    that load_info cannot refuse a truncated shard up front."""
    import shutil
    from tests.test_faults import damage
    from upright.pipeline import recordio
    out = str(tmp_path / f"{split}_{how}")
    shutil.copytree(sharded_records, out)
    if legacy:
        path = os.path.join(out, "info.json")
        info = json.load(open(path))
        for entry in info["splits"].values():
            entry.pop("shard_bytes", None)
        json.dump(info, open(path, "w"))
    shard = recordio.shard_paths(out, split)[1]
    return out, shard, damage(shard, how)


def test_truncated_train_shard_through_the_tool_names_file_and_record(sharded_records,
                                                                     tmp_path):
    """A truncated train shard in a folder whose info.json has no shard sizes
    (written before that field existed): the framing check of load_info finds
    the record that runs past the end before training starts (a config error,
    exit 2): one line naming the shard and the record; the subprocess timeout
    fails a hang."""
    out, shard, index = _damaged_copy(sharded_records, tmp_path, "train", "truncate",
                                      legacy=True)
    result = _tool(f"--records={out}", f"--model_dir={tmp_path / 'run'}", "--backbone=tiny",
                   "--weights=none", "--image_size=32", "--batch_size=8",
                   "--stage1_epochs=1", "--stage1_freeze_below_block=3", "--stage2_epochs=0",
                   "--steps_per_epoch=3", "--augment_policy=none", "--noexport", "--verbose=0",
                   timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = _error_lines(result)
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"train: error: {shard}: record {index} is damaged "
                               "(truncated or corrupted shard: "), lines
    assert lines[0].endswith("restore the file or run make_records again"), lines
    assert "Traceback" not in result.stderr


def test_truncated_shard_with_known_size_is_refused_before_any_work(sharded_records,
                                                                    tmp_path):
    out, shard, _ = _damaged_copy(sharded_records, tmp_path, "train", "truncate")
    with pytest.raises(train.ConfigError, match=f"{shard}: damaged shard"):
        train.train_and_evaluate(tiny_config(out, str(tmp_path / "run")))
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("split, how", [("train", "flip"), ("val", "flip"),
                                        ("val", "truncate")])
def test_damaged_shard_met_by_fit_or_validation_is_named(sharded_records, tmp_path, split,
                                                         how):
    """Flipped bytes (the size is unchanged) or a truncated shard of a folder
    without sizes, in the train split (met by fit) or the val split (met by
    fit's validation): RecordsError naming the shard file and the record. (A
    truncation, or a flip that hits a length field, is found before any work by
    load_info's framing check: then a ConfigError with the same line.)"""
    from upright.pipeline import recordio
    out, shard, index = _damaged_copy(sharded_records, tmp_path, split, how, legacy=True)
    config = tiny_config(out, str(tmp_path / "run"), stage2_epochs=0, steps_per_epoch=3,
                         augment_policy="none")
    with pytest.raises((recordio.RecordsError, train.ConfigError)) as caught:
        train.train_and_evaluate(config)
    assert str(caught.value).startswith(f"{shard}: record {index} is damaged"), caught.value


# Slow: every moment, through the real tool, rerun with the same command.
KILL_ARGS = ["--backbone=tiny", "--weights=none", "--image_size=32", "--batch_size=8",
             "--stage1_epochs=2", "--stage1_freeze_below_block=3", "--stage2_epochs=3",
             "--steps_per_epoch=3", f"--augment_policy={POLICY}", "--dropout=0.25",
             "--noexport", "--verbose=0", "--seed=5"]


@pytest.fixture(scope="module")
def whole_run(records, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("whole") / "run"
    result = _tool(f"--records={records}", *KILL_ARGS, f"--model_dir={model_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return str(model_dir), json.loads((model_dir / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("kill_at, resumed_stage, resumed_at", [
    ("stage1_epoch1", "1", 1),      # during stage 1, mid-epoch (after its first batch)
    ("stage1_backup2", "1", 1),     # inside stage 1's last backup: weights in, metadata not
    ("between_stages", "2", 0),     # after stage1.done.json, before stage 2's first epoch
    ("stage2_epoch1", "2", 1),      # during stage 2, mid-epoch
    ("stage2_backup2", "2", 1),     # inside a stage 2 backup
])
def test_sigkill_at_each_moment_then_rerun_matches(records, whole_run, tmp_path, kill_at,
                                                   resumed_stage, resumed_at):
    whole_dir, whole_metrics = whole_run
    model_dir = tmp_path / "killed"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    killed = subprocess.run([sys.executable, "-m", "tests.fault_tools", "train",
                             f"--kill-at={kill_at}", "--",
                             f"--records={records}", *KILL_ARGS, f"--model_dir={model_dir}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (model_dir / "metrics.json").exists()
    again = _tool(f"--flagfile={model_dir / 'flags.txt'}")   # the same command again
    assert again.returncode == 0, again.stderr[-3000:]
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["stages"][resumed_stage]["resumed_at_epoch"] == resumed_at
    _assert_same_run(str(model_dir), whole_dir, metrics, whole_metrics)


def test_every_commit_point_of_a_run_is_durable(records, tmp_path, monkeypatch):
    """Backups, stage markers, checkpoints and JSON files all land through
    fileio: the new file fsynced before its rename, its folder after it."""
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def where(path, dir_fd):
        if dir_fd is None:
            return os.path.realpath(path)
        return os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
        renamed = ("rename", where(src, src_dir_fd), where(dst, dst_dir_fd))
        real_replace(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        events.append(renamed)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    train.train_and_evaluate(tiny_config(records, str(tmp_path / "run"), stage2_epochs=1))
    run = os.path.realpath(tmp_path / "run")
    landed = {}
    for i, event in enumerate(events):
        if event[0] == "rename" and event[2].startswith(run + os.sep):
            landed[os.path.relpath(event[2], run)] = (
                ("fsync", event[1]) in events[:i]
                and ("fsync", os.path.dirname(event[2])) in events[i + 1:])
    for expected in ("backup/stage1/epoch1.weights.h5", "backup/stage1/training_metadata.json",
                     "stages/stage1.weights.npz", "stages/stage1.done.json",
                     "stages/stage2.done.json", "model.keras", "metrics.json"):
        assert landed.get(expected), (expected, landed)


# ------------------------- trainer flags (tests/README.md), by value

def _spy_on_fit(monkeypatch):
    """Records what fit() runs with, read from the live objects: per stage the
    jit_compile given to compile() and the compiled model's own attribute, the
    model fit() trains, and the optimizer's learning rate at each epoch start
    (the rate that epoch trains with). Returns the list it fills, one dict per
    fitted stage."""
    seen = []
    original = keras.Model.compile

    def compile(self, *args, **kwargs):
        seen.append({"jit_compile_arg": kwargs.get("jit_compile"), "lr": []})
        return original(self, *args, **kwargs)

    class Spy(callbacks.History):
        def on_train_begin(self, logs=None):
            seen[-1].update(stage=self.stage, model=self.model,
                            jit_compile=self.model.jit_compile)

        def on_epoch_begin(self, epoch, logs=None):
            seen[-1]["lr"].append(float(keras.ops.convert_to_numpy(
                self.model.optimizer.learning_rate)))

    monkeypatch.setattr(keras.Model, "compile", compile)
    monkeypatch.setattr(callbacks, "History", Spy)
    return seen


def _history(model_dir):
    """history.csv as {column: [float per row]}."""
    rows = open(os.path.join(model_dir, "history.csv")).read().splitlines()
    header = rows[0].split(",")
    return {k: [float(r.split(",")[i]) for r in rows[1:]] for i, k in enumerate(header)}


def test_bn_momentum_reaches_every_backbone_batchnorm(records, tmp_path, monkeypatch):
    """--bn_momentum=0.5: every BatchNorm of the backbone of the model fit()
    trains and of the saved model.keras has momentum 0.5 (the tiny backbone's
    own is 0.9); the head's BatchNorm, outside the backbone, keeps Keras' 0.99."""
    seen = _spy_on_fit(monkeypatch)
    config = tiny_config(records, str(tmp_path / "run"), bn_momentum=0.5, stage1_epochs=0,
                         stage2_epochs=1, steps_per_epoch=1, validation_steps=1,
                         augment_policy="none")
    train.train_and_evaluate(config)
    saved = keras.saving.load_model(os.path.join(config.model_dir, "model.keras"),
                                    compile=False)
    for model in (seen[0]["model"], saved):
        backbone = model_lib.get_backbone(model)
        momenta = {layer.name: layer.momentum for layer in backbone.layers
                   if isinstance(layer, keras.layers.BatchNormalization)}
        assert momenta == {f"block{b}_bn": 0.5 for b in (1, 2, 3, 4)}
        assert model.get_layer("head_bn").momentum == 0.99


def test_early_stopping_stops_after_the_peak_and_restores_the_best_weights(records, tmp_path):
    """The seeded run of test_kept_model_is_the_best_epoch_of_history (val
    accuracy 0.50, 0.35, 0.55, 0.50 over 4 epochs) with --early_stopping_patience=1
    stops after epoch 2, and the stage's final weights are epoch 1's (the ones
    best.keras kept when epoch 1 ended), not epoch 2's."""
    config = tiny_config(records, str(tmp_path / "run"), stage1_epochs=0, stage2_epochs=4,
                         stage2_lr=3e-2, augment_policy="none", early_stopping_patience=1)
    metrics = train.train_and_evaluate(config)
    val = _history(config.model_dir)["val_accuracy"]
    assert len(val) == 2 and val[1] < val[0], val   # the peak, then a fall: stopped
    stage = metrics["stages"]["2"]
    assert stage["stopped_early"] is True and stage["epochs_run_this_process"] == 2
    assert metrics["best"]["val_accuracy"] == pytest.approx(val[0])
    best = keras.saving.load_model(os.path.join(config.model_dir, "checkpoints", "best.keras"),
                                   compile=False)
    final = _npz(os.path.join(config.model_dir, "stages", "stage2.weights.npz"))
    assert len(final) == len(best.get_weights())
    for x, y in zip(final, best.get_weights()):
        np.testing.assert_array_equal(x, y)
    # The stage's own closing evaluation ran on the restored weights.
    assert stage["val_accuracy"] == pytest.approx(val[0])


def test_reduce_lr_on_plateau_multiplies_by_the_factor_down_to_min_lr(records, tmp_path,
                                                                        monkeypatch):
    """--reduce_lr_patience=1 --reduce_lr_factor=0.5 --min_lr=1e-2 from lr 3e-2:
    the rate each epoch trains with, read from the optimizer, is the previous
    one x 0.5 after each epoch whose val loss is no better than the best so far,
    clipped at 1e-2, and unchanged otherwise. The seeded run has to show the
    factor (3e-2 -> 1.5e-2) and the floor (1.5e-2 -> 1e-2, not 7.5e-3)."""
    seen = _spy_on_fit(monkeypatch)
    lr, factor, floor = 3e-2, 0.5, 1e-2
    config = tiny_config(records, str(tmp_path / "run"), stage1_epochs=0, stage2_epochs=5,
                         stage2_lr=lr, augment_policy="none", reduce_lr_patience=1,
                         reduce_lr_factor=factor, min_lr=floor)
    train.train_and_evaluate(config)
    val_loss = _history(config.model_dir)["val_loss"]
    expected, best = [lr], float("inf")
    for v in val_loss[:-1]:
        current = expected[-1]
        if v < best - 1e-4:   # Keras' min_delta
            best = v
        else:
            current = max(current * factor, floor)
        expected.append(current)
    assert seen[0]["lr"] == pytest.approx(expected, rel=1e-6), (val_loss, seen[0]["lr"])
    assert {lr, lr * factor, floor} <= {round(x, 9) for x in expected}, (val_loss, expected)


def test_cosine_schedule_decays_each_epoch_and_a_resumed_stage_stays_on_the_curve(
        records, tmp_path, monkeypatch):
    """--stage2_schedule=cosine, 4 epochs of 2 steps from 4e-2: the rate each
    epoch starts with is lr * (1 + cos(pi * e / 4)) / 2 = 4e-2, 3.41e-2, 2e-2,
    0.59e-2. Killed after epoch 2 (before its backup) and run again, the resumed
    process starts epoch 2 at 3.41e-2 (the optimizer's step count comes back
    with the backup), not at 4e-2 as a fresh schedule would."""
    lr, epochs = 4e-2, 4
    expected = [lr * (1 + np.cos(np.pi * e / epochs)) / 2 for e in range(epochs)]
    config = tiny_config(records, str(tmp_path / "run"), stage1_epochs=0, stage2_epochs=epochs,
                         stage2_lr=lr, stage2_schedule="cosine", augment_policy="none")
    seen = _spy_on_fit(monkeypatch)
    train.train_and_evaluate(config)
    assert seen[0]["lr"] == pytest.approx(expected, rel=1e-5)

    resumed = configs.replace(config, model_dir=str(tmp_path / "resumed"))
    original = callbacks.History.on_epoch_end

    def crash(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt("simulated kill")
        original(self, epoch, logs)

    monkeypatch.setattr(callbacks.History, "on_epoch_end", crash)
    seen.clear()
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(resumed)
    monkeypatch.setattr(callbacks.History, "on_epoch_end", original)
    seen.clear()
    again = train.train_and_evaluate(resumed)
    assert again["stages"]["2"]["resumed_at_epoch"] == 1
    assert again["stages"]["2"]["schedule"] == "cosine"
    assert seen[0]["lr"] == pytest.approx(expected[1:], rel=1e-5)
    with pytest.raises(train.ConfigError, match="stage2_schedule=cosine and reduce_lr"):
        train.check_config(configs.replace(config, reduce_lr_patience=2,
                                           model_dir=str(tmp_path / "other")))


def test_a_run_pinned_before_a_setting_existed_resumes(records, tmp_path):
    """config.json of a run from before stage*_schedule existed lacks the key:
    the same flags (the default schedule) resume it; another schedule is refused."""
    config = tiny_config(records, str(tmp_path / "run"))
    settings = configs.flatten(config)
    old = {k: v for k, v in settings.items() if not k.endswith("_schedule")}
    os.makedirs(config.model_dir)
    with open(os.path.join(config.model_dir, "config.json"), "w") as f:
        json.dump(old, f)
    train.check_config(config)
    with pytest.raises(train.ConfigError, match="stage2_schedule: 'constant' -> 'cosine'"):
        train.check_config(configs.replace(config, stage2_schedule="cosine"))


def test_measure_steps_writes_a_consistent_throughput_block(records, tmp_path, monkeypatch):
    """--measure_steps=2: metrics.json gets the throughput block of train.measure_throughput
    (stage 2, the steps, the batch size, images/s on the real stream and on a
    cached batch, input_wait_fraction = max(0, 1 - t_cached / t_real)), and the
    timing ran 3 warm-up + 2 timed steps on each of the two streams."""
    steps = []
    original = keras.Model.train_on_batch
    monkeypatch.setattr(keras.Model, "train_on_batch",
                        lambda self, *a, **k: steps.append(1) or original(self, *a, **k))
    config = tiny_config(records, str(tmp_path / "run"), stage1_epochs=0, stage2_epochs=1,
                         steps_per_epoch=1, validation_steps=1, augment_policy="none",
                         measure_steps=2)
    metrics = train.train_and_evaluate(config)
    block = metrics["throughput"]
    assert json.load(open(os.path.join(config.model_dir, "metrics.json")))["throughput"] == block
    assert sorted(block) == ["batch_size", "compute_only_images_per_s", "images_per_s",
                             "input_wait_fraction", "stage", "steps"]
    assert (block["stage"], block["steps"], block["batch_size"]) == (2, 2, 8)
    assert len(steps) == 2 * (3 + 2)
    real, cached = block["images_per_s"], block["compute_only_images_per_s"]
    assert real > 0 and cached > 0
    # t_cached / t_real = real / cached (images/s is batch_size / t); all rounded.
    assert block["input_wait_fraction"] == pytest.approx(max(0.0, 1 - real / cached), abs=2e-3)
    assert 0 <= block["input_wait_fraction"] < 1


@pytest.mark.parametrize("value, passed, compiled", [
    ("true", True, True), ("false", False, False), ("auto", "auto", None)])
def test_jit_compile_reaches_model_compile(records, tmp_path, monkeypatch, value, passed,
                                           compiled):
    """--jit_compile: true and false reach compile() and the compiled model's
    jit_compile attribute; auto reaches compile() as "auto" (Keras resolves it:
    XLA only with an accelerator), with host augmentation."""
    seen = _spy_on_fit(monkeypatch)
    config = tiny_config(records, str(tmp_path / "run"), stage1_epochs=0, stage2_epochs=1,
                         steps_per_epoch=1, validation_steps=1, augment_policy="none",
                         jit_compile=value)
    train.train_and_evaluate(config)
    assert [s["jit_compile_arg"] for s in seen] == [passed]
    if compiled is not None:
        assert seen[0]["jit_compile"] is compiled


@pytest.mark.parametrize("train_batchnorm", [False, True])
def test_stage2_train_batchnorm_decides_if_frozen_batchnorm_statistics_move(
        records, tmp_path, train_batchnorm):
    """Stage 2 with the whole backbone frozen (freeze below block 5 of 4):
    --stage2_train_batchnorm=false leaves every BatchNorm weight (moving mean
    and variance included) exactly as initialised; true moves every moving
    mean and variance. The convolutions stay frozen and the head trains in both."""
    config = tiny_config(records, str(tmp_path / "run"), stage1_epochs=0, stage2_epochs=1,
                         stage2_freeze_below_block=5, stage2_train_batchnorm=train_batchnorm,
                         head="linear", dropout=0.0, augment_policy="none",
                         validation_steps=1)
    keras.utils.set_random_seed(config.seed)   # the run's initial weights
    model = model_lib.build_model(backbone="tiny", image_size=32, weights=None, head="linear")
    initial = _weights_by_name(model, model.get_weights())
    train.train_and_evaluate(config)
    after = _weights_by_name(model, _npz(os.path.join(config.model_dir, "stages",
                                                      "stage2.weights.npz")))
    bn = [p for p in initial if "_bn/" in p]
    assert len(bn) == 4 * 4
    for path in bn:
        if train_batchnorm and path.endswith(("moving_mean", "moving_variance")):
            assert not np.allclose(after[path], initial[path]), path
        elif not train_batchnorm:
            np.testing.assert_array_equal(after[path], initial[path], err_msg=path)
    for b in (1, 2, 3, 4):
        np.testing.assert_array_equal(after[f"block{b}_conv/kernel"],
                                      initial[f"block{b}_conv/kernel"])
    assert not np.allclose(after["head_logits/kernel"], initial["head_logits/kernel"])


def test_validation_steps_is_the_number_of_val_batches(records, tmp_path):
    """--validation_steps=2 with 20 val examples (5 images x 4 turns) in batches
    of 8: fit's validation and the stage's closing evaluation score exactly the
    first 16 examples (their loss under the final weights), not all 20."""
    config = tiny_config(records, str(tmp_path / "run"), stage1_epochs=0, stage2_epochs=1,
                         stage2_lr=3e-2, augment_policy="none", validation_steps=2)
    metrics = train.train_and_evaluate(config)
    model = model_lib.build_model(backbone="tiny", image_size=32, weights=None, head="dense",
                                  dropout=config.dropout)
    model.set_weights(_npz(os.path.join(config.model_dir, "stages", "stage2.weights.npz")))
    _, probs, labels = _val_probs(model, config)
    assert len(labels) == 20
    loss = keras.losses.SparseCategoricalCrossentropy()
    first16 = float(loss(labels[:16], probs[:16]))
    for other in (8, 20):   # one batch, the whole split: far from the 16 at this tolerance
        assert abs(float(loss(labels[:other], probs[:other])) - first16) > 1e-3 * first16
    assert metrics["stages"]["2"]["val_loss"] == pytest.approx(first16, rel=1e-5)
    assert _history(config.model_dir)["val_loss"][-1] == pytest.approx(first16, rel=1e-5)
    assert metrics["final"]["val_examples"] == 20   # the final evaluation: the whole split


def test_tool_passes_the_hygiene_and_speed_flags_into_the_config(records, tmp_path):
    """The tests above drive TrainConfig; this is the tool's half: each of those
    flags, at a value other than its default, reaches the TrainConfig it builds."""
    values = {"bn_momentum": 0.5, "early_stopping_patience": 3, "reduce_lr_patience": 2,
              "reduce_lr_factor": 0.5, "min_lr": 0.001, "measure_steps": 4,
              "jit_compile": "false", "stage2_train_batchnorm": False, "validation_steps": 7}
    defaults = configs.flatten(train.TrainConfig())
    assert all(defaults[k] != v for k, v in values.items())
    flags = [f"--no{k}" if v is False else f"--{k}={v}" for k, v in values.items()]
    result = _tool(f"--records={records}", f"--model_dir={tmp_path / 'run'}",
                   "--backbone=tiny", "--weights=none", "--image_size=32", "--dry_run", *flags)
    assert result.returncode == 0, result.stderr[-2000:]
    for key, value in values.items():
        assert f"{key} = {value!r}" in result.stdout.splitlines(), key
