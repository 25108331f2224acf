"""Nothing lost: what a model_dir keeps so that a killed run continues.

A run killed at any moment and restarted with the same config continues from
the last completed epoch of the stage it was in:
  * per stage, callbacks.AtomicBackup (model_dir/backup/stage<k>) saves
    weights + optimizer state + epoch at every epoch end, atomically: the
    weights go to a temporary name, are renamed to epoch<e>.weights.h5, and
    training_metadata.json (the epoch and the name of its weights file, written
    to a temporary name and renamed) is the commit point. So a kill at any
    instant leaves either the previous epoch's backup or the new one, never new
    weights under the old epoch number or a half-written file (Keras' own
    callback writes both in place); every rename is durable (fileio: file and
    folder synced), so a power cut leaves the same choice;
  * a finished stage leaves model_dir/stages/stage<k>.done.json and its final
    weights stage<k>.weights.npz (written first), so a restart skips it and
    starts the next stage from exactly those weights; the stage's backup is
    removed only after its marker exists (finish_stage);
  * the data stream is resumable: one seeded input_fn stream per stage
    (stream_seed), every epoch exactly `steps_per_epoch` batches of it, so a run
    resumed at epoch e skips e x steps batches (decoding only: input_fn's
    skip_batches comes before augmentation); the dropout / stochastic-depth
    random state is reset from (seed, stage, epoch) at each epoch start
    (callbacks.ResetRandomState). So epoch e sees the same batches and the
    same random numbers whether or not the run was interrupted before it, and
    a resumed run ends where an uninterrupted one does (within float tolerance);
  * model_dir/config.json pins the config (pin_config): restarting in a
    model_dir that holds a different run is refused.
Not restored on resume: the patience counters of EarlyStopping and
ReduceLROnPlateau (they restart from zero); the learning rate itself is part
of the optimizer state and is restored.
"""
import contextlib
import errno
import json
import os

import numpy as np

from upright.pipeline import fileio

# Settings that do not change the result: a run and its restart may differ in them.
FREE_SETTINGS = ("verbose", "measure_steps", "export")


class OutputError(RuntimeError):
    """Writing into model_dir failed (full disk, file size limit, read-only);
    str(e) is one line. Everything written before is intact."""


class ConfigMismatch(ValueError):
    """model_dir holds a run with a different config; str(e) is one line."""


def stream_seed(seed: int, stage: int, epoch: int = -1) -> int:
    """Seed of the stage's input stream (epoch -1) or of an epoch's dropout."""
    return int(np.random.SeedSequence([int(seed), int(stage), int(epoch) + 1])
               .generate_state(1, dtype=np.uint32)[0] >> 1)


# ----------------------------------------------------------------------------
# config.json and metrics.json: the run a model_dir holds, and whether it ended.

def check_pinned(model_dir: str, settings: dict, defaults: dict | None = None) -> None:
    """ConfigMismatch when model_dir/config.json holds a run whose settings (the
    flat config) differ from `settings` beyond FREE_SETTINGS; writes nothing.
    A setting the pinned file lacks (added to the config after that run) counts
    as its value in `defaults`."""
    path = os.path.join(model_dir, "config.json")
    if os.path.exists(path):
        old = {**(defaults or {}), **read_json(path)}
        diff = sorted(k for k in settings
                      if k not in FREE_SETTINGS and old.get(k) != settings[k])
        if diff:
            raise ConfigMismatch(
                f"model_dir {model_dir!r} holds a run with a different config "
                f"({', '.join(f'{k}: {old.get(k)!r} -> {settings[k]!r}' for k in diff[:3])}); "
                "use a new --model_dir or the same flags")


def pin_config(model_dir: str, settings: dict, defaults: dict | None = None) -> None:
    """Writes model_dir/config.json, or raises ConfigMismatch (check_pinned)."""
    os.makedirs(model_dir, exist_ok=True)
    check_pinned(model_dir, settings, defaults)
    write_json(os.path.join(model_dir, "config.json"), settings)


