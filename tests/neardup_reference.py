"""The all-pairs near-duplicate grouping that make_records used before
pipeline/neardup.py: kept only as the oracle of tests/test_neardup.py (and the
benchmark's comparison). Quadratic: n^2/2 distances."""
import collections

import numpy as np

from upright.pipeline import imageio


def group_near_duplicates_all_pairs(signatures, block: int = 2048, limit: float = None) -> list:
    """Groups images whose signatures are near-duplicates (transitively).

    Args:
      signatures: list of imageio.signature bytes (768 each).
      limit: imageio.near_duplicate_threshold's limit (None: NEAR_ABS, today's).
    Returns:
      list of groups, each a sorted list of indices; every index in exactly one.
    Cost: n^2/2 distances of 192-value thumbnails in float32 blocks, then an
    exact check of the candidates.
    """
    n = len(signatures)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if n > 1:
        full = np.frombuffer(b"".join(signatures), np.uint8).reshape(
            n, imageio.SIGNATURE_SIDE, imageio.SIGNATURE_SIDE, 3).astype(np.float32)
        # Candidates from 2x2-averaged 8x8 thumbnails: averaging never increases
        # the RMS difference, so every near pair passes this 4x cheaper filter.
        x = full.reshape(n, 8, 2, 8, 2, 3).mean(axis=(2, 4)).reshape(n, -1)
        dims = x.shape[1]
        # min(std_i, std_j) <= std_i: a per-row bound on the pair's threshold.
        scale = 1.0 if limit is None else limit / imageio.NEAR_ABS
        row_limit = scale * np.maximum(imageio.NEAR_ABS,
                                       imageio.NEAR_REL * full.reshape(n, -1).std(1))
        x -= 128.0    # centring keeps float32 dot products accurate
        sq = (x * x).sum(axis=1)
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            d2 = sq[lo:hi, None] + sq[None, lo:] - 2.0 * (x[lo:hi] @ x[lo:].T)
            # A small margin for float32 rounding; the exact check follows.
            bound = ((row_limit[lo:hi] + 0.5) ** 2 * dims)[:, None]
            rows, cols = np.nonzero(d2 <= bound)
            for r, c in zip(rows.tolist(), cols.tolist()):
                i, j = lo + r, lo + c
                if j > i and find(i) != find(j) and imageio.are_near_duplicates(
                        signatures[i], signatures[j], limit=limit):
                    parent[find(i)] = find(j)
    groups = collections.defaultdict(list)
    for i in range(n):
        groups[find(i)].append(i)
    return sorted(groups.values())


