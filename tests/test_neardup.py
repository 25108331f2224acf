"""pipeline/neardup.py: the sub-quadratic grouping finds exactly what all pairs find.

The oracles: imageio.are_near_duplicates over every pair (the pairs), and the
all-pairs grouping make_records used before (tests/neardup_reference.py: the
groups), on random and adversarial inputs: copies straddling the threshold,
dense clusters, chains, flat pictures, pairs exactly at the threshold and
across std bands, other thresholds.
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tests import neardup_reference
from upright.pipeline import imageio, neardup


def all_pairs(x, limit=imageio.NEAR_ABS):
    """Every (i, j), i < j, that imageio.are_near_duplicates accepts."""
    sigs = [row.tobytes() for row in x]
    return [(i, j) for i in range(len(x)) for j in range(i + 1, len(x))
            if imageio.are_near_duplicates(sigs[i], sigs[j], limit=limit)]


def assert_same_as_all_pairs(x, limit=imageio.NEAR_ABS):
    i, j = neardup.near_pairs(x, limit=limit)
    expected = all_pairs(x, limit)
    assert list(zip(i.tolist(), j.tolist())) == expected
    groups = neardup.group_near_duplicates(x, limit=limit)
    assert groups == neardup_reference.group_near_duplicates_all_pairs(
        [row.tobytes() for row in x], limit=limit)
    return expected, groups


def pictures(rng, n, contrast):
    """[n, 768] int64 smooth pictures: a 4x4 colour field upsampled, given contrast."""
    field = rng.normal(0, 1, (n, 4, 4, 3)).repeat(4, 1).repeat(4, 2).reshape(n, 768)
    return rng.uniform(60, 190, (n, 1)) + contrast * field


def copies(rng, base, noise):
    """base [n, 768] plus Gaussian noise of the given sigma, as uint8."""
    return np.clip(np.rint(base + rng.normal(0, noise, base.shape)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("seed", range(3))
def test_random_pictures_with_copies_straddling_the_threshold(seed):
    rng = np.random.default_rng(seed)
    base = pictures(rng, 40, rng.uniform(2, 60, (40, 1)))
    # Noise from far below to far above the threshold (4 grey levels, more
    # for contrasty pictures): some copies are near, some not.
    x = np.concatenate([copies(rng, base, 0)] +
                       [copies(rng, base[k % 2::2], s) for k, s in enumerate((1, 3, 5, 9))])
    pairs, groups = assert_same_as_all_pairs(x[rng.permutation(len(x))])
    assert 20 < len(pairs) and any(len(g) > 2 for g in groups)


def test_dense_cluster_of_noisy_copies_is_one_group():
    """The issue's folder: one template, many copies differing by noise and a
    marker; every pair is near, so the m^2 candidates must still give one group."""
    rng = np.random.default_rng(7)
    template = pictures(rng, 1, 30.0)
    x = np.repeat(template, 150, 0).reshape(150, 16, 16, 3)
    for k in range(150):                                   # a marker moving along the rows
        x[k, k % 16, (k // 16) % 16] += 40
    x = copies(rng, x.reshape(150, 768), 1.5)
    pairs, groups = assert_same_as_all_pairs(x)
    assert groups == [list(range(150))]


def test_flat_pictures_chain_transitively():
    """Blank pages 3 grey levels apart: each near only to its neighbours, one chain."""
    levels = np.arange(20, 240, 3)
    x = np.repeat(levels[:, None], 768, 1).astype(np.uint8)
    pairs, groups = assert_same_as_all_pairs(x)
    assert len(pairs) == len(levels) - 1 and groups == [list(range(len(levels)))]


def test_pairs_at_exactly_the_threshold_and_across_std_bands():
    rng = np.random.default_rng(3)
    flat = np.full((1, 768), 100, np.int64)
    # RMS exactly 4.0 (near, on the boundary) and sqrt(17) = 4.12 (not near).
    at, past = flat + 4, flat + np.where(np.arange(768) % 2, 3, -5)[None]
    sigs = [flat, at, past]
    # Contrasty pictures with stds around the band edges 16, 20, 24, 28.8 and
    # copies whose std falls in the next band.
    for std in (15.9, 19.95, 20.05, 24.0, 28.7, 28.9):
        base = pictures(rng, 1, 1.0)
        base = 128 + (base - base.mean()) * std / base.std()
        sigs += [base, base * 1.04 - 5, base * 0.97 + 2, base * 1.1]
    x = np.clip(np.rint(np.concatenate(sigs)), 0, 255).astype(np.uint8)
    pairs, _ = assert_same_as_all_pairs(x)
    assert (0, 1) in pairs and (0, 2) not in pairs


@pytest.mark.parametrize("limit", [1e-9, 0.5, 2.0, 10.0, 30.0])
def test_other_thresholds(limit):
    rng = np.random.default_rng(int(limit * 10))
    base = pictures(rng, 30, rng.uniform(1, 50, (30, 1)))
    x = np.concatenate([copies(rng, base, 0), copies(rng, base, 2), copies(rng, base, 6)])
    assert_same_as_all_pairs(x, limit)


def test_threshold_zero_turns_grouping_off():
    x = np.zeros((3, 768), np.uint8)                  # even identical signatures
    assert neardup.near_pairs(x, limit=0)[0].tolist() == []
    assert neardup.group_near_duplicates(x, limit=0) == [[0], [1], [2]]


def test_small_and_bytes_inputs():
    assert neardup.group_near_duplicates([]) == []
    sig = bytes(range(256)) * 3
    assert neardup.group_near_duplicates([sig]) == [[0]]
    assert neardup.group_near_duplicates([sig, sig, bytes(768)]) == [[0, 1], [2]]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(0, 2**32 - 1), st.integers(2, 60), st.floats(0.5, 8.0))
def test_property_same_groups_as_all_pairs(seed, n, noise):
    """Any mix of few bases, contrasts and changes: per-pixel noise, brightness
    shifts and smooth gradients (changes that sit in the coarse coordinates
    the search uses, up to the threshold and past it): same pairs and groups."""
    rng = np.random.default_rng(seed)
    bases = pictures(rng, rng.integers(1, 6), rng.uniform(0, 70, (1, 1)))
    x = bases[rng.integers(0, len(bases), n)]
    ramp = np.linspace(-1, 1, 16)[None, :, None, None].repeat(16, 2).repeat(3, 3)
    x = x + rng.uniform(-noise, noise, (n, 1)) + (
        rng.uniform(-noise, noise, (n, 1, 1, 1)) * ramp).reshape(n, 768)
    assert_same_as_all_pairs(copies(rng, x, rng.uniform(0, noise / 2, (n, 1))))


def test_components_labels_are_the_smallest_member():
    labels = neardup.components(7, [5, 1, 3, 6], [1, 3, 4, 6])
    assert labels.tolist() == [0, 1, 2, 1, 1, 1, 6]
    assert neardup.groups_of(labels) == [[0], [1, 3, 4, 5], [2], [6]]
    # A long chain given backwards needs several hooking rounds.
    n = 1000
    labels = neardup.components(n, np.arange(n - 1)[::-1], np.arange(1, n)[::-1])
    assert (labels == 0).all()


def test_all_identical_and_tiny_inputs():
    x = np.full((60, 768), 77, np.uint8)
    pairs, groups = assert_same_as_all_pairs(x)
    assert len(pairs) == 60 * 59 // 2 and groups == [list(range(60))]
    for n in (0, 1):
        i, j = neardup.near_pairs(np.zeros((n, 768), np.uint8))
        assert i.dtype == j.dtype == np.int64 and len(i) == len(j) == 0
        assert neardup.group_near_duplicates(np.zeros((n, 768), np.uint8)) == [[0]][:n]


def test_the_bounds_never_exceed_the_distance():
    """The search's exactness rests on two bounds for every pair:
    |std_a - std_b| <= d and |coords_a - coords_b|^2 + (detail_a - detail_b)^2
    <= d^2 (d: the RMS signature distance). Checked on pictures, noise,
    flat and saturated signatures."""
    rng = np.random.default_rng(11)
    x = np.concatenate([copies(rng, pictures(rng, 100, rng.uniform(0, 80, (100, 1))), 3),
                        rng.integers(0, 256, (100, 768)).astype(np.uint8),
                        np.repeat(np.arange(0, 256, 5, dtype=np.uint8)[:, None], 768, 1)])
    std, coords, detail = neardup.features(x)
    a, b = rng.integers(0, len(x), (2, 5000))
    d = np.sqrt(((x[a].astype(np.int64) - x[b]) ** 2).mean(1))
    bound = np.sqrt(((coords[a].astype(np.float64) - coords[b]) ** 2).sum(1)
                    + (detail[a] - detail[b]) ** 2)
    assert (np.abs(std[a] - std[b]) <= d + 1e-9).all()
    assert (bound <= d + 1e-4).all() and (bound > 0.5 * d).mean() > 0.5


@settings(max_examples=15, deadline=None, derandomize=True)
@given(st.integers(0, 2**32 - 1), st.integers(2, 80))
def test_property_small_queries_same_as_all_pairs(seed, n):
    """Tiny query runs (many runs per band, partners cut along the first
    coordinate, runs resized after every query) on dense and sparse data."""
    rng = np.random.default_rng(seed)
    bases = pictures(rng, rng.integers(1, 4), rng.uniform(0, 70, (1, 1)))
    x = copies(rng, bases[rng.integers(0, len(bases), n)], rng.uniform(0, 4, (n, 1)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(neardup, "_ANCHORS", 8)
        patch.setattr(neardup, "_PAIRS", 5)
        patch.setattr(neardup, "_FIRST_RUN", 2)
        assert_same_as_all_pairs(x)


@pytest.mark.parametrize("seed", range(3))
def test_contrast_scaled_copies_whose_stds_differ_by_up_to_the_threshold(seed):
    """A copy with its contrast scaled by 1 + e about the mean differs by
    e * std, all of it in the std: the pairs whose stds lie furthest apart
    (up to the threshold, several std bands) that are still near."""
    rng = np.random.default_rng(100 + seed)
    base = pictures(rng, 30, rng.uniform(3, 60, (30, 1)))
    base = np.clip(base, 20, 235)
    mean = base.mean(1, keepdims=True)
    scales = [1.0, 1.1, 1.15, 1.18, 1.2, 1.22, 0.85, 0.82, 1 + 4 / (base.std(1, keepdims=True))]
    x = np.concatenate([np.rint(mean + s * (base - mean)) for s in scales])
    x = np.clip(x, 0, 255).astype(np.uint8)
    pairs, _ = assert_same_as_all_pairs(x[rng.permutation(len(x))])
    assert len(pairs) > 100
