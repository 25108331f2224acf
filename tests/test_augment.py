"""Tests for pipeline/augment.py, augment_ops.py and image_filters.py: values, not shapes."""
import numpy as np
import pytest
import tensorflow as tf

from upright.pipeline import augment, augment_ops as ao, image_filters
from tests import helpers


def seeds_for(n, start=0):
    return tf.reshape(tf.range(2 * start, 2 * (start + n), dtype=tf.int32), [n, 2])


def run(op, images, seeds=None):
    images = tf.constant(images, tf.float32)
    n = images.shape[0]
    labels = tf.zeros([n], tf.int32)
    out, _ = op(images, labels, seeds_for(n) if seeds is None else seeds)
    return out.numpy()


def const_images(n, size=8, value=128.0):
    return np.full([n, size, size, 3], value, np.float32)


# ---------------------------------------------------------------- exact values

def test_add_shifts_every_pixel_then_clips():
    x = np.array([[[[0, 10, 250], [100, 245, 246]], [[1, 2, 3], [255, 0, 7]]]], np.float32)
    np.testing.assert_array_equal(run(ao.Add(10), x), np.minimum(x + 10, 255))
    np.testing.assert_array_equal(run(ao.Add(-10), x), np.maximum(x - 10, 0))


def test_multiply_and_linear_contrast_exact():
    x = np.array([[[[0, 100, 200]]]], np.float32)
    np.testing.assert_allclose(run(ao.Multiply(1.2), x), [[[[0, 120, 240]]]], rtol=1e-6)
    np.testing.assert_allclose(run(ao.LinearContrast(2.0), x),
                               [[[[0, 72.5, 255]]]], rtol=1e-6)  # 127.5 + 2 (x - 127.5), clipped


def test_gamma_one_is_identity_and_gamma_two_squares():
    x = np.random.default_rng(0).uniform(0, 255, [2, 4, 4, 3]).astype(np.float32)
    x[0, 0, 0] = 0.0
    np.testing.assert_allclose(run(ao.Gamma(1.0), x), x, atol=2e-3)
    np.testing.assert_allclose(run(ao.Gamma(2.0), x), 255 * (x / 255) ** 2, atol=2e-3)
    np.testing.assert_allclose(run(ao.ChannelGamma(1.0, 1.0), x), x, atol=2e-3)


def test_log_and_sigmoid_contrast_formulas():
    x = np.array([[[[0, 127.5, 255]]]], np.float32)
    np.testing.assert_allclose(run(ao.LogContrast(1.0), x),
                               255 * np.log2(1 + x / 255), atol=1e-3)
    want = 255 / (1 + np.exp(6 * (0.5 - x / 255)))
    np.testing.assert_allclose(run(ao.SigmoidContrast(6, 6, 0.5, 0.5), x), want, atol=1e-3)


def test_hue_saturation_one_is_identity():
    x = np.random.default_rng(1).uniform(0, 255, [2, 4, 4, 3]).astype(np.float32)
    np.testing.assert_allclose(run(ao.HueSaturation(1.0), x), x, atol=1e-2)
    grey = const_images(1, 4, 90.0)
    np.testing.assert_allclose(run(ao.HueSaturation(0.8), grey), grey, atol=1e-3)


def test_hue_saturation_matches_tf_image_hsv():
    rng = np.random.default_rng(4)
    x = rng.uniform(0, 255, [3, 8, 8, 3]).astype(np.float32)
    x[0, 0, 0] = [0, 0, 0]
    x[0, 0, 1] = [200, 200, 200]
    x[0, 0, 2] = [255, 0, 0]
    for m in (0.8, 1.1):
        hsv = tf.image.rgb_to_hsv(x / 255).numpy()
        hsv[..., 0] = np.mod(hsv[..., 0] * m, 1.0)
        hsv[..., 1] = np.minimum(hsv[..., 1] * m, 1.0)
        want = np.clip(tf.image.hsv_to_rgb(hsv).numpy() * 255, 0, 255)
        np.testing.assert_allclose(run(ao.HueSaturation(m), x), want, atol=2e-3)


