"""The staged fine-tune: TrainConfig -> train_and_evaluate -> a model_dir.

    from upright.pipeline import train
    metrics = train.train_and_evaluate(train.TrainConfig(
        records="records/photos", model_dir="runs/b1"))

This module holds the config (TrainConfig, StageConfig; flat flag names in
pipeline/configs.py), its one check (check_config: cheap, before any work)
and the two stages' fit:
  stage 1: backbone frozen below block `stage1.freeze_below_block` (article:
           blocks 1-4 frozen = 5), BatchNorm of the frozen blocks training or
           not (`stage1.train_batchnorm`), Adam at `stage1.lr` (1e-3), 15 epochs;
  stage 2: everything trainable (`stage2.freeze_below_block` = 0) at
           `stage2.lr` (1e-4).
The model is recompiled between stages (a fresh Adam); weights carry over. A
stage with 0 epochs is skipped. The rest lives beside it: trainer_models.py
(the models built from the config), callbacks.py (a stage's callbacks),
streams.py (the data fit() reads), resume.py (a killed run continues from its
last epoch; write failures end in resume.OutputError), outputs.py (the end of
a run: model.keras, model_info.json, exports, metrics) and throughput.py
(--measure_steps).

A NaN or infinite training loss stops the run at once with TrainingDiverged;
the last good epoch's backup and the best checkpoint stay. A damaged shard
stops it with recordio.RecordsError naming the shard and the record.
A model_dir after a run (BUILD.md section 6): config.json, model.keras (best
epoch by val accuracy, float32, no AugmentLayer), model_info.json, metrics.json,
history.csv, logs/ (TensorBoard), checkpoints/best.keras + best.json, stages/,
export/ and model.tflite (serve).
"""
import contextlib
import dataclasses
import os
import time
import warnings

from upright.pipeline import (cluster, configs, fileio, outputs, recordio, resume, schema,
                              throughput, trainer_models)
from upright.pipeline import model as model_lib

# The trainer's speed measurement, under the name callers use (benchmarks/README.md).
measure_throughput = throughput.measure_throughput

AUGMENT_ON = ("auto", *schema.AUGMENT_PLACEMENTS)
LR_SCHEDULES = ("constant", "cosine")
JIT_COMPILE = ("auto", "true", "false")


class ConfigError(ValueError):
    """A config that cannot work; str(e) is one line saying what to change."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


def _weights_from_text(text: str):
    """A --weights value: "imagenet" and "none" in any case, else a file path."""
    if text.lower() in ("none", ""):
        return None
    return "imagenet" if text.lower() == "imagenet" else text


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One stage of the fine-tune."""
    epochs: int = configs.field(15, "epochs (0 skips the stage).")
    lr: float = configs.field(1e-3, "learning rate (Adam).")
    freeze_below_block: int = configs.field(
        0, "backbone blocks numbered below this are frozen (0 = everything trains; "
        "5 = EfficientNet blocks 1-4, the article's stage 1; the last block + 1 freezes "
        "the whole backbone).")
    train_batchnorm: bool = configs.field(
        True, "BatchNorm layers of the frozen blocks still train.")
    schedule: str = configs.field(
        "constant", "learning rate over the stage: constant, or cosine (from lr down to 0 "
        "at the stage's last step).", choices=LR_SCHEDULES)


