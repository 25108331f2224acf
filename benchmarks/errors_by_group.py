"""Where the held-out errors are: accuracy per group of pictures, over many runs.

    python benchmarks/errors_by_group.py runs/accuracy/documents_* \
        --group '^[0-9]+_([a-z]+)_'          # document pages by layout
    python benchmarks/errors_by_group.py runs/accuracy/documents_* \
        --group '_([a-z0-9]+)[.]jpg$'        # ... by font

Reads RUN/eval_holdout_images.csv of each run folder (written by
benchmarks/accuracy.py: one row per held-out image and turn), puts each row in
the group that --group's first capture takes from its source_id, and prints a
line per run (accuracy on all rows, per group, and on every row outside the
hardest group) and the pictures that most runs get wrong. One run's figure
moves by its seed; a group that is low in every run is what the set asks of
the model, not luck.
"""
import argparse
import collections
import csv
import os
import re
import sys

CSV_NAME = "eval_holdout_images.csv"


def read_run(run_dir, pattern):
    """{group: [correct, total]} and the set of wrong (source_id, true angle)."""
    groups = collections.defaultdict(lambda: [0, 0])
    wrong = set()
    with open(os.path.join(run_dir, CSV_NAME), newline="") as f:
        for row in csv.DictReader(f):
            match = pattern.search(row["source_id"])
            tally = groups[match.group(1) if match else "(no match)"]
            correct = int(row["correct"])
            tally[0] += correct
            tally[1] += 1
            if not correct:
                wrong.add((row["source_id"], row["true_angle"]))
    return dict(groups), wrong


def accuracy(tallies):
    correct = sum(t[0] for t in tallies)
    total = sum(t[1] for t in tallies)
    return correct / total if total else float("nan")


def summarise(run_dirs, pattern, top=10):
    """Lines of the report: per run, per group, and the most often wrong."""
    runs = {os.path.basename(os.path.normpath(d)): read_run(d, pattern) for d in run_dirs}
    names = sorted({g for groups, _ in runs.values() for g in groups})
    pooled = {g: [sum(groups.get(g, [0, 0])[i] for groups, _ in runs.values())
                  for i in (0, 1)] for g in names}
    hardest = min(names, key=lambda g: accuracy([pooled[g]]))
    lines = ["run | all | " + " | ".join(names) + f" | all but {hardest}"]
    for run, (groups, _) in runs.items():
        rest = [t for g, t in groups.items() if g != hardest]
        cells = [f"{accuracy([groups[g]]):.3f}" if g in groups else "-" for g in names]
        lines.append(f"{run} | {accuracy(groups.values()):.4f} | " + " | ".join(cells)
                     + f" | {accuracy(rest):.4f}")
    lines.append("pooled | " + f"{accuracy(pooled.values()):.4f} | "
                 + " | ".join(f"{accuracy([pooled[g]]):.3f}" for g in names) + " | "
                 + f"{accuracy([t for g, t in pooled.items() if g != hardest]):.4f}")
    lines.append("rows per run and group: " + ", ".join(
        f"{g} {pooled[g][1] // len(runs)}" for g in names))
    misses = collections.Counter(w for _, wrong in runs.values() for w in wrong)
    lines.append(f"wrong in most of the {len(runs)} runs (picture, true angle: runs):")
    lines += [f"  {source} {angle}: {n}" for (source, angle), n in misses.most_common(top)]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help=f"run folders holding {CSV_NAME}")
    parser.add_argument("--group", required=True,
                        help="regular expression; its first capture of source_id is the group")
    parser.add_argument("--top", type=int, default=10, help="pictures wrong most often to list")
    args = parser.parse_args(argv)
    pattern = re.compile(args.group)
    if pattern.groups < 1:
        parser.error("--group needs one capture, e.g. '^[0-9]+_([a-z]+)_'")
    run_dirs = [d for d in args.runs if os.path.isfile(os.path.join(d, CSV_NAME))]
    if not run_dirs:
        parser.error(f"no {CSV_NAME} in any of the {len(args.runs)} folders given")
    print("\n".join(summarise(run_dirs, pattern, args.top)))


if __name__ == "__main__":
    sys.exit(main())
