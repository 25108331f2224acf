"""Near-duplicate grouping in sub-quadratic time, exact.

    groups = neardup.group_near_duplicates(signatures)            # [[index, ...], ...]
    i, j = neardup.near_pairs(signatures, limit=imageio.NEAR_ABS)  # every near pair, i < j

Finds exactly the pairs `imageio.are_near_duplicates` accepts, without
comparing all pairs. Why it is exact: for signatures a, b (768 uint8 values)
let d = RMS(a - b). Then
  * |std_a - std_b| <= d (centring is a projection), and
  * for the 48 block means of 4x4 pixels per channel, scaled by 1/sqrt(48),
    rotated by any orthonormal matrix (here their principal axes), the
    Euclidean distance is <= d (averaging is a projection too), so each of
    these coordinates differs by at most d as well.
A pair is near when d <= T(a, b) = min(r_a, r_b), r = the image's own radius
(`radii`). So a near pair's stds differ by at most T and its coordinates lie
within Euclidean distance T: bands on the std (band k is [e_k, e_k + r(e_k)),
so a partner of band k lies in band k or k + 1) and, per band, a k-d tree on
the first KD_DIMS coordinates with the band's largest radius see every near
pair. Candidates then pass the std and 48-coordinate bounds and finally the
exact 768-value check, and one union-find joins the groups.

Cost: about n log n plus the candidates, which depend on the data: pictures
whose variance sits in a few coarse coordinates (photos, scans) give few; a
set of unstructured noise-like signatures at one contrast would approach all
pairs (no exact method avoids that in high dimension). A cluster of m mutual
near-duplicates costs m^2 label comparisons but about m exact checks.

Local and Beam runs call the same functions.
"""
import numpy as np

from upright.pipeline import imageio

KD_DIMS = 5            # coordinates in the k-d tree (measured at 300k: 5 beats 3, 4, 6, 8)
_BLOCK = 4             # 4x4-pixel block means: 48 coordinates
_ANCHORS = 1 << 13     # anchors per k-d tree query: bounds the pairs held at once
_CHUNK = 1 << 13       # rows (or anchors) per chunk of float work: bounded memory
# Float margins: every bound below holds in exact arithmetic; the margins keep
# rounding from ever dropping a true pair (extra candidates are harmless).
_MARGIN = 1e-3


def as_array(signatures) -> np.ndarray:
    """[n, SIGNATURE_BYTES] uint8 from a list of signature bytes (or such an array)."""
    if isinstance(signatures, np.ndarray):
        return signatures.reshape(len(signatures), imageio.SIGNATURE_BYTES)
    if not len(signatures):
        return np.zeros((0, imageio.SIGNATURE_BYTES), np.uint8)
    return np.frombuffer(b"".join(signatures), np.uint8).reshape(
        len(signatures), imageio.SIGNATURE_BYTES)


def radii(std: np.ndarray, limit: float) -> np.ndarray:
    """Per-image radius r: the pair threshold is min(r_a, r_b) (float64 [n]).

    Equal to imageio.near_duplicate_threshold(s, s, limit) because that
    threshold grows with the smaller std.
    """
    return (limit / imageio.NEAR_ABS) * np.maximum(imageio.NEAR_ABS, imageio.NEAR_REL * std)


def features(x: np.ndarray):
    """(std float64 [n], coordinates float32 [n, 48]) of signatures x [n, 768] uint8.

    Coordinates: the 4x4-block means per channel / sqrt(48), centred and rotated
    onto their principal axes (largest variance first); any two images'
    coordinate distance is <= their RMS signature distance.
    """
    n, cells = len(x), imageio.SIGNATURE_SIDE // _BLOCK
    std = np.empty(n)
    q = np.empty((n, cells * cells * 3), np.float32)
    for lo in range(0, n, _CHUNK):
        part = x[lo:lo + _CHUNK]
        std[lo:lo + _CHUNK] = part.std(axis=1)    # the same float64 std as imageio
        blocks = part.reshape(-1, cells, _BLOCK, cells, _BLOCK, 3).mean(axis=(2, 4))
        q[lo:lo + _CHUNK] = blocks.reshape(len(part), -1) / np.sqrt(q.shape[1])
    if n > 1:
        q -= q.mean(axis=0)
        scatter = sum(part.T.astype(np.float64) @ part for part in np.split(
            q, range(_CHUNK, n, _CHUNK)))     # q^T q by chunks: no float64 copy of q
        _, axes = np.linalg.eigh(scatter)
        for lo in range(0, n, _CHUNK):        # rotated in place, largest variance first
            q[lo:lo + _CHUNK] = q[lo:lo + _CHUNK] @ axes[:, ::-1].astype(np.float32)
    return std, q


