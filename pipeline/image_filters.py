"""Image filters with per-image parameters: the numerical kernels of the blur
and geometry ops (augment_ops.py), on whole batches.

  * convolution with a kernel per image: the batch folded into the channels of
    one depthwise convolution ([B, H, W, C] -> [1, H, W, B*C]), or, for XLA,
    a sum of shifted weighted copies (`convolve_taps`); the Gaussian, box and
    motion-line kernels;
  * exact medians (3x3 by shared column sorts, 5x5 and 7x7 by forgetful
    selection), XLA-compiled, padded to buckets of batch sizes;
  * bilinear warps (small rotations, zoom windows) in one XLA gather kernel.

Reflect padding (cv2 BORDER_REFLECT_101) everywhere, built from slices so that
an empty batch (a OneOf branch no image chose) passes.
"""
import math

import tensorflow as tf


def reflect_pad(images, ph: int, pw: int):
    """Reflect padding (cv2 BORDER_REFLECT_101) of the two spatial axes.

    Built from slices so that it also accepts an empty batch (MirrorPad
    rejects a zero-sized batch axis).
    """
    x = images
    if ph:
        x = tf.concat([tf.reverse(x[:, 1:ph + 1], [1]), x, tf.reverse(x[:, -ph - 1:-1], [1])], 1)
    if pw:
        x = tf.concat([tf.reverse(x[:, :, 1:pw + 1], [2]), x,
                       tf.reverse(x[:, :, -pw - 1:-1], [2])], 2)
    return x


def _fold(x):
    """[B, H, W, C] -> [1, H, W, B*C]: the batch into the channels."""
    shape = tf.shape(x)
    return tf.reshape(tf.transpose(x, [1, 2, 0, 3]), [1, shape[1], shape[2], shape[0] * shape[3]])


def _unfold(y, b, c):
    """[1, H, W, B*C] -> [B, H, W, C]."""
    shape = tf.shape(y)
    return tf.transpose(tf.reshape(y, [shape[1], shape[2], b, c]), [2, 0, 1, 3])


def _depthwise_folded(x, kernels, c):
    """VALID depthwise convolution of a folded batch with per-image kernels
    [B, kh, kw] (each image's kernel repeated over its c channels)."""
    kh, kw = kernels.shape[1], kernels.shape[2]
    b = tf.shape(kernels)[0]
    f = tf.transpose(kernels, [1, 2, 0])[:, :, :, None]
    f = tf.reshape(tf.broadcast_to(f, [kh, kw, b, c]), [kh, kw, b * c, 1])
    # One zero channel group extra: a depthwise filter may not be empty (a
    # OneOf branch can get no images).
    shape = tf.shape(x)
    x = tf.concat([x, tf.zeros([1, shape[1], shape[2], c])], 3)
    f = tf.concat([f, tf.zeros([kh, kw, c, 1])], 2)
    return tf.nn.depthwise_conv2d(x, f, [1, 1, 1, 1], "VALID")[..., :b * c]


