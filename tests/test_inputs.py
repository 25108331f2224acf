"""Tests of pipeline/inputs.py: real records in tmp_path through the real input_fn."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from upright.pipeline import augment, inputs, preprocess, recordio
from tests import helpers

# Odd, non-square sizes: the cases where a resize or pad could break rot90-equivariance.
ODD_SIZES = [(37, 53), (53, 37), (31, 31), (9, 70), (101, 64)]


def _collect(ds, limit=None):
    """All (images, labels) of a dataset as numpy arrays, concatenated."""
    xs, ys = [], []
    for x, y in ds.take(limit) if limit else ds:
        xs.append(x.numpy() if not isinstance(x, dict) else x["images"].numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def _flat_images(n, value_step=10, size=(8, 8)):
    """n images, each one constant colour: identifiable after any resize or rotation."""
    return [np.full(size + (3,), value_step * (i + 1), np.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def png_records(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("png"))
    train = [helpers.upright_image(i, h, w) for i, (h, w) in enumerate(ODD_SIZES * 4)]
    val = [helpers.upright_image(100 + i, h, w) for i, (h, w) in enumerate(ODD_SIZES[:3])]
    helpers.write_records(d, {"train": train, "val": val}, fmt="png", shards_per_split=3)
    return d, train, val


# ------------------------------------------------------------------ resize

@pytest.mark.parametrize("resize", inputs.RESIZE_METHODS)
@pytest.mark.parametrize("size", [16, 17])
def test_resize_commutes_with_rot90(resize, size):
    rng = np.random.default_rng(0)
    for h, w in ODD_SIZES:
        x = rng.uniform(0, 255, (h, w, 3)).astype(np.float32)
        y = preprocess.resize_image(x, size, resize).numpy()
        for k in (1, 2, 3):
            turned = preprocess.resize_image(np.rot90(x, k), size, resize).numpy()
            np.testing.assert_allclose(turned, np.rot90(y, k), atol=2e-3,
                                       err_msg=f"{h}x{w} k={k}")


def test_resize_values():
    # A constant image stays constant (squash, crop) and pad adds equal zero bars.
    x = np.full((10, 30, 3), 200, np.uint8)
    np.testing.assert_allclose(preprocess.resize_image(x, 12, "squash").numpy(), 200, atol=1e-3)
    np.testing.assert_allclose(preprocess.resize_image(x, 12, "crop").numpy(), 200, atol=1e-3)
    padded = preprocess.resize_image(x, 12, "pad").numpy()
    # 10 x 30 -> 4 x 12 content (12 * 10 / 30 = 4, S - 4 even), bars of 4 rows each side.
    np.testing.assert_array_equal(padded[:4], 0)
    np.testing.assert_array_equal(padded[-4:], 0)
    np.testing.assert_allclose(padded[4:8], 200, atol=1e-3)
    # An odd padding total is made even: 12 * 9 / 30 = 3.6 -> 4 rows (not 3 + a lopsided bar).
    padded = preprocess.resize_image(np.full((9, 30, 3), 50, np.uint8), 12, "pad").numpy()
    assert (padded[:, 0, 0] > 0).tolist() == [False] * 4 + [True] * 4 + [False] * 4
    # crop keeps the centre: a 4 x 8 image whose outer columns differ is cropped to them.
    x = np.zeros((4, 8, 3), np.uint8)
    x[:, 2:6] = 255
    np.testing.assert_allclose(preprocess.resize_image(x, 4, "crop").numpy(), 255, atol=1e-3)
    with pytest.raises(ValueError, match="resize must be one of"):
        preprocess.resize_image(x, 4, "stretch")


def test_preprocess_png_is_exact_and_equivariant():
    img = helpers.upright_image(3, 37, 53)
    out = preprocess.preprocess_image(helpers.encode(img, "png"), 16, "squash").numpy()
    assert out.dtype == np.float32 and out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out, preprocess.resize_image(img, 16, "squash").numpy())
    for k in (1, 2, 3):
        turned = preprocess.preprocess_image(helpers.encode(np.rot90(img, k).copy(), "png"), 16)
        np.testing.assert_allclose(turned.numpy(), np.rot90(out, k), atol=2e-3)


def test_preprocess_jpeg_block_crop_and_reduced_decode():
    img = helpers.upright_image(4, 300, 203)
    data = helpers.encode(img, "jpeg")
    full = tf.io.decode_jpeg(data, fancy_upscaling=False).numpy()
    # Whole 16 x 16 blocks only: 288 x 192. With S=40, 192 / 4 = 48 >= 40 -> ratio 4.
    want = preprocess.resize_image(full[:288, :192], 40, "squash").numpy()
    got = preprocess.preprocess_image(data, 40, "squash").numpy()
    assert np.abs(got - want).mean() < 3.0          # the decoder's 1/4 scale vs full decode
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99
    # Small JPEGs (under one block on a side) keep that side whole.
    tiny = preprocess.preprocess_image(helpers.encode(helpers.upright_image(5, 12, 40), "jpeg"), 8)
    assert tiny.shape == (8, 8, 3)
    assert 0 <= tiny.numpy().min() and tiny.numpy().max() <= 255


@pytest.mark.parametrize("height, width, size, resize, ratio, decoded", [
    # 300 x 203 keeps whole blocks, 288 x 192; the side that must keep >= S pixels
    # is the short one (squash, crop) or the long one (pad).
    (300, 203, 32, "squash", 4, (72, 48)),   # 192 / 8 = 24 < 32 <= 192 / 4
    (300, 203, 32, "crop", 4, (72, 48)),
    (300, 203, 32, "pad", 8, (36, 24)),      # 288 / 8 = 36 >= 32
    (300, 203, 96, "squash", 2, (144, 96)),  # 192 / 2 = 96 >= 96 exactly
    (300, 203, 100, "squash", 1, (288, 192)),
    (12, 40, 8, "squash", 1, (12, 32)),      # a side under one block: not aligned, full scale
])
def test_jpeg_decoded_size_before_resizing(height, width, size, resize, ratio, decoded):
    """The decode path actually used: libjpeg's reduced decode at the largest ratio
    that still leaves S pixels, seen in the decoded size before resizing, and the
    preprocessed image is that decode resized (not the full-size decode)."""
    data = helpers.encode(helpers.upright_image(4, height, width), "jpeg")
    image = preprocess._decode_jpeg_aligned(tf.constant(data), size, resize).numpy()
    assert image.shape == decoded + (3,)
    reduced = tf.io.decode_jpeg(data, channels=3, ratio=ratio, fancy_upscaling=False).numpy()
    np.testing.assert_array_equal(image, reduced[:decoded[0], :decoded[1]])
    got = preprocess.preprocess_image(data, size, resize).numpy()
    np.testing.assert_array_equal(got, preprocess.resize_image(image, size, resize).numpy())
    if ratio > 1:
        full = tf.io.decode_jpeg(data, channels=3, fancy_upscaling=False).numpy()
        from_full = preprocess.resize_image(full[:decoded[0] * ratio, :decoded[1] * ratio],
                                        size, resize).numpy()
        assert np.abs(got - from_full).max() > 1.0   # the two paths are distinguishable


# ------------------------------------------------------------------ validation stream

@pytest.mark.parametrize("resize", inputs.RESIZE_METHODS)
def test_eval_all_orientations_exact_pixels(png_records, resize):
    records, _, val = png_records
    size = 16
    ds = inputs.input_fn(records, split="val", batch_size=5, image_size=size, training=False,
                         resize=resize)
    assert [int(y.shape[0]) for _, y in ds] == [5, 5, 2]   # 4 x 3 examples, last batch kept
    images, labels = _collect(ds)
    assert images.dtype == np.float32 and labels.dtype == np.int32
    np.testing.assert_array_equal(labels, [0, 1, 2, 3] * 3)
    for i, img in enumerate(val):
        base = preprocess.resize_image(img, size, resize).numpy()
        for k in range(4):
            np.testing.assert_array_equal(images[4 * i + k], np.rot90(base, k))
            # ... which is also what preprocessing the truly turned image gives.
            np.testing.assert_allclose(images[4 * i + k],
                                       preprocess.resize_image(np.rot90(img, k), size,
                                                           resize).numpy(),
                                       atol=2e-3)
    # Same examples, same order, every run; the count is 4 x num_examples.
    again, again_labels = _collect(inputs.input_fn(records, split="val", batch_size=5,
                                                   image_size=size, training=False,
                                                   resize=resize))
    assert again.tobytes() == images.tobytes() and again_labels.tolist() == labels.tolist()
    assert len(labels) == 4 * inputs.num_examples(records, "val")


def test_eval_stream_runs_without_autotune_training_stream_with_it(png_records):
    # Deleting an autotuned iterator waits out its autotune thread's sleep (up to a
    # minute); Keras deletes the val iterator every epoch, so autotuning the val
    # stream idled the cores 30-40 s an epoch ("Idle stalls between epochs" in
    # benchmarks/README.md). The training stream, made once per stage, keeps it.
    records, _, _ = png_records
    val = inputs.input_fn(records, split="val", batch_size=4, image_size=8, training=False)
    train = inputs.input_fn(records, split="train", batch_size=4, image_size=8,
                            training=True, seed=0)
    assert val.options().autotune.enabled is False
    assert train.options().autotune.enabled is not False
    assert val.options().deterministic and train.options().deterministic


# ------------------------------------------------------------------ training stream

def test_training_one_epoch_is_each_image_once_turned_by_its_label(png_records):
    records, train, _ = png_records
    size = 17
    ds = inputs.input_fn(records, split="train", batch_size=4, image_size=size,
                         training=True, seed=3, policy="none", repeat=False)
    images, labels = _collect(ds)
    assert images.shape == (20, size, size, 3) and labels.shape == (20,)
    stored = [preprocess.resize_image(a, size, "squash").numpy() for a in train]
    seen = []
    for x, k in zip(images, labels):
        upright = np.rot90(x, -k)  # undo the label's turn: must be a stored image, exactly
        matches = [j for j, s in enumerate(stored) if np.array_equal(s, upright)]
        assert len(matches) == 1
        seen.append(matches[0])
    assert sorted(seen) == list(range(20))      # a permutation: each image once per epoch
    assert seen != list(range(20))              # ... shuffled


def test_training_is_deterministic_per_seed(png_records):
    records = png_records[0]

    def batches(seed, **kw):
        ds = inputs.input_fn(records, split="train", batch_size=4, image_size=16,
                             training=True, seed=seed, **kw)
        return [(x.numpy().tobytes(), y.numpy().tobytes()) for x, y in ds.take(8)]

    # A short random policy (the default one costs seconds to trace, nothing more to test).
    policy = "add(-15,15) | multiply(0.8,1.2); gaussian_noise(0.02,12.75,0.5)"
    first = batches(7, policy=policy)           # 8 batches > 1 epoch of 20: crosses a repeat
    assert batches(7, policy=policy) == first
    assert batches(8, policy=policy) != first
    # The policy changes pixels, "none" does not; labels come from the same seeds.
    none = batches(7, policy="none")
    assert [y for _, y in none] == [y for _, y in first]
    assert [x for x, _ in none] != [x for x, _ in first]


def test_unseeded_shuffle_refused(png_records):
    records = png_records[0]
    with pytest.raises(ValueError, match="needs a seed"):
        inputs.input_fn(records, split="train", batch_size=4, image_size=8, training=True)
    ds = inputs.input_fn(records, split="train", batch_size=4, image_size=8, training=True,
                         allow_unseeded_shuffle=True, policy="none")
    x, y = next(iter(ds))
    assert x.shape == (4, 8, 8, 3) and y.shape == (4,)
    with pytest.raises(ValueError, match="non-negative"):
        inputs.input_fn(records, split="train", batch_size=4, image_size=8, training=True,
                        seed=-1)
    # Validation needs no seed: nothing in it is random.
    inputs.input_fn(records, split="val", batch_size=4, image_size=8, training=False)


def test_labels_uniform_and_seeds_distinct(tmp_path):
    helpers.write_records(str(tmp_path), {"train": _flat_images(50, value_step=5)},
                          shards_per_split=2)
    ds = inputs.input_fn(str(tmp_path), split="train", batch_size=50, image_size=4,
                         training=True, seed=0, policy="none", augment_on="device")
    labels, seeds = [], []
    for x, y in ds.take(40):
        labels.append(y.numpy())
        seeds.append(x["seeds"].numpy())
        assert x["seeds"].dtype == tf.int32 and x["seeds"].shape == (50, 2)
    counts = np.bincount(np.concatenate(labels), minlength=4)
    # 2000 draws: expected 500 each, sd ~19.4; chi-square with 3 dof < 16.3 (p = 0.001).
    chi2 = ((counts - 500.0) ** 2 / 500.0).sum()
    assert chi2 < 16.3, counts
    seeds = np.concatenate(seeds)
    assert len({tuple(s) for s in seeds}) == len(seeds)   # one seed per image, no repeats


def test_device_placement_matches_host(png_records):
    records = png_records[0]
    # JPEG (host only) then device ops: the split really splits.
    policy = "sometimes(0.5, jpeg(60,80)); add(-15,15); gaussian_blur(0.5,1)"
    kw = dict(split="train", batch_size=4, image_size=16, training=True, seed=5,
              policy=policy)
    host = inputs.input_fn(records, augment_on="host", **kw)
    device = inputs.input_fn(records, augment_on="device", **kw)
    layer = augment.AugmentLayer(policy)
    for (hx, hy), (dx, dy) in zip(host.take(2), device.take(2)):
        assert set(dx) == {"images", "seeds"}
        np.testing.assert_array_equal(dy.numpy(), hy.numpy())
        np.testing.assert_allclose(layer(dx, training=True).numpy(), hx.numpy(), atol=1e-3)
        # Inference: the layer passes images through.
        np.testing.assert_array_equal(layer(dx, training=False).numpy(), dx["images"].numpy())


# ------------------------------------------------------------------ records checks

def test_schema_version_mismatch_refused(tmp_path):
    helpers.write_records(str(tmp_path), {"train": _flat_images(2)})
    path = tmp_path / "info.json"
    info = json.loads(path.read_text())
    info["schema_version"] = 99
    path.write_text(json.dumps(info))
    for training in (True, False):
        with pytest.raises(recordio.RecordsError, match="schema version 99"):
            inputs.input_fn(str(tmp_path), split="train", batch_size=2, image_size=4,
                            training=training, seed=0)
    with pytest.raises(recordio.RecordsError, match="no split 'val'"):
        helpers.write_records(str(tmp_path), {"train": _flat_images(2)})
        inputs.num_examples(str(tmp_path), "val")


def test_bad_arguments(png_records):
    records = png_records[0]
    with pytest.raises(ValueError, match="resize must be one of"):
        inputs.input_fn(records, split="val", batch_size=2, image_size=4, training=False,
                        resize="fit")
    with pytest.raises(ValueError, match="augment_on"):
        inputs.input_fn(records, split="train", batch_size=2, image_size=4, training=True,
                        seed=0, augment_on="gpu")
    with pytest.raises(ValueError, match="known"):
        inputs.input_fn(records, split="train", batch_size=2, image_size=4, training=True,
                        seed=0, policy="add;blurr")


# ------------------------------------------------------------------ tf.distribute

def _shard_values(records, split, context, training):
    ds = inputs.input_fn(records, split=split, batch_size=4, image_size=4, training=training,
                         seed=0, policy="none", input_context=context, repeat=False)
    images, _ = _collect(ds)
    return images, set(np.round(images[:, 0, 0, 0]).astype(int).tolist())


def test_input_context_shards_by_file(tmp_path):
    records = str(tmp_path)
    # 12 constant images in 4 shard files: pixel value identifies the image.
    helpers.write_records(records, {"train": _flat_images(12), "val": _flat_images(12)},
                          shards_per_split=4)
    for split, training in (("val", False), ("train", True)):
        parts = []
        for pid in range(2):
            ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pid,
                                             num_replicas_in_sync=2)
            images, values = _shard_values(records, split, ctx, training)
            # Global batch 4 over 2 replicas -> per-replica batches of 2.
            assert len(images) == (24 if split == "val" else 6)
            parts.append(values)
        assert parts[0].isdisjoint(parts[1])
        # Pipeline 0 reads files 0 and 2, pipeline 1 files 1 and 3 (3 images per file).
        assert parts[0] == {10, 20, 30, 70, 80, 90}
        assert parts[0] | parts[1] == {10 * (i + 1) for i in range(12)}
    ctx = tf.distribute.InputContext(num_input_pipelines=5, input_pipeline_id=0)
    with pytest.raises(ValueError, match="4 shard file.*5 input pipelines.*at least 5 shards"):
        inputs.input_fn(records, split="train", batch_size=5, image_size=4, training=True,
                        seed=0, input_context=ctx)


def test_distribute_datasets_from_function(png_records):
    records = png_records[0]
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])

    def dataset_fn(context):
        return inputs.input_fn(records, split="train", batch_size=4, image_size=16,
                               training=True, seed=1, policy="none", input_context=context)

    dist = strategy.distribute_datasets_from_function(dataset_fn)
    x, y = next(iter(dist))
    x = strategy.experimental_local_results(x)[0].numpy()
    y = strategy.experimental_local_results(y)[0].numpy()
    direct_x, direct_y = next(iter(inputs.input_fn(
        records, split="train", batch_size=4, image_size=16, training=True, seed=1,
        policy="none")))
    # One pipeline, one replica: the same stream as without tf.distribute.
    np.testing.assert_array_equal(x, direct_x.numpy())
    np.testing.assert_array_equal(y, direct_y.numpy())


def test_derive_seeds_independent():
    a, b = inputs.derive_seeds(0), inputs.derive_seeds(0, pipeline_id=1)
    assert a["files"] != a["examples"] and a["files"] != b["files"]
    assert inputs.derive_seeds(0)["files"] == a["files"]
    assert min(a["files"], a["examples"], *a["augment"]) >= 0


def test_import_touches_no_flags():
    # No flag defined by any project module after importing the input function.
    code = ("import upright.pipeline.inputs, absl.flags as f; "
            "print([n for n in f.FLAGS "
            "if 'upright' in (f.FLAGS.find_module_defining_flag(n) or '')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, check=True)
    assert out.stdout.strip() == "[]"
