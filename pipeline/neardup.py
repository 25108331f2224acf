"""Near-duplicate grouping in sub-quadratic time, exact.

    groups = neardup.group_near_duplicates(signatures)            # [[index, ...], ...]
    i, j = neardup.near_pairs(signatures, limit=imageio.NEAR_ABS)  # every near pair, i < j

Finds exactly the pairs `imageio.are_near_duplicates` accepts, without
comparing all pairs. Why it is exact: for signatures a, b (768 uint8 values)
let d = RMS(a - b). Then
  * |std_a - std_b| <= d (centring is a projection), and
  * the 48 block means of 4x4 pixels per channel, scaled by 1/sqrt(48) and
    rotated by any orthonormal matrix (here their principal axes), and the
    "detail" (RMS of the signature minus its block means) split the
    signature into orthogonal parts, so |coords_a - coords_b|^2 +
    (detail_a - detail_b)^2 <= d^2: any subset of these coordinates lies
    within Euclidean distance d as well (`features`).
A pair is near when d <= T(a, b) = min(r_a, r_b), r = the image's own radius
(`radii`). So a near pair's stds differ by at most T, and its coordinates
lie within Euclidean distance T <= r_a of each other. Images are laid out
by std band (band k is [e_k, e_k + r(e_k)) plus a float margin, so a partner
of band k lies in band k or k + 1), then by the first coordinate; each run
of anchors queries a k-d tree over the partners within reach along that
coordinate: on 8 coordinates with each anchor's own radius, or, in
low-contrast bands, on 12 with the band's largest. Candidates then pass the
std bound, the 16- and 48-coordinate bounds (with the detail) and finally
the exact 768-value check, and one union-find joins the groups.

Cost: about n log n plus the candidates, which depend on the data: pictures
whose variance sits in a few coarse coordinates (photos, scans) give few; a
set of unstructured noise-like signatures at one contrast would approach all
pairs (no exact method avoids that in high dimension). A cluster of m mutual
near-duplicates costs m^2 label comparisons (and near_pairs returns its m^2
pairs) but about m exact checks (`_join`). Measured: benchmarks/README.md,
"Near-duplicate grouping".

Local and Beam runs call the same functions.
"""
import itertools

import numpy as np

from upright.pipeline import imageio

_BLOCK = 4             # 4x4-pixel block means: 48 coordinates
_ANCHORS = 1 << 13     # most anchors per k-d tree query
# A band's first run: small, because a dense band has thousands of pairs per
# anchor (8192 of them made 16M pairs, 1 GB, at 1M); runs then grow 4x at most.
_FIRST_RUN = 1 << 9
_PAIRS = 1 << 20       # tree pairs aimed at per query: bounds the memory held at once
_CHUNK = 1 << 13       # rows per chunk of float work: bounded memory
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


def _width(std: float, limit: float) -> float:
    """The radius at `std` plus the float margin: the reach of a band's search."""
    return float(radii(np.array([std]), limit)[0]) * (1 + _MARGIN) + _MARGIN


