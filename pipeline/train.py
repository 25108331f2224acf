"""The staged fine-tune: TrainConfig -> train_and_evaluate -> a model_dir.

    from upright.pipeline import train
    metrics = train.train_and_evaluate(train.TrainConfig(
        records="records/photos", model_dir="runs/b1"))

Two stages, as in the source article:
  stage 1: backbone frozen below block `stage1_freeze_below_block` (article:
           blocks 1-4 frozen = 5), BatchNorm of the frozen blocks training or
           not (`stage1_train_batchnorm`), Adam at `stage1_lr` (1e-3), 15 epochs;
  stage 2: everything trainable (`stage2_freeze_below_block` = 0) at
           `stage2_lr` (1e-4).
The model is recompiled between stages (a fresh Adam); weights carry over. A
stage with 0 epochs is skipped.

Nothing lost. A run killed at any moment and restarted with the same config
continues from the last completed epoch of the stage it was in:
  * per stage, a keras.callbacks.BackupAndRestore (model_dir/backup/stage<k>)
    saves weights + optimizer state + epoch at every epoch end, atomically:
    the weights go to a temporary name, are renamed to epoch<e>.weights.h5,
    and training_metadata.json (the epoch and the name of its weights file,
    written to a temporary name and renamed) is the commit point. So a kill at
    any instant leaves either the previous epoch's backup or the new one,
    never new weights under the old epoch number or a half-written file
    (Keras' own callback writes both in place); every rename is durable
    (fileio: file and folder synced), so a power cut
    leaves the same choice;
  * a finished stage leaves model_dir/stages/stage<k>.done.json and its final
    weights stage<k>.weights.npz (written first), so a restart skips it and
    starts the next stage from exactly those weights; the stage's backup is
    removed only after its marker exists;
  * the data stream is resumable: one seeded input_fn stream per stage, every
    epoch exactly `steps_per_epoch` batches of it, so a run resumed at epoch e
    skips e x steps batches (decoding only; augmentation is applied after the
    skip, see train_stream); the dropout / stochastic-depth random state is
    reset from (seed, stage, epoch) at each epoch start. So epoch e sees the
    same batches and the same random numbers whether or not the run was
    interrupted before it, and a resumed run ends where an uninterrupted one
    does (within float tolerance).
  * model_dir/config.json pins the config: restarting in a model_dir that holds
    a different run is refused.
Not restored on resume: the patience counters of EarlyStopping and
ReduceLROnPlateau (they restart from zero); the learning rate itself is part
of the optimizer state and is restored.

NaN: a NaN or infinite training loss stops the run at once with
TrainingDiverged; the last good epoch's backup and the best checkpoint stay.

Full disk: every file of model_dir is written under a temporary name and
renamed, so a failed write (no space, file size limit, read-only) leaves the
earlier best checkpoint, backup and stage files as they were; the run stops
with OutputError (one line) and the same command resumes once there is room.
A damaged shard met while training or validating stops the run with
recordio.RecordsError naming the shard file and the record
(inputs.naming_damaged_records), within the read of that record.

Test-only fault injection: the environment variable UPRIGHT_TEST_KILL_AT
(read only by _test_kill_point) makes the process SIGKILL itself at a named
point: "stage<k>_epoch<e>" (after the first batch of epoch e of stage k,
counted from 0), "stage<k>_backup<n>" (inside the backup made after n epochs:
its weights file renamed in, its metadata not yet), "between_stages" (after
stage 1's done marker, before stage 2 starts). Unset, nothing changes.

A model_dir after a run (see BUILD.md section 6):
    config.json, model.keras (best epoch by val accuracy, float32, no
    AugmentLayer), model_info.json, metrics.json, history.csv, logs/ (TensorBoard),
    checkpoints/best.keras + best.json, stages/, export/ and model.tflite (serve).
"""
import contextlib
import csv
import dataclasses
import errno
import json
import os
import signal
import time

import numpy as np

from upright.pipeline import fileio, recordio, schema
from upright.pipeline import model as model_lib

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")
AUGMENT_ON = ("auto", "host", "device")
JIT_COMPILE = ("auto", "true", "false")
RESIZE = ("squash", "pad", "crop")