def convolve_per_image(images, kernels):
    """Each image convolved with its own 2-D kernel, reflect padding.

    images float32 [B, H, W, C]; kernels float32 [B, kh, kw] (kh, kw static,
    odd). The batch is folded into the channels of ONE depthwise convolution:
    [B, H, W, C] -> [1, H, W, B*C] with a [kh, kw, B*C, 1] filter.
    """
    kh, kw = kernels.shape[1], kernels.shape[2]
    b, c = tf.shape(images)[0], images.shape[3]
    x = _fold(reflect_pad(images, kh // 2, kw // 2))
    return _unfold(_depthwise_folded(x, kernels, c), b, c)


def convolve_separable(images, kernels):
    """Each image convolved with its own separable kernel k k^T ([B, K], K
    odd), reflect padding: two 1-D depthwise passes in one folded layout."""
    k = kernels.shape[1]
    b, c = tf.shape(images)[0], images.shape[3]
    x = _fold(reflect_pad(images, k // 2, k // 2))
    x = _depthwise_folded(x, tf.reshape(kernels, [-1, 1, k]), c)
    x = _depthwise_folded(x, tf.reshape(kernels, [-1, k, 1]), c)
    return _unfold(x, b, c)


def convolve_taps(images, kernels):
    """convolve_per_image as a sum of shifted, per-image weighted copies of the
    reflect-padded images (kh kw taps, [B, kh, kw] kernels): elementwise work
    that XLA fuses into one pass. The static schedule's form: XLA's CPU
    backend runs the batch-folded depthwise convolution ~20x slower."""
    kh, kw = kernels.shape[1], kernels.shape[2]
    h, w = tf.shape(images)[1], tf.shape(images)[2]
    x = reflect_pad(images, kh // 2, kw // 2)
    out = None
    for i in range(kh):
        for j in range(kw):
            term = tf.reshape(kernels[:, i, j], [-1, 1, 1, 1]) * x[:, i:i + h, j:j + w, :]
            out = term if out is None else out + term
    return out


def convolve_separable_taps(images, kernels):
    """convolve_separable as two tap sums ([B, K] kernels), for XLA."""
    k = kernels.shape[1]
    x = convolve_taps(images, tf.reshape(kernels, [-1, 1, k]))
    return convolve_taps(x, tf.reshape(kernels, [-1, k, 1]))


def gaussian_kernels(sigma, size: int):
    """Normalised 1-D Gaussians, float32 [B, size], one per sigma [B]."""
    x = tf.range(size, dtype=tf.float32) - (size - 1) / 2.0
    g = tf.exp(-0.5 * tf.square(x[None, :] / sigma[:, None]))
    return g / tf.reduce_sum(g, 1, keepdims=True)


def box_kernels(k, size: int):
    """1-D box filters of odd length k [B] (int32) centred in `size` taps."""
    x = tf.abs(tf.range(size, dtype=tf.int32) - size // 2)
    inside = tf.cast(x[None, :] <= k[:, None] // 2, tf.float32)
    return inside / tf.reduce_sum(inside, 1, keepdims=True)


def motion_kernels(k, angle_deg, size: int):
    """Line kernels of length k [B] (int32) at any angle [B] (degrees, counter-
    clockwise from the x axis), centred in a size x size grid: float32
    [B, size, size], each summing to 1.

    In the line's own frame a tap at (along, across) gets the length of the
    segment [-k/2, k/2] inside its unit cell along the line, times a tent
    max(0, 1 - |across|) across it: the k-pixel box line that imgaug's
    MotionBlur rotates with bilinear interpolation, in closed form. At 0 and
    90 degrees it is exactly k taps of 1/k.
    """
    c = (size - 1) / 2.0
    grid = tf.range(size, dtype=tf.float32) - c
    gx = grid[None, None, :]          # column offset, x to the right
    gy = -grid[None, :, None]         # row offset, y up
    rad = angle_deg * (math.pi / 180.0)
    cos = tf.reshape(tf.cos(rad), [-1, 1, 1])
    sin = tf.reshape(tf.sin(rad), [-1, 1, 1])
    along = gx * cos + gy * sin
    across = -gx * sin + gy * cos
    half = tf.reshape(tf.cast(k, tf.float32), [-1, 1, 1]) / 2.0
    kern = (tf.clip_by_value(half + 0.5 - tf.abs(along), 0.0, 1.0)
            * tf.nn.relu(1.0 - tf.abs(across)))
    return kern / tf.reduce_sum(kern, [1, 2], keepdims=True)


def _shifted(images, k: int):
    """The k*k shifted views of reflect-padded images (each [B, H, W, C])."""
    p = k // 2
    x = reflect_pad(images, p, p)
    h, w = tf.shape(images)[1], tf.shape(images)[2]
    return [x[:, i:i + h, j:j + w, :] for i in range(k) for j in range(k)]


def _med3(a, b, c):
    return tf.maximum(tf.minimum(a, b), tf.minimum(tf.maximum(a, b), c))


def median3(images):
    """Exact 3x3 median per channel (reflect border).

    Sort every vertical triple once (shared by the three windows that hold
    it); the 3x3 median is then med3(max of the three lows, med3 of the three
    middles, min of the three highs) over horizontally adjacent columns, the
    max and min by 1x3 max-pooling (one fused pass each).
    """
    h, w = tf.shape(images)[1], tf.shape(images)[2]
    x = reflect_pad(images, 1, 1)
    a, b, c = x[:, 0:h], x[:, 1:h + 1], x[:, 2:h + 2]      # [B, H, W + 2, C]
    lo, hi = tf.minimum(a, b), tf.maximum(a, b)
    mid = tf.maximum(lo, tf.minimum(hi, c))
    lo, hi = tf.minimum(lo, c), tf.maximum(hi, c)
    max_lo = tf.nn.max_pool2d(lo, [1, 3], 1, "VALID")
    min_hi = -tf.nn.max_pool2d(-hi, [1, 3], 1, "VALID")
    return _med3(max_lo, _med3(mid[:, :, 0:w], mid[:, :, 1:w + 1], mid[:, :, 2:w + 2]), min_hi)


def median_forgetful(images, k: int):
    """Exact k x k median (k odd) by forgetful selection: keep n//2 + 2
    candidates, repeatedly drop the current min and max and take in the next
    value. O(n^2 / 2) min/max ops instead of a full sort; used for k >= 5."""
    vals = _shifted(images, k)
    n = len(vals)
    r = n // 2 + 2
    pool, rest = vals[:r], vals[r:]
    while True:
        # Move the min to pool[0] and the max to pool[-1] by one pass each.
        for i in range(1, len(pool)):
            pool[0], pool[i] = tf.minimum(pool[0], pool[i]), tf.maximum(pool[0], pool[i])
        for i in range(1, len(pool) - 1):
            pool[i], pool[-1] = tf.minimum(pool[i], pool[-1]), tf.maximum(pool[i], pool[-1])
        pool = pool[1:-1]
        if not rest:
            break
        pool.append(rest.pop(0))
    # Remaining pool: odd length with the median in the middle of its order.
    while len(pool) > 1:
        for i in range(1, len(pool)):
            pool[0], pool[i] = tf.minimum(pool[0], pool[i]), tf.maximum(pool[0], pool[i])
        for i in range(1, len(pool) - 1):
            pool[i], pool[-1] = tf.minimum(pool[i], pool[-1]), tf.maximum(pool[i], pool[-1])
        pool = pool[1:-1]
    return pool[0]


MEDIAN_XLA = {
    3: tf.function(median3, jit_compile=True, reduce_retracing=True, autograph=False),
    5: tf.function(lambda x: median_forgetful(x, 5), jit_compile=True, reduce_retracing=True,
                   autograph=False),
    7: tf.function(lambda x: median_forgetful(x, 7), jit_compile=True, reduce_retracing=True,
                   autograph=False),
}


@tf.autograph.experimental.do_not_convert
def run_xla_bucketed(fn, images, bucket: int = 8):
    """fn(images) for an XLA-compiled fn, with the batch zero-padded to a
    multiple of `bucket`: a OneOf hands a branch a different number of images
    every batch, and XLA compiles once per shape, so this bounds the
    compilations (9 shapes for batches of 64) for a few padded rows.

    XLA fuses the median's min/max network into one pass: ~3x faster on a CPU.
    """
    n = tf.shape(images)[0]
    padded = (n + bucket - 1) // bucket * bucket
    pad = tf.zeros(tf.concat([[padded - n], tf.shape(images)[1:]], 0), images.dtype)
    return fn(tf.concat([images, pad], 0))[:n]


def rotation_transforms(angle_deg, height, width):
    """Projective transforms [B, 8] (output -> input coordinates) that turn
    each image by angle_deg [B] degrees counter-clockwise about its centre."""
    a = angle_deg * (math.pi / 180.0)
    cos, sin = tf.cos(a), tf.sin(a)
    cx = (tf.cast(width, tf.float32) - 1.0) / 2.0
    cy = (tf.cast(height, tf.float32) - 1.0) / 2.0
    # Input point for output (x, y): rotate (x - cx, y - cy) back by the angle
    # (y points down, so a counter-clockwise turn on screen is -a in (x, y)).
    a0, a1 = cos, -sin
    b0, b1 = sin, cos
    a2 = cx - a0 * cx - a1 * cy
    b2 = cy - b0 * cx - b1 * cy
    zeros = tf.zeros_like(a)
    return tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], 1)


@tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
def rotate_bilinear(images, angle_deg):
    """Turns each image by its angle (degrees, counter-clockwise) about its
    centre; bilinear, edge fill (source coordinates clamped to the image, as
    ImageProjectiveTransformV3's fill_mode NEAREST: no empty corners).

    images float32 [B, H, W, C]; angle_deg float32 [B]. Angle 0 returns the
    image exactly. XLA-compiled: the coordinate maths, the four gathers and
    the interpolation fuse into one loop, ~5x faster on a CPU than
    ImageProjectiveTransformV3 (whose CPU kernel is a per-pixel functor).
    """
    shape = tf.shape(images)
    return _affine_bilinear(images, rotation_transforms(angle_deg, shape[1], shape[2]))


def window_transforms(scale, x0, y0):
    """Transforms [B, 8] that stretch the square window with corner (x0, y0)
    and side scale x (size - 1) pixels (pixel-centre coordinates) over the
    whole image: output (x, y) reads input (x0 + scale x, y0 + scale y)."""
    zeros = tf.zeros_like(scale)
    return tf.stack([scale, zeros, x0, zeros, scale, y0, zeros, zeros], 1)


@tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
def zoom_window(images, scale, x0, y0):
    """Each image's window (window_transforms) stretched over the image, bilinear.

    images float32 [B, H, W, C]; scale, x0, y0 float32 [B], scale in (0, 1],
    the window inside the image: 0 <= x0 <= (1 - scale)(W - 1), likewise y0.
    scale 1 at (0, 0) returns the image exactly.
    """
    return _affine_bilinear(images, window_transforms(scale, x0, y0))


def _affine_bilinear(images, t):
    """Samples images [B, H, W, C] at the input points of transforms t [B, 8]
    (output -> input, the first six entries), bilinear, coordinates clamped to
    the image. Traced inside the XLA functions above."""
    b, h, w, c = tf.unstack(tf.shape(images))
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    yy = tf.range(hf)[None, :, None]
    xx = tf.range(wf)[None, None, :]
    a0, a1, a2, b0, b1, b2 = [tf.reshape(t[:, i], [-1, 1, 1]) for i in range(6)]
    sx = tf.clip_by_value(a0 * xx + a1 * yy + a2, 0.0, wf - 1.0)
    sy = tf.clip_by_value(b0 * xx + b1 * yy + b2, 0.0, hf - 1.0)
    x0, y0 = tf.floor(sx), tf.floor(sy)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    x0, y0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
    x1, y1 = tf.minimum(x0 + 1, w - 1), tf.minimum(y0 + 1, h - 1)
    flat = tf.reshape(images, [-1, c])
    base = tf.reshape(tf.range(b) * h * w, [-1, 1, 1])

    def pick(yi, xi):
        return tf.gather(flat, base + yi * w + xi)

    p00, p01, p10, p11 = pick(y0, x0), pick(y0, x1), pick(y1, x0), pick(y1, x1)
    top = p00 + fx * (p01 - p00)
    bottom = p10 + fx * (p11 - p10)
    return top + fy * (bottom - top)
