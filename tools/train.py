"""Trains an orientation classifier: the two-stage fine-tune of the source article.

    train --flagfile=b1.flags --records=records/photos --model_dir=runs/b1
    train --flagfile=demo.flags                       # CPU-sized, minutes
    train --flagfile=runs/b1/flags.txt                # replays (or resumes) a run

Every flag below is validated before any work starts; a bad one gives one line
on stderr and exit status 2. The resolved flags are written to
MODEL_DIR/flags.txt, so `train --flagfile=MODEL_DIR/flags.txt` replays the run;
run the same command again after a crash and it resumes from the last
completed epoch of the stage it was in. A NaN loss stops the run (exit 1).
A full disk (or any failed write into MODEL_DIR) and a damaged records shard
met while training each give one line, `train: error: ...`, and exit status 1;
the files written before are intact, and the same command resumes.
"""
import sys

from absl import flags

from upright import tools
from upright.pipeline import model as model_lib
from upright.pipeline import fileio, recordio, train

__doc__ += "\n" + tools.describe_recipes()

_D = train.TrainConfig()   # the defaults are the b1 recipe

# Data and output.
_RECORDS = flags.DEFINE_string("records", None, "Records folder written by make_records.")
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Output folder of the run (resumable).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", _D.batch_size,
                                   "Global batch size (all replicas together).", lower_bound=1)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", _D.image_size, "Side S of the S x S input.",
                                   lower_bound=1)
_SEED = flags.DEFINE_integer("seed", _D.seed, "The one seed of the run.")
_AUGMENT_POLICY = flags.DEFINE_string("augment_policy", _D.augment_policy,
                                      "Augmentation spec: default, none, or a spec string "
                                      "(see pipeline/augment.py).")
_AUGMENT_ON = flags.DEFINE_enum("augment_on", _D.augment_on, train.AUGMENT_ON,
                                "Where augmentation runs; auto = device when a GPU/TPU is present, "
                                "host on a CPU (measured faster there: benchmarks/README.md).")
_RESIZE = flags.DEFINE_enum("resize", _D.resize, train.RESIZE,
                            "How stored images become S x S (all commute with rot90).")
# Model.
_BACKBONE = flags.DEFINE_string("backbone", _D.backbone,
                                f"One of: {', '.join(model_lib.known_backbones())}.")
_WEIGHTS = flags.DEFINE_string("weights", _D.weights,
                               "imagenet (Keras downloads them), none, or a path to a "
                               "backbone weights file (offline).")
_HEAD = flags.DEFINE_enum("head", _D.head, model_lib.HEADS,
                          "dense: Dense(256)+LeakyReLU+BN+Dense(4); linear: Dense(4).")
_DROPOUT = flags.DEFINE_float("dropout", _D.dropout, "Dropout on the pooled features.")
_BN_MOMENTUM = flags.DEFINE_float(
    "bn_momentum", _D.bn_momentum, "Momentum of the backbone's BatchNorm layers; 0 keeps "
    "the backbone's own. Short runs from random init (--weights=none) need about 0.9.")
# Stages.
_S1_EPOCHS = flags.DEFINE_integer("stage1_epochs", _D.stage1_epochs,
                                  "Stage 1 epochs (0 skips the stage).")
_S1_LR = flags.DEFINE_float("stage1_lr", _D.stage1_lr, "Stage 1 learning rate (Adam).")
_S1_FREEZE = flags.DEFINE_integer("stage1_freeze_below_block", _D.stage1_freeze_below_block,
                                  "Stage 1: backbone blocks numbered below this are frozen "
                                  "(5 = EfficientNet blocks 1-4, the article).")
_S1_BN = flags.DEFINE_bool("stage1_train_batchnorm", _D.stage1_train_batchnorm,
                           "Stage 1: BatchNorm layers of the frozen blocks still train.")
_S2_EPOCHS = flags.DEFINE_integer("stage2_epochs", _D.stage2_epochs,
                                  "Stage 2 epochs (0 skips the stage).")
_S2_LR = flags.DEFINE_float("stage2_lr", _D.stage2_lr, "Stage 2 learning rate (Adam).")
_S2_FREEZE = flags.DEFINE_integer("stage2_freeze_below_block", _D.stage2_freeze_below_block,
                                  "Stage 2 freeze point (0 = everything trains).")