def test_dropout_pepper_salt_with_p_one():
    x = const_images(3, 6, 128.0)
    np.testing.assert_array_equal(run(ao.Dropout(1.0), x), 0.0)
    pepper, salt = run(ao.Pepper(1.0), x), run(ao.Salt(1.0), x)
    assert pepper.max() <= 127.5 and salt.min() >= 127.5
    # The same value in all channels of a pixel (per_channel=False).
    assert np.all(pepper == pepper[..., :1]) and np.all(salt == salt[..., :1])
    np.testing.assert_array_equal(run(ao.Salt(0.0), x), x)


def test_box_and_motion_kernels_sum_to_one():
    k = image_filters.box_kernels(tf.constant([1, 3, 5]), 5).numpy()
    np.testing.assert_allclose(k.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(k[1], [0, 1 / 3, 1 / 3, 1 / 3, 0], rtol=1e-6)
    lengths = tf.constant([3, 5, 4, 5, 3], tf.int32)
    angles = tf.constant([0.0, 90.0, 45.0, 213.0, 359.0])
    m = image_filters.motion_kernels(lengths, angles, 5).numpy()
    np.testing.assert_allclose(m.sum((1, 2)), 1.0, rtol=1e-5)
    # Angle 0: a horizontal line through the centre; 90: a vertical one.
    np.testing.assert_allclose(m[0][2, 1:4], 1 / 3, atol=1e-6)
    assert m[0].sum() - m[0][2].sum() < 1e-6
    np.testing.assert_allclose(m[1][:, 2], 1 / 5, atol=1e-6)
    # 45 degrees: the weight sits on the anti-diagonal (x right, y up).
    assert m[2][1, 3] > 0.1 and m[2][3, 1] > 0.1 and m[2][1, 1] < 1e-6


def test_convolve_per_image_uses_each_images_kernel():
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 255, [2, 6, 6, 3]).astype(np.float32)
    delta = np.zeros([3, 3], np.float32)
    delta[1, 1] = 1
    shift = np.zeros([3, 3], np.float32)
    shift[1, 2] = 1  # out[i, j] = x[i, j + 1] (cross-correlation)
    out = image_filters.convolve_per_image(tf.constant(x),
                                           tf.constant(np.stack([delta, shift]))).numpy()
    np.testing.assert_allclose(out[0], x[0], atol=1e-4)
    np.testing.assert_allclose(out[1][:, :5], x[1][:, 1:], atol=1e-4)
    np.testing.assert_allclose(out[1][:, 5], x[1][:, 4], atol=1e-4)  # reflect border


def test_blurs_keep_constant_images():
    x = const_images(4, 8, 77.0)
    for op in (ao.GaussianBlur(0.5, 1.0), ao.AverageBlur(3, 5), ao.MotionBlur(3, 5),
               ao.MedianBlur(3), ao.MedianBlur(5)):
        np.testing.assert_allclose(run(op, x), x, atol=1e-3, err_msg=op.spec())


def test_average_blur_matches_reference():
    x = np.random.default_rng(6).uniform(0, 255, [2, 6, 7, 3]).astype(np.float32)
    xp = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)], mode="reflect")
    want = sum(xp[:, i:i + 6, j:j + 7] for i in range(3) for j in range(3)) / 9
    np.testing.assert_allclose(run(ao.AverageBlur(3), x), want, atol=1e-3)


def test_gaussian_blur_matches_formula():
    x = np.zeros([1, 9, 9, 3], np.float32)
    x[0, 4, 4] = 255.0
    out = run(ao.GaussianBlur(1.0), x)[0, :, :, 0]
    g = np.exp(-0.5 * np.arange(-3, 4) ** 2)
    g /= g.sum()
    np.testing.assert_allclose(out[1:8, 1:8], 255 * np.outer(g, g), atol=1e-3)


