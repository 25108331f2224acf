"""pipeline/splits.py on read results alone (no images, no TensorFlow): dedupe,
groups, keys and the stable split. make_records' own split tests (through real
folders and records) are in tests/test_records.py."""
import hashlib
import types

import numpy as np
import pytest

from upright.pipeline import imageio, records_read, splits


def result(rel: str, content: str, signature: bytes):
    """A read result with status "ok": path, sha256 of `content`, a signature."""
    image = types.SimpleNamespace(signature=signature)
    return records_read._Result(rel.encode(), "ok", sha256=hashlib.sha256(content.encode())
                                .hexdigest(), image=image)


def far_signatures(n, seed=0):
    """n signatures no two of which are near-duplicates (uniform noise)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, imageio.SIGNATURE_BYTES, dtype=np.uint8).tobytes()
            for _ in range(n)]


def test_merge_groups_unites_keys_and_near_duplicates():
    # 0-1 near-duplicates; 1 and 3 share key "a"; 4 shares "b" with nobody else.
    merged = splits.merge_groups([[0, 1], [2], [3], [4], [5]], [[], ["a"], [], ["a"], ["b"], []])
    assert merged == [[0, 1, 3], [2], [4], [5]]
    # An image with two keys (its exact duplicate's path gave the second) joins both.
    assert splits.merge_groups([[0], [1], [2]], [["a"], ["a", "b"], ["b"]]) == [[0, 1, 2]]


def test_dedupe_keeps_the_first_path_and_remembers_the_others():
    sig = far_signatures(2)
    kept, duplicates, paths_of = splits.dedupe(
        [result("a.jpg", "x", sig[0]), result("b.jpg", "y", sig[1]),
         result("c.jpg", "x", sig[0])])
    assert [r.rel for r in kept] == [b"a.jpg", b"b.jpg"]
    assert duplicates == [(b"c.jpg", b"a.jpg")]
    assert paths_of == [[b"a.jpg", b"c.jpg"], [b"b.jpg"]]


def test_plan_splits_each_key_as_one_unit_ordered_by_sha256():
    sig = far_signatures(40)
    results = [result(f"p{n // 4}_{n % 4}.jpg", str(n), sig[n]) for n in range(40)]
    pattern = splits.compile_group_by(r"^(p\d+)_")
    plan = splits.plan(results, val_fraction=0.5, group_pattern=pattern)
    side = {}
    for split, items in plan.splits.items():
        assert [r.sha256 for r in items] == sorted(r.sha256 for r in items)
        for r in items:
            side.setdefault(r.rel.decode().split("_")[0], set()).add(split)
    assert all(len(s) == 1 for s in side.values()) and len(side) == 10
    assert plan.named_groups == {"keys": 10, "unmatched": 0, "split_groups": 10}
    assert plan.largest_group == 4 and plan.groups == [] and plan.duplicates == []


def test_plan_never_moves_an_old_image_when_unrelated_ones_are_added():
    sig = far_signatures(60)
    old = [result(f"{n:02d}.jpg", str(n), sig[n]) for n in range(30)]
    new = old + [result(f"{n:02d}.jpg", str(n), sig[n]) for n in range(30, 60)]
    before, after = (splits.plan(r, val_fraction=0.3) for r in (old, new))
    split_of = {r.rel: s for s, items in after.splits.items() for r in items}
    assert all(split_of[r.rel] == s for s, items in before.splits.items() for r in items)


def test_plan_refuses_an_empty_split_with_a_hint_for_one_large_group():
    sig = far_signatures(1) * 3     # three near-duplicates (identical signatures)
    results = [result(f"{n}.jpg", str(n), sig[n]) for n in range(3)]
    with pytest.raises(records_read.MakeRecordsError, match="would be empty") as e:
        splits.plan(results, val_fraction=0.5)
    assert e.value.refused
    assert "one group holds 3 of the 3 images" in str(e.value)
    assert splits.plan(results, val_fraction=1.0).groups == [[b"0.jpg", b"1.jpg", b"2.jpg"]]