_S2_BN = flags.DEFINE_bool("stage2_train_batchnorm", _D.stage2_train_batchnorm,
                           "Stage 2: BatchNorm layers of frozen blocks still train.")
_STEPS = flags.DEFINE_integer("steps_per_epoch", _D.steps_per_epoch,
                              "Training steps per epoch; 0 = one pass over the train split.")
_VAL_STEPS = flags.DEFINE_integer("validation_steps", _D.validation_steps,
                                  "Validation steps; 0 = the whole val split in 4 orientations.")
# Speed and scale.
_MIXED = flags.DEFINE_bool("mixed_precision", _D.mixed_precision,
                           "mixed_float16 (mixed_bfloat16 on TPU); output stays float32.")
_JIT = flags.DEFINE_enum("jit_compile", _D.jit_compile, train.JIT_COMPILE,
                         "XLA compilation of the train step (with --augment_on=device the "
                         "augmentation too); auto = on with a GPU/TPU, off on a CPU.")
_STRATEGY = flags.DEFINE_enum("strategy", _D.strategy, train.STRATEGIES,
                              "tf.distribute strategy; auto = several GPUs -> mirrored.")
_DATA_SERVICE = flags.DEFINE_string(
    "data_service", _D.data_service, "grpc://HOST:PORT of a tf.data service dispatcher (see "
    "the data_service command) that runs the input pipeline; empty = local input pipeline.")
_DETERMINISTIC = flags.DEFINE_bool("deterministic", _D.deterministic,
                                   "tf.config.experimental.enable_op_determinism (slower).")
# Hygiene.
_EARLY = flags.DEFINE_integer("early_stopping_patience", _D.early_stopping_patience,
                              "Stop a stage after this many epochs without a val accuracy "
                              "gain (restores the best weights); 0 = off.")
_REDUCE = flags.DEFINE_integer("reduce_lr_patience", _D.reduce_lr_patience,
                               "Multiply the lr by --reduce_lr_factor after this many epochs "
                               "without a val loss gain; 0 = off.")
_REDUCE_FACTOR = flags.DEFINE_float("reduce_lr_factor", _D.reduce_lr_factor,
                                    "Factor of ReduceLROnPlateau.")
_MIN_LR = flags.DEFINE_float("min_lr", _D.min_lr, "Lower bound of ReduceLROnPlateau.")
_EXPORT = flags.DEFINE_bool("export", _D.export,
                            "Write the SavedModel (model_dir/export) and model.tflite.")
_MEASURE = flags.DEFINE_integer("measure_steps", _D.measure_steps,
                                "> 0: at the end, time this many steps on the real input "
                                "and on a cached batch (images/s, input-wait fraction).")
_VERBOSE = flags.DEFINE_integer(
    "verbose", None, "Training progress: 1 a progress bar per step with ETA, 2 one line per "
    "epoch, 0 none. Default: 1 on a terminal, 2 otherwise (logs, CI).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False,
                             "Validate the flags and print the resolved config; train nothing.")

FLAGS_FILE = "flags.txt"


def build_config() -> train.TrainConfig:
    """The TrainConfig of the parsed flags."""
    weights = _WEIGHTS.value
    if weights is None or weights.lower() in ("none", ""):
        weights = None
    elif weights.lower() == "imagenet":
        weights = "imagenet"
    return train.TrainConfig(
        records=_RECORDS.value or "", model_dir=_MODEL_DIR.value or "",
        batch_size=_BATCH_SIZE.value, image_size=_IMAGE_SIZE.value, seed=_SEED.value,
        augment_policy=_AUGMENT_POLICY.value, augment_on=_AUGMENT_ON.value,
        resize=_RESIZE.value, backbone=_BACKBONE.value.lower(), weights=weights,
        head=_HEAD.value, dropout=_DROPOUT.value, bn_momentum=_BN_MOMENTUM.value,
        stage1_epochs=_S1_EPOCHS.value, stage1_lr=_S1_LR.value,
        stage1_freeze_below_block=_S1_FREEZE.value, stage1_train_batchnorm=_S1_BN.value,
        stage2_epochs=_S2_EPOCHS.value, stage2_lr=_S2_LR.value,
        stage2_freeze_below_block=_S2_FREEZE.value, stage2_train_batchnorm=_S2_BN.value,
        steps_per_epoch=_STEPS.value, validation_steps=_VAL_STEPS.value,
        mixed_precision=_MIXED.value, jit_compile=_JIT.value, strategy=_STRATEGY.value,
        data_service=_DATA_SERVICE.value,
        deterministic=_DETERMINISTIC.value,
        early_stopping_patience=_EARLY.value, reduce_lr_patience=_REDUCE.value,
        reduce_lr_factor=_REDUCE_FACTOR.value, min_lr=_MIN_LR.value, export=_EXPORT.value,
        measure_steps=_MEASURE.value,
        verbose=_VERBOSE.value if _VERBOSE.value is not None else 1 if sys.stdout.isatty() else 2)