def _median_reference(x, k):
    p = k // 2
    xp = np.pad(x, [(0, 0), (p, p), (p, p), (0, 0)], mode="reflect")
    h, w = x.shape[1:3]
    windows = np.stack([xp[:, i:i + h, j:j + w] for i in range(k) for j in range(k)])
    return np.median(windows, axis=0)


@pytest.mark.parametrize("k", [3, 5])
def test_median_exact_and_removes_isolated_salt(k):
    x = const_images(1, 9, 100.0)
    x[0, 4, 4] = 255.0
    x[0, 0, 7] = 0.0
    np.testing.assert_array_equal(run(ao.MedianBlur(k), x), 100.0)
    rnd = np.random.default_rng(k).integers(0, 256, [2, 7, 7, 3]).astype(np.float32)
    np.testing.assert_array_equal(run(ao.MedianBlur(k), rnd), _median_reference(rnd, k))


def test_rotate_small_angle_leaves_no_empty_corners():
    x = np.tile(np.linspace(10, 250, 16, dtype=np.float32)[None, :, None, None], [4, 1, 16, 3])
    x = np.transpose(x, [0, 2, 1, 3]).copy()  # horizontal gradient, min 10
    for angle in (-2.0, 2.0):
        out = run(ao.Rotate(angle), x)
        assert out.min() >= 9.99, angle
        assert not np.allclose(out, x)
    const = const_images(2, 16, 200.0)
    np.testing.assert_allclose(run(ao.Rotate(-2, 2), const), 200.0, atol=1e-3)
    np.testing.assert_allclose(run(ao.Rotate(0.0), x), x, atol=1e-3)


def test_rotate_matches_projective_transform_and_sometimes_keeps_the_rest():
    x = _images(6, 24)
    angle = tf.constant([-2.0, -1.0, 0.0, 0.5, 1.5, 2.0])
    ours = image_filters.rotate_bilinear(tf.constant(x), angle).numpy()
    t = image_filters.rotation_transforms(angle, 24, 24)
    want = tf.raw_ops.ImageProjectiveTransformV3(
        images=x, transforms=t, output_shape=[24, 24], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="NEAREST").numpy()
    np.testing.assert_allclose(ours, want, atol=0.05)
    np.testing.assert_array_equal(ours[2], x[2])  # angle 0 is exact
    op = augment.Sometimes(0.5, ao.Rotate())
    out = run(op, _images(40, 12))
    same = [np.array_equal(o, i) for o, i in zip(out, _images(40, 12))]
    assert 10 <= sum(same) <= 30  # the unchosen half untouched, exactly


def test_rotate_turns_counter_clockwise():
    # A dot right of centre moves up (smaller row) under a CCW turn.
    x = np.zeros([1, 41, 41, 3], np.float32)
    x[0, 20, 38] = 255.0
    out = run(ao.Rotate(10.0), x)[0, :, :, 0]
    r, c = np.unravel_index(np.argmax(out), out.shape)
    assert r < 20 and c >= 36


