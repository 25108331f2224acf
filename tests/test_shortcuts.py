"""Shortcut guard: the input pipeline must not leak the label through artefacts.

An orientation model can read the label from how an image was processed
instead of what it shows: a resize or pad that is not rot90-equivariant, or the
JPEG block grid / chroma upsampling pattern that is anchored at the STORED
image's top-left and so turns with the label. Two guards:

(a) content with no orientation (rot90-symmetric patterns, stored losslessly)
    comes out of the pipeline the same for all four labels;
(b) a small CNN trained on orientation-free noise stored as JPEG at odd sizes
    stays at chance -- and the same CNN reads the label perfectly when the two
    JPEG fixes in preprocess.preprocess_image are switched off (so (b) has teeth).
"""
import keras
import numpy as np
import pytest

from upright.pipeline import inputs, preprocess
from tests import helpers

NOISE_SIZE = 45          # odd, not a multiple of 8: partial JPEG blocks at bottom/right


def _symmetric_pattern(seed, n):
    """uint8 [n, n, 3] equal to its own rot90, exactly (integer orbit average)."""
    q = np.random.default_rng(seed).integers(0, 256, (n, n, 3)).astype(np.int64)
    total = sum(np.rot90(q, k) for k in range(4))
    p = (total // 4).astype(np.uint8)
    assert np.array_equal(np.rot90(p), p)
    return p


@pytest.mark.parametrize("n,size", [(21, 21), (33, 16), (33, 17)])
def test_symmetric_content_looks_the_same_under_every_label(tmp_path, n, size):
    images = [_symmetric_pattern(i, n) for i in range(8)]
    helpers.write_records(str(tmp_path), {"train": images, "val": images}, fmt="png",
                          shards_per_split=2)
    # n == size: no resampling at all, so outputs must be bit-identical; otherwise
    # they may differ only by float rounding.
    atol = 0.0 if n == size else 2e-3
    stored = [preprocess.resize_image(p, size).numpy() for p in images]
    ds = inputs.input_fn(str(tmp_path), split="train", batch_size=8, image_size=size,
                         training=True, seed=0, policy="none")
    labels_seen = {i: set() for i in range(len(images))}
    for x, y in ds.take(30):                      # 30 epochs: every image under every label
        for image, label in zip(x.numpy(), y.numpy()):
            match = [i for i, s in enumerate(stored) if np.allclose(image, s, atol=atol, rtol=0)]
            assert len(match) == 1, "output depends on the label"
            labels_seen[match[0]].add(int(label))
    assert all(seen == {0, 1, 2, 3} for seen in labels_seen.values())
    val_x, val_y = next(iter(inputs.input_fn(str(tmp_path), split="val", batch_size=4,
                                             image_size=size, training=False)))
    assert val_y.numpy().tolist() == [0, 1, 2, 3]
    for k in range(4):
        np.testing.assert_allclose(val_x[k].numpy(), stored[0], atol=atol, rtol=0)


@pytest.fixture(scope="module")
def noise_jpeg_records(tmp_path_factory):
    """Orientation-free i.i.d. noise, stored as JPEG (quality 95, 4:2:0) at 45 x 45."""
    rng = np.random.default_rng(0)
    d = str(tmp_path_factory.mktemp("noise"))

    def noise(n):
        return [rng.integers(0, 256, (NOISE_SIZE, NOISE_SIZE, 3)).astype(np.uint8)
                for _ in range(n)]

    helpers.write_records(d, {"train": noise(1000), "val": noise(200)}, fmt="jpeg",
                          shards_per_split=2)
    return d


def _val_accuracy(records, steps):
    """Trains a tiny CNN on the training stream; accuracy on val (800 = 200 x 4)."""
    size = NOISE_SIZE   # no resampling: JPEG artefacts reach the model at full strength
    train = inputs.input_fn(records, split="train", batch_size=32, image_size=size,
                            training=True, seed=0, policy="none")
    val = inputs.input_fn(records, split="val", batch_size=200, image_size=size,
                          training=False)
    keras.utils.set_random_seed(0)
    # Flatten (not global pooling) keeps positions, so the model CAN use where
    # block boundaries sit relative to the image edges.
    model = keras.Sequential([
        keras.Input((size, size, 3)),
        keras.layers.Rescaling(1 / 127.5, offset=-1),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
        keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(4, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(train, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)
    return model.evaluate(val, verbose=0, return_dict=True)["accuracy"]


def test_model_stays_at_chance_on_orientation_free_jpeg(noise_jpeg_records):
    # 800 validation examples: sd of chance accuracy ~0.015 (more with the
    # 4-per-image correlation); 0.08 is a wide margin for a real shortcut to show.
    accuracy = _val_accuracy(noise_jpeg_records, steps=400)
    assert abs(accuracy - 0.25) < 0.08, accuracy


def test_shortcut_guard_has_teeth(noise_jpeg_records, monkeypatch):
    # Without the whole-block crop and with libjpeg's fancy chroma upsampling, the
    # same model reads the label from the partial-block grid almost perfectly
    # (measured: 1.00; fancy upsampling alone, with the crop: 0.55-0.58).
    monkeypatch.setattr(preprocess, "JPEG_BLOCK", 1)
    monkeypatch.setattr(preprocess, "JPEG_FANCY_UPSCALING", True)
    accuracy = _val_accuracy(noise_jpeg_records, steps=400)
    assert accuracy > 0.6, accuracy
