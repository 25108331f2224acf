"""Accuracy of a training recipe on a real set, end to end, with the time it took.

    python benchmarks/accuracy.py --name documents_cpu --records R --holdout H \
        --out runs/accuracy -- --flagfile=cpu.flags
    python benchmarks/accuracy.py --name documents_frozen --records R --holdout H \
        --out runs/accuracy -- --flagfile=cpu.flags --stage2_epochs=0
    python benchmarks/accuracy.py --name documents_random --records R --holdout H \
        --out runs/accuracy -- --flagfile=cpu.flags --weights=none

Runs `train` (the flags after `--`, with --records and --model_dir set here),
then `evaluate` on the held-out records (every image in all four turns, TTA
too), and appends one JSON line to OUT/accuracy.jsonl: name, train flags, train
seconds, val accuracy (make_records' val split of the training records: unseen
images of the training sources), held-out accuracy and per-class accuracy
(unseen sources), TTA accuracy, held-out images. Prints that line. The sets
are built by benchmarks/make_documents.py, make_clipart.py and make_photos.py;
benchmarks/README.md lists the figures and the commands.
"""
import argparse
import json
import os
import subprocess
import sys
import time


def run(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--records", required=True, help="records of the training sources")
    parser.add_argument("--holdout", required=True, help="records of unseen sources (val split)")
    parser.add_argument("--out", required=True, help="folder for the runs and accuracy.jsonl")
    parser.add_argument("train_flags", nargs="*", help="train flags, after --")
    args = parser.parse_args(argv)
    bin_dir = os.path.dirname(sys.executable)
    model_dir = os.path.join(args.out, args.name)
    start = time.monotonic()
    subprocess.run([os.path.join(bin_dir, "train"), *args.train_flags,
                    f"--records={args.records}", f"--model_dir={model_dir}", "--verbose=2"],
                   check=True)
    train_seconds = time.monotonic() - start
    out_json = os.path.join(model_dir, "eval_holdout.json")
    subprocess.run([os.path.join(bin_dir, "evaluate"), f"--model={model_dir}",
                    f"--records={args.holdout}", "--split=val", "--tta", f"--out={out_json}",
                    "--noplots"], check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(model_dir, "metrics.json")) as f:
        metrics = json.load(f)
    with open(out_json) as f:
        held = json.load(f)
    line = {"name": args.name, "train_flags": args.train_flags,
            "train_seconds": round(train_seconds, 1),
            "val_accuracy": round(metrics["final"]["val_accuracy"], 4),
            "val_examples": metrics["final"]["val_examples"],
            "holdout_accuracy": round(held["accuracy"], 4),
            "holdout_tta_accuracy": round(held["tta"]["accuracy"], 4),
            "holdout_per_class": {k: round(v, 4) for k, v in held["per_class_accuracy"].items()},
            "holdout_images": held["num_images"]}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "accuracy.jsonl"), "a") as f:
        f.write(json.dumps(line) + "\n")
    print(json.dumps(line))
    return line


if __name__ == "__main__":
    run()