def write_flags_file(model_dir: str) -> str:
    """Writes this module's flags, every one with its value, to model_dir/flags.txt."""
    import os
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, FLAGS_FILE)
    module_flags = flags.FLAGS.get_flags_for_module(sys.modules[__name__])
    lines = [f.serialize() for f in sorted(module_flags, key=lambda f: f.name)
             if f.name != "dry_run" and f.value is not None]
    with fileio.atomic_write(path, "w", encoding="utf-8") as f:
        f.write("# train flags; replay with: train --flagfile=" + path + "\n")
        f.write("\n".join(lines) + "\n")
    return path


def _fail(message: str, status: int = 2):
    """One line on stderr and exit `status` (2: the flags need changing; 1: the
    run could not go on: a full disk, a damaged shard)."""
    print(f"train: error: {str(message).splitlines()[0]}", file=sys.stderr)
    sys.exit(status)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    config = build_config()
    try:
        train.check_config(config)
    except ValueError as e:   # ConfigError, ModelError, RecordsError
        _fail(str(e))
    if _DRY_RUN.value:
        import dataclasses
        for key, value in dataclasses.asdict(config).items():
            print(f"{key} = {value!r}")
        return 0
    try:
        write_flags_file(config.model_dir)
    except OSError as e:
        _fail(f"cannot write into model_dir {config.model_dir}: {e}", status=1)
    try:
        metrics = train.train_and_evaluate(config)
    except (train.ConfigError, model_lib.ModelError) as e:
        _fail(str(e))
    except (train.OutputError, recordio.RecordsError) as e:
        # h5py objects of a failed write still hang off the exception; their
        # destructors would print "Exception ignored ... Traceback" at exit
        # (Cython prints through sys.excepthook, then sys.unraisablehook).
        sys.unraisablehook = lambda unraisable: None
        sys.excepthook = lambda *exc_info: None
        _fail(str(e), status=1)
    except train.TrainingDiverged as e:
        print(f"train: error: {e}", file=sys.stderr)
        sys.exit(1)
    final = metrics["final"]
    if metrics.get("already_complete"):
        print(f"[train] already complete: nothing retrained or re-exported (a new "
              f"--model_dir trains again); val accuracy {final['val_accuracy']:.4f}")
    else:
        print(f"[train] done: val accuracy {final['val_accuracy']:.4f} (4 orientations "
              f"of {final['val_examples'] // 4} val images)")
    warning = chance_warning(final["val_accuracy"], final["val_examples"],
                             final.get("temperature"))
    if warning:
        print(f"[train] warning: {warning}")
    print(f"[train] model in {config.model_dir}; next: evaluate --model {config.model_dir} "
          f"--records {config.records}")
    return 0


def chance_warning(accuracy: float, examples: int, temperature=None):
    """A plain sentence when the model is no better than guessing, else None.

    Guessing scores 0.25 on the four balanced turns, with a binomial standard
    error of sqrt(0.25 * 0.75 / n); within two of them the run has not shown it
    learned anything. A fitted temperature at the end of its search range
    (evaluation.fit_temperature: 0.05..20) says the confidences carry nothing.
    """
    margin = 2 * (0.1875 / max(1, examples)) ** 0.5
    if accuracy <= 0.25 + margin:
        return (f"val accuracy {accuracy:.3f} on {examples} examples is within chance "
                f"(0.25 +- {margin:.3f}): this model has not learned orientation; train longer, "
                "on more images, or from a pretrained backbone (BUILD.md, section 6)")
    if temperature is not None and not 0.06 <= temperature <= 19.0:
        return (f"the fitted temperature {temperature:.3g} sits at the end of its range: "
                "the model's confidences carry no information; do not trust "
                "--min_confidence with it")
    return None


def run():
    tools.run_tool(main, __name__)


if __name__ == "__main__":
    run()