def test_mirror_is_the_turned_mirror_image_and_keeps_labels():
    x = _images(8, 12, seed=3)
    k = np.array([0, 1, 2, 3, 3, 2, 1, 0], np.int32)
    turned = np.stack([np.rot90(x[i], k[i]) for i in range(8)])
    out, labels = ao.Mirror(1.0)(tf.constant(turned), tf.constant(k), seeds_for(8))
    # The output is the MIRRORED UPRIGHT picture turned by the same label:
    # still an upright picture under label k, so no trace of the label is added.
    want = np.stack([np.rot90(np.fliplr(x[i]), k[i]) for i in range(8)])
    np.testing.assert_array_equal(out.numpy(), want)
    np.testing.assert_array_equal(labels.numpy(), k)
    out, _ = ao.Mirror(0.0)(tf.constant(turned), tf.constant(k), seeds_for(8))
    np.testing.assert_array_equal(out.numpy(), turned)
    many = np.repeat(turned[:1], 40, 0)
    out, _ = ao.Mirror(0.5)(tf.constant(many), tf.zeros([40], tf.int32), seeds_for(40))
    flipped = [np.array_equal(o, many[0][:, ::-1]) for o in out.numpy()]
    assert 10 <= sum(flipped) <= 30 and all(f or np.array_equal(o, many[0])
                                            for f, o in zip(flipped, out.numpy()))
    # It reads the labels, which the model-side part never sees: host only.
    host, device = augment.split_policy(augment.parse_policy("zoom; mirror; gamma"))
    assert host.spec() == "zoom(0.6,1); mirror(0.5)" and device.spec() == "gamma(0.7,1.3)"
    with pytest.raises(ValueError, match="mirror: p=2"):
        ao.Mirror(2)
    # Before a nested policy, the nested one is split too: everything after
    # its JPEG still goes to the device, and host then device is the whole policy.
    policy = augment.parse_policy("mirror; default")
    host, device = augment.split_policy(policy)
    default_host, default_device = augment.split_policy(augment.parse_policy("default"))
    assert host.spec() == f"mirror(0.5); ({default_host.spec()})"
    assert device.spec() == f"({default_device.spec()})" and not device.host
    images, s = tf.constant(turned), seeds_for(8, start=4)
    both = device(*host(images, tf.constant(k), s), s)[0]
    np.testing.assert_allclose(both.numpy(), policy(images, tf.constant(k), s)[0].numpy(),
                               atol=1e-3, rtol=0)


def test_zoom_stretches_a_window_and_commutes_with_quarter_turns():
    size = 16
    ramp = np.tile((10.0 * np.arange(size, dtype=np.float32))[None, None, :, None],
                   [2, size, 1, 3])                         # value = 10 x column
    out = image_filters.zoom_window(tf.constant(ramp), tf.constant([0.5, 1.0]),
                                    tf.constant([3.0, 0.0]), tf.constant([2.0, 0.0])).numpy()
    np.testing.assert_allclose(out[0, 5], 10.0 * (3.0 + 0.5 * np.arange(size))[:, None]
                               * np.ones(3), atol=1e-3)
    np.testing.assert_array_equal(out[1], ramp[1])          # the whole image: exact
    # Turning the image turns the window with it: the window (x0, y0, side d)
    # of the turned image is the window (size-1-y0-d, x0) of the upright one,
    # and that map keeps the uniform distribution of positions.
    x = _images(3, size, seed=5)
    scale, x0, y0 = 0.6, 2.5, 4.0
    d = scale * (size - 1)

    def zoom(images, x0, y0):
        n = len(images)
        return image_filters.zoom_window(tf.constant(images), tf.fill([n], scale),
                                         tf.fill([n], x0), tf.fill([n], y0)).numpy()

    turned = np.rot90(x, 1, axes=(1, 2)).copy()
    np.testing.assert_allclose(zoom(turned, x0, y0),
                               np.rot90(zoom(x, size - 1 - y0 - d, x0), 1, axes=(1, 2)),
                               atol=1e-3)
    # The op: windows inside the image (values stay in the input's range),
    # constants stay constant, and every image gets its own window.
    out = run(ao.Zoom(0.5, 0.9), np.repeat(x[:1], 6, 0))
    assert out.min() >= x[0].min() - 1e-3 and out.max() <= x[0].max() + 1e-3
    assert len({o.tobytes() for o in out}) == 6
    np.testing.assert_allclose(run(ao.Zoom(), const_images(2, 16, 77.0)), 77.0, atol=1e-3)
    with pytest.raises(ValueError, match="0 < lo <= hi <= 1"):
        ao.Zoom(0.0, 1.0)


def test_jpeg_matches_encoder_at_forced_quality():
    img = helpers.upright_image(0, 32, 32).astype(np.float32)
    out = run(ao.Jpeg(70, 70), img[None])[0]
    want = tf.io.decode_jpeg(tf.io.encode_jpeg(img.astype(np.uint8), quality=70)).numpy()
    np.testing.assert_array_equal(out, want)