class ConfigError(ValueError):
    """A config that cannot work; str(e) is one line saying what to change."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


class OutputError(RuntimeError):
    """Writing into model_dir failed (full disk, file size limit, read-only);
    str(e) is one line. Everything written before is intact."""


TEST_KILL_ENV = "UPRIGHT_TEST_KILL_AT"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on. Defaults are the b1.flags recipe."""
    # Data and output.
    records: str = ""
    model_dir: str = ""
    batch_size: int = 32            # global batch size (all replicas together)
    image_size: int = 128
    seed: int = 0
    augment_policy: str = "default"
    # auto: "device" when a GPU/TPU is present, else "host". Measured on a
    # 2-core CPU (benchmarks/README.md, gpu_check, same run): host 122-127 ms
    # a step vs device + XLA 477-575 ms (the static schedule runs every branch
    # on every image; tf.data overlaps host work with the step), so a CPU
    # keeps the host placement.
    augment_on: str = "auto"
    resize: str = "squash"
    # Model.
    backbone: str = "efficientnetb1"
    weights: str | None = "imagenet"   # "imagenet", None, or a backbone weights file
    head: str = "dense"
    dropout: float = 0.0
    bn_momentum: float = 0.0           # 0 keeps the backbone's BatchNorm momentum
    # Stages.
    stage1_epochs: int = 15
    stage1_lr: float = 1e-3
    stage1_freeze_below_block: int = 5
    stage1_train_batchnorm: bool = True
    stage2_epochs: int = 15
    stage2_lr: float = 1e-4
    stage2_freeze_below_block: int = 0
    stage2_train_batchnorm: bool = True
    steps_per_epoch: int = 0        # 0: one pass over the train split per epoch
    validation_steps: int = 0       # 0: the whole val split (x4 orientations)
    # Speed and scale.
    mixed_precision: bool = False
    # auto: Keras' auto, XLA only with a GPU/TPU (and no distribution
    # strategy); the same CPU measurement: XLA slowed every CPU row.
    jit_compile: str = "auto"
    data_service: str = ""          # grpc://HOST:PORT of a tf.data service; "" = local input
    strategy: str = "auto"
    deterministic: bool = False     # tf.config.experimental.enable_op_determinism
    # Hygiene.
    early_stopping_patience: int = 0      # 0 = off; epochs without val_accuracy gain
    reduce_lr_patience: int = 0           # 0 = off
    reduce_lr_factor: float = 0.2
    min_lr: float = 1e-6
    export: bool = True                   # SavedModel + TFLite via pipeline/serve.py
    measure_steps: int = 0                # >0: measure throughput / input wait at the end
    verbose: int = 2                      # keras fit verbosity


def stage_settings(config: TrainConfig, stage: int) -> dict:
    """The per-stage fields of `config` for stage 1 or 2, without the prefix."""
    prefix = f"stage{stage}_"
    return {f.name[len(prefix):]: getattr(config, f.name)
            for f in dataclasses.fields(config) if f.name.startswith(prefix)}


# ----------------------------------------------------------------------------
# Validation: everything that can be checked before any work.

def check_config(config: TrainConfig) -> dict:
    """Checks the config cheaply (no model is built, no data read).

    Returns:
      the records' info.json.
    Raises:
      ConfigError (or model_lib.ModelError, a ValueError too) with one line.
    """
    if not config.records:
        raise ConfigError("--records is required: a folder written by make_records")
    if not config.model_dir:
        raise ConfigError("--model_dir is required: where the run writes its outputs")
    try:
        info = recordio.load_info(config.records)
        for split in ("train", "val"):
            recordio.shard_paths(config.records, split, info)
            if not info["splits"][split]["num_examples"]:
                raise ConfigError(f"split {split!r} of {config.records!r} is empty")
    except recordio.RecordsError as e:
        raise ConfigError(str(e)) from None
    model_lib.check_choices(backbone=config.backbone, image_size=config.image_size,
                            weights=config.weights, head=config.head,
                            dropout=config.dropout, bn_momentum=config.bn_momentum)
    if config.weights not in (None, "imagenet"):
        # Builds the backbone alone and loads the file: a wrong architecture fails
        # here, in seconds, not after the data pipeline started.
        model_lib.check_weights_file(backbone=config.backbone, image_size=config.image_size,
                                     path=config.weights)
    _check_choice("augment_on", config.augment_on, AUGMENT_ON)
    _check_choice("strategy", config.strategy, STRATEGIES)
    if config.data_service:
        from upright.pipeline import data_service
        try:
            data_service.check_address(config.data_service)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    _check_choice("jit_compile", str(config.jit_compile).lower(), JIT_COMPILE)
    _check_choice("resize", config.resize, RESIZE)
    if config.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {config.batch_size}")
    if config.steps_per_epoch < 0 or config.validation_steps < 0:
        raise ConfigError("steps_per_epoch and validation_steps must be >= 0 (0 = one pass)")
    top = model_lib.backbone_spec(config.backbone).num_blocks
    for stage in (1, 2):
        s = stage_settings(config, stage)
        if s["epochs"] < 0:
            raise ConfigError(f"stage{stage}_epochs must be >= 0, got {s['epochs']}")
        if not s["lr"] > 0:
            raise ConfigError(f"stage{stage}_lr must be > 0, got {s['lr']}")
        if not 0 <= s["freeze_below_block"] <= top + 1:
            raise ConfigError(
                f"stage{stage}_freeze_below_block={s['freeze_below_block']} outside "
                f"[0, {top + 1}] for {config.backbone} (blocks 1..{top}; "
                f"{top + 1} freezes the whole backbone)")
    if config.stage1_epochs + config.stage2_epochs == 0:
        raise ConfigError("both stages have 0 epochs: nothing to train")
    for name in ("early_stopping_patience", "reduce_lr_patience", "measure_steps"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must be >= 0")
    if not 0 < config.reduce_lr_factor < 1:
        raise ConfigError(f"reduce_lr_factor must be in (0, 1), got {config.reduce_lr_factor}")
    try:
        from upright.pipeline import augment
        augment.parse_policy(config.augment_policy)
    except ImportError:
        pass   # checked again by input_fn
    except ValueError as e:
        raise ConfigError(f"augment_policy: {str(e).splitlines()[0]}") from None
    return info


def _check_choice(name, value, choices):
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


# ----------------------------------------------------------------------------
# The run.

def train_and_evaluate(config: TrainConfig) -> dict:
    """Runs (or resumes) both stages, then writes the model_dir outputs.

    Returns:
      the metrics dict also written to model_dir/metrics.json.
    Raises:
      ConfigError / model_lib.ModelError: bad config (before any training);
      TrainingDiverged: NaN loss.
    """
    import keras
    import tensorflow as tf
    info = check_config(config)
    started = time.time()
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.seed)
    previous_policy = keras.config.dtype_policy()
    strategy = make_strategy(config.strategy)
    augment_on = resolve_augment_on(config.augment_on)
    if config.strategy == "multi_worker":
        # Non-chief workers write under model_dir/workers/worker-<i>/: one backup each.
        from upright.pipeline import cluster
        config = dataclasses.replace(config, model_dir=cluster.worker_dir(config.model_dir))
    with _reporting_write_failures(config.model_dir):
        _pin_config(config)
    finished = finished_metrics(config)
    if finished is not None:
        return finished
    if config.mixed_precision:
        keras.config.set_dtype_policy(
            "mixed_bfloat16" if isinstance(strategy, tf.distribute.TPUStrategy)
            else "mixed_float16")
    try:
        with strategy.scope():
            classifier = _build_classifier(config, config.weights)
            train_model = _training_model(classifier, config, augment_on)
        with _reporting_write_failures(config.model_dir):
            run = _Run(config, info, strategy, classifier, train_model, augment_on)
            stages = {}
            for stage in (1, 2):
                stages[str(stage)] = run.stage(stage)
            metrics = run.finish(stages)
            metrics["seconds_total_this_process"] = round(time.time() - started, 1)
            _write_json(os.path.join(config.model_dir, "metrics.json"), metrics)
    finally:
        keras.config.set_dtype_policy(previous_policy)
    return metrics


