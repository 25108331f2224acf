"""Predict the rotation of image files and (optionally) write upright copies.

    orient --model runs/demo photos/ --fix --dst fixed/ --report orient.csv
    orient --model documents scans/ scan.pdf --fix --dst fixed/

For every image (files, or folders walked recursively): the predicted rotation
(degrees counter-clockwise the image is turned, as a person sees it with EXIF
applied), the confidence and the action, as a table and a CSV/JSON report.
Images below --min_confidence are left alone and listed. --fix writes upright
copies into --dst (metadata kept, EXIF orientation 1; JPEGs turned losslessly
with jpegtran, dropping a partial edge block of < 16 pixels where the size needs
it, and saying so per file). Sources are never modified; corrupt
files are reported and skipped; a rerun skips files already written. PDFs:
one row per page; --fix writes the PDF with the turned pages' /Rotate corrected
(original bytes kept: an incremental update); pages left alone are listed.
Details: pipeline/orient.py and BUILD.md section 7.
"""
import sys

from absl import app, flags

from upright import tools

_MODEL = flags.DEFINE_string("model", None, "model_dir written by train (or a SavedModel "
                             "export or TFLite-only folder), or a built-in model name: "
                             "documents (looked up in upright/models/, or in "
                             "$UPRIGHT_MODELS_DIR when set).")
_FIX = flags.DEFINE_boolean("fix", False, "write upright copies of the images to turn "
                            "into --dst.")
_DST = flags.DEFINE_string("dst", None, "output folder for --fix (same relative paths).")
_MIN_CONFIDENCE = flags.DEFINE_float("min_confidence", 0.9, "below this confidence an image "
                                     "is left alone (a wrong turn is worse than none).",
                                     lower_bound=0.0, upper_bound=1.0)
_REPORT = flags.DEFINE_string("report", None, "write a report: a path ending in .csv or .json.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "images per model call.", lower_bound=1)
_LOSSLESS = flags.DEFINE_boolean("lossless", True, "turn JPEGs with jpegtran (lossless) when "
                                 "it is installed; --nolossless always re-encodes.")
_JPEG_QUALITY = flags.DEFINE_integer("jpeg_quality", 95, "quality of re-encoded JPEGs.",
                                     lower_bound=1, upper_bound=100)
_TRIM_EDGES = flags.DEFINE_boolean("trim_edges", True, "when a JPEG's size is not a whole "
                                   "number of coding blocks (most photos), turn it "
                                   "losslessly anyway by dropping the partial edge block "
                                   "(< 16 pixels at the copy's left or top; each file's line "
                                   "says how many); --notrim_edges keeps every pixel by "
                                   "re-encoding such JPEGs.")
_MAX_PDF_PAGES = flags.DEFINE_integer("max_pdf_pages", 2000, "a PDF with more pages is not "
                                     "processed (one error line).", lower_bound=1)
_TABLE = flags.DEFINE_boolean("table", True, "print one line per file.")
_TTA = flags.DEFINE_boolean("tta", False, "predict each image in its four quarter turns and "
                            "combine them: 4x the model's work, removes a model's bias "
                            "towards one turn (recommended for --model documents).")
_WORKERS = flags.DEFINE_integer("workers", 0, "threads that decode and predict side by side "
                               "(0: the CPU cores this process may use).", lower_bound=0)
_TRUST_MODEL = flags.DEFINE_boolean(
    "trust_model", False, "load a SavedModel even if it holds ops outside the allowlist "
    "(file, network or Python ops): a SavedModel is a program; only for models from people "
    "you trust. model.keras is always loaded in Keras' safe mode.")


def main(argv):
    paths = tuple(argv[1:])
    if not _MODEL.value:
        raise app.UsageError("--model is required")
    if not paths:
        raise app.UsageError("give at least one image file or folder")
    from upright.pipeline import orient
    config = orient.OrientConfig(
        model_dir=_MODEL.value, paths=paths, fix=_FIX.value, dst=_DST.value,
        min_confidence=_MIN_CONFIDENCE.value, report=_REPORT.value,
        batch_size=_BATCH_SIZE.value, lossless=_LOSSLESS.value,
        jpeg_quality=_JPEG_QUALITY.value, trim_edges=_TRIM_EDGES.value,
        max_pdf_pages=_MAX_PDF_PAGES.value, trust_model=_TRUST_MODEL.value, tta=_TTA.value,
        workers=_WORKERS.value)
    try:
        result = orient.run(config)
    except orient.OrientError as e:
        print(f"orient: error: {e}", file=sys.stderr)
        sys.exit(2)
    summary = result["summary"]
    if _TABLE.value and result["rows"]:
        print(orient.format_table(result["rows"]))
    if summary["files"] == 0:
        print(f"orient: error: no image files in {' '.join(paths)}", file=sys.stderr)
        sys.exit(1)
    print(orient.format_summary(summary))
    if result["report"]:
        print(f"report: {result['report']}")
    if summary["errors"] == summary["files"]:
        print(f"orient: error: none of the {summary['files']} files could be read "
              "(errors above)", file=sys.stderr)
        sys.exit(1)
    if _FIX.value:
        print(f"upright copies in {_DST.value}")


def run():
    tools.run_tool(main, __name__)


if __name__ == "__main__":
    run()
