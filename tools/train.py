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
import dataclasses
import os
import sys

from absl import flags

from upright import tools
from upright.pipeline import configs, evaluation, recordio, resume, train
from upright.pipeline import model as model_lib

__doc__ += "\n" + tools.describe_recipes()

# One flag per TrainConfig setting, declared there (help, type, default, choices).
tools.define_config_flags(train.TrainConfig, __name__)
_DRY_RUN = flags.DEFINE_bool("dry_run", False,
                             "Validate the flags and print the resolved config; train nothing.")

FLAGS_FILE = "flags.txt"


def main(argv):
    if len(argv) > 1:
        tools.fail(__name__, f"unexpected arguments: {' '.join(argv[1:])}")
    config = tools.config_from_flags(train.TrainConfig)
    if flags.FLAGS.verbose is None and sys.stdout.isatty():
        config = dataclasses.replace(config, verbose=1)   # a progress bar on a terminal
    try:
        train.check_config(config)
    except ValueError as e:   # ConfigError, ModelError, RecordsError
        tools.fail(__name__, e)
    if _DRY_RUN.value:
        for key, value in configs.flatten(config).items():
            print(f"{key} = {value!r}")
        return 0
    try:
        tools.write_flags_file(__name__, os.path.join(config.model_dir, FLAGS_FILE))
    except OSError as e:
        tools.fail(__name__, f"cannot write into model_dir {config.model_dir}: {e}", status=1)
    try:
        metrics = train.train_and_evaluate(config)
    except (train.ConfigError, model_lib.ModelError) as e:
        tools.fail(__name__, e)
    except (resume.OutputError, recordio.RecordsError) as e:
        # h5py objects of a failed write still hang off the exception; their
        # destructors would print "Exception ignored ... Traceback" at exit
        # (Cython prints through sys.excepthook, then sys.unraisablehook).
        sys.unraisablehook = lambda unraisable: None
        sys.excepthook = lambda *exc_info: None
        tools.fail(__name__, e, status=1)
    except train.TrainingDiverged as e:
        print(f"train: error: {e}", file=sys.stderr)
        sys.exit(1)
    _report(config, metrics)
    return 0


def _report(config, metrics):
    final = metrics["final"]
    if metrics.get("already_complete"):
        print(f"[train] already complete: nothing retrained or re-exported (a new "
              f"--model_dir trains again); val accuracy {final['val_accuracy']:.4f}")
    else:
        print(f"[train] done: val accuracy {final['val_accuracy']:.4f} (4 orientations "
              f"of {final['val_examples'] // 4} val images)")
    warning = evaluation.chance_warning(final["val_accuracy"], final["val_examples"],
                                        final.get("temperature"))
    if warning:
        print(f"[train] warning: {warning}")
    print(f"[train] model in {config.model_dir}; next: evaluate --model {config.model_dir} "
          f"--records {config.records}")


def run():
    tools.run_tool(main, __name__)


if __name__ == "__main__":
    run()