def finished_metrics(config: TrainConfig):
    """The metrics of a run in config.model_dir that already finished (its
    metrics.json, written last, exists, and holds the exports if config asks for
    them), with "already_complete": True added; None when there is work left."""
    path = os.path.join(config.model_dir, "metrics.json")
    if not os.path.exists(path):
        return None
    metrics = _read_json(path)
    if config.export and "tflite_bytes" not in metrics.get("model", {}):
        return None   # finished with --noexport, now asked to export: redo the end
    return {**metrics, "already_complete": True}


# errno values and TensorFlow message fragments of a write that cannot succeed.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS)
_WRITE_TEXTS = ("No space left on device", "File too large", "Disk quota exceeded",
                "Read-only file system", "errno = 28", "errno = 27")


@contextlib.contextmanager
def _reporting_write_failures(model_dir):
    """Turns a failed write into model_dir (OSError from Python, h5py or zipfile;
    a TensorFlow OpError from its own writers) into one-line OutputError."""
    import tensorflow as tf
    try:
        yield
    except (OSError, tf.errors.OpError) as e:
        text = " ".join(str(e).split())
        if not (getattr(e, "errno", None) in _WRITE_ERRNOS
                or any(t in text for t in _WRITE_TEXTS)):
            raise
        reason = next((t for t in _WRITE_TEXTS[:4] if t in text), None) or (
            os.strerror(e.errno) if getattr(e, "errno", None) else text[:200])
        where = getattr(e, "filename", None)
        raise OutputError(
            f"cannot write into model_dir {model_dir}"
            f"{f' ({where})' if where else ''}: {reason}; everything written before "
            "(finished stages, the last epoch's backup, checkpoints/best.keras) is "
            "intact; free space and run the same command again to resume") from e


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
        from upright.pipeline import cluster
        cluster.patch_keras_for_multi_worker()   # Keras 3.15 fit() fails with >1 worker
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu="")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}; got {name!r}")


def resolve_augment_on(value: str) -> str:
    """'auto' -> 'device' when an accelerator is visible, else 'host'."""
    import tensorflow as tf
    if value != "auto":
        return value
    accelerators = tf.config.list_physical_devices("GPU") + tf.config.list_physical_devices("TPU")
    return "device" if accelerators else "host"


def _build_classifier(config, weights):
    return model_lib.build_model(backbone=config.backbone, image_size=config.image_size,
                                 weights=weights, head=config.head, dropout=config.dropout,
                                 bn_momentum=config.bn_momentum)


def _training_model(classifier, config, augment_on):
    """The model fit() trains: the classifier, behind the AugmentLayer on device."""
    if augment_on != "device":
        return classifier
    import keras
    from upright.pipeline import augment
    s = config.image_size
    inputs = {"images": keras.Input((s, s, 3), dtype="float32", name="images"),
              "seeds": keras.Input((2,), dtype="int32", name="seeds")}
    images = augment.AugmentLayer(config.augment_policy, name="augment")(inputs)
    return keras.Model(inputs, classifier(images), name="train_model")


def stream_seed(seed: int, stage: int, epoch: int = -1) -> int:
    """Seed of the stage's input stream (epoch -1) or of an epoch's dropout."""
    return int(np.random.SeedSequence([int(seed), int(stage), int(epoch) + 1])
               .generate_state(1, dtype=np.uint32)[0] >> 1)