def _pool_matrix() -> np.ndarray:
    """float32 [768, 48]: 1 where a signature value lies in a 4x4 block of its channel."""
    side, cells = imageio.SIGNATURE_SIDE, imageio.SIGNATURE_SIDE // _BLOCK
    row, col, channel = np.indices((side, side, 3)).reshape(3, -1)
    pool = np.zeros((side * side * 3, cells * cells * 3), np.float32)
    pool[np.arange(len(row)), ((row // _BLOCK) * cells + col // _BLOCK) * 3 + channel] = 1
    return pool


def features(x: np.ndarray):
    """(std float64 [n], coordinates float32 [n, 48], detail float64 [n]) of
    signatures x [n, 768] uint8.

    Coordinates: the 4x4-block means per channel / sqrt(48), centred and rotated
    onto their principal axes (largest variance first). Detail: the RMS of the
    signature minus its block means (the part the coordinates miss; its
    square is std^2 minus the block means' variance). The two parts are
    orthogonal, so for any two images |coordinates_a - coordinates_b|^2 +
    (detail_a - detail_b)^2 <= their RMS signature distance^2.
    """
    import concurrent.futures
    n, pool = len(x), _pool_matrix()
    std, detail = np.empty(n), np.empty(n)
    q = np.empty((n, pool.shape[1]), np.float32)

    def chunk(lo):
        part, rows = x[lo:lo + _CHUNK], slice(lo, lo + _CHUNK)
        std[rows] = part.std(axis=1)    # the same float64 std as imageio
        # Block sums are integers below 2^24: exact in float32, and one BLAS call.
        q[rows] = part.astype(np.float32) @ pool
        means = q[rows] / np.float64(_BLOCK * _BLOCK)
        spread = ((means - means.mean(1, keepdims=True)) ** 2).mean(1)
        detail[rows] = np.sqrt(np.maximum(std[rows] ** 2 - spread, 0))

    # Chunks write disjoint rows; numpy and BLAS release the GIL: both cores.
    with concurrent.futures.ThreadPoolExecutor(2) as threads:
        list(threads.map(chunk, range(0, n, _CHUNK)))
    q *= 1 / (_BLOCK * _BLOCK * np.sqrt(q.shape[1]))
    if n > 1:
        # The axes need only be orthonormal, not exact: float32 BLAS suffices.
        q -= q.mean(axis=0)
        _, axes = np.linalg.eigh((q.T @ q).astype(np.float64))
        axes = np.ascontiguousarray(axes[:, ::-1], np.float32)   # largest variance first
        for lo in range(0, n, _CHUNK):        # rotated in place
            q[lo:lo + _CHUNK] = q[lo:lo + _CHUNK] @ axes
    return std, q, detail


def band_edges(max_std: float, limit: float) -> np.ndarray:
    """Std band edges e_0 = 0 < e_1 < ...: e_{k+1} = e_k + width(e_k), past max_std.

    width = the radius plus the float margin (_width). Band k+1 is at least as
    wide as the largest radius in band k, so a near partner of an image in
    band k lies in band k or k+1. Bands are at least 1/256 of the range wide:
    a tiny limit must not make millions of them.
    """
    edges, least = [0.0], (max_std + 1.0) / 256
    while edges[-1] <= max_std:
        edges.append(edges[-1] + max(least, _width(edges[-1], limit)))
    return np.array(edges)


class _Layout:
    """The images in search order: by std band, then by the first coordinate.

    order: int64 [n], position -> original index; std, radius, detail: float64
    [n] and coords: float32 [n, 48] in that order (see features); starts: int64 [bands + 1], band k
    holds positions starts[k]:starts[k + 1]; edges: the bands' std edges.
    Sorting by the first coordinate within a band lets each query take only
    the partners within reach along it, and keeps its reads close together.
    """

    def __init__(self, x, limit):
        std, coords, detail = features(x)
        self.edges = band_edges(float(std.max()), limit)
        band = np.searchsorted(self.edges, std, side="right") - 1
        self.order = np.lexsort((coords[:, 0], band))
        self.std, self.coords = std[self.order], coords[self.order]
        self.detail = detail[self.order]
        del coords, detail
        self.radius = radii(self.std, limit)
        self.starts = np.searchsorted(band[self.order], np.arange(len(self.edges)))


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
    if limit <= 0 or len(x) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    layout = _Layout(x, limit)
    found = [(layout.order[a], layout.order[b]) for a, b in _scan(x, layout, limit)]
    i = np.concatenate([f[0] for f in found] + [np.zeros(0, np.int64)])
    j = np.concatenate([f[1] for f in found] + [np.zeros(0, np.int64)])
    code = np.unique(np.minimum(i, j) * len(x) + np.maximum(i, j))
    return code // len(x), code % len(x)


def _scan(x, layout, limit, labels=None, bands=None):
    """Yields (a, b) arrays of near pairs as layout positions, query by query.

    With `labels` (int64 [n] over positions, updated in place) the pairs join
    their components as they are found (_join), and pairs already inside one
    component may be skipped; without, every near pair is yielded.
    bands: the band numbers to search (default all).
    """
    for k in range(len(layout.edges) - 1) if bands is None else bands:
        for a, b in _band_candidates(layout, k, limit):
            if labels is None:
                yield _check(x, layout, a, b, limit)
            else:
                yield from _join(x, layout, a, b, limit, labels)


def _join(x, layout, a, b, limit, labels):
    """Checks candidates (a, b) in rounds, joining each round's near pairs
    before the next: candidates then inside one component are dropped
    unchecked. Round g takes the pairs at most 8^g positions apart: images
    sorted by the first coordinate sit next to their closest partners, so in a
    dense cluster of m images (m^2 candidates) the first rounds join it with
    about m exact checks, and the later ones only compare labels."""
    gap, reach = b - a, 1
    while len(a):
        keep = labels[a] != labels[b]
        a, b, gap = a[keep], b[keep], gap[keep]
        now = gap <= reach
        near = _check(x, layout, a[now], b[now], limit)
        _union(labels, *near)
        yield near
        a, b, gap, reach = a[~now], b[~now], gap[~now], 8 * reach


def _dense(top: float, width: float) -> bool:
    """Whether a band with std up to `top` and radius `width` is low-contrast.

    The coordinates' spread grows with the std: under 3 radii, each axis
    prunes little, so the tree takes more axes (12, not 8: 3-9x fewer
    candidates at 1M) and one radius per query (a dual-tree query beats one
    query per anchor when each has hundreds of candidates).
    """
    return top < 3 * width


def _band_candidates(layout, k, limit):
    """Yields candidate pairs (a < b, positions) of band k: every near pair of
    an image in band k with one in band k or k + 1, once.

    A near pair's stds differ by at most its threshold, at most the band's
    largest radius plus the margin (`width`), so partners lie in band k or
    k + 1 (band_edges); its coordinates lie within Euclidean distance
    min(r_a, r_b) <= r_a: a k-d tree over the first few coordinates of the
    partners within `width` along the first returns them. Anchors go in runs
    sized to keep about _PAIRS pairs per query (from _FIRST_RUN anchors).
    """
    width = _width(layout.edges[k + 1], limit)
    lo, end = layout.starts[k], layout.starts[k + 1]
    after = layout.starts[min(k + 2, len(layout.starts) - 1)]
    first, size = layout.coords[:, 0], _FIRST_RUN
    while lo < end:
        hi = min(lo + size, end)
        low, high = first[lo] - width, first[hi - 1] + width
        later = first[end:after]
        partners = np.concatenate([
            np.arange(lo, lo + np.searchsorted(first[lo:end], high, side="right")),
            end + np.arange(np.searchsorted(later, low, side="left"),
                            np.searchsorted(later, high, side="right"))])
        a, b = _tree_pairs(layout, lo, hi, partners, width, _dense(layout.edges[k + 1], width))
        yield a[a < b], b[a < b]       # pairs within the run come twice (and self-pairs)
        size = max(1, min(_ANCHORS, 4 * size, int(size * _PAIRS / max(len(a), 1))))
        lo = hi


def _tree_pairs(layout, lo, hi, partners, width, dense):
    """(a, b): anchors lo..hi-1 and the partners within their radius on the
    tree's axes (dense: all within `width`, on 12 axes; else each anchor's
    own radius, on 8)."""
    from scipy import spatial
    dims = 12 if dense else 8
    anchors = layout.coords[lo:hi, :dims]
    if dense:
        tree = spatial.cKDTree(layout.coords[partners, :dims])
        found = spatial.cKDTree(anchors).sparse_distance_matrix(tree, width, output_type="ndarray")
        return lo + found["i"], partners[found["j"]]
    # Leaves of 64, not 16: 25-40 % less CPU per query here (measured at 1M).
    tree = spatial.cKDTree(layout.coords[partners, :dims], leafsize=64)
    reach = layout.radius[lo:hi] * (1 + _MARGIN) + _MARGIN
    lists = tree.query_ball_point(anchors, reach, return_sorted=False, workers=2)
    counts = np.fromiter(map(len, lists), np.int64, len(lists))
    b = np.fromiter(itertools.chain.from_iterable(lists), np.int64, counts.sum())
    return np.repeat(np.arange(lo, hi), counts), partners[b]


def _check(x, layout, a, b, limit):
    """The near pairs among candidates (a, b): the bounds, then the exact test."""
    std, coords, radius = layout.std, layout.coords, layout.radius
    threshold = np.minimum(radius[a], radius[b])
    ok = np.abs(std[a] - std[b]) <= threshold + _MARGIN
    # 16 coordinates (one 64-byte cache line per image) drop most candidates
    # before all 48 and the detail are read.
    a, b, threshold = a[ok], b[ok], threshold[ok]
    ok = _within(coords, 16, a, b, threshold)
    a, b, threshold = a[ok], b[ok], threshold[ok]
    ok = _within(coords, coords.shape[1], a, b, threshold, layout.detail)
    a, b, threshold = a[ok], b[ok], threshold[ok]
    near = np.empty(len(a), bool)
    for lo in range(0, len(a), _CHUNK):
        rows_a, rows_b = x[layout.order[a[lo:lo + _CHUNK]]], x[layout.order[b[lo:lo + _CHUNK]]]
        d = rows_a.astype(np.int32) - rows_b
        # Integer sum of squares, one division, one sqrt: imageio's float64 value.
        dist = np.sqrt((d * d).sum(1) / float(x.shape[1]))
        near[lo:lo + _CHUNK] = dist <= threshold[lo:lo + _CHUNK]
        # A tie within rounding: imageio's own function decides.
        for t in np.flatnonzero(np.abs(dist - threshold[lo:lo + _CHUNK]) < 1e-9):
            near[lo + t] = imageio.are_near_duplicates(
                rows_a[t].tobytes(), rows_b[t].tobytes(), limit=limit)
    return a[near], b[near]


def _within(coords, dims, a, b, threshold, detail=None):
    """bool [m]: the first `dims` coordinates of a[k], b[k] (and their detail,
    if given) lie within Euclidean distance threshold[k]."""
    ok = np.empty(len(a), bool)
    for lo in range(0, len(a), 8 * _CHUNK):
        part = slice(lo, lo + 8 * _CHUNK)
        d = coords[a[part], :dims] - coords[b[part], :dims]
        square = np.einsum("ij,ij->i", d, d, dtype=np.float64)
        if detail is not None:
            square += (detail[a[part]] - detail[b[part]]) ** 2
        ok[part] = square <= (threshold[part] + _MARGIN) ** 2
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
    if limit <= 0 or len(x) < 2:
        return groups_of(np.arange(len(x)))
    layout = _Layout(x, limit)
    labels = _band_labels(x, layout, limit)
    # Label each image by its component's smallest original index.
    smallest = np.full(len(x), len(x), np.int64)
    np.minimum.at(smallest, labels, layout.order)
    original = np.empty(len(x), np.int64)
    original[layout.order] = smallest[labels]
    return groups_of(original)


def _band_labels(x, layout, limit, threads: int = 2) -> np.ndarray:
    """Component labels (int64 [n], over layout positions) of all near pairs.

    The bands are independent: `threads` threads take them largest first,
    each joining its pairs in its own labels (the k-d queries and most numpy
    work release the GIL, so both cores work), and the labels are merged.
    """
    import concurrent.futures
    import threading
    sizes = np.diff(layout.starts)
    todo, lock = iter(np.argsort(-sizes, kind="stable").tolist()), threading.Lock()

    def work():
        labels = np.arange(len(x), dtype=np.int64)
        while True:
            with lock:
                k = next(todo, None)
            if k is None:
                return labels
            for _ in _scan(x, layout, limit, labels, bands=[k]):
                pass

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        parts = [pool.submit(work) for _ in range(threads)]
        parts = [part.result() for part in parts]
    for other in parts[1:]:       # node p joins its root in the other labels
        _union(parts[0], np.arange(len(x)), other)
    return parts[0]
