"""Which images make_records keeps, how it groups them, and the split of each group.

    plan = splits.plan(results, val_fraction=0.2, group_pattern=None)
    plan.splits["val"]        # the kept val images, ordered by sha256

Works on read results alone (path, sha256 of the file bytes, near-duplicate
signature), never on image bytes, so local and Beam runs plan with the same
code and write the same records. The rules:

  * Exact duplicates (same sha256 of the file bytes) are stored once: the copy
    whose path sorts first is kept, the others are reported as its duplicates.
  * Near-duplicates (the same picture re-encoded or resized: within
    `near_limit` grey levels, `imageio.are_near_duplicates`; 0: off) form one
    group, transitively (`neardup` finds them, exactly, without comparing all
    pairs). Every group gets ONE split.
  * With a group_by pattern (a regular expression searched in each relative
    path, "/"-separated; its first capture group, else the whole match, is the
    key), images whose paths give the same key also share one group: crops or
    bursts of one scene (r"^(.*)_\d+\.jpg$" for crops named <picture>_<n>.jpg),
    one folder per subject (r"^[^/]+"). An exact duplicate brings its own
    path's key: the duplicate's picture must not land on the other side
    either. Paths that do not match keep their own group (counted in
    info.json). Near-duplicate groups and keys are united by the one
    union-find, `neardup.components`.
  * The split is a stable hash, never a draw: a group with keys goes by a hash
    of its smallest key, so new members of a picture never move it; a group
    without keys goes by its anchor, the member with the smallest anchor hash
    of its sha256. The group is "val" when that split hash < val_fraction
    (val_fraction=1: an evaluation-only folder, "val" alone).
  * Hence an image's split depends only on its own bytes, key and group, never
    on the other files: adding images never moves old ones, except by moves
    that are the point (the same picture must not sit in both splits):
      - a new near-duplicate of old images joins their group and can become
        its anchor, and the old copies move with it;
      - a new near-duplicate that bridges two old groups makes them one, with
        one split;
      - a new near-duplicate that bridges a keyed group to another key (the
        union takes the smaller key's split) or to a group with no key (which
        joins the keyed group's split).
  * A split that would be empty is refused (MakeRecordsError, refused=True),
    with a hint when one group holds more than a quarter of the images.
  * Within a split, images are ordered by sha256: independent of the number
    of workers, and each shard is a random mix of the folder.
"""
import dataclasses
import hashlib
import os
import re

from upright.pipeline import imageio, neardup, records_read, schema


@dataclasses.dataclass
class Plan:
    """What `plan` decided about the readable images."""
    splits: dict            # split -> [_Result] kept images, ordered by sha256
    duplicates: list        # [(rel, rel of the kept copy)] exact duplicates not stored
    groups: list            # [[rel, ...]] near-duplicate groups of >= 2 kept images, sorted
    largest_group: int      # images in the largest group that shares one split
    named_groups: dict = None  # with group_by: counts of keys, unmatched paths, groups


def plan(results, *, val_fraction, group_pattern=None, near_limit=imageio.NEAR_ABS) -> Plan:
    """Dedups, groups and splits the readable images (the rules above).

    Args:
      results: the read results with status "ok" (records_read._Result), sorted
        by path; at least one.
      val_fraction: in (0, 1], the expected share of pictures in "val".
      group_pattern: `compile_group_by(group_by)`: a compiled pattern or None.
      near_limit: grey levels (>= 0) of the RMS signature distance at which two
        images are the same picture, scaled up for contrasty pictures
        (imageio.near_duplicate_threshold); the default imageio.NEAR_ABS = 4 is
        the measured one; 0 turns near-duplicate grouping off (exact duplicates
        are still stored once).
    Raises:
      records_read.MakeRecordsError: refused, when a split would be empty.
    """
    kept, duplicates, paths_of = dedupe(results)
    near = neardup.group_near_duplicates([r.image.signature for r in kept], limit=near_limit)
    keys, units = [[] for _ in kept], near
    if group_pattern is not None:
        keys = [path_keys(group_pattern, paths) for paths in paths_of]
        units = merge_groups(near, keys)
    # val_fraction=1 makes an evaluation-only folder (e.g. a held-out set): no train split.
    splits = {s: [] for s in (("val",) if val_fraction >= 1.0 else schema.SPLITS)}
    for members in units:
        split = "val" if _split_hash(members, kept, keys) < val_fraction else "train"
        splits[split].extend(kept[i] for i in members)
    largest = max(len(members) for members in units)
    _refuse_empty(splits, len(kept), len(units), largest, val_fraction,
                  grouped_by_key=group_pattern is not None)
    for items in splits.values():
        # Order by content hash: independent of workers, and shards mix the folder.
        items.sort(key=lambda r: r.sha256)
    named_groups = None
    if group_pattern is not None:
        named_groups = {"keys": len({k for ks in keys for k in ks}),
                        "unmatched": sum(not ks for ks in keys),
                        "split_groups": len(units)}
    near_groups = [sorted(kept[i].rel for i in g) for g in near if len(g) > 1]
    return Plan(splits=splits, duplicates=duplicates, groups=sorted(near_groups),
                largest_group=largest, named_groups=named_groups)