def band_edges(max_std: float, limit: float) -> np.ndarray:
    """Std band edges e_0 = 0 < e_1 < ...: e_{k+1} = e_k + r(e_k), past max_std.

    Band k+1 is at least as wide as the largest radius in band k, so a near
    partner of an image in band k lies in band k or k+1. Bands are at least
    1/256 of the range wide: a tiny limit must not make millions of them.
    """
    edges, least = [0.0], (max_std + 1.0) / 256
    while edges[-1] <= max_std:
        edges.append(edges[-1] + max(least, float(radii(np.array([edges[-1]]), limit)[0])))
    return np.array(edges)


def near_pairs(signatures, *, limit: float = imageio.NEAR_ABS):
    """Every pair (i < j) with imageio.are_near_duplicates(s_i, s_j, limit).

    Args:
      signatures: n signatures (bytes of SIGNATURE_BYTES each, or uint8 [n, 768]).
      limit: threshold in grey levels (see imageio.near_duplicate_threshold);
        0 (or less) finds no pairs: grouping off.
    Returns:
      (i, j): int64 arrays, sorted by (i, j), no repeats.
    """
    x = as_array(signatures)
    found = list(_scan(x, limit))
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    i, j = np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])
    code = np.unique(np.minimum(i, j) * len(x) + np.maximum(i, j))
    return code // len(x), code % len(x)


def _scan(x, limit, labels=None):
    """Yields (i, j) arrays of near pairs, std band by std band.

    With `labels` (int64 [n], component labels, updated in place) candidates
    already in one component skip the checks and found pairs join their
    components at once: a dense cluster of m images then costs m^2 label
    comparisons but about m exact checks. Without, every near pair is yielded.
    """
    if limit <= 0 or len(x) < 2:
        return
    std, coords = features(x)
    radius = radii(std, limit)
    for a, b in _candidates(std, coords, limit):
        if labels is not None:
            keep = labels[a] != labels[b]
            a, b = a[keep], b[keep]
        a, b = _check(x, std, coords, radius, a, b, limit)
        if labels is not None:
            _union(labels, a, b)
        yield a, b


def _candidates(std, coords, limit):
    """Yields candidate pairs (i, j): every near pair once, as (i, j) or (j, i).

    Band k of the std (edges e_k, see band_edges) meets itself and the later
    images within its largest radius w (a near partner's std differs by at
    most the pair's threshold); among those, a k-d tree on the first KD_DIMS
    coordinates finds the pairs within Euclidean distance w, a lower bound of
    their RMS signature distance.
    """
    from scipy import spatial
    edges = band_edges(float(std.max()), limit)
    order = np.argsort(std, kind="stable")
    ends = np.searchsorted(std[order], edges, side="left")
    for k in range(len(edges) - 1):
        if ends[k] == ends[k + 1]:
            continue
        width = float(radii(np.array([edges[k + 1]]), limit)[0]) * (1 + _MARGIN) + _MARGIN
        reach = np.searchsorted(std[order], edges[k + 1] + width, side="right")
        partners = order[ends[k]:reach]
        tree = spatial.cKDTree(coords[partners, :KD_DIMS])
        for lo in range(ends[k], ends[k + 1], _ANCHORS):
            anchors = order[lo:min(lo + _ANCHORS, ends[k + 1])]
            found = spatial.cKDTree(coords[anchors, :KD_DIMS]).sparse_distance_matrix(
                tree, width, output_type="ndarray")
            a, b = anchors[found["i"]], partners[found["j"]]
            # Pairs inside the band come twice: keep them once.
            keep = (std[b] >= edges[k + 1]) | (a < b)
            yield a[keep], b[keep]


