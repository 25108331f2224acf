"""Fault injection for tests/test_faults*.py and tests/test_train.py: a
make_records driver that can be killed at a chosen step, a train driver that
can be killed at a named moment, folder snapshots, and the image fuzzer's driver.

Run as a module in a subprocess:

    python -m tests.fault_tools make SRC OUT [--kill-at-step N] [--count-steps FILE]
        [--shard-bytes B] [--workers W]
    python -m tests.fault_tools train --kill-at MOMENT -- [train flags]
    python -m tests.fault_tools fuzz --examples N --seed S --report FILE
        [--per-input-seconds T] [--max-rss-mb M]

`train` runs the train command with kill_training_at(MOMENT) installed: the
process SIGKILLs itself at that moment (see kill_training_at).

`make` runs records.make_records (library call, arguments=None so that
info.json does not depend on OUT's path). A "step" is one change of OUT's
directory entries made by make_records (os.mkdir, os.rmdir, os.remove,
os.replace of a path under OUT); --kill-at-step N sends SIGKILL to the process
just before step N (1-based), --count-steps writes how many steps a full run
takes.
"""
import argparse
import json
import os
import signal
import sys

from upright.pipeline import recordio, schema


# ---------------------------------------------------------------- folders

def snapshot(out) -> dict:
    """{file name: bytes} of info.json and every shard it lists (a complete output)."""
    info = recordio.load_info(str(out))
    names = [schema.INFO_FILE] + [n for s in info["splits"].values() for n in s["shards"]]
    result = {}
    for name in names:
        with open(os.path.join(str(out), name), "rb") as f:
            result[name] = f.read()
    return result


def state_of(out, references: dict):
    """Classifies a records folder: the name of the reference snapshot it equals
    byte for byte, or ("refused", message) when load_info refuses it.

    Raises AssertionError when a reader accepts a folder that matches no reference
    (a mix, or a half-written output)."""
    try:
        snap = snapshot(out)
    except recordio.RecordsError as e:
        return "refused", str(e)
    for name, ref in references.items():
        if snap == ref:
            return name, ""
    differing = sorted(n for n in set(snap) | set(next(iter(references.values())))
                       if all(snap.get(n) != r.get(n) for r in references.values()))
    raise AssertionError(f"{out}: a reader accepts a folder that is none of "
                         f"{sorted(references)}; differing files: {differing}")


def lock_is_free(out, wait_seconds: float = 60.0) -> bool:
    """True when OUT's make_records lock can be taken within wait_seconds (the
    kernel frees a dead holder's lock at once; the wait only guards a hang)."""
    import fcntl
    import time
    path = os.path.join(str(out), ".make_records.lock")
    if not os.path.exists(path):
        return True
    deadline = time.monotonic() + wait_seconds
    fd = os.open(path, os.O_RDWR)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return True
            except OSError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- make driver

def _instrument(out, kill_at, counter):
    """Wraps os's directory-changing calls: count those under OUT, die at kill_at."""
    prefix = os.path.realpath(out)

    def wrap(name):
        real = getattr(os, name)

        def wrapper(path, *args, **kwargs):
            p = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
            if p and os.path.realpath(p).startswith(prefix) and os.getpid() == counter["pid"]:
                counter["steps"] += 1
                if counter["steps"] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(path, *args, **kwargs)
        setattr(os, name, wrapper)

    for name in ("mkdir", "rmdir", "remove", "replace", "unlink"):
        wrap(name)


def main_make(args):
    from upright.pipeline import records
    if args.shard_bytes:
        records.SHARD_BYTES = args.shard_bytes
    counter = {"steps": 0, "pid": os.getpid()}
    _instrument(args.out, args.kill_at_step, counter)
    try:
        records.make_records(src=args.src, out=args.out, workers=args.workers,
                             progress=False, max_side=args.max_side)
    except records.MakeRecordsError as e:
        print(f"make_records: error: {e}", file=sys.stderr)
        sys.exit(1 if e.refused else 2)
    if args.count_steps:
        with open(args.count_steps, "w") as f:
            f.write(str(counter["steps"]))


# ---------------------------------------------------------------- train driver

def kill_training_at(moment: str) -> None:
    """Makes this process SIGKILL itself when training reaches `moment`:
    "stage<k>_epoch<e>" (after the first batch of epoch e of stage k, counted
    from 0), "stage<k>_backup<n>" (inside the backup made after n epochs: its
    weights file renamed in, its metadata not yet), "between_stages" (after
    stage 1's done marker and the removal of its backup, before stage 2 starts).
    Wraps the trainer's own code in this process only; "" installs nothing."""
    from upright.pipeline import callbacks, resume
    if not moment:
        return

    def die_at(name):
        if name == moment:
            os.kill(os.getpid(), signal.SIGKILL)

    batch_end = callbacks.StopOnNaN.on_train_batch_end

    def on_train_batch_end(self, batch, logs=None):
        batch_end(self, batch, logs)
        if batch == 0:
            die_at(f"stage{self.stage}_epoch{self.epoch}")

    commit = callbacks.AtomicBackup.commit

    def commit_backup(self, name):
        die_at(f"stage{self.stage}_backup{self._current_epoch}")
        commit(self, name)

    finish_stage = resume.finish_stage

    def finish(model_dir, stage, *args, **kwargs):
        finish_stage(model_dir, stage, *args, **kwargs)
        if stage == 1:
            die_at("between_stages")

    callbacks.StopOnNaN.on_train_batch_end = on_train_batch_end
    callbacks.AtomicBackup.commit = commit_backup
    resume.finish_stage = finish