_f = configs.field


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on. Defaults are the b1.flags recipe."""
    # Data and output.
    records: str = _f("", "Records folder written by make_records.", flag_default=None)
    model_dir: str = _f("", "Output folder of the run (resumable).", flag_default=None)
    batch_size: int = _f(32, "Global batch size (all replicas together).", lower_bound=1)
    image_size: int = _f(128, "Side S of the S x S input.", lower_bound=1)
    seed: int = _f(0, "The one seed of the run.")
    augment_policy: str = _f("default", "Augmentation spec: default, none, or a spec string "
                             "(see pipeline/augment.py).")
    # auto: "device" when a GPU/TPU is present, else "host". Measured on a
    # 2-core CPU (benchmarks/README.md, gpu_check, same run): host 122-127 ms
    # a step vs device + XLA 477-575 ms (the static schedule runs every branch
    # on every image; tf.data overlaps host work with the step), so a CPU
    # keeps the host placement.
    augment_on: str = _f("auto", "Where augmentation runs; auto = device when a GPU/TPU is "
                         "present, host on a CPU (measured faster there: benchmarks/README.md).",
                         choices=AUGMENT_ON)
    resize: str = _f("squash", "How stored images become S x S (all commute with rot90).",
                     choices=schema.RESIZE_METHODS)
    # Model.
    backbone: str = _f("efficientnetb1", f"One of: {', '.join(model_lib.known_backbones())}.",
                       parse=str.lower)
    weights: str | None = _f("imagenet", "imagenet (Keras downloads them), none, or a path to "
                             "a backbone weights file (offline).", parse=_weights_from_text)
    head: str = _f("dense", "dense: Dense(256)+LeakyReLU+BN+Dense(4); linear: Dense(4).",
                   choices=model_lib.HEADS)
    dropout: float = _f(0.0, "Dropout on the pooled features.")
    bn_momentum: float = _f(0.0, "Momentum of the backbone's BatchNorm layers; 0 keeps the "
                            "backbone's own. Short runs from random init (--weights=none) "
                            "need about 0.9.")
    # Stages.
    stage1: StageConfig = _f(StageConfig(epochs=15, lr=1e-3, freeze_below_block=5), "Stage 1")
    stage2: StageConfig = _f(StageConfig(epochs=15, lr=1e-4, freeze_below_block=0), "Stage 2")
    steps_per_epoch: int = _f(0, "Training steps per epoch; 0 = one pass over the train split.")
    validation_steps: int = _f(0, "Validation steps; 0 = the whole val split in 4 orientations.")
    # Speed and scale.
    mixed_precision: bool = _f(False, "mixed_float16 (mixed_bfloat16 on TPU); output stays "
                               "float32.")
    # auto: Keras' auto, XLA only with a GPU/TPU (and no distribution
    # strategy); the same CPU measurement: XLA slowed every CPU row.
    jit_compile: str = _f("auto", "XLA compilation of the train step (with --augment_on=device "
                          "the augmentation too); auto = on with a GPU/TPU, off on a CPU.",
                          choices=JIT_COMPILE)
    data_service: str = _f("", "grpc://HOST:PORT of a tf.data service dispatcher (see the "
                           "data_service command) that runs the input pipeline; empty = local "
                           "input pipeline.")
    strategy: str = _f("auto", "tf.distribute strategy; auto = several GPUs -> mirrored.",
                       choices=cluster.STRATEGIES)
    deterministic: bool = _f(False, "tf.config.experimental.enable_op_determinism (slower).")
    # Hygiene.
    early_stopping_patience: int = _f(0, "Stop a stage after this many epochs without a val "
                                      "accuracy gain (restores the best weights); 0 = off.")
    reduce_lr_patience: int = _f(0, "Multiply the lr by --reduce_lr_factor after this many "
                                 "epochs without a val loss gain; 0 = off.")
    reduce_lr_factor: float = _f(0.2, "Factor of ReduceLROnPlateau.")
    min_lr: float = _f(1e-6, "Lower bound of ReduceLROnPlateau.")
    export: bool = _f(True, "Write the SavedModel (model_dir/export) and model.tflite.")
    measure_steps: int = _f(0, "> 0: at the end, time this many steps on the real input and "
                            "on a cached batch (images/s, input-wait fraction).")
    verbose: int = _f(2, "Training progress: 1 a progress bar per step with ETA, 2 one line "
                      "per epoch, 0 none. Default: 1 on a terminal, 2 otherwise (logs, CI).",
                      flag_default=None)

    def stage(self, number: int) -> StageConfig:
        """The settings of stage 1 or 2."""
        return {1: self.stage1, 2: self.stage2}[number]


# ----------------------------------------------------------------------------
# Validation: everything that can be checked before any work.

# Settings of a config.json written before a setting existed (resume.check_pinned).
_DEFAULT_SETTINGS = configs.flatten(TrainConfig())


def check_config(config: TrainConfig) -> dict:
    """Checks the config cheaply (no model is built, no data read), and that
    model_dir holds no other run.

    Returns:
      the records' info.json.
    Raises:
      ConfigError (or model_lib.ModelError, a ValueError too) with one line.
    """
    if not config.records:
        raise ConfigError("--records is required: a folder written by make_records")
    if not config.model_dir:
        raise ConfigError("--model_dir is required: where the run writes its outputs")
    info = _check_records(config.records)
    model_lib.check_choices(backbone=config.backbone, image_size=config.image_size,
                            weights=config.weights, head=config.head,
                            dropout=config.dropout, bn_momentum=config.bn_momentum)
    if config.weights not in (None, "imagenet"):
        # Builds the backbone alone and loads the file: a wrong architecture fails
        # here, in seconds, not after the data pipeline started.
        model_lib.check_weights_file(backbone=config.backbone, image_size=config.image_size,
                                     path=config.weights)
    settings = configs.flatten(config)
    for f in configs.flat_fields(TrainConfig):
        if "choices" in f.metadata:
            _check_choice(f.name, settings[f.name], f.metadata["choices"])
    if config.data_service:
        from upright.pipeline import data_service
        try:
            data_service.check_address(config.data_service)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if config.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {config.batch_size}")
    if config.steps_per_epoch < 0 or config.validation_steps < 0:
        raise ConfigError("steps_per_epoch and validation_steps must be >= 0 (0 = one pass)")
    _check_stages(config)
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
    try:   # read only: the run itself pins the config (resume.pin_config)
        resume.check_pinned(config.model_dir, settings, _DEFAULT_SETTINGS)
    except resume.ConfigMismatch as e:
        raise ConfigError(str(e)) from None
    return info


def _check_records(records):
    """info.json of a records folder with non-empty train and val splits."""
    try:
        info = recordio.load_info(records)
        for split in ("train", "val"):
            recordio.shard_paths(records, split, info)
            if not info["splits"][split]["num_examples"]:
                raise ConfigError(f"split {split!r} of {records!r} is empty")
    except recordio.RecordsError as e:
        raise ConfigError(str(e)) from None
    return info


def _check_stages(config):
    for number in (1, 2):
        s = config.stage(number)
        if s.epochs < 0:
            raise ConfigError(f"stage{number}_epochs must be >= 0, got {s.epochs}")
        if not s.lr > 0:
            raise ConfigError(f"stage{number}_lr must be > 0, got {s.lr}")
        if s.schedule == "cosine" and config.reduce_lr_patience:
            # ReduceLROnPlateau sets the rate; a schedule computes it each step.
            raise ConfigError(f"stage{number}_schedule=cosine and reduce_lr_patience > 0 "
                              "both set the learning rate; use one")
        try:
            model_lib.check_freeze_range(s.freeze_below_block, backbone=config.backbone,
                                         top=model_lib.backbone_spec(config.backbone).num_blocks)
        except model_lib.ModelError as e:
            raise ConfigError(f"stage{number}_{e}") from None
    if config.stage1.epochs + config.stage2.epochs == 0:
        raise ConfigError("both stages have 0 epochs: nothing to train")


def _check_choice(name, value, choices):
    if name == "jit_compile":
        value = str(value).lower()   # library callers may pass True / False
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
    strategy = cluster.make_strategy(config.strategy)
    augment_on = cluster.resolve_augment_on(config.augment_on)
    if config.strategy == "multi_worker":
        # Non-chief workers write under model_dir/workers/worker-<i>/: one backup each.
        config = dataclasses.replace(config, model_dir=cluster.worker_dir(config.model_dir))
    with resume.reporting_write_failures(config.model_dir):
        try:
            resume.pin_config(config.model_dir, configs.flatten(config), _DEFAULT_SETTINGS)
        except resume.ConfigMismatch as e:
            raise ConfigError(str(e)) from None
    finished = resume.finished_metrics(config.model_dir, export=config.export)
    if finished is not None:
        return finished
    if config.mixed_precision:
        keras.config.set_dtype_policy(
            "mixed_bfloat16" if isinstance(strategy, tf.distribute.TPUStrategy)
            else "mixed_float16")
    try:
        with strategy.scope():
            classifier = trainer_models.build_classifier(config, config.weights)
            train_model = trainer_models.training_model(classifier, config, augment_on)
        with resume.reporting_write_failures(config.model_dir):
            run = _Run(config, info, strategy, classifier, train_model, augment_on)
            stages = {}
            for stage in (1, 2):
                stages[str(stage)] = run.stage(stage)
            metrics = outputs.finish(config, config.model_dir, stages)
            metrics["seconds_total_this_process"] = round(time.time() - started, 1)
            resume.write_json(os.path.join(config.model_dir, "metrics.json"), metrics)
    finally:
        keras.config.set_dtype_policy(previous_policy)
    return metrics


def _learning_rate(stage: StageConfig, steps_per_epoch: int):
    """The stage's rate for Adam: a float, or a cosine decay over all its steps.

    The schedule reads the optimizer's step count, which the per-epoch backup
    keeps, so a resumed stage continues on the same curve.
    """
    if stage.schedule == "constant":
        return stage.lr
    import keras
    return keras.optimizers.schedules.CosineDecay(
        stage.lr, decay_steps=max(1, stage.epochs * steps_per_epoch))


@contextlib.contextmanager
def _val_read_to_its_end(active: bool):
    """Under a strategy validation has no step count: it reads each pipeline's
    files to their end, and Keras then warns "Your input ran out of data;
    interrupting training" though nothing was cut short. Only that warning,
    only then, is silenced (the train stream repeats forever, so it never
    ends there)."""
    with warnings.catch_warnings():
        if active:
            warnings.filterwarnings("ignore", message="Your input ran out of data",
                                    category=UserWarning)
        yield


class _Run:
    """State shared by the stages of one train_and_evaluate call."""

    def __init__(self, config, info, strategy, classifier, train_model, augment_on):
        import tensorflow as tf
        self.config = config
        self.strategy = strategy
        self.classifier = classifier
        self.train_model = train_model
        self.augment_on = augment_on
        self.distributed = strategy is not tf.distribute.get_strategy()
        self.dir = config.model_dir
        num_train = int(info["splits"]["train"]["num_examples"])
        num_val = int(info["splits"]["val"]["num_examples"])
        self.steps = config.steps_per_epoch or max(1, num_train // config.batch_size)
        # Known validation length (4 orientations x the split): keeps Keras from
        # warning that the data "ran out". Per-pipeline lengths under a strategy vary.
        self.val_steps = config.validation_steps or (
            None if self.distributed else -(-4 * num_val // config.batch_size))
        for sub in ("stages", "checkpoints", "logs", "backup"):
            fileio.make_dirs(self.dir, sub)   # a link planted here is refused
        self.done_stage = None   # the last finished stage, whose weights the next starts from

    def stage(self, stage: int) -> dict:
        """Runs stage 1 or 2 unless finished; returns its summary."""
        if self.config.stage(stage).epochs == 0:
            return {"skipped": True, "epochs": 0}
        summary = resume.done_stage(self.dir, stage)
        if summary is not None:
            self.done_stage = stage
            return summary
        if self.done_stage is not None:
            # Restarted after an earlier stage finished: continue from its weights.
            resume.load_weights(self.classifier,
                                resume.stage_paths(self.dir, self.done_stage)["weights"])
        summary = self._fit_stage(stage)
        resume.finish_stage(self.dir, stage, self.classifier, summary)
        self.done_stage = stage
        return summary

    def _fit_stage(self, stage):
        """Fits `stage` from its last backed-up epoch (0 without one) and scores it
        on the val split; -> the summary its done marker keeps.

        Raises TrainingDiverged at a NaN/inf loss (callbacks.StopOnNaN), saying
        what was kept (resume.kept), so the user knows what a rerun starts from.
        """
        s = self.config.stage(stage)
        import keras
        from upright.pipeline import callbacks as cb
        from upright.pipeline import streams
        freezing = model_lib.set_trainable(self.classifier,
                                           freeze_below_block=s.freeze_below_block,
                                           train_batchnorm=s.train_batchnorm)
        with self.strategy.scope():
            trainer_models.compile_model(
                self.train_model, self.config, _learning_rate(s, self.steps),
                metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        backup_dir = resume.stage_paths(self.dir, stage)["backup"]
        start = min(resume.backup_epoch(backup_dir), s.epochs)   # killed before the marker
        timer = cb.Throughput(self.config.batch_size)
        callbacks = cb.for_stage(self.config, stage, train_model=self.train_model,
                                 classifier=self.classifier, strategy=self.strategy,
                                 model_dir=self.dir, backup_dir=backup_dir, timer=timer)
        strategy = self.strategy if self.distributed else None
        train_data = streams.train_data(self.config, stage=stage, start_epoch=start,
                                        steps=self.steps, augment_on=self.augment_on,
                                        strategy=strategy)
        val_data = streams.val_data(self.config, augment_on=self.augment_on, strategy=strategy)
        self.train_model._initial_epoch = None   # left set by a previous stage's restore
        _log(f"stage {stage}: epochs {start + 1}..{s.epochs} of {s.epochs}, "
             f"{self.steps} steps/epoch, lr {s.lr} ({s.schedule}), freeze below block "
             f"{s.freeze_below_block} ({freezing['frozen_layers']} layers frozen, "
             f"{freezing['trainable_params']} trainable params), augment on {self.augment_on}")
        t0 = time.time()
        try:
            with (streams.naming_damaged_records(self.config.records),
                  _val_read_to_its_end(self.val_steps is None)):
                history = self.train_model.fit(
                    train_data, epochs=s.epochs, initial_epoch=start,
                    steps_per_epoch=self.steps, validation_data=val_data,
                    validation_steps=self.val_steps, shuffle=False,
                    callbacks=callbacks, verbose=self.config.verbose)
        except cb.NaNLoss as e:
            raise TrainingDiverged(f"{e}; stopped. Kept: {resume.kept(self.dir, backup_dir)}. "
                                   f"Lower --stage{stage}_lr or check the data") from None
        with (streams.naming_damaged_records(self.config.records),
              _val_read_to_its_end(self.val_steps is None)):
            logs = self.train_model.evaluate(
                streams.val_data(self.config, augment_on=self.augment_on, strategy=strategy),
                steps=self.val_steps, verbose=0, return_dict=True)
        epochs_run = len(history.history.get("loss", []))
        return {"epochs": s.epochs, "lr": s.lr, "schedule": s.schedule,
                "freeze_below_block": s.freeze_below_block,
                "train_batchnorm": s.train_batchnorm, **freezing,
                "val_accuracy": float(logs["accuracy"]), "val_loss": float(logs["loss"]),
                "resumed_at_epoch": start, "epochs_run_this_process": epochs_run,
                "stopped_early": start + epochs_run < s.epochs,
                "train_images_per_s": timer.images_per_s(),
                "seconds_this_process": round(time.time() - t0, 1)}


def _log(message):
    print(f"[train] {message}", flush=True)
