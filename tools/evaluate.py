"""Evaluate a trained orientation model on a records split.

    evaluate --model runs/demo --records records/demo --split val --tta

Scores every image of the split in all four orientations and writes
MODEL/eval_<split>.json (accuracy, per-class accuracy, confusion matrix,
expected calibration error, error-versus-coverage curve, optional test-time
agreement) plus PNGs beside it; prints a readable summary. Definitions:
pipeline/evaluation.py and BUILD.md section 7.
"""
import sys

from absl import app, flags

from upright import tools

_MODEL = flags.DEFINE_string("model", None, "model_dir written by train (or a SavedModel "
                             "export folder).")
_RECORDS = flags.DEFINE_string("records", None, "records folder written by make_records.")
_SPLIT = flags.DEFINE_string("split", "val", "split to score.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "images per model call.", lower_bound=1)
_TTA = flags.DEFINE_boolean("tta", False, "also score test-time agreement over the four "
                            "rotations of each input (4x the compute).")
_OUT = flags.DEFINE_string("out", None, "result JSON; default MODEL/eval_<split>.json. PNGs "
                           "and <stem>_coverage.json are written beside it.")
_NUM_BINS = flags.DEFINE_integer("num_bins", 15, "equal-width confidence bins for the "
                                 "calibration error and reliability diagram.", lower_bound=1)
_PLOTS = flags.DEFINE_boolean("plots", True, "write the PNG charts.")
_TRUST_MODEL = flags.DEFINE_boolean(
    "trust_model", False, "load a SavedModel even if it holds ops outside the allowlist "
    "(file, network or Python ops): a SavedModel is a program; only for models from people "
    "you trust. model.keras is always loaded in Keras' safe mode.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _MODEL.value or not _RECORDS.value:
        raise app.UsageError("--model and --records are required")
    from upright.pipeline import evaluation, recordio, serve
    try:
        predictor = serve.load_model(_MODEL.value, trust_model=_TRUST_MODEL.value)
        info = recordio.load_info(_RECORDS.value)
        recordio.shard_paths(_RECORDS.value, _SPLIT.value, info)
    except (serve.ModelDirError, recordio.RecordsError, ValueError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        result = evaluation.evaluate(
            _MODEL.value, _RECORDS.value, split=_SPLIT.value, batch_size=_BATCH_SIZE.value,
            tta=_TTA.value, out_json=_OUT.value, num_bins=_NUM_BINS.value,
            plots=_PLOTS.value, predictor=predictor)
    except OSError as e:   # a full disk, no permission, a refused link (fileio)
        print(f"evaluate: error: cannot write the results: {e}", file=sys.stderr)
        sys.exit(1)
    print(evaluation.format_summary(result))


def run():
    tools.run_tool(main, __name__)


if __name__ == "__main__":
    run()
