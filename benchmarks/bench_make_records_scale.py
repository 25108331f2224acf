"""make_records at scale on small synthetic images: launcher memory, scratch disk, rate.

    python benchmarks/bench_make_records_scale.py --n 100000 --work /tmp/scale [--workers 2]
    python benchmarks/bench_make_records_scale.py --n 100000 --work /tmp/scale --runner beam \
        --beam_pipeline_options="--direct_num_workers=2 --direct_running_mode=multi_processing"

Writes --n synthetic 64x64 JPEGs (photo-like pictures, a third of them
re-encoded copies of others; see bench_near_duplicates.synthetic_signatures'
pictures) into WORK/src once (kept for reruns), then runs records.make_records
in this process (the launcher) into WORK/out and prints wall time, images/s,
CPU seconds per image (launcher + reader processes), the launcher's peak RSS
(reader processes excluded) and the largest size the scratch file reached
(sampled every 0.2 s). Figures go in benchmarks/README.md.
"""
import argparse
import glob
import io
import os
import resource
import shlex
import tempfile
import threading
import time

import numpy as np
from PIL import Image

import bench_near_duplicates
from upright.pipeline import records


def make_folder(src: str, n: int, seed: int = 0):
    """n JPEGs of 64x64 in 100 subfolders; skips the work when they exist."""
    if os.path.exists(os.path.join(src, "done")):
        return
    rng = np.random.default_rng(seed)
    for lo in range(0, n, 1000):
        m = min(1000, n - lo)
        small = bench_near_duplicates._pictures(rng, m).reshape(m, 16, 16, 3)
        for k in range(m):
            if k == 0 or rng.random() > 1 / 3:   # else: picture k - 1 at another quality
                picture = np.clip(small[k], 0, 255).astype(np.uint8).repeat(4, 0).repeat(4, 1)
            folder = os.path.join(src, f"{(lo + k) % 100:02d}")
            os.makedirs(folder, exist_ok=True)
            buffer = io.BytesIO()
            Image.fromarray(picture).save(buffer, "JPEG", quality=int(rng.integers(70, 96)))
            with open(os.path.join(folder, f"{lo + k:07d}.jpg"), "wb") as f:
                f.write(buffer.getvalue())
    open(os.path.join(src, "done"), "w").close()


def watch_scratch(path: str, peak: list, stop: threading.Event):
    """peak[0]: the scratch file's largest size; peak[1]: the Beam temp folders' (the
    workers' store files, shard plans and metadata, under the system temp folder)."""
    pattern = os.path.join(tempfile.gettempdir(), "make_records_beam_*", "**")
    while not stop.wait(0.2):
        try:
            peak[0] = max(peak[0], os.path.getsize(path))
        except OSError:
            pass
        peak[1] = max(peak[1], sum(_size(p) for p in glob.glob(pattern, recursive=True)
                                   if os.path.isfile(p)))


def _size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def cpu_seconds():
    own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--work", required=True)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--runner", default="local", choices=records.RUNNERS)
    parser.add_argument("--beam_pipeline_options", default="",
                        help='e.g. "--direct_num_workers=2 --direct_running_mode=multi_processing"')
    args = parser.parse_args()
    src, out = os.path.join(args.work, "src"), os.path.join(args.work, "out")
    start = time.perf_counter()
    make_folder(src, args.n)
    print(f"folder: {time.perf_counter() - start:.0f} s", flush=True)
    peak, stop = [0, 0], threading.Event()
    threading.Thread(target=watch_scratch, daemon=True, args=(
        os.path.join(out, records.SCRATCH_FILE), peak, stop)).start()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start, cpu = time.perf_counter(), cpu_seconds()
    info = records.make_records(src=src, out=out, workers=args.workers, progress=False,
                                overwrite=True, runner=args.runner,
                                beam_options=shlex.split(args.beam_pipeline_options))
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    stop.set()
    c = info["counts"]
    print(f"n={args.n} {args.runner} {args.beam_pipeline_options}, workers={args.workers or 'all'}: "
          f"{seconds:.0f} s wall, "
          f"{c['candidates'] / seconds:.0f} img/s, {1000 * cpu / c['candidates']:.1f} ms CPU/img, "
          f"launcher peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB "
          f"({rss_before:.0f} MB before), scratch peak {peak[0] / 1e6:.0f} MB, "
          f"Beam temp peak {peak[1] / 1e6:.0f} MB, "
          f"stored {c['stored']}, near-duplicate groups {c['near_duplicate_groups']}, "
          f"largest group {c['largest_group']}, load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