def test_frequency_blend_with_unit_factors_is_identity():
    x = np.random.default_rng(3).uniform(0, 255, [3, 16, 16, 3]).astype(np.float32)
    np.testing.assert_allclose(run(ao.FrequencyBlend(1, 1, 1, 1), x), x, atol=1e-3)
    mask = ao.FrequencyBlend().mask(seeds_for(3), tf.constant([-1.0, 0.5, 2.0]), [32, 32]).numpy()
    assert mask.min() >= 0 and mask.max() <= 1 + 1e-6 and mask.std() > 0.05


# ---------------------------------------------------------------- statistics

N = 2000


def test_add_and_multiply_parameters_uniform_in_range():
    x = const_images(N, 2, 128.0)
    d = run(ao.Add(-15, 15), x)[:, 0, 0, 0] - 128
    assert d.min() >= -15 and d.max() <= 15
    assert abs(d.mean()) < 0.6 and abs(d.std() - 30 / np.sqrt(12)) < 0.4
    m = run(ao.Multiply(0.8, 1.2), x)[:, 0, 0, 0] / 128
    assert m.min() >= 0.8 - 1e-6 and m.max() <= 1.2 + 1e-6 and abs(m.mean() - 1) < 0.01
    # every pixel and channel of an image got the same value
    out = run(ao.Add(-15, 15), const_images(50, 4))
    assert np.all(out == out[:, :1, :1, :1])


def test_one_of_and_sometimes_frequencies():
    x = const_images(N, 2, 100.0)
    out = run(augment.OneOf([ao.Add(10), ao.Add(20), ao.Add(30)]), x)[:, 0, 0, 0] - 100
    freq = [np.mean(out == v) for v in (10, 20, 30)]
    np.testing.assert_allclose(freq, 1 / 3, atol=0.035)
    out = run(augment.Sometimes(0.3, ao.Add(10)), x)[:, 0, 0, 0] - 100
    assert set(np.unique(out)) <= {0.0, 10.0}
    assert abs(np.mean(out == 10) - 0.3) < 0.035
    out = run(augment.OneOf([ao.Add(10), ao.Add(20)], weights=[3, 1]), x)[:, 0, 0, 0] - 100
    assert abs(np.mean(out == 10) - 0.75) < 0.035


def test_noise_scales_and_per_channel_share():
    x = const_images(400, 16, 128.0)
    for op, std in ((ao.GaussianNoise(5, 5, 0.5), 5.0),
                    (ao.LaplaceNoise(4, 4, 0.5), 4 * np.sqrt(2))):
        out = run(op, x)
        assert abs((out - 128).std() - std) < 0.1 * std, op.spec()
        per_channel = np.mean(np.any(out[..., 0] != out[..., 1], axis=(1, 2)))
        assert abs(per_channel - 0.5) < 0.08, op.spec()
    out = run(ao.PoissonNoise(10, 10, 1.0), x) - 128
    assert abs(np.abs(out).mean() - 10) < 0.3 and abs(np.mean(out > 0) - 0.5) < 0.02
    assert np.all(out == np.round(out))
    scales = (run(ao.GaussianNoise(2, 10, 1.0), x) - 128).std(axis=(1, 2, 3))
    assert scales.min() > 1.5 and scales.max() < 10.8 and scales.std() > 1.5


def test_fused_one_of_matches_grouped_branches():
    # Fusible OneOfs run every branch in one XLA kernel, sparse ones scatter
    # all branches' hits at once; values must match each branch on its own.
    x, s = _images(12), seeds_for(12, start=5)
    for spec in ("gaussian_noise|laplace_noise|poisson_noise",
                 "add|multiply|hue_saturation", "gamma|channel_gamma|sigmoid_contrast",
                 "dropout(0.02)|pepper(0.02)|salt(0.03)"):
        op = augment.parse_policy(spec).ops[0]
        fused = run(op, x, s)
        choice = op.choose(s).numpy()
        for i in range(12):
            alone = run(op.ops[choice[i]], x[i:i + 1], s[i:i + 1])
            np.testing.assert_allclose(fused[i], alone[0], atol=1e-3, err_msg=spec)


