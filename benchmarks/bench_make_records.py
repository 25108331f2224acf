"""Benchmark: make_records throughput against one process doing the bare pixel work.

    python benchmarks/bench_make_records.py --src PHOTOS [--limit 1000] [--workers N]

Picks --limit files spread evenly over --src (sorted names), links them into a
temporary folder, then measures
  1. baseline: one process doing Pillow decode + RGB + resize to 512 (LANCZOS)
     + JPEG encode (quality 95) of every file, in memory;
  2. make_records with default flags (all cores) into a temporary OUT,
     end to end: walk, read, dedup, split, write shards and info.json.
Prints images/s of both, the ratio against the target 0.85 x workers x
baseline, and the records' total size against the source files' size.
make_records runs as the command does (TensorFlow is imported only to write
the shards, inside the timed run). Also printed: the rate of the read phase
alone, CPU seconds per image of both (user + sys, the reader processes
included), which do not depend on other load on the machine, and the load
average, which does.
"""
import argparse
import io
import os
import resource
import shutil
import tempfile
import time

from PIL import Image


def pick_files(src, limit):
    names = sorted(n for n in os.listdir(src) if os.path.isfile(os.path.join(src, n)))
    step = max(1, len(names) // limit)
    return [os.path.join(src, n) for n in names[::step][:limit]]


def cpu_seconds():
    """User + sys CPU of this process and its reaped children."""
    own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                 resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def baseline(files, max_side=512, quality=95):
    """One process: decode, RGB, resize to max_side, encode. Returns images/s."""
    start = time.perf_counter()
    for path in files:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = max_side / max(image.size)
            if scale < 1:
                image = image.resize((max(1, round(image.width * scale)),
                                      max(1, round(image.height * scale))),
                                     Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=quality)
    return len(files) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="folder of photos")
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from upright.pipeline import records
    read_seconds = []
    real_read_all = records._read_all

    def timed_read_all(*a, **k):
        start = time.perf_counter()
        result = real_read_all(*a, **k)
        read_seconds.append(time.perf_counter() - start)
        return result

    records._read_all = timed_read_all

    files = pick_files(args.src, args.limit)
    source_bytes = sum(os.path.getsize(p) for p in files)
    work = tempfile.mkdtemp(prefix="bench_make_records_")
    try:
        folder = os.path.join(work, "photos")
        os.mkdir(folder)
        for path in files:
            os.symlink(path, os.path.join(folder, os.path.basename(path)))
        load_before = os.getloadavg()[0]
        cpu = cpu_seconds()
        base_rate = baseline(files)
        base_cpu = (cpu_seconds() - cpu) / len(files)
        workers = args.workers or records._usable_cores()
        cpu = cpu_seconds()
        start = time.perf_counter()
        info = records.make_records(src=folder, out=os.path.join(work, "out"),
                                    workers=args.workers, progress=False)
        seconds = time.perf_counter() - start
        run_cpu = (cpu_seconds() - cpu) / len(files)
        load_after = os.getloadavg()[0]
        out = os.path.join(work, "out")
        records_bytes = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out)
                            if n.startswith(("train.", "val.")))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rate = len(files) / seconds
    target = 0.85 * workers * base_rate
    c = info["counts"]
    print(f"files: {len(files)} from {args.src} ({source_bytes / 1e6:.1f} MB), "
          f"workers: {workers}, cores: {os.cpu_count()}")
    print(f"baseline, 1 process, Pillow decode + resize 512 + JPEG 95: {base_rate:.1f} images/s")
    print(f"make_records, default flags, end to end:                 {rate:.1f} images/s "
          f"({seconds:.1f} s, TensorFlow import included)")
    print(f"make_records read phase alone (walk excluded):             "
          f"{len(files) / read_seconds[0]:.1f} images/s ({read_seconds[0]:.1f} s)")
    print(f"CPU per image: baseline {1000 * base_cpu:.1f} ms, make_records {1000 * run_cpu:.1f} ms "
          f"(all processes); load average {load_before:.1f} before, {load_after:.1f} after "
          f"on {os.cpu_count()} cores")
    print(f"ratio make_records / (0.85 x {workers} x baseline) = {rate / target:.2f} "
          f"(target >= 1.00; make_records / baseline = {rate / base_rate:.2f})")
    print(f"stored {c['stored']} (train {c['train']}, val {c['val']}), unchanged "
          f"{c['stored_unchanged']}, duplicates {c['duplicates']}, near-duplicate groups "
          f"{c['near_duplicate_groups']} ({c['images_in_near_duplicate_groups']} images), "
          f"skipped {c['skipped']}")
    print(f"records size {records_bytes / 1e6:.1f} MB vs source {source_bytes / 1e6:.1f} MB "
          f"= {records_bytes / source_bytes:.2f}")


if __name__ == "__main__":
    main()
