"""The trainer's Keras callbacks: NaN stop, random state, best model, history,
throughput and the atomic per-epoch backup.

Each is a plain class; for_stage puts them, with Keras' own EarlyStopping,
ReduceLROnPlateau and TensorBoard, in the order a stage needs (StopOnNaN
first: nothing saves a NaN epoch; AtomicBackup last: an epoch's backup is
written after everything else saw the epoch).
"""
import csv
import importlib.util
import os
import time

import keras
import numpy as np

from upright.pipeline import cluster, fileio, resume


class NaNLoss(Exception):
    """A training batch's loss was NaN or infinite (train.py turns it into
    TrainingDiverged, with what was kept)."""


class StageEpoch(keras.callbacks.Callback):
    """Knows its stage and the epoch it is in."""

    def __init__(self, stage):
        super().__init__()
        self.stage = stage
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch


class StopOnNaN(StageEpoch):
    """Raises NaNLoss at the first NaN/inf batch loss, before the epoch's backups run."""

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            raise NaNLoss(f"training loss became {float(loss)} in stage {self.stage}, "
                          f"epoch {self.epoch}, batch {batch}")


class ResetRandomState(keras.callbacks.Callback):
    """Sets every SeedGenerator (dropout, stochastic depth) from (seed, stage, epoch).

    So an epoch draws the same random numbers whether the run was resumed or not.
    """

    def __init__(self, seed, stage):
        super().__init__()
        self.seed, self.stage = seed, stage

    def on_epoch_begin(self, epoch, logs=None):
        states = [v for v in self.model.non_trainable_variables
                  if v.path.endswith("seed_generator_state")]
        base = resume.stream_seed(self.seed, self.stage, epoch)
        for i, v in enumerate(states):
            v.assign(np.array([(base + 7919 * i) % (2**31), 0], dtype=v.dtype))


class SaveBest(keras.callbacks.Callback):
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
        best = resume.read_json(state_path) if os.path.exists(state_path) else None
        if best is not None and value <= best["val_accuracy"]:
            return
        resume.save_keras(self.classifier, os.path.join(self.folder, "best.keras"))
        resume.write_json(state_path, {"val_accuracy": float(value), "stage": self.stage,
                                       "epoch": int(epoch) + 1})   # 1-based, as printed


class History(keras.callbacks.Callback):
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


class Throughput(keras.callbacks.Callback):
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


class AtomicBackup(keras.callbacks.BackupAndRestore):
    """BackupAndRestore whose backup is one complete epoch at every instant.

    backup_dir holds epoch<e>.weights.h5 (weights + optimizer state) and
    training_metadata.json {"epoch": e, "batch": 0, "weights": name}. Saving
    writes the weights under a temporary name, renames them, then replaces
    the metadata (the commit point, `commit`) and removes older weights files;
    loading reads the weights file the metadata names. The backup is kept
    after fit() (the stage removes it once its done marker exists).
    """

    def __init__(self, backup_dir, stage):
        super().__init__(backup_dir, delete_checkpoint=False)
        self.stage = stage

    def on_train_begin(self, logs=None):
        self._load_model()

    def _load_model(self):
        state = resume.read_backup(self.backup_dir)
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
        self.commit(name)

    def commit(self, name):
        """Makes the renamed-in weights file `name` the backup: the metadata, then
        the older weights files go. A failed metadata write removes `name`."""
        with resume.removed_on_error(os.path.join(self.backup_dir, name)):
            resume.write_json(os.path.join(self.backup_dir, "training_metadata.json"),
                              {"epoch": self._current_epoch, "batch": 0, "weights": name})
        for other in os.listdir(self.backup_dir):
            if other.endswith(".weights.h5") and other != name:
                os.remove(os.path.join(self.backup_dir, other))

    def on_train_end(self, logs=None):
        pass


def for_stage(config, stage: int, *, train_model, classifier, strategy, model_dir: str,
              backup_dir: str, timer: Throughput) -> list:
    """The callbacks of one stage's fit(), in the order they must see an epoch end.

    StopOnNaN first (nothing saves a NaN epoch), AtomicBackup last (an epoch's
    backup is written after everything above saw it). SaveBest keeps the
    best `classifier` (no AugmentLayer) while `train_model` is what fit() trains.
    TensorBoard logs only when the tensorboard package is installed.
    """
    callbacks = [
        StopOnNaN(stage),     # first: nothing saves a NaN epoch
        ResetRandomState(config.seed, stage),
        # Multi-worker: average BatchNorm statistics so workers do not drift.
        cluster.average_non_trainable_callback(train_model, strategy),
        SaveBest(classifier, os.path.join(model_dir, "checkpoints"), stage),
        History(os.path.join(model_dir, "history.csv"), stage),
        timer,
    ]
    if importlib.util.find_spec("tensorboard") is not None:
        callbacks.append(keras.callbacks.TensorBoard(
            os.path.join(model_dir, "logs", f"stage{stage}"), write_graph=False,
            profile_batch=0))
    elif stage == 1:
        print("[train] TensorBoard logs off: the tensorboard package is not installed "
              "(pip install tensorboard)", flush=True)
    if config.early_stopping_patience:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor="val_accuracy", mode="max", patience=config.early_stopping_patience,
            restore_best_weights=True))
    if config.reduce_lr_patience:
        callbacks.append(keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=config.reduce_lr_factor,
            patience=config.reduce_lr_patience, min_lr=config.min_lr))
    # Last: the backup of an epoch is written after everything above saw it.
    callbacks.append(AtomicBackup(backup_dir, stage))
    return callbacks