def test_sparse_probabilities():
    x = const_images(200, 32, 128.0)
    hit = np.mean(run(ao.Salt(0.01), x)[..., 0] != 128)
    assert abs(hit - 0.01) < 0.002
    hit = np.mean(run(ao.Dropout(0.005), x)[..., 0] == 0)
    assert abs(hit - 0.005) < 0.0015


def test_blur_parameters_follow_range():
    # AverageBlur(1, 5) picks k in {1, 3, 5}: on a delta, the centre keeps 1/k^2.
    x = np.zeros([600, 7, 7, 3], np.float32)
    x[:, 3, 3] = 225.0
    centre = run(ao.AverageBlur(1, 5), x)[:, 3, 3, 0]
    ks = np.round(np.sqrt(225.0 / centre)).astype(int)
    assert set(ks) == {1, 3, 5}
    np.testing.assert_allclose(np.bincount(ks)[[1, 3, 5]] / 600, 1 / 3, atol=0.06)


# ---------------------------------------------------------------- rot90 labels

def test_rotate90_random_matches_tf_rot90_and_moves_marker():
    img = helpers.upright_image(5, 16, 16).astype(np.float32)
    img[:3, :3] = 255.0  # bright top-left marker
    n = 64
    batch = np.repeat(img[None], n, 0)
    out, k = augment.rotate90_random(tf.constant(batch), tf.zeros([n], tf.int32), seeds_for(n))
    out, k = out.numpy(), k.numpy()
    assert set(k) == {0, 1, 2, 3}
    corner = {0: (0, 0), 1: (15, 0), 2: (15, 15), 3: (0, 15)}  # where CCW turns take it
    for i in range(n):
        np.testing.assert_array_equal(out[i], tf.image.rot90(img, int(k[i])).numpy())
        r, c = corner[int(k[i])]
        assert out[i, r, c, 0] == 255.0 and out[i, r, c, 2] == 255.0


def test_rotate90_labels_uniform():
    n = 8000
    _, k = augment.rotate90_random(tf.zeros([n, 2, 2, 1]), tf.zeros([n], tf.int32), seeds_for(n))
    counts = np.bincount(k.numpy(), minlength=4)
    chi2 = ((counts - n / 4) ** 2 / (n / 4)).sum()
    assert chi2 < 16.3  # p = 0.001 for 3 degrees of freedom


# ---------------------------------------------------------------- determinism

def _images(n, size=16, seed=0):
    images = [helpers.upright_image(seed + i, size, size) for i in range(n)]
    return np.stack(images).astype(np.float32)


def test_default_policy_same_seed_same_output_different_seed_differs():
    policy = augment.parse_policy("default")
    x = _images(6)
    a, b = run(policy, x), run(policy, x)
    np.testing.assert_array_equal(a, b)
    c = run(policy, x, seeds_for(6, start=100))
    assert np.all(np.abs(a - c).reshape(6, -1).max(1) > 1)
    assert a.min() >= 0 and a.max() <= 255
    extreme = run(policy, np.concatenate([const_images(3, 16, 0), const_images(3, 16, 255)]))
    assert extreme.min() >= 0 and extreme.max() <= 255


def test_per_image_parameters_and_independence_from_batch():
    policy = augment.parse_policy("add(-15,15); gaussian_noise(3,8); motion_blur(3,5)")
    x = _images(2)
    same = np.repeat(x[:1], 2, 0)
    out = run(policy, same)
    assert np.abs(out[0] - out[1]).max() > 1  # two images, two parameter draws
    # An image's result depends on its own seed, not on its batch.
    seeds = seeds_for(4, start=7)
    full = run(policy, _images(4), seeds)
    alone = run(policy, _images(4)[2:3], seeds[2:3])
    np.testing.assert_allclose(full[2], alone[0], atol=1e-3)


def test_eager_and_dataset_map_give_same_values():
    policy = augment.parse_policy("default")
    x, s = _images(8), seeds_for(8, start=3)
    y = tf.zeros([8], tf.int32)
    eager = policy(tf.constant(x), y, s)[0].numpy()
    ds = tf.data.Dataset.from_tensors((x, y, s)).map(policy)
    mapped = next(iter(ds))[0].numpy()
    np.testing.assert_allclose(eager, mapped, atol=1e-3)