def dedupe(results):
    """Exact duplicates stored once, the copy whose path sorts first.

    results: sorted by path. Returns (kept results, [(rel, rel of the kept
    copy)], paths_of: per kept image, its path and its duplicates' paths).
    """
    kept, duplicates, paths_of, first = [], [], [], {}
    for r in results:
        if r.sha256 in first:
            duplicates.append((r.rel, kept[first[r.sha256]].rel))
            paths_of[first[r.sha256]].append(r.rel)
        else:
            first[r.sha256] = len(kept)
            kept.append(r)
            paths_of.append([r.rel])
    return kept, duplicates, paths_of


def _split_hash(members, kept, keys) -> float:
    """A group's split hash in [0, 1): by its smallest key, whatever the
    members; else by the split hash of its anchor."""
    named = sorted(k for i in members for k in keys[i])
    if named:
        return _unit_hash(b"group", hashlib.sha256(named[0].encode(
            "utf-8", "surrogateescape")).hexdigest())
    anchor = min(members, key=lambda i: _unit_hash(b"anchor", kept[i].sha256))
    return _unit_hash(b"split", kept[anchor].sha256)


def _refuse_empty(splits, images, groups, largest, val_fraction, *, grouped_by_key):
    """MakeRecordsError (refused) naming the first empty split, with what to do."""
    for split, items in splits.items():
        if not items:
            raise records_read.MakeRecordsError(
                f"split {split!r} would be empty ({images} distinct images, "
                f"{groups} picture groups, val_fraction={val_fraction:g}); "
                + (large_group_hint(largest, images, grouped_by_key) or
                   "add images or change --val_fraction"), refused=True)


def large_group_hint(largest: int, total: int, grouped_by_key: bool) -> str:
    """What to do when one group holds more than a quarter of the images, or "".

    Transitive near-duplicate merging chains pictures that differ little by
    design (form pages, product shots on white, one camera's frames)."""
    if largest < 2 or largest * 4 <= total:
        return ""
    named = " or check --group_by" if grouped_by_key else ""
    return (f"one group holds {largest} of the {total} images: near-duplicates chain "
            "pictures that differ little by design; lower --near_duplicate_threshold "
            f"(0 turns near-duplicate grouping off){named}")


def compile_group_by(group_by):
    """The compiled --group_by pattern, or None; MakeRecordsError if it is not
    a regular expression."""
    if group_by is None or group_by == "":
        return None
    try:
        return re.compile(group_by)
    except re.error as e:
        raise records_read.MakeRecordsError(
            f"group_by {group_by!r} is not a regular expression: {e}") from None


def group_key(pattern, rel: bytes):
    """The group key of a relative path (str), or None when the pattern does not
    match (or its first group takes no part in the match)."""
    m = pattern.search(os.fsdecode(rel))
    if m is None:
        return None
    return m.group(1) if pattern.groups else m.group(0)


def path_keys(pattern, paths) -> list:
    """The sorted distinct keys of an image's paths (its own and its exact
    duplicates'); empty when none matched."""
    return sorted({k for k in (group_key(pattern, rel) for rel in paths) if k is not None})


def merge_groups(groups, keys) -> list:
    """Unites near-duplicate groups (lists of indices) with images that share a
    key (keys[i]: the list of image i's keys, often one, none when no path of
    it matched). Returns the merged groups, members sorted, ordered by their
    first member."""
    i = [members[0] for members in groups for _ in members[1:]]
    j = [m for members in groups for m in members[1:]]
    first_with_key = {}
    for index, image_keys in enumerate(keys):
        for key in image_keys:
            i.append(first_with_key.setdefault(key, index))
            j.append(index)
    return neardup.groups_of(neardup.components(len(keys), i, j))


def _unit_hash(salt: bytes, sha256_hex: str) -> float:
    """A stable number in [0, 1) from an image's bytes digest."""
    digest = hashlib.sha256(salt + b":" + sha256_hex.encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64