def _check(x, std, coords, radius, a, b, limit):
    """The near pairs among candidates (a, b): the bounds, then the exact test."""
    threshold = np.minimum(radius[a], radius[b])
    ok = np.abs(std[a] - std[b]) <= threshold + _MARGIN
    # 16 coordinates (one 64-byte cache line per image) drop most candidates
    # before all 48 are read.
    for dims in (16, coords.shape[1]):
        a, b, threshold = a[ok], b[ok], threshold[ok]
        ok = _within(coords, dims, a, b, threshold)
    a, b, threshold = a[ok], b[ok], threshold[ok]
    near = np.empty(len(a), bool)
    for lo in range(0, len(a), _CHUNK):
        d = x[a[lo:lo + _CHUNK]].astype(np.int32) - x[b[lo:lo + _CHUNK]]
        # Integer sum of squares, one division, one sqrt: imageio's float64 value.
        dist = np.sqrt((d * d).sum(1) / float(x.shape[1]))
        near[lo:lo + _CHUNK] = dist <= threshold[lo:lo + _CHUNK]
        # A tie within rounding: imageio's own function decides.
        for t in np.flatnonzero(np.abs(dist - threshold[lo:lo + _CHUNK]) < 1e-9):
            near[lo + t] = imageio.are_near_duplicates(
                x[a[lo + t]].tobytes(), x[b[lo + t]].tobytes(), limit=limit)
    return a[near], b[near]


def _within(coords, dims, a, b, threshold):
    """bool [m]: the first `dims` coordinates of a[k], b[k] lie within threshold[k]."""
    ok = np.empty(len(a), bool)
    for lo in range(0, len(a), 8 * _CHUNK):
        part = slice(lo, lo + 8 * _CHUNK)
        d = coords[a[part], :dims] - coords[b[part], :dims]
        ok[part] = np.einsum("ij,ij->i", d, d) <= (threshold[part] + _MARGIN) ** 2
    return ok


def components(n: int, i, j) -> np.ndarray:
    """Connected components of n nodes joined by edges (i[k], j[k]).

    Returns int64 [n]: each node's label, the smallest node of its component.
    """
    labels = np.arange(n, dtype=np.int64)
    _union(labels, i, j)
    return labels


def _union(labels: np.ndarray, i, j) -> None:
    """Joins the components of edges (i[k], j[k]) in `labels` (in place).

    labels: int64 [n], every entry a root (labels[r] == r) whose index is the
    smallest of its component. Vectorised union-find: hook each edge's larger
    root under the smaller one, compress paths, repeat until every edge lies
    inside one component.
    """
    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    while len(i):
        li, lj = labels[i], labels[j]
        apart = li != lj
        i, j, li, lj = i[apart], j[apart], li[apart], lj[apart]
        if not len(i):
            return
        np.minimum.at(labels, np.maximum(li, lj), np.minimum(li, lj))
        while True:
            up = labels[labels]
            if np.array_equal(up, labels):
                break
            labels[:] = up


def groups_of(labels: np.ndarray) -> list:
    """Component labels [n] -> groups: sorted lists of indices, ordered by first member."""
    order = np.argsort(labels, kind="stable")
    cuts = np.flatnonzero(np.diff(labels[order])) + 1
    return [part.tolist() for part in np.split(order, cuts)] if len(labels) else []


def group_near_duplicates(signatures, *, limit: float = imageio.NEAR_ABS) -> list:
    """Groups images whose signatures are near-duplicates (transitively).

    Args:
      signatures: n signatures (bytes of SIGNATURE_BYTES each, or uint8 [n, 768]).
      limit: threshold in grey levels (imageio.NEAR_ABS = today's); 0: no grouping.
    Returns:
      list of groups, each a sorted list of indices; every index in exactly one;
      ordered by first member.
    """
    x = as_array(signatures)
    labels = np.arange(len(x), dtype=np.int64)
    for _ in _scan(x, limit, labels):
        pass
    return groups_of(labels)