def main_train(args):
    """The train command, killed at args.kill_at."""
    from upright.tools import train
    kill_training_at(args.kill_at)
    sys.argv = ["train", *[a for a in args.train_args if a != "--"]]
    train.run()


# ---------------------------------------------------------------- fuzz driver

def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024   # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss_mb() -> float:
    """Resets this process's peak resident size to its current size (Linux:
    writing 5 to /proc/self/clear_refs resets VmHWM); returns that size in MB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident size (MB) since the last reset_peak_rss_mb()."""
    return _proc_status_mb("VmHWM")


def main_fuzz(args):
    """Runs the image fuzzer in this process, under a per-input watchdog and a
    memory limit; writes a JSON report. Exit 0 when every input was stored or
    skipped with a reason, 1 otherwise. When one input takes longer than
    --per-input-seconds, the watchdog (faulthandler, a C thread that works even
    when Python is stuck in C code) prints every thread's traceback and ends
    the process without a report; the input is left in current_input.bin."""
    import faulthandler
    import resource
    import time
    from tests import fuzz_images
    limit = args.max_rss_mb * 1024 * 1024
    # Address space limit: an input that tries to allocate far beyond it gets
    # MemoryError (a failure the fuzzer reports) instead of swapping the machine.
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    current = os.path.join(os.path.dirname(args.report), "current_input.bin")
    stats = {"examples": 0, "stored": 0, "skipped": 0, "reasons": {}, "slowest_s": 0.0,
             "kinds": {}, "input_peak_mb": 0.0}

    def before(data, kind):
        with open(current, "wb") as f:   # the input that hangs is kept for the report
            f.write(data)
        stats["_last"] = data
        stats["_base_mb"] = reset_peak_rss_mb()
        faulthandler.dump_traceback_later(args.per_input_seconds, exit=True)

    def after(outcome, kind, seconds):
        faulthandler.cancel_dump_traceback_later()
        # What this one input made the reader hold at its peak, over what the
        # process held just before: independent of TensorFlow, Hypothesis and
        # every earlier input, so the bound means the same on any machine.
        grew = peak_rss_mb() - stats["_base_mb"]
        if grew > stats["input_peak_mb"]:
            stats["input_peak_mb"] = round(grew, 1)
            stats["input_peak"] = {"kind": kind, "outcome": outcome[:120],
                                   "seconds": round(seconds, 3), "size": len(stats["_last"]),
                                   "head_hex": stats["_last"][:48].hex()}
        if seconds > stats["slowest_s"]:
            stats["slowest_input"] = {"kind": kind, "outcome": outcome[:120]}
        stats["examples"] += 1
        stats["kinds"][kind] = stats["kinds"].get(kind, 0) + 1
        stats["slowest_s"] = max(stats["slowest_s"], round(seconds, 3))
        if outcome.startswith("stored"):
            stats["stored"] += 1
        else:
            stats["skipped"] += 1
            word = outcome.split(":", 1)[0]
            stats["reasons"][word] = stats["reasons"].get(word, 0) + 1

    start = time.monotonic()
    failures = fuzz_images.run_fuzz(examples=args.examples, seed=args.seed, before=before,
                                    after=after)
    stats["seconds"] = round(time.monotonic() - start, 1)
    stats["failures"] = failures
    # Lifetime peak, for information only: Linux carries the pre-exec peak of the
    # forked parent (pytest with TensorFlow loaded) into ru_maxrss.
    stats["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    # The stored images must decode in TensorFlow exactly as inspect_records and
    # the input pipeline decode them. TensorFlow needs more address space.
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    stats["tf_checked"], tf_failures = fuzz_images.check_stored_with_tensorflow()
    stats["failures"] += tf_failures
    stats.pop("_last", None)
    stats.pop("_base_mb", None)
    with open(args.report, "w") as f:
        json.dump(stats, f, indent=2)
    sys.exit(1 if stats["failures"] else 0)


def main(argv=None):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make")
    make.add_argument("src")
    make.add_argument("out")
    make.add_argument("--kill-at-step", type=int, default=0)
    make.add_argument("--count-steps")
    make.add_argument("--shard-bytes", type=int, default=0)
    make.add_argument("--workers", type=int, default=2)
    make.add_argument("--max-side", type=int, default=64)
    train = sub.add_parser("train")
    train.add_argument("--kill-at", default="")
    train.add_argument("train_args", nargs=argparse.REMAINDER)
    fuzz = sub.add_parser("fuzz")
    fuzz.add_argument("--examples", type=int, required=True)
    fuzz.add_argument("--seed", type=int, default=0)
    fuzz.add_argument("--report", required=True)
    fuzz.add_argument("--per-input-seconds", type=float, default=20.0)
    fuzz.add_argument("--max-rss-mb", type=int, default=3072)
    args = parser.parse_args(argv)
    {"make": main_make, "train": main_train, "fuzz": main_fuzz}[args.command](args)


if __name__ == "__main__":
    main()