def test_host_and_device_placements_identical():
    spec = "default"
    policy = augment.parse_policy(spec)
    host, device = augment.split_policy(policy)
    assert host.host and not device.host
    layer = augment.AugmentLayer(spec)
    x = tf.constant(_images(8, seed=20))
    s = seeds_for(8, start=11)
    y = tf.zeros([8], tf.int32)
    ds = tf.data.Dataset.from_tensors((x, y, s))

    def rotate_and_host(x, y, s):
        x, y = augment.rotate90_random(x, y, s)
        x, y = host(x, y, s)
        return x, y, s

    def host_placement(x, y, s):
        x, y, s = rotate_and_host(x, y, s)
        return device(x, y, s)

    hx, hy = next(iter(ds.map(host_placement)))
    dx, dy, ds_ = next(iter(ds.map(rotate_and_host)))
    # The layer as Keras runs it in a train step: inside a tf.function.
    lx = tf.function(lambda d: layer(d, training=True))({"images": dx, "seeds": ds_})
    np.testing.assert_array_equal(hy.numpy(), dy.numpy())
    # Same parameters and noise; only float rounding may differ, because
    # TensorFlow fuses exp/log/convolutions differently in a tf.data function,
    # a tf.function and eagerly (measured: <= 1e-4 grey levels).
    np.testing.assert_allclose(hx.numpy(), lx.numpy(), atol=1e-3, rtol=0)
    whole = policy(*augment.rotate90_random(x, y, s), s)[0]
    np.testing.assert_allclose(hx.numpy(), whole.numpy(), atol=1e-3, rtol=0)
    assert np.abs(hx.numpy() - x.numpy()).max() > 10  # it did augment
    # Inference: identity.
    np.testing.assert_array_equal(layer({"images": dx, "seeds": ds_}, training=False).numpy(),
                                  dx.numpy())


def test_static_schedule_under_xla_matches_host_placement():
    # The device schedule (every branch on the whole batch, per-image select)
    # is what XLA compiles inside a train step: the FULL default policy must
    # compile (jit_compile=True fails loudly if any op cannot) and give the
    # host placement's images: same draws, float rounding only.
    policy = augment.parse_policy("default")
    host, device = augment.split_policy(policy)
    x, s = tf.constant(_images(8, size=32, seed=40)), seeds_for(8, start=17)
    y = tf.zeros([8], tf.int32)
    rx, ry = augment.rotate90_random(x, y, s)
    hx = host(rx, ry, s)[0]
    want = next(iter(tf.data.Dataset.from_tensors((hx, ry, s)).map(device)))[0].numpy()
    layer = augment.AugmentLayer("default")
    assert layer.supports_jit and layer.resolved_schedule() == "grouped"  # eager on a CPU
    from upright.pipeline import augment_schedule
    seen = []
    tf.function(lambda: seen.append(augment_schedule.resolve("auto")) or 0,
                jit_compile=True).get_concrete_function()
    assert seen == ["static"]   # traced for XLA
    assert [augment_schedule.resolve(s) for s in ("static", "grouped")] == ["static", "grouped"]
    step = tf.function(lambda d: layer(d, training=True), jit_compile=True)
    feed = {"images": hx, "seeds": s}
    hlo = step.experimental_get_compiler_ir(feed)(stage="hlo")
    assert "fft" in hlo  # frequency_blend's mask: the device part is in the XLA module
    got = step(feed).numpy()
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
    assert np.abs(want - hx.numpy()).max() > 10  # it did augment


@pytest.mark.parametrize("spec", [
    "dropout(0.02)|pepper(0.02)|salt(0.03); salt(0.01)",
    "gaussian_blur|average_blur(3,5)|motion_blur|median_blur(3); sometimes(0.5, median_blur(5))",
    "gaussian_noise|laplace_noise|poisson_noise; sometimes(0.5, gaussian_noise(3, 8, 0.5))",
    "sometimes(0.7, add(-20, 20)|multiply; rotate)"])