def train_stream(config: TrainConfig, *, stage: int, skip_batches: int = 0,
                 augment_on: str = "host", input_context=None):
    """The training batches of a stage, resumable.

    One input_fn stream per stage, seeded by stream_seed(seed, stage), repeated
    forever; with a fixed number of steps per epoch, epoch e is batches
    [e * steps, (e + 1) * steps) of it, so a run resumed at epoch e skips e *
    steps batches and then sees exactly what an uninterrupted run saw.
    The stream is requested from input_fn in its "device" form (rotated images
    + per-image seeds, policy "none") and the augmentation policy is applied
    here, AFTER the skip: skipping costs decoding only, never augmentation.
    With the same per-image seeds, policy(images) here equals input_fn's host
    placement exactly (tests/test_train.py checks it).

    Returns:
      tf.data.Dataset: augment_on "host" -> (images float32 [B, S, S, 3] in
      [0, 255], labels int32 [B]); "device" -> ({"images": host part applied,
      "seeds": int32 [B, 2]}, labels) for a model behind augment.AugmentLayer.
    """
    import tensorflow as tf
    from upright.pipeline import augment, inputs
    policy = augment.parse_policy(config.augment_policy)
    host_op = augment.split_policy(policy)[0] if augment_on == "device" else policy
    ds = inputs.input_fn(config.records, split="train", batch_size=config.batch_size,
                         image_size=config.image_size, training=True,
                         seed=stream_seed(config.seed, stage), resize=config.resize,
                         policy="none", augment_on="device", input_context=input_context,
                         repeat=True)
    if skip_batches:
        ds = ds.skip(skip_batches)

    def apply_policy(features, labels):
        images, labels = host_op(features["images"], labels, features["seeds"])
        if augment_on == "device":
            return {"images": images, "seeds": features["seeds"]}, labels
        return images, labels

    ds = ds.map(apply_policy, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


class _Run:
    """State shared by the stages of one train_and_evaluate call."""

    def __init__(self, config, info, strategy, classifier, train_model, augment_on):
        import tensorflow as tf
        self.config = config
        self.info = info
        self.strategy = strategy
        self.classifier = classifier
        self.train_model = train_model
        self.augment_on = augment_on
        self.distributed = strategy is not tf.distribute.get_strategy()
        self.dir = config.model_dir
        self.num_train = int(info["splits"]["train"]["num_examples"])
        self.num_val = int(info["splits"]["val"]["num_examples"])
        self.steps = config.steps_per_epoch or max(1, self.num_train // config.batch_size)
        # Known validation length (4 orientations x the split): keeps Keras from
        # warning that the data "ran out". Per-pipeline lengths under a strategy vary.
        self.val_steps = config.validation_steps or (
            None if self.distributed else -(-4 * self.num_val // config.batch_size))
        for sub in ("stages", "checkpoints", "logs", "backup"):
            fileio.make_dirs(self.dir, sub)   # a link planted here is refused
        self.done_weights = None   # weights file of the last finished stage

    # -- paths ----------------------------------------------------------------
    def _path(self, *parts):
        return os.path.join(self.dir, *parts)

    def stage(self, stage: int) -> dict:
        """Runs stage 1 or 2 unless finished; returns its summary."""
        settings = stage_settings(self.config, stage)
        marker = self._path("stages", f"stage{stage}.done.json")
        weights_file = self._path("stages", f"stage{stage}.weights.npz")
        if settings["epochs"] == 0:
            return {"skipped": True, "epochs": 0}
        if os.path.exists(marker) and os.path.exists(weights_file):
            self.done_weights = weights_file
            with open(marker) as f:
                return json.load(f)
        if self.done_weights is not None:
            # Restarted after an earlier stage finished: continue from its weights.
            _load_npz(self.classifier, self.done_weights)
        summary = self._fit_stage(stage, settings)
        _save_npz(self.classifier, weights_file)
        _write_json(marker, summary)   # commit point of the stage
        self.done_weights = weights_file
        fileio.remove_tree(self._path("backup", f"stage{stage}"), ignore_errors=True)
        if stage == 1:
            _test_kill_point("between_stages")
        return summary

    def _fit_stage(self, stage, s):
        import keras
        from upright.pipeline import cluster
        config = self.config
        freezing = model_lib.set_trainable(self.classifier,
                                           freeze_below_block=s["freeze_below_block"],
                                           train_batchnorm=s["train_batchnorm"])
        with self.strategy.scope():
            self.train_model.compile(
                optimizer=keras.optimizers.Adam(learning_rate=s["lr"]),
                loss=keras.losses.SparseCategoricalCrossentropy(),
                metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                jit_compile=_jit(config.jit_compile))
        backup_dir = self._path("backup", f"stage{stage}")
        start = _backup_epoch(backup_dir)
        if start >= s["epochs"]:
            start = s["epochs"]   # killed after the last epoch, before the marker
        timer = _callback("Throughput")(config.batch_size)
        callbacks = [
            _callback("StopOnNaN")(stage),     # first: nothing saves a NaN epoch
            _callback("ResetRandomState")(config.seed, stage),
            # Multi-worker: average BatchNorm statistics so workers do not drift.
            cluster.average_non_trainable_callback(self.train_model, self.strategy),
            _callback("SaveBest")(self.classifier, self._path("checkpoints"), stage),
            _callback("History")(self._path("history.csv"), stage),
            timer,
        ]
        if _test_kill_at():
            callbacks.append(_callback("TestKill")(stage))
        if _have_tensorboard():
            callbacks.append(keras.callbacks.TensorBoard(
                self._path("logs", f"stage{stage}"), write_graph=False, profile_batch=0))
        elif stage == 1:
            _log("TensorBoard logs off: the tensorboard package is not installed "
                 "(pip install tensorboard)")
        if config.early_stopping_patience:
            callbacks.append(keras.callbacks.EarlyStopping(
                monitor="val_accuracy", mode="max", patience=config.early_stopping_patience,
                restore_best_weights=True))
        if config.reduce_lr_patience:
            callbacks.append(keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss", factor=config.reduce_lr_factor,
                patience=config.reduce_lr_patience, min_lr=config.min_lr))
        # Last: the backup of an epoch is written after everything above saw it.
        callbacks.append(_callback("AtomicBackup")(backup_dir, stage))
        train_data = self._train_data(stage, start)
        val_data = self._val_data()
        self.train_model._initial_epoch = None   # left set by a previous stage's restore
        _log(f"stage {stage}: epochs {start + 1}..{s['epochs']} of {s['epochs']}, "
             f"{self.steps} steps/epoch, lr {s['lr']}, freeze below block "
             f"{s['freeze_below_block']} ({freezing['frozen_layers']} layers frozen, "
             f"{freezing['trainable_params']} trainable params), augment on {self.augment_on}")
        t0 = time.time()
        try:
            with self._naming_damaged_records():
                history = self.train_model.fit(
                    train_data, epochs=s["epochs"], initial_epoch=start,
                    steps_per_epoch=self.steps, validation_data=val_data,
                    validation_steps=self.val_steps, shuffle=False,
                    callbacks=callbacks, verbose=config.verbose)
        except _NaNLoss as e:
            best = self._path("checkpoints", "best.keras")
            kept = [f"the last good epoch in {backup_dir}" if _backup_epoch(backup_dir) else "",
                    f"the best model so far in {best}" if os.path.exists(best) else ""]
            kept = " and ".join(k for k in kept if k) or "no epoch finished before it"
            raise TrainingDiverged(f"{e}; stopped. Kept: {kept}. Lower --stage{stage}_lr "
                                   "or check the data") from None
        with self._naming_damaged_records():
            logs = self.train_model.evaluate(self._val_data(), steps=self.val_steps,
                                             verbose=0, return_dict=True)
        epochs_run = len(history.history.get("loss", []))
        return {"epochs": s["epochs"], "lr": s["lr"],
                "freeze_below_block": s["freeze_below_block"],
                "train_batchnorm": s["train_batchnorm"], **freezing,
                "val_accuracy": float(logs["accuracy"]), "val_loss": float(logs["loss"]),
                "resumed_at_epoch": start, "epochs_run_this_process": epochs_run,
                "stopped_early": start + epochs_run < s["epochs"],
                "train_images_per_s": timer.images_per_s(),
                "seconds_this_process": round(time.time() - t0, 1)}

    # -- data -----------------------------------------------------------------
    def _naming_damaged_records(self):
        """A DataLossError of a damaged train or val shard -> RecordsError naming
        the shard file and the record (the inner context looks at val, the outer
        at train: a damage in train passes the inner one unnamed)."""
        from upright.pipeline import inputs
        stack = contextlib.ExitStack()
        stack.enter_context(inputs.naming_damaged_records(self.config.records, "train"))
        stack.enter_context(inputs.naming_damaged_records(self.config.records, "val"))
        return stack

    def _distribute(self, dataset_fn):
        # Without a strategy Keras takes the plain dataset; with one, each input
        # pipeline builds its own dataset from its InputContext.
        if not self.distributed:
            return dataset_fn(None)
        return self.strategy.distribute_datasets_from_function(dataset_fn)

    def _train_data(self, stage, start):
        """The stage's training stream from epoch `start` on (see train_stream)."""
        config = self.config
        if not config.data_service:
            return self._distribute(lambda ctx: train_stream(
                config, stage=stage, skip_batches=start * self.steps,
                augment_on=self.augment_on, input_context=ctx))
        from upright.pipeline import data_service

        def dataset_fn(ctx):
            # All consumers share one service job: no file sharding here, and no
            # skip on resume (the service's batch order is not reproducible anyway).
            batch = ctx.get_per_replica_batch_size(config.batch_size) if ctx else config.batch_size
            ds = train_stream(dataclasses.replace(config, batch_size=batch), stage=stage,
                              augment_on=self.augment_on, input_context=None)
            return data_service.maybe_distribute(
                ds, config.data_service,
                job_name=data_service.job_name(config.model_dir, stage, start))
        return self._distribute(dataset_fn)

    def _val_data(self):
        from upright.pipeline import inputs
        import tensorflow as tf
        config = self.config
        device = self.augment_on == "device"

        def dataset_fn(input_context):
            ds = inputs.input_fn(config.records, split="val", batch_size=config.batch_size,
                                 image_size=config.image_size, training=False,
                                 resize=config.resize, input_context=input_context)
            if device:
                # The training model takes the dict form; AugmentLayer is identity here.
                ds = ds.map(lambda x, y: ({"images": x,
                                           "seeds": tf.zeros([tf.shape(x)[0], 2], tf.int32)}, y))
            return ds

        return self._distribute(dataset_fn)

    # -- the end --------------------------------------------------------------
    def finish(self, stages: dict) -> dict:
        """Writes model.keras (best epoch), model_info.json, exports; -> metrics."""
        import keras
        config = self.config
        best_path = self._path("checkpoints", "best.keras")
        best_info = _read_json(self._path("checkpoints", "best.json"))
        final = keras.saving.load_model(best_path, compile=False)
        final = _as_float32(final, config)
        model_path = self._path("model.keras")
        _save_keras_atomic(final, model_path)
        model_info = {"image_size": config.image_size, "resize": config.resize,
                      "backbone": config.backbone, "head": config.head,
                      "convention": schema.convention(),
                      "input": "float32 [B, S, S, 3] in [0, 255]",
                      "output": "float32 softmax [B, 4] over convention.class_names",
                      "best": best_info}
        evaluation = evaluate_model(final, config)
        model_info["temperature"] = evaluation["temperature"]
        _write_json(self._path("model_info.json"), model_info)
        sizes = {"keras_bytes": os.path.getsize(model_path)}
        if config.export:
            sizes.update(_export(final, self.dir, config, evaluation["temperature"]))
        metrics = {
            "stages": stages,
            "best": best_info,
            "final": evaluation,
            "model": {"backbone": config.backbone, "head": config.head,
                      "image_size": config.image_size, "params": int(final.count_params()),
                      **sizes},
            "train_images_per_s": _last_rate(stages),
        }
        if config.measure_steps:
            metrics["throughput"] = measure_throughput(config, steps=config.measure_steps)
        return metrics


def evaluate_model(model, config) -> dict:
    """Accuracy, per-class accuracy and a fitted temperature on the whole val split (x4).

    The temperature (evaluation.fit_temperature, Guo et al. 2017) rescales the
    logits so that confidences match accuracy on validation; it never changes
    a prediction. Heavy training-time augmentation leaves models under-confident
    on clean inputs, and orient's --min_confidence needs honest numbers.
    """
    from upright.pipeline import evaluation, inputs
    ds = inputs.input_fn(config.records, split="val", batch_size=config.batch_size,
                         image_size=config.image_size, training=False, resize=config.resize)
    labels, probs = [], []
    with inputs.naming_damaged_records(config.records, "val"):
        for images, y in ds:
            probs.append(np.asarray(model.predict_on_batch(images), np.float64))
            labels.append(y.numpy())
    labels, probs = np.concatenate(labels), np.concatenate(probs)
    preds = np.argmax(probs, axis=-1)
    per_class = {name: float(np.mean(preds[labels == k] == k)) if np.any(labels == k) else None
                 for k, name in enumerate(schema.CLASS_NAMES)}
    temperature = evaluation.fit_temperature(probs, labels)
    return {"val_accuracy": float(np.mean(preds == labels)), "val_examples": int(labels.size),
            "per_class_accuracy": per_class,
            "temperature": temperature,
            "val_ece": evaluation.calibration(probs, labels)["ece"],
            "val_ece_after_temperature": evaluation.calibration(
                evaluation.apply_temperature(probs, temperature), labels)["ece"]}


def _export(model, model_dir, config, temperature: float = 1.0) -> dict:
    from upright.pipeline import serve
    export_dir = serve.export_saved_model(model, os.path.join(model_dir, serve.EXPORT_DIR),
                                          image_size=config.image_size, resize=config.resize,
                                          temperature=temperature)
    tflite_bytes = serve.export_tflite(model, os.path.join(model_dir, serve.TFLITE_FILE),
                                       image_size=config.image_size)
    return {"saved_model_bytes": _dir_size(export_dir), "tflite_bytes": int(tflite_bytes)}


def measure_throughput(config: TrainConfig, *, steps: int = 10, warmup: int = 3,
                       stage: int = 2) -> dict:
    """Training speed with the real input stream vs. a cached batch.

    Builds a throwaway model of the same architecture (random weights: speed does
    not depend on them), then times `steps` training steps (after `warmup`) fed
    (a) from one batch held in memory: the compute-only step time t_c, and
    (b) from the real input_fn stream: the step time t_r.
    input_wait_fraction = max(0, 1 - t_c / t_r): the share of a step spent
    waiting for input. The model is frozen as in `stage` (2: everything trains,
    the slower stage). Uses the config's augment_on.
    """
    import keras
    augment_on = resolve_augment_on(config.augment_on)
    classifier = _build_classifier(config, None)
    model = _training_model(classifier, config, augment_on)
    settings = stage_settings(config, stage)
    model_lib.set_trainable(classifier, freeze_below_block=settings["freeze_below_block"],
                            train_batchnorm=settings["train_batchnorm"])
    model.compile(optimizer=keras.optimizers.Adam(settings["lr"]),
                  loss=keras.losses.SparseCategoricalCrossentropy(),
                  jit_compile=_jit(config.jit_compile))
    stream = train_stream(config, stage=stage, augment_on=augment_on)
    cached = stream.take(1).cache().repeat()

    def time_steps(ds):
        it = iter(ds)
        for _ in range(warmup):
            model.train_on_batch(*next(it))
        t0 = time.perf_counter()
        for _ in range(steps):
            model.train_on_batch(*next(it))
        return (time.perf_counter() - t0) / steps

    t_cached = time_steps(cached)
    t_real = time_steps(stream)
    return {"stage": stage, "steps": steps, "batch_size": config.batch_size,
            "images_per_s": round(config.batch_size / t_real, 2),
            "compute_only_images_per_s": round(config.batch_size / t_cached, 2),
            "input_wait_fraction": round(max(0.0, 1.0 - t_cached / t_real), 3)}


# ----------------------------------------------------------------------------
# Callbacks.

class _NaNLoss(Exception):
    pass


_CALLBACKS = {}


def _callback(name):
    """The callback class `name`, defined on first use (keeps keras out of import)."""
    if not _CALLBACKS:
        _CALLBACKS.update(_define_callbacks())
    return _CALLBACKS[name]


def _define_callbacks() -> dict:
    import keras

    class _StageEpoch(keras.callbacks.Callback):
        """Knows its stage and the epoch it is in."""

        def __init__(self, stage):
            super().__init__()
            self.stage = stage
            self.epoch = 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

    class _StopOnNaN(_StageEpoch):
        """Raises at the first NaN/inf batch loss, before the epoch's backups run."""

        def on_train_batch_end(self, batch, logs=None):
            loss = (logs or {}).get("loss")
            if loss is not None and not np.isfinite(float(loss)):
                raise _NaNLoss(f"training loss became {float(loss)} in stage {self.stage}, "
                               f"epoch {self.epoch}, batch {batch}")

    class _ResetRandomState(keras.callbacks.Callback):
        """Sets every SeedGenerator (dropout, stochastic depth) from (seed, stage, epoch).

        So an epoch draws the same random numbers whether the run was resumed or not.
        """

        def __init__(self, seed, stage):
            super().__init__()
            self.seed, self.stage = seed, stage

        def on_epoch_begin(self, epoch, logs=None):
            states = [v for v in self.model.non_trainable_variables
                      if v.path.endswith("seed_generator_state")]
            base = stream_seed(self.seed, self.stage, epoch)
            for i, v in enumerate(states):
                v.assign(np.array([(base + 7919 * i) % (2**31), 0], dtype=v.dtype))

    class _SaveBest(keras.callbacks.Callback):
        """Keeps the classifier of the best epoch so far (by val_accuracy), across
        stages and restarts: its value lives in best.json beside best.keras.

        Not keras ModelCheckpoint: that saves the model fit() trains (with the
        AugmentLayer in device mode) and forgets its best value on restart.
        """

        def __init__(self, classifier, folder, stage):
            super().__init__()
            self.classifier = classifier
            self.folder = folder
            self.stage = stage

        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get("val_accuracy")
            if value is None:
                return
            state_path = os.path.join(self.folder, "best.json")
            best = _read_json(state_path) if os.path.exists(state_path) else None
            if best is not None and value <= best["val_accuracy"]:
                return
            _save_keras_atomic(self.classifier, os.path.join(self.folder, "best.keras"))
            _write_json(state_path, {"val_accuracy": float(value), "stage": self.stage,
                                     "epoch": int(epoch) + 1})   # 1-based, as printed

    class _History(keras.callbacks.Callback):
        """history.csv: one row per epoch, "stage" and the 1-based "epoch" first,
        then the epoch's logs in the columns of the file's header. The stage is
        not put into Keras' logs, so the progress line shows metrics only."""

        def __init__(self, path, stage):
            super().__init__()
            self.path, self.stage = path, stage

        def on_epoch_end(self, epoch, logs=None):
            logs = {k: float(v) for k, v in (logs or {}).items()}
            header = None
            if os.path.exists(self.path):
                with open(self.path, newline="") as f:
                    header = next(csv.reader(f), None)
            with fileio.open_append(self.path) as f:
                writer = csv.writer(f)
                if not header:
                    header = ["stage", "epoch", *sorted(logs)]
                    writer.writerow(header)
                row = {**logs, "stage": self.stage, "epoch": epoch + 1}
                writer.writerow([row.get(k, "") for k in header])

    class _Throughput(keras.callbacks.Callback):
        """Training images/s, from the end of each epoch's first step to its last."""

        def __init__(self, batch_size):
            super().__init__()
            self.batch_size = batch_size
            self.seconds = 0.0
            self.steps = 0
            self._first = None

        def on_train_batch_end(self, batch, logs=None):
            now = time.perf_counter()
            if batch == 0:
                self._first = now
            elif self._first is not None:
                self._last = now
                self._last_batch = batch

        def on_epoch_end(self, epoch, logs=None):
            if self._first is not None and getattr(self, "_last_batch", 0) > 0:
                self.seconds += self._last - self._first
                self.steps += self._last_batch
            self._first, self._last_batch = None, 0

        def images_per_s(self):
            return round(self.steps * self.batch_size / self.seconds, 2) if self.seconds else None

    class _AtomicBackup(keras.callbacks.BackupAndRestore):
        """BackupAndRestore whose backup is one complete epoch at every instant.

        backup_dir holds epoch<e>.weights.h5 (weights + optimizer state) and
        training_metadata.json {"epoch": e, "batch": 0, "weights": name}. Saving
        writes the weights under a temporary name, renames them, then replaces
        the metadata (the commit point) and removes older weights files; loading
        reads the weights file the metadata names. The backup is kept after
        fit() (the stage removes it once its done marker exists).
        """

        def __init__(self, backup_dir, stage):
            super().__init__(backup_dir, delete_checkpoint=False)
            self.stage = stage

        def on_train_begin(self, logs=None):
            self._load_model()

        def _load_model(self):
            state = _read_backup(self.backup_dir)
            if state is None:
                return
            if self.model.optimizer is not None and not self.model.optimizer.built:
                self.model.optimizer.build(self.model.trainable_variables)
            self.model.load_weights(state["weights_path"])
            self.model._initial_epoch = state["epoch"]

        def _save_model(self):
            fileio.make_dirs(*os.path.split(self.backup_dir))
            name = f"epoch{self._current_epoch}.weights.h5"
            path = os.path.join(self.backup_dir, name)
            with fileio.replacing(path, suffix=".weights.h5") as tmp:
                self.model.save_weights(tmp, overwrite=True)
            _test_kill_point(f"stage{self.stage}_backup{self._current_epoch}")
            with _removed_on_error(path):
                _write_json(os.path.join(self.backup_dir, "training_metadata.json"),
                            {"epoch": self._current_epoch, "batch": 0, "weights": name})
            for other in os.listdir(self.backup_dir):
                if other.endswith(".weights.h5") and other != name:
                    os.remove(os.path.join(self.backup_dir, other))

        def on_train_end(self, logs=None):
            pass

    class _TestKill(_StageEpoch):
        """Test-only: SIGKILL after the first batch of the epoch UPRIGHT_TEST_KILL_AT names."""

        def on_train_batch_end(self, batch, logs=None):
            if batch == 0:
                _test_kill_point(f"stage{self.stage}_epoch{self.epoch}")

    return {"StopOnNaN": _StopOnNaN, "ResetRandomState": _ResetRandomState,
            "SaveBest": _SaveBest, "History": _History, "Throughput": _Throughput,
            "AtomicBackup": _AtomicBackup, "TestKill": _TestKill}


# ----------------------------------------------------------------------------
# Small helpers.

def _jit(value):
    """compile()'s jit_compile: "auto" is Keras' auto (XLA when a GPU/TPU is
    visible and no distribution strategy; off on a CPU-only machine), true and
    false force it. With augment_on=device the AugmentLayer compiles too (its
    static schedule), so XLA covers the augmentation and the backbone in one
    step.
    """
    return {"auto": "auto", "true": True, "false": False}[str(value).lower()]


def _have_tensorboard() -> bool:
    import importlib.util
    return importlib.util.find_spec("tensorboard") is not None


def _read_backup(backup_dir):
    """{"epoch", "weights_path"} of the backup in backup_dir, or None.

    training_metadata.json names its weights file; a backup of Keras' own
    BackupAndRestore (no name) uses latest.weights.h5.
    """
    path = os.path.join(backup_dir, "training_metadata.json")
    if not os.path.exists(path):
        return None
    meta = _read_json(path)
    weights = os.path.join(backup_dir, meta.get("weights", "latest.weights.h5"))
    if not os.path.exists(weights):
        return None
    return {"epoch": int(meta["epoch"]), "weights_path": weights}


def _backup_epoch(backup_dir) -> int:
    """The epoch the stage's backup resumes at (0 without a backup)."""
    state = _read_backup(backup_dir)
    return state["epoch"] if state else 0


def _test_kill_at() -> str:
    """Test-only: the kill point named by UPRIGHT_TEST_KILL_AT ("" when unset).
    The only place that reads the variable (see the module docstring)."""
    return os.environ.get(TEST_KILL_ENV, "")


def _test_kill_point(name):
    """Test-only: SIGKILL this process when UPRIGHT_TEST_KILL_AT == name."""
    if _test_kill_at() == name:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def _removed_on_error(path):
    """Removes the (temporary) file `path` when the block fails, then re-raises."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(path)
        raise


def _pin_config(config):
    """Writes model_dir/config.json, or refuses a model_dir of a different run."""
    os.makedirs(config.model_dir, exist_ok=True)
    path = os.path.join(config.model_dir, "config.json")
    current = dataclasses.asdict(config)
    # Fields that do not change the result may differ between a run and its restart.
    free = ("verbose", "measure_steps", "export")
    if os.path.exists(path):
        old = _read_json(path)
        diff = sorted(k for k in current if k not in free and old.get(k) != current[k])
        if diff:
            raise ConfigError(
                f"model_dir {config.model_dir!r} holds a run with a different config "
                f"({', '.join(f'{k}: {old.get(k)!r} -> {current[k]!r}' for k in diff[:3])}); "
                "use a new --model_dir or the same flags")
    _write_json(path, current)


def _as_float32(model, config):
    """A float32 copy of a mixed-precision model (export and TFLite want float32)."""
    if not config.mixed_precision:
        return model
    import keras
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        copy = _build_classifier(config, None)
    finally:
        keras.config.set_dtype_policy(previous)
    copy.set_weights(model.get_weights())
    return copy


def _save_npz(model, path):
    with fileio.atomic_write(path, "wb") as f:
        np.savez(f, *model.get_weights())


def _load_npz(model, path):
    with np.load(path) as data:
        model.set_weights([data[f"arr_{i}"] for i in range(len(data.files))])


def _save_keras_atomic(model, path):
    with fileio.replacing(path, suffix=".keras") as tmp:   # Keras wants the suffix
        model.save(tmp)


def _write_json(path, obj):
    fileio.write_json(path, obj, indent=2, sort_keys=True)


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _dir_size(path) -> int:
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)


def _last_rate(stages):
    rates = [s.get("train_images_per_s") for s in stages.values() if s.get("train_images_per_s")]
    return rates[-1] if rates else None


def _log(message):
    print(f"[train] {message}", flush=True)
