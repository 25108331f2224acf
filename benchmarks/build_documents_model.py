"""Build the built-in `documents` model reproducibly: records -> train -> export ->
check -> copy model.tflite + model_info.json into src/upright/models/documents/.

The command that builds the shipped model (from the repository root; the page
set and the recipe come from issue 14's data and the pretrained-backbone work):

    python benchmarks/build_documents_model.py \
        --src /data/document_pages --flagfile documents.flags \
        --backbone efficientnet_lite0 --work /data/documents_build

Smoke run on this machine (tiny backbone, pages rendered by Pillow; minutes on
2 CPU cores; writes to a scratch folder, not into the package):

    python benchmarks/render_test_pages.py --out /tmp/pages --num 40
    python benchmarks/build_documents_model.py --src /tmp/pages --flagfile demo.flags \
        --backbone tiny --work /tmp/docbuild --install_dir /tmp/docbuild/installed/documents \
        -- --stage1_epochs=1 --stage2_epochs=1 --image_size=32

Steps (each a real command, run as a subprocess with this Python, and printed):
1. make_records --src SRC --out WORK/records (skipped with --records: an
   existing records folder is used as it is);
2. train --flagfile FLAGFILE --records ... --model_dir WORK/model --backbone B
   --export [train flags after `--`, which win]. A rerun resumes (train's own
   resume), so an interrupted build is continued by the same command;
3. the TFLite file is checked: under --max_mb, loads as a TFLite-only model
   folder (serve.load_model_dir), and its accuracy on the records' val split in
   all four turns (evaluation.evaluate) is at least --min_val_accuracy;
4. model.tflite and model_info.json are written (atomically, pipeline/fileio)
   into --install_dir (default: src/upright/models/documents in this repository).
   model_info.json gains a "build" entry: the command, the git commit, the
   flagfile's text, the records' counts, the val accuracy of the TFLite file,
   the seconds each step took.
Reproducible: the flagfile carries the seed; train writes its resolved flags to
WORK/model/flags.txt; make_records' splits depend only on file bytes.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_INSTALL = os.path.join(REPO, "src", "upright", "models", "documents")


def run_step(name, args, timings):
    """Runs `python -m upright.tools.NAME ARGS`; exits on failure."""
    command = [sys.executable, "-m", f"upright.tools.{name}", *args]
    print("$ " + shlex.join(["python", "-m", f"upright.tools.{name}", *args]), flush=True)
    start = time.monotonic()
    proc = subprocess.run(command)
    timings[name] = round(time.monotonic() - start, 1)
    if proc.returncode != 0:
        sys.exit(f"build_documents_model: {name} failed (exit status {proc.returncode})")


def git_commit():
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Build the built-in documents model (see the module docstring).",
        epilog="Arguments after `--` go to train and override the flagfile.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--src", help="folder of upright page images (make_records --src)")
    source.add_argument("--records", help="an existing records folder (skips make_records)")
    parser.add_argument("--flagfile", required=True, help="train recipe (e.g. documents.flags)")
    parser.add_argument("--backbone", required=True,
                        help="train --backbone (efficientnet_lite0 for the shipped model)")
    parser.add_argument("--work", required=True, help="scratch folder: records/, model/")
    parser.add_argument("--install_dir", default=DEFAULT_INSTALL,
                        help="where model.tflite + model_info.json go (default: %(default)s)")
    parser.add_argument("--max_side", type=int, default=512, help="make_records --max_side")
    parser.add_argument("--val_fraction", type=float, default=0.2,
                        help="make_records --val_fraction")
    parser.add_argument("--max_mb", type=float, default=10.0,
                        help="refuse a TFLite file larger than this (wheel size)")
    parser.add_argument("--min_val_accuracy", type=float, default=0.0,
                        help="refuse to install below this val accuracy (four turns)")
    own, _, train_extra = list(argv), None, []
    if "--" in own:
        cut = own.index("--")
        own, train_extra = own[:cut], own[cut + 1:]
    return parser.parse_args(own), train_extra


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, train_extra = parse_args(argv)
    timings, started = {}, time.time()
    work = os.path.abspath(args.work)
    records = args.records or os.path.join(work, "records")
    model_dir = os.path.join(work, "model")

    if args.src:
        if os.path.exists(os.path.join(records, "info.json")):
            print(f"records: {records} exists, used as it is (remove it to rebuild)")
        else:
            run_step("make_records", [f"--src={args.src}", f"--out={records}",
                                      f"--max_side={args.max_side}",
                                      f"--val_fraction={args.val_fraction}"], timings)
    run_step("train", [f"--flagfile={args.flagfile}", f"--records={records}",
                       f"--model_dir={model_dir}", f"--backbone={args.backbone}", "--export",
                       *train_extra], timings)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from upright.pipeline import evaluation, fileio, serve
    tflite = os.path.join(model_dir, serve.TFLITE_FILE)
    info_path = os.path.join(model_dir, serve.INFO_FILE)
    for path in (tflite, info_path):
        if not os.path.isfile(path):
            sys.exit(f"build_documents_model: {path} missing: train did not export "
                     "(does the flagfile say --noexport?)")
    size_mb = os.path.getsize(tflite) / 1e6
    if size_mb > args.max_mb:
        sys.exit(f"build_documents_model: {tflite} is {size_mb:.1f} MB, over --max_mb "
                 f"{args.max_mb}")

    # Check the two files exactly as they will ship: a TFLite-only folder.
    stage = os.path.join(work, "staged", "documents")
    os.makedirs(stage, exist_ok=True)
    with open(tflite, "rb") as f:
        tflite_bytes = f.read()
    with open(info_path) as f:
        info = json.load(f)
    fileio.write_bytes(os.path.join(stage, serve.TFLITE_FILE), tflite_bytes)
    fileio.write_json(os.path.join(stage, serve.INFO_FILE), info, indent=2, sort_keys=True)
    start = time.monotonic()
    result = evaluation.evaluate(stage, records, split="val", plots=False,
                                 out_json=os.path.join(work, "eval_val_tflite.json"))
    timings["evaluate_tflite"] = round(time.monotonic() - start, 1)
    accuracy = float(result["accuracy"])
    print(f"TFLite {size_mb:.2f} MB, val accuracy (4 turns, {result['num_images']} pages): "
          f"{accuracy:.4f}")
    if accuracy < args.min_val_accuracy:
        sys.exit(f"build_documents_model: val accuracy {accuracy:.4f} < --min_val_accuracy "
                 f"{args.min_val_accuracy}; not installed")

    with open(args.flagfile) as f:
        flagfile_text = f.read()
    records_info = {}
    with open(os.path.join(records, "info.json")) as f:
        records_info = json.load(f)
    info["build"] = {
        "command": shlex.join(["python", "benchmarks/build_documents_model.py", *argv]),
        "git_commit": git_commit(),
        "flagfile": args.flagfile,
        "flagfile_text": flagfile_text,
        "backbone": args.backbone,
        "train_extra_flags": train_extra,
        "records_counts": records_info.get("counts"),
        "val_accuracy_tflite": accuracy,
        "tflite_bytes": len(tflite_bytes),
        "seconds": {**timings, "total": round(time.time() - started, 1)},
        "built_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    fileio.make_dirs(os.path.dirname(args.install_dir) or ".", os.path.basename(args.install_dir))
    fileio.write_bytes(os.path.join(args.install_dir, serve.TFLITE_FILE), tflite_bytes)
    fileio.write_json(os.path.join(args.install_dir, serve.INFO_FILE), info, indent=2,
                      sort_keys=True)
    print(f"installed {args.install_dir}/{{{serve.TFLITE_FILE},{serve.INFO_FILE}}} "
          f"in {info['build']['seconds']['total']} s")


if __name__ == "__main__":
    main()
