"""Near-duplicate grouping at scale, on synthetic signatures.

    python benchmarks/bench_near_duplicates.py --n 100000 --n 1000000
    python benchmarks/bench_near_duplicates.py --n 20000 --all_pairs   # + the old method

Synthetic signatures with the structure of photo collections: pictures with
equal variance per octave (2x2 to 16x16: the 1/f^2 spectrum of photos), colour
mostly shared by the channels, random brightness and contrast (std 5-70
grey levels), 2 % nearly flat like blank pages; 60 % of them
alone, the others in clusters of 2 or more copies (geometric sizes, capped at
50) that differ by re-encoding-like noise (sigma 1.5 grey levels) and a small
brightness shift. Prints time, peak RSS, pairs and groups per size; the
figures go in benchmarks/README.md.
"""
import argparse
import os
import resource
import sys
import time

import numpy as np

from upright.pipeline import neardup


def synthetic_signatures(n: int, seed: int = 0) -> np.ndarray:
    """[n, 768] uint8 signatures in clusters (see the module docstring), shuffled."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 768), np.uint8)
    for lo in range(0, n, 4096):      # small chunks: the peak RSS is the grouping's
        m = min(4096, n - lo)
        bases = _pictures(rng, m)
        copies = np.where(rng.random(m) < 0.6, 1, 1 + rng.geometric(0.45, m)).clip(1, 50)
        which = np.repeat(np.arange(m), copies)[:m]         # m signatures from the first bases
        noise = rng.normal(0, 1.5, (m, 768)) + rng.normal(0, 1.0, (m, 1))
        noise[np.r_[True, which[1:] != which[:-1]]] = 0     # the base itself, untouched
        out[lo:lo + m] = np.clip(bases[which] + noise, 0, 255).astype(np.uint8)
    rng.shuffle(out)                 # in place: no second copy
    return out


def _pictures(rng, m):
    """[m, 768] float64 pictures with the statistics of photos: equal variance
    per octave (a 1/f^2 power spectrum), colour mostly shared by the channels."""
    luma = sum(_octave(rng, m, side) for side in (2, 4, 8, 16)) / 2
    chroma = 0.3 * _octave(rng, m, 2, channels=3)
    contrast = rng.uniform(5, 70, (m, 1, 1, 1))
    contrast[rng.random(m) < 0.02] = rng.uniform(0, 2)      # nearly flat: blank pages
    pictures = rng.uniform(40, 220, (m, 1, 1, 1)) + contrast * (luma + chroma)
    return pictures.reshape(m, 768)


def _octave(rng, m, side, channels=1):
    """[m, 16, 16, channels] unit-variance noise at side x side, upsampled by blocks."""
    field = rng.normal(0, 1, (m, side, side, channels))
    return field.repeat(16 // side, 1).repeat(16 // side, 2)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, action="append", help="signatures (repeatable)")
    parser.add_argument("--all_pairs", action="store_true",
                        help="also time the old all-pairs method (quadratic: keep n small)")
    args = parser.parse_args()
    for n in args.n or [100_000]:
        x = synthetic_signatures(n)
        rss_input = _peak_rss_mb()
        start, cpu = time.perf_counter(), time.process_time()
        groups = neardup.group_near_duplicates(x)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        multi = [len(g) for g in groups if len(g) > 1]
        print(f"n={n}: {seconds:.1f} s wall, {cpu:.1f} s CPU (load {os.getloadavg()[0]:.1f}), "
              f"{n / seconds:,.0f} signatures/s, peak RSS "
              f"{_peak_rss_mb():.0f} MB ({rss_input:.0f} MB after making the input), "
              f"{len(multi)} groups of >= 2 ({sum(multi)} images), "
              f"largest {max(multi, default=1)}", flush=True)
        if args.all_pairs:
            sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            from tests import neardup_reference
            start = time.perf_counter()
            old = neardup_reference.group_near_duplicates_all_pairs(list(map(bytes, x)))
            print(f"  all pairs: {time.perf_counter() - start:.1f} s, same groups: {old == groups}")


if __name__ == "__main__":
    main()