def test_static_schedule_equals_grouped_schedule(spec):
    # Per op family, the static schedule's values equal the grouped one's,
    # with and without XLA (sparse hits as dense masks, noise drawn for all
    # channels, medians without bucketing, nested OneOf inside Sometimes).
    policy = augment.parse_policy(spec)
    x, s = tf.constant(_images(12, size=16, seed=3)), seeds_for(12, start=29)
    y = tf.zeros([12], tf.int32)
    grouped = policy(x, y, s)[0].numpy()
    static = policy.call_static(x, y, s)[0].numpy()
    np.testing.assert_allclose(static, grouped, atol=1e-3, rtol=0, err_msg=spec)
    xla = tf.function(lambda x, s: policy.call_static(x, y, s)[0], jit_compile=True)(x, s)
    np.testing.assert_allclose(xla.numpy(), grouped, atol=1e-3, rtol=0, err_msg=spec)


def test_augment_layer_schedules():
    assert augment.AugmentLayer("add", schedule="static").resolved_schedule() == "static"
    grouped = augment.AugmentLayer("add", schedule="grouped")
    assert grouped.resolved_schedule() == "grouped" and not grouped.supports_jit
    seen = []
    layer = augment.AugmentLayer("add")
    layer.resolved_schedule = lambda orig=layer.resolved_schedule: seen.append(orig()) or seen[-1]
    feed = {"images": tf.constant(_images(2)), "seeds": seeds_for(2)}
    tf.function(lambda d: layer(d, training=True), jit_compile=True)(feed)
    tf.function(lambda d: layer(d, training=True))(feed)
    assert seen == ["static", "grouped"]  # XLA trace vs a plain tf.function on a CPU
    with pytest.raises(ValueError, match="schedule"):
        augment.AugmentLayer("add", schedule="dense")


def test_augment_layer_serializes():
    import keras
    layer = augment.AugmentLayer("add(-5,5); median_blur(3)")
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert clone.policy_spec == "add(-5,5); median_blur(3)"
    x, s = tf.constant(_images(2)), seeds_for(2)
    np.testing.assert_array_equal(layer({"images": x, "seeds": s}, training=True).numpy(),
                                  clone({"images": x, "seeds": s}, training=True).numpy())


# ---------------------------------------------------------------- spec strings

def test_parse_policy_specs():
    x = _images(3)
    np.testing.assert_array_equal(run(augment.parse_policy("none"), x), x)
    default = augment.parse_policy("default")
    assert augment.parse_policy(default.spec()).spec() == default.spec()
    np.testing.assert_array_equal(run(augment.parse_policy(default.spec()), x), run(default, x))
    p = augment.parse_policy("add(-20,20)|multiply; gaussian_blur; sometimes(0.5, jpeg(60,80))")
    assert [type(op).__name__ for op in p.ops] == ["OneOf", "GaussianBlur", "Sometimes"]
    assert p.ops[0].ops[0].lo == -20 and p.ops[0].ops[1].hi == 1.2
    host, device = augment.split_policy(p)
    assert len(host.ops) == 3 and len(device.ops) == 0  # jpeg last: all on host
    np.testing.assert_array_equal(run(augment.parse_policy("add(10)"), const_images(1)), 138.0)


@pytest.mark.parametrize("spec", ["ad(-20,20)", "add(1,2)|gausian_blur", "sometimes(0.5, jepg)"])
def test_parse_policy_typo_lists_known_names(spec):
    with pytest.raises(ValueError, match="known ops: .*gaussian_blur.*jpeg"):
        augment.parse_policy(spec)


@pytest.mark.parametrize("spec", ["", "add(", "add(1,2", "sometimes(x, add)", "add(2,1)",
                                  "median_blur(4)", "add;;add", "add(a)"])
def test_parse_policy_bad_syntax(spec):
    with pytest.raises(ValueError):
        augment.parse_policy(spec)
