"""records.make_records / inspect_records on real folders made in tmp_path."""
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from upright.pipeline import (imageio, neardup, recordio, records, records_inspect, schema,
                              splits)
from tests import helpers


def read_split(out, split):
    """All records of a split, in file order, as schema.Record."""
    return [schema.decode_example(s.numpy())
            for s in tf.data.TFRecordDataset(recordio.shard_paths(str(out), split))]


def assignments(out):
    """{sha256: split} of a records folder."""
    return {r.sha256: split for split in schema.SPLITS for r in read_split(out, split)}


def make_good_folder(src, seeds, size=(40, 56)):
    os.makedirs(src, exist_ok=True)
    for seed in seeds:
        helpers.write_image_file(os.path.join(src, f"img{seed:03d}.jpg"),
                                 helpers.distinct_image(seed, *size))


def run(src, out, **kwargs):
    kwargs.setdefault("workers", 1)
    kwargs.setdefault("progress", False)
    return records.make_records(src=str(src), out=str(out), **kwargs)


def test_messy_folder_stores_the_good_and_names_every_bad_file(tmp_path):
    src = tmp_path / "src"
    (src / "sub dir").mkdir(parents=True)
    (src / "日本語").mkdir()
    (src / "bad").mkdir()
    for seed in range(10):
        helpers.write_image_file(src / "sub dir" / f"photo {seed}.jpg",
                                 helpers.distinct_image(seed, 40, 56))
    helpers.write_image_file(src / "日本語" / "写真.png", helpers.distinct_image(20, 30, 30), "png")
    non_utf8 = os.path.join(os.fsencode(src), b"caf\xe9.jpg")
    helpers.write_image_file(non_utf8, helpers.distinct_image(21, 30, 40))
    shutil.copy(src / "sub dir" / "photo 0.jpg", src / "zz copy.jpg")               # exact dup
    small = Image.fromarray(helpers.distinct_image(1, 40, 56)).resize((28, 20))
    small.save(src / "zz small.jpg", quality=80)                                    # near dup
    (src / "bad" / "zero.jpg").write_bytes(b"")
    (src / "bad" / "text.jpg").write_text("not a picture\n")
    data = helpers.encode(helpers.distinct_image(30, 64, 64), "jpeg")
    (src / "bad" / "cut.jpg").write_bytes(data[:len(data) // 2])
    (src / "bad" / "bomb.png").write_bytes(helpers.png_header_only(50000, 50000))
    (src / "bad" / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 40)
    os.symlink("/proc/self/mem", src / "bad" / "unreadable.jpg")   # fstat size 0: read as empty
    os.symlink("..", src / "bad" / "loop")                          # folder loop
    os.symlink("self.jpg", src / "self.jpg")                        # link to itself
    os.symlink("nowhere.jpg", src / "broken.jpg")
    (src / "notes.txt").write_text("shot in 2024\n")
    (src / ".hidden.jpg").write_bytes(b"")
    out = tmp_path / "out"

    info = run(src, out, max_skipped_fraction=1.0, max_side=48)

    skipped = {e["path"]: e["reason"] for e in info["skipped"]}
    assert skipped["bad/zero.jpg"] == "zero bytes"
    assert skipped["bad/text.jpg"].startswith("not an image")
    assert skipped["bad/cut.jpg"].startswith("truncated")
    assert skipped["bad/bomb.png"].startswith("decompression bomb")
    assert skipped["bad/phone.heic"].startswith("unsupported format")
    assert skipped["bad/loop"].startswith("symlink loop")
    assert skipped["self.jpg"].startswith("symlink loop")
    assert skipped["broken.jpg"].startswith("unreadable")
    if os.path.exists("/proc/self/mem"):
        # Reads stop at the size fstat gives (never endless, as /dev/zero would be).
        assert skipped["bad/unreadable.jpg"] == "zero bytes"
    assert {e["path"]: e["reason"] for e in info["ignored"]} == {
        "notes.txt": "not an image file (.txt)"}
    assert info["counts"]["hidden_ignored"] == 1
    assert info["duplicates"] == [{"path": "zz copy.jpg", "duplicate_of": "sub dir/photo 0.jpg"}]
    assert ["sub dir/photo 1.jpg", "zz small.jpg"] in info["near_duplicate_groups"]

    stored = {r.source_id: r for split in schema.SPLITS for r in read_split(out, split)}
    assert len(stored) == info["counts"]["stored"] == 13
    assert "日本語/写真.png" in stored and "sub dir/photo 3.jpg" in stored
    odd = [s for s in stored if os.fsencode(s) == b"caf\xe9.jpg"]
    assert len(odd) == 1                                     # the exact bytes come back
    for r in stored.values():
        pixels = tf.io.decode_image(r.encoded, channels=3).numpy()
        assert pixels.shape == (r.height, r.width, 3) and max(r.height, r.width) <= 48
    assert stored["sub dir/photo 2.jpg"].sha256 == imageio.sha256_hex(
        (src / "sub dir" / "photo 2.jpg").read_bytes())
    assert records_inspect.inspect_records(str(out))["splits"]["train"]["num_examples"] == \
        info["counts"]["train"]
    assert not (out / records.SCRATCH_FILE).exists()


def test_output_is_byte_identical_whatever_the_worker_count(tmp_path):
    src = tmp_path / "src"
    make_good_folder(src, range(14), size=(80, 120))   # > max_side: re-encoded
    helpers.write_image_file(src / "a.png", helpers.distinct_image(99, 20, 20), "png")
    info1 = run(src, tmp_path / "w1", workers=1, max_side=64)
    info2 = run(src, tmp_path / "w2", workers=2, max_side=64)
    names = sorted(os.listdir(tmp_path / "w1"))
    assert names == sorted(os.listdir(tmp_path / "w2"))
    for name in names:
        if name.startswith(("train", "val")):
            assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()
    for info in (info1, info2):
        info.pop("arguments")
    assert info1 == info2


def test_adding_images_never_moves_old_ones(tmp_path):
    src = tmp_path / "src"
    make_good_folder(src, range(30))
    run(src, tmp_path / "out", val_fraction=0.3)
    before = assignments(tmp_path / "out")
    assert set(before.values()) == {"train", "val"}
    make_good_folder(src / "more", range(100, 130))
    run(src, tmp_path / "out", val_fraction=0.3)   # replaces its own earlier output
    after = assignments(tmp_path / "out")
    assert len(after) == 60
    assert {sha: after[sha] for sha in before} == before
    # The split follows the bytes, not the path: a renamed folder keeps its splits.
    os.rename(src, tmp_path / "renamed")
    run(tmp_path / "renamed", tmp_path / "out2", val_fraction=0.3)
    assert assignments(tmp_path / "out2") == after


def test_duplicates_and_near_duplicates_never_straddle_splits(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for seed in range(16):
        picture = helpers.distinct_image(seed, 60, 90)
        helpers.write_image_file(src / f"{seed}_a.jpg", picture)
        helpers.write_image_file(src / f"{seed}_b.png", picture, "png")          # re-encoded
        Image.fromarray(picture).resize((45, 30), Image.Resampling.BICUBIC).save(
            src / f"{seed}_c.jpg", quality=75)                                    # resized
        shutil.copy(src / f"{seed}_a.jpg", src / f"{seed}_d.jpg")                 # same bytes
    info = run(src, tmp_path / "out", val_fraction=0.5)
    assert info["counts"]["duplicates"] == 16
    assert len(info["near_duplicate_groups"]) == 16
    split_of = {r.source_id: s for s in schema.SPLITS for r in read_split(tmp_path / "out", s)}
    assert len(split_of) == 48
    for seed in range(16):
        assert len({split_of[f"{seed}_{v}"] for v in ("a.jpg", "b.png", "c.jpg")}) == 1
    assert set(split_of.values()) == {"train", "val"}


def test_val_share_is_near_val_fraction(tmp_path):
    """300 distinct pictures, each one its own group: a correct split puts each
    in val independently with probability val_fraction (a hash of its bytes),
    so the val count is Binomial(300, f). The bound is 5 standard deviations,
    5 * sqrt(f (1 - f) / 300): 0.115 for f = 0.2, 0.144 for f = 0.5; a correct
    hash split falls outside it with probability < 1e-6. A split that ignores
    the fraction or inverts the comparison (share 1 - f) lands outside it for
    0.2. The hash threshold is monotone: val at 0.2 is inside val at 0.5."""
    src = tmp_path / "src"
    make_good_folder(src, range(300), size=(16, 24))
    val_of = {}
    for fraction in (0.2, 0.5):
        info = run(src, tmp_path / f"out{fraction}", val_fraction=fraction)
        counts = info["counts"]
        assert counts["stored"] == 300 and counts["near_duplicate_groups"] == 0, counts
        assert counts["train"] + counts["val"] == 300
        assert info["splits"]["val"]["num_examples"] == counts["val"]
        bound = 5 * (fraction * (1 - fraction) / 300) ** 0.5
        assert abs(counts["val"] / 300 - fraction) < bound, (fraction, counts)
        val_of[fraction] = {r.sha256 for r in read_split(tmp_path / f"out{fraction}", "val")}
        assert len(val_of[fraction]) == counts["val"]
    assert val_of[0.2] < val_of[0.5]


def test_group_near_duplicates_is_transitive_and_exact():
    pictures = [helpers.distinct_image(s, 32, 32) for s in range(5)]
    sigs = [imageio.signature(Image.fromarray(p)) for p in pictures]
    shifted = bytes(min(255, b + 3) for b in sigs[2])        # 3 grey levels off picture 2
    groups = neardup.group_near_duplicates(sigs + [shifted])
    assert groups == [[0], [1], [2, 5], [3], [4]]


def test_refusals(tmp_path):
    with pytest.raises(records.MakeRecordsError, match="does not exist"):
        run(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(records.MakeRecordsError, match="empty"):
        run(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("x")
    with pytest.raises(records.MakeRecordsError, match="no images could be read"):
        run(tmp_path / "texts", tmp_path / "out")
    src = tmp_path / "src"
    make_good_folder(src, range(12))
    with pytest.raises(records.MakeRecordsError, match="inside the source folder"):
        run(src, src / "records")
    with pytest.raises(records.MakeRecordsError, match="inside the source folder"):
        run(src, src)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(records.MakeRecordsError, match="not a make_records output"):
        run(src, foreign)
    run(src, foreign, overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "precious"
    recordio.load_info(str(foreign))
    with pytest.raises(records.MakeRecordsError, match="split 'val' would be empty"):
        run(src, tmp_path / "one", val_fraction=0.001)
    for value, flag in [(0.0, "val_fraction"), (1.5, "val_fraction")]:
        with pytest.raises(records.MakeRecordsError, match=flag):
            run(src, tmp_path / "x", val_fraction=value)


def test_val_fraction_one_makes_an_evaluation_only_folder(tmp_path):
    src = tmp_path / "src"
    make_good_folder(src, range(6))
    info = run(src, tmp_path / "holdout", val_fraction=1.0)
    assert sorted(info["splits"]) == ["val"]
    assert info["splits"]["val"]["num_examples"] == 6
    assert records_inspect.inspect_records(str(tmp_path / "holdout"))["splits"]["val"]["num_examples"] == 6
    assert "val 6 in 1 shard(s)" in records.format_summary(info)


def test_too_many_skipped_refuses_and_keeps_the_previous_output(tmp_path):
    src = tmp_path / "src"
    make_good_folder(src, range(12))
    out = tmp_path / "out"
    before = run(src, out)
    for i in range(3):
        (src / f"broken{i}.jpg").write_text("oops")
    with pytest.raises(records.MakeRecordsError, match=r"3 of 15 .* were skipped") as caught:
        run(src, out)
    assert caught.value.refused
    assert any("broken0.jpg: not an image" in line for line in caught.value.details)
    assert recordio.load_info(str(out)) == before
    assert not (out / records.SCRATCH_FILE).exists()
    assert run(src, out, max_skipped_fraction=0.25)["counts"]["skipped"] == 3


def test_a_second_run_into_the_same_out_refuses(tmp_path):
    src = tmp_path / "src"
    make_good_folder(src, range(12))
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / records.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"4242\n")
        with pytest.raises(records.MakeRecordsError, match="another make_records run.*4242"):
            run(src, out)
    finally:
        os.close(fd)
    run(src, out)   # the lock died with its holder


KILLER = textwrap.dedent("""
    import os, signal, sys
    from upright.pipeline import recordio, records
    real = recordio.write_split
    def write_then_die(out_dir, split, examples, num_shards):
        entry = real(out_dir, split, examples, num_shards)
        if split == "train":            # train is on disk, val and info.json are not
            os.kill(os.getpid(), signal.SIGKILL)
        return entry
    recordio.write_split = write_then_die
    records.make_records(src=sys.argv[1], out=sys.argv[2], workers=1, progress=False)
""")


def test_a_killed_run_leaves_nothing_a_reader_accepts_and_a_rerun_succeeds(tmp_path):
    src = tmp_path / "src"
    make_good_folder(src, range(12))
    out = tmp_path / "out"
    before = run(src, out)              # a complete earlier output...
    make_good_folder(src, range(12, 20))
    proc = subprocess.run([sys.executable, "-c", KILLER, str(src), str(out)],
                          capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    # The new train shard was written beside the earlier output (staging), which
    # is still complete and accepted; the half-new one is not visible to readers.
    assert any(n.startswith("train.tfrecord")
               for n in os.listdir(out / records.STAGING_DIR))
    assert recordio.load_info(str(out)) == before
    shutil.rmtree(out / records.STAGING_DIR)
    os.remove(out / schema.INFO_FILE)   # an earlier kill during the swap:
    with pytest.raises(recordio.RecordsError, match="no info.json"):
        recordio.load_info(str(out))    # ...the folder is refused
    info = run(src, out)
    assert info["counts"]["stored"] == 20
    records_inspect.inspect_records(str(out))


@pytest.fixture(scope="module")
def good_records(tmp_path_factory):
    base = tmp_path_factory.mktemp("good")
    make_good_folder(base / "src", range(24))
    run(base / "src", base / "out")
    return base / "out"


def copy_of(good_records, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(good_records, out)
    return out


def test_inspect_records_accepts_a_good_folder(good_records):
    summary = records_inspect.inspect_records(str(good_records))
    info = recordio.load_info(str(good_records))
    for split in schema.SPLITS:
        assert summary["splits"][split]["num_examples"] == info["splits"][split]["num_examples"]
    assert summary["formats"] == {"jpeg": 24}


def test_inspect_records_catches_a_corrupted_shard(good_records, tmp_path):
    out = copy_of(good_records, tmp_path)
    shard = out / "train.tfrecord-00000-of-00001"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(recordio.RecordsError, match="train.tfrecord-00000-of-00001.*damaged"):
        records_inspect.inspect_records(str(out))


def test_inspect_records_catches_a_truncated_shard(good_records, tmp_path):
    out = copy_of(good_records, tmp_path)
    shard = out / "val.tfrecord-00000-of-00001"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(recordio.RecordsError, match="val.tfrecord-00000-of-00001.*damaged"):
        records_inspect.inspect_records(str(out))


def test_inspect_records_catches_counts_and_sizes_that_disagree(good_records, tmp_path):
    out = copy_of(good_records, tmp_path)
    info = json.loads((out / "info.json").read_text())
    info["splits"]["train"]["shard_examples"][0] += 1
    (out / "info.json").write_text(json.dumps(info))
    with pytest.raises(recordio.RecordsError, match="holds .* records, info.json says"):
        records_inspect.inspect_records(str(out))
    # A record whose stated size is wrong.
    out2 = tmp_path / "sizes"
    img = helpers.distinct_image(0, 10, 12)
    recordio.write_split(str(out2.mkdir() or out2), "train", [schema.encode_example(
        schema.Record(helpers.encode(img, "png"), "png", 11, 12, "a.png", "0" * 64))], 1)
    recordio.write_split(str(out2), "val", [schema.encode_example(
        schema.Record(helpers.encode(img, "png"), "png", 10, 12, "b.png", "1" * 64))], 1)
    recordio.write_info(str(out2), {
        s: {"num_examples": 1, "shards": [schema.shard_name(s, 0, 1)], "shard_examples": [1]}
        for s in schema.SPLITS})
    with pytest.raises(recordio.RecordsError, match="decodes to 10x12, record says 11x12"):
        records_inspect.inspect_records(str(out2))


def test_contact_sheet_shows_four_orientations(good_records, tmp_path):
    path = tmp_path / "sheet.png"
    assert records_inspect.draw_contact_sheet(str(good_records), str(path), num_images=3) == 3
    sheet = Image.open(path)
    assert sheet.width == 4 * (160 + 12) and sheet.height > 3 * 160


def test_shard_count_aims_at_100_to_200_mb():
    mb = 1000 * 1000
    assert records.num_shards_for(1) == 1
    assert records.num_shards_for(199 * mb) == 1
    assert records.num_shards_for(200 * mb) == 2
    for total in (350 * mb, 10_000 * mb, 123_456 * mb):
        per_shard = total / records.num_shards_for(total)
        assert 100 * mb <= per_shard < 200 * mb


def test_group_by_keeps_every_crop_of_a_picture_in_one_split(tmp_path):
    """Crops named <picture>_<n>.jpg are different images (not near-duplicates),
    so only --group_by keeps a picture's crops out of both splits."""
    src = tmp_path / "src"
    src.mkdir()
    for picture in range(12):
        for n in range(3):
            helpers.write_image_file(src / f"pic{picture:02d}_{n}.jpg",
                                     helpers.distinct_image(100 * picture + n))
    helpers.write_image_file(src / "loose.jpg", helpers.distinct_image(999))  # no key
    plain = run(src, tmp_path / "plain", val_fraction=0.5)
    assert plain["group_by"] is None

    def sides(out):
        split_of = {r.source_id: s for s in schema.SPLITS for r in read_split(out, s)}
        by_picture = {}
        for name, split in split_of.items():
            by_picture.setdefault(name.rsplit("_", 1)[0], set()).add(split)
        return split_of, by_picture

    _, by_picture = sides(tmp_path / "plain")
    assert any(len(s) == 2 for k, s in by_picture.items() if k.startswith("pic"))

    info = run(src, tmp_path / "grouped", val_fraction=0.5, group_by=r"^(.*)_\d+\.jpg$")
    assert info["group_by"] == {"keys": 12, "unmatched": 1, "split_groups": 13}
    assert info["arguments"]["group_by"] == r"^(.*)_\d+\.jpg$"
    split_of, by_picture = sides(tmp_path / "grouped")
    assert len(split_of) == 37
    assert all(len(s) == 1 for s in by_picture.values())
    assert {s for v in by_picture.values() for s in v} == {"train", "val"}

    # The key decides the split: a picture's new crop joins its old side, and
    # nothing else moves.
    helpers.write_image_file(src / "pic00_3.jpg", helpers.distinct_image(3))
    run(src, tmp_path / "grouped2", val_fraction=0.5, group_by=r"^(.*)_\d+\.jpg$")
    again, _ = sides(tmp_path / "grouped2")
    assert {k: again[k] for k in split_of} == split_of
    assert again["pic00_3.jpg"] == split_of["pic00_0.jpg"]


def test_group_by_bad_pattern_is_refused_before_reading(tmp_path):
    make_good_folder(tmp_path / "src", range(3))
    with pytest.raises(records.MakeRecordsError, match="not a regular expression") as e:
        run(tmp_path / "src", tmp_path / "out", group_by="(unclosed")
    assert not e.value.refused                   # a bad argument: exit 2, not 1
    assert not (tmp_path / "out").exists()


def test_group_by_follows_exact_duplicates_to_their_own_picture(tmp_path):
    """p7_1 is a byte copy of p0_0: stored once (as p0_0), it still ties the
    pictures p0 and p7 together, so no crop of p7 can sit across from it."""
    src = tmp_path / "src"
    src.mkdir()
    for name, seed in [("p0_0", 1), ("p0_1", 2), ("p7_0", 3)]:
        helpers.write_image_file(src / f"{name}.jpg", helpers.distinct_image(seed))
    shutil.copy(src / "p0_0.jpg", src / "p7_1.jpg")
    for picture in range(1, 6):                  # other pictures, so both splits fill
        helpers.write_image_file(src / f"q{picture}_0.jpg", helpers.distinct_image(50 + picture))
    info = run(src, tmp_path / "out", val_fraction=0.5, group_by=r"^(.*)_\d+\.jpg$")
    assert info["counts"]["duplicates"] == 1
    split_of = {r.source_id: s for s in schema.SPLITS for r in read_split(tmp_path / "out", s)}
    assert split_of["p0_0.jpg"] == split_of["p0_1.jpg"] == split_of["p7_0.jpg"]
    # Teeth: on their own, the keys p0 and p7 hash to different sides.
    sides = [splits._unit_hash(b"group", hashlib.sha256(k).hexdigest()) < 0.5
             for k in (b"p0", b"p7")]
    assert sides[0] != sides[1]


def write_template_folder(src, count):
    """One template, copies that differ by noise and a small marker's position:
    near-duplicates by design, chained into one group at the default threshold."""
    os.makedirs(src, exist_ok=True)
    rng = np.random.default_rng(0)
    template = np.linspace(100, 160, 64)[None, :, None].repeat(64, 0).repeat(3, 2)
    for k in range(count):
        picture = template + rng.normal(0, 2, template.shape)
        picture[4 * (k % 15):4 * (k % 15) + 2, 4 * (k // 15):4 * (k // 15) + 2] = 0
        helpers.write_image_file(os.path.join(src, f"form{k:03d}.png"),
                                 np.clip(picture, 0, 255).astype(np.uint8), "png")


def test_near_duplicate_threshold_and_the_largest_group(tmp_path):
    write_template_folder(tmp_path / "src", 40)
    with pytest.raises(records.MakeRecordsError, match=r"would be empty .*one group holds 40 "
                       r"of the 40 images.*lower --near_duplicate_threshold \(0 turns"):
        run(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out" / "info.json").exists()
    info = run(tmp_path / "src", tmp_path / "out", near_duplicate_threshold=0)
    counts = info["counts"]
    assert (counts["stored"], counts["near_duplicate_groups"], counts["largest_group"]) == (40, 0, 1)
    assert info["near_duplicate_threshold"] == 0 and counts["train"] and counts["val"]
    assert "largest group 1" in records.format_summary(info)
    assert "warning" not in records.format_summary(info)
    with pytest.raises(records.MakeRecordsError, match="near_duplicate_threshold must be >= 0"):
        run(tmp_path / "src", tmp_path / "out2", near_duplicate_threshold=-1)


def test_summary_warns_of_a_group_of_more_than_a_quarter(tmp_path):
    write_template_folder(tmp_path / "src", 12)
    make_good_folder(tmp_path / "src", range(30))
    info = run(tmp_path / "src", tmp_path / "out", val_fraction=0.5)
    assert info["counts"]["largest_group"] == 12 and info["near_duplicate_threshold"] == 4.0
    assert ("warning: one group holds 12 of the 42 images"
            in records.format_summary(info))