def finished_metrics(model_dir: str, *, export: bool):
    """The metrics of a run in model_dir that already finished (its metrics.json,
    written last, exists, and holds the exports if `export` asks for them), with
    "already_complete": True added; None when there is work left."""
    path = os.path.join(model_dir, "metrics.json")
    if not os.path.exists(path):
        return None
    metrics = read_json(path)
    if export and "tflite_bytes" not in metrics.get("model", {}):
        return None   # finished with --noexport, now asked to export: redo the end
    return {**metrics, "already_complete": True}


# ----------------------------------------------------------------------------
# Stages: done markers and their weights; per-epoch backups.

def stage_paths(model_dir: str, stage: int) -> dict:
    return {"marker": os.path.join(model_dir, "stages", f"stage{stage}.done.json"),
            "weights": os.path.join(model_dir, "stages", f"stage{stage}.weights.npz"),
            "backup": os.path.join(model_dir, "backup", f"stage{stage}")}


def done_stage(model_dir: str, stage: int):
    """The summary of a finished stage (its marker and weights exist), else None."""
    paths = stage_paths(model_dir, stage)
    if os.path.exists(paths["marker"]) and os.path.exists(paths["weights"]):
        return read_json(paths["marker"])
    return None


def finish_stage(model_dir: str, stage: int, model, summary: dict) -> None:
    """Commits a stage: its weights, then its marker (the commit point), then
    its backup goes."""
    paths = stage_paths(model_dir, stage)
    save_weights(model, paths["weights"])
    write_json(paths["marker"], summary)
    fileio.remove_tree(paths["backup"], ignore_errors=True)


def read_backup(backup_dir):
    """{"epoch", "weights_path"} of the backup in backup_dir, or None.

    training_metadata.json names its weights file; a backup of Keras' own
    BackupAndRestore (no name) uses latest.weights.h5.
    """
    path = os.path.join(backup_dir, "training_metadata.json")
    if not os.path.exists(path):
        return None
    meta = read_json(path)
    weights = os.path.join(backup_dir, meta.get("weights", "latest.weights.h5"))
    if not os.path.exists(weights):
        return None
    return {"epoch": int(meta["epoch"]), "weights_path": weights}


def backup_epoch(backup_dir) -> int:
    """The epoch the stage's backup resumes at (0 without a backup)."""
    state = read_backup(backup_dir)
    return state["epoch"] if state else 0


def kept(model_dir: str, backup_dir: str) -> str:
    """What a stage stopped mid-way (NaN loss) leaves to resume or use, in words:
    its last backed-up epoch and the best checkpoint, those that exist."""
    best = os.path.join(model_dir, "checkpoints", "best.keras")
    parts = [f"the last good epoch in {backup_dir}" if backup_epoch(backup_dir) else "",
             f"the best model so far in {best}" if os.path.exists(best) else ""]
    return " and ".join(p for p in parts if p) or "no epoch finished before it"


# ----------------------------------------------------------------------------
# Files of model_dir, each landing whole (fileio) or not at all.

def save_weights(model, path):
    """model.get_weights() as arr_0, arr_1, ... of an .npz file."""
    with fileio.atomic_write(path, "wb") as f:
        np.savez(f, *model.get_weights())


def load_weights(model, path):
    with np.load(path) as data:
        model.set_weights([data[f"arr_{i}"] for i in range(len(data.files))])


def save_keras(model, path):
    with fileio.replacing(path, suffix=".keras") as tmp:   # Keras wants the suffix
        model.save(tmp)


def write_json(path, obj):
    fileio.write_json(path, obj, indent=2, sort_keys=True)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# errno values and TensorFlow message fragments of a write that cannot succeed.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS)
_WRITE_TEXTS = ("No space left on device", "File too large", "Disk quota exceeded",
                "Read-only file system", "errno = 28", "errno = 27")


@contextlib.contextmanager
def reporting_write_failures(model_dir):
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


@contextlib.contextmanager
def removed_on_error(path):
    """Removes the (temporary) file `path` when the block fails, then re-raises."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(path)
        raise
