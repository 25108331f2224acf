"""Batched, per-image, seeded pixel ops: the leaves of an augmentation policy.

Every op is a callable `op(images, labels, seeds) -> (images, labels)`:
  images: float32 [B, S, S, 3], values in [0, 255] (outputs are clipped to it);
  labels: int32 [B] in [0, 4) (pixel ops pass them through unchanged);
  seeds:  int32 [B, 2], one stateless seed per image.
Each op folds its own constant (its `salt`, set from its position in a policy)
into every image's seed, then draws that image's parameters from the folded
seed only. So an image's output depends on its own pixels and seed alone: not
on the batch it sits in, its position there, or the other ops of the policy.
That is what lets a OneOf compute a branch only for the images that chose it,
and lets the host (tf.data) and device (Keras layer) placements agree exactly.

Random numbers come from per_image_random.py: per-image scalars from
`uniforms`, per-pixel noise from the counter-based `pixel_bits`.

A leaf op declares its traits (Op below) and implements ONE transform;
augment_schedule.py is the one scheduler that reads those traits and picks how
an op runs (its own transform, masked, dense in a fused kernel, grouped by
choice, hits as a list or as masks): no op carries its own schedules.

Ranges are in OUTPUT pixels (the training resolution, e.g. S=128); see
`augment.py` for the mapping from the source article's full-resolution ranges.
"""
import math

import numpy as np
import tensorflow as tf

from upright.pipeline import augment_schedule as schedule
from upright.pipeline import image_filters as filters
from upright.pipeline import per_image_random as rnd

plain = schedule.plain  # no AutoGraph in our ops (faster traces)


def per_image(values):
    """[B] -> [B, 1, 1, 1] for broadcasting against images."""
    return tf.reshape(values, [-1, 1, 1, 1])


# ---------------------------------------------------------------- base class

class Op:
    """Base of all ops. A leaf sets `name`, its traits, and implements

        transform(images, seeds, u, **form) -> images

    (seeds already folded with the op's salt, u float32 [B, num_params] its
    per-image uniforms or None; the scheduler clips the result if `clips`).
    `form` holds only what the traits ask for: `chosen` (maskable), `variant`
    (variants), `labels` (reads_labels), `static_args` (static schedule).

    Traits, read by augment_schedule.path (the one place that picks the path):
      pointwise     elementwise (or per-pixel noise): cheap to run on every
                    image, fused, in one XLA kernel (a dense OneOf, a masked
                    Sometimes);
      maskable      transform takes `chosen` (bool [B]) and is exactly the
                    identity where it is False: a Sometimes runs it on the
                    whole batch;
      sparse        changes few pixels: `candidates` and `value` give its hits
                    (a list or dense masks) where `sparse_ok(images)`;
                    transform is its per-pixel form elsewhere;
      variants      n > 1: transform takes `variant` in range(n), and
                    `variant(u)` (int32 [B]) says which one each image gets;
      host          no accelerator kernel (JPEG) or reads the labels:
                    `split_policy` keeps it in the tf.data part;
      reads_labels  transform takes the labels: callers that pass none
                    refuse it (augment.refuse_label_readers);
      static_args   keyword arguments of transform in the static schedule
                    (for XLA: the blurs' tap sums, medians without buckets);
      identity      Identity only: skipped by a grouped OneOf.
    """
    name = "op"
    kind = "leaf"  # composites (augment.py): "sequence", "choice", "optional"
    pointwise = False
    maskable = False
    sparse = False
    variants = 1
    host = False
    reads_labels = False
    static_args = {}
    identity = False
    num_params = 0  # per-image uniforms drawn for transform
    clips = True    # False where outputs of [0, 255] inputs stay in [0, 255]

    def __init__(self):
        self.salt = rnd.salt_of(self.name)

    def bind(self, path: str):
        """Sets the op's salt from its position in a policy (called by parents)."""
        self.salt = rnd.salt_of(path)

    @plain
    def __call__(self, images, labels, seeds):
        """The grouped (host) schedule: (images, labels) in batch order."""
        return schedule.run(self, images, labels, seeds)

    @plain
    def call_static(self, images, labels, seeds):
        """The same values as __call__, with static shapes only (no grouping
        of rows by a random choice, no data-dependent sizes): what XLA needs
        to compile a policy inside a model step."""
        return schedule.run(self, images, labels, seeds, static=True)

    def transform(self, images, seeds, u, **form):
        raise NotImplementedError

    def spec(self) -> str:
        return self.name

    def __repr__(self):
        return self.spec()


def _fmt(*values) -> str:
    return ",".join(f"{v:g}" for v in values)


class RangeOp(Op):
    """An op with one parameter drawn uniformly in [lo, hi] per image."""
    num_params = 1
    default = (0.0, 0.0)

    def __init__(self, lo=None, hi=None):
        super().__init__()
        if lo is None:
            lo, hi = self.default
        elif hi is None:
            hi = lo  # one number: a fixed value, e.g. add(10)
        self.lo, self.hi = float(lo), float(hi)
        if self.hi < self.lo:
            raise ValueError(f"{self.name}: range ({self.lo}, {self.hi}) is empty")

    def draw(self, u):
        """The per-image parameter, float32 [B]."""
        return rnd.lerp(self.lo, self.hi, u[:, 0])

    def spec(self):
        return f"{self.name}({_fmt(self.lo, self.hi)})"


# ---------------------------------------------------------------- identity

class Identity(Op):
    name = "identity"
    identity = True


# ---------------------------------------------------------------- colour

class Add(RangeOp):
    """x + v, one v per image (all channels), v in [lo, hi] grey levels."""
    pointwise = True
    name = "add"
    default = (-15.0, 15.0)

    def transform(self, images, seeds, u):
        return images + per_image(self.draw(u))


class Multiply(RangeOp):
    """x * m, one m per image."""
    pointwise = True
    name = "multiply"
    default = (0.8, 1.2)

    def transform(self, images, seeds, u):
        return images * per_image(self.draw(u))


class HueSaturation(RangeOp):
    """Hue and saturation (HSV) both multiplied by one m per image (imgaug
    MultiplyHueAndSaturation, per_channel=False); hue wraps around."""
    pointwise = True
    name = "hue_saturation"
    default = (0.8, 1.1)

    def transform(self, images, seeds, u):
        m = per_image(self.draw(u))
        # tf.image's fused kernels; a hand-written elementwise version was
        # slower on a CPU (TensorFlow's select and last-axis broadcasts are).
        hsv = tf.image.rgb_to_hsv(images * (1.0 / 255.0))
        h = tf.math.floormod(hsv[..., 0:1] * m, 1.0)
        s = tf.minimum(hsv[..., 1:2] * m, 1.0)
        return tf.image.hsv_to_rgb(tf.concat([h, s, hsv[..., 2:3]], -1)) * 255.0


# ---------------------------------------------------------------- noise

class _Noise(Op):
    """Additive noise with a per-image scale in [lo, hi]; per channel with
    probability `per_channel` (else one value per pixel for all channels).

    Two variants: 0 draws [S, S, 3] (per channel), 1 draws [S, S, 1] (shared).
    Channel 0 of a 3-channel draw is not the 1-channel draw (element indices
    differ), so the grouped schedule draws the shared images' third of the
    numbers only, and the static one draws both and selects."""
    pointwise = True  # per-pixel noise: fuses in a dense XLA OneOf
    variants = 2
    num_params = 2
    default = (0.0, 0.0)

    def __init__(self, lo=None, hi=None, per_channel=0.5):
        super().__init__()
        self.lo = float(self.default[0] if lo is None else lo)
        self.hi = float(self.default[1] if hi is None else hi)
        self.per_channel = float(per_channel)
        if self.hi < self.lo:
            raise ValueError(f"{self.name}: range ({self.lo}, {self.hi}) is empty")

    def spec(self):
        return f"{self.name}({_fmt(self.lo, self.hi, self.per_channel)})"

    def variant(self, u):
        """0 (per channel) or 1 (shared channels) per image, int32 [B]."""
        return tf.cast(u[:, 1] >= self.per_channel, tf.int32)

    def transform(self, images, seeds, u, variant):
        scale = per_image(rnd.lerp(self.lo, self.hi, u[:, 0]))
        shape = tf.concat([tf.shape(images)[1:3], [1 if variant else 3]], 0)
        return images + self.sample(seeds, shape, scale)


class GaussianNoise(_Noise):
    """N(0, scale^2) per pixel; scale in grey levels."""
    name = "gaussian_noise"
    default = (0.02, 0.05 * 255)

    def sample(self, seeds, shape, scale):
        return rnd.pixel_draw(seeds, shape, "normal") * scale


class LaplaceNoise(_Noise):
    """Laplace(0, scale) per pixel by inverse CDF of one uniform."""
    name = "laplace_noise"
    default = (0.02, 0.05 * 255)

    def sample(self, seeds, shape, scale):
        v = rnd.pixel_uniform(seeds, shape) - 0.5  # in [-0.5, 0.5)
        return -scale * tf.sign(v) * tf.math.log1p(-2.0 * tf.abs(v))


class PoissonNoise(_Noise):
    """imgaug AdditivePoissonNoise: +-Poisson(lam) with a random sign, lam in
    [lo, hi] per image. Poisson(lam) is drawn by its normal approximation
    round(lam + sqrt(lam) z), clipped at 0: for lam >= 8 its skew is <= 0.35
    and its cost is one 32-bit draw instead of a rejection loop: bit 0 is the
    sign, the other 31 give z (bits_to_normal). (The "scale" here is lam.)"""
    name = "poisson_noise"
    default = (8.0, 16.0)

    def sample(self, seeds, shape, lam):
        bits = rnd.pixel_bits(seeds, shape)
        z = rnd.bits_to_normal(tf.bitwise.right_shift(bits, 1), pop_bits=23)
        k = tf.maximum(tf.round(lam + tf.sqrt(lam) * z), 0.0)
        # Sign from bit 0 by arithmetic: tf.where is slow on a CPU.
        sign = 1.0 - 2.0 * tf.cast(tf.bitcast(tf.bitwise.bitwise_and(
            bits, tf.constant(1, tf.uint32)), tf.int32), tf.float32)
        return k * sign


# ---------------------------------------------------------------- sparse

class _Replace(Op):
    """Replaces each pixel (all channels together) with probability p.

    Cost is proportional to the number of hits, not of pixels: per image the
    hit count is drawn from the normal approximation of Binomial(H W, p)
    (at most `max_hits`), and that many positions are drawn uniformly (two
    draws landing on one pixel make one hit: at 128 px and p = 0.01 that
    lowers the rate by ~0.5 %). A hit's value is a function of its position,
    so duplicates agree and the scatter is deterministic.
    """
    clips = False
    sparse = True
    num_params = 1

    def __init__(self, p=None):
        super().__init__()
        self.p = float(self.default_p if p is None else p)
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"{self.name}: p={self.p} not in [0, 1]")

    def spec(self):
        return f"{self.name}({_fmt(self.p)})"

    def sparse_ok(self, images):
        """Whether the hit form applies (known size, small p)."""
        return images.shape[1] is not None and images.shape[2] is not None and self.p <= 0.05

    def candidates(self, images, seeds, chosen=None):
        """The hit form's draws: (h, w, max_hits, count float32 [B] hits per
        image (0 where `chosen` is False), keys [B] of the folded seeds, pos
        int32 [B, max_hits] candidate positions in [0, h w)). `seeds` are
        the caller's (unfolded) seeds; a hit's value is value(uniform of
        hash_bits(key, position)), so duplicates agree."""
        seeds = rnd.fold_seeds(seeds, self.salt)
        u = rnd.uniforms(seeds, self.num_params)
        h, w = images.shape[1], images.shape[2]
        lam = self.p * h * w
        sd = math.sqrt(lam * (1.0 - self.p))
        max_hits = int(math.ceil(lam + 6.0 * sd + 8.0))
        z = tf.math.ndtri(tf.clip_by_value(u[:, 0], 1e-7, 1.0 - 1e-7))
        count = tf.clip_by_value(tf.round(lam + sd * z), 0.0, float(max_hits))
        if chosen is not None:
            count *= tf.cast(chosen, tf.float32)
        keys = rnd.image_keys(seeds)
        bits = rnd.hash_bits(keys[:, None],
                             tf.constant(np.arange(max_hits, dtype=np.uint32) + np.uint32(1 << 31)))
        # Position: a 24-bit uniform scaled to [0, h w).
        pos = tf.cast(tf.floor(rnd.bits_to_uniform(bits) * (h * w)), tf.int32)
        return h, w, max_hits, count, keys, tf.minimum(pos, h * w - 1)

    def transform(self, images, seeds, u):
        """One uniform per pixel: for unknown sizes and large p."""
        shape = tf.concat([tf.shape(images)[1:3], [1]], 0)
        v = rnd.pixel_uniform(seeds, shape)
        # Given a hit, v / p is again uniform in [0, 1): reuse it for the value.
        return tf.where(v < self.p, self.value(v / max(self.p, 1e-12)), images)


def _arcsine_low(w):
    """imgaug's pepper level in [0, 127.5]: 255 * (0.5 - |Beta(.5,.5) - 0.5|),
    mostly near 0. Beta(0.5, 0.5) = sin^2(pi w / 2) for uniform w."""
    beta = tf.square(tf.sin(0.5 * math.pi * w))
    return 255.0 * (0.5 - tf.abs(beta - 0.5))


class Dropout(_Replace):
    """Pixels set to 0 with probability p (imgaug Dropout, per_channel=False)."""
    name = "dropout"
    default_p = 0.005

    def value(self, w):
        return tf.zeros_like(w)


class Pepper(_Replace):
    """Dark pixels with probability p, level in [0, 127.5], mostly near 0."""
    name = "pepper"
    default_p = 0.005

    def value(self, w):
        return _arcsine_low(w)


class Salt(_Replace):
    """Bright pixels with probability p, level in [127.5, 255], mostly near 255."""
    name = "salt"
    default_p = 0.01

    def value(self, w):
        return 255.0 - _arcsine_low(w)


# ---------------------------------------------------------------- frequency blend

class FrequencyBlend(Op):
    """imgaug FrequencyNoiseAlpha(exponent, first=Multiply(m), second=
    LinearContrast(c)): out = a * (x m) + (1 - a) * contrast(x, c), where the
    mask a in [0, 1] is per-image 1/f^-exponent noise made on a 16x16 grid by
    FFT, normalised to [0, 1] and resized bilinearly to S x S."""
    name = "frequency_blend"
    maskable = True
    clips = False  # _blend clips
    num_params = 3
    grid = 16

    def __init__(self, mul_lo=0.9, mul_hi=1.1, con_lo=0.8, con_hi=1.2, exp_lo=-1.0, exp_hi=2.0):
        super().__init__()
        self.mul = (float(mul_lo), float(mul_hi))
        self.con = (float(con_lo), float(con_hi))
        self.exponent = (float(exp_lo), float(exp_hi))

    def spec(self):
        return f"{self.name}({_fmt(*self.mul, *self.con, *self.exponent)})"

    def mask(self, seeds, exponent, size):
        g = self.grid
        noise = rnd.pixel_draw(seeds, [g, g], "normal")
        f = np.fft.fftfreq(g)
        radius = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
        radius[0, 0] = 1.0 / g  # keep the mean finite
        log_r = tf.constant(np.log(radius), tf.float32)
        # Amplitude radius^exponent: exponent < 0 gives blobs, > 0 fine pattern.
        amp = tf.exp(exponent[:, None, None] * log_r[None])
        spec = tf.signal.fft2d(tf.complex(noise, tf.zeros_like(noise))) * tf.complex(amp, 0.0)
        field = tf.math.real(tf.signal.ifft2d(spec))
        lo = tf.reduce_min(field, [1, 2], keepdims=True)
        hi = tf.reduce_max(field, [1, 2], keepdims=True)
        field = (field - lo) / tf.maximum(hi - lo, 1e-6)
        return tf.image.resize(field[..., None], size, method="bilinear")

    def transform(self, images, seeds, u, chosen=None):
        m = per_image(rnd.lerp(*self.mul, u[:, 0]))
        c = per_image(rnd.lerp(*self.con, u[:, 1]))
        a = self.mask(seeds, rnd.lerp(*self.exponent, u[:, 2]), tf.shape(images)[1:3])
        if chosen is None:
            return _blend(images, a, m, c)
        # Masked: masks for the whole batch (small FFTs), then one fused XLA pass.
        return _blend_masked(images, a, m, c, per_image(tf.cast(chosen, tf.float32)))


def _blend(images, a, m, c):
    first = images * m
    second = 127.5 + c * (images - 127.5)
    return tf.clip_by_value(second + a * (first - second), 0.0, 255.0)


@tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
def _blend_masked(images, a, m, c, chosen):
    # x + chosen * (blend - x): exactly x where chosen is 0.
    return images + chosen * (_blend(images, a, m, c) - images)


# ---------------------------------------------------------------- blurs

class GaussianBlur(RangeOp):
    """Gaussian blur, sigma in [lo, hi] output pixels per image (separable)."""
    name = "gaussian_blur"
    default = (0.5, 1.0)
    static_args = {"convolve": filters.convolve_separable_taps}

    def transform(self, images, seeds, u, convolve=filters.convolve_separable):
        size = 2 * max(1, math.ceil(3 * self.hi)) + 1
        return convolve(images, filters.gaussian_kernels(tf.maximum(self.draw(u), 1e-3), size))



class AverageBlur(Op):
    """Box blur, odd size k in [lo, hi] per image (separable)."""
    name = "average_blur"
    num_params = 1
    static_args = {"convolve": filters.convolve_separable_taps}

    def __init__(self, lo=3, hi=None):
        super().__init__()
        self.lo, self.hi = int(lo), int(lo if hi is None else hi)
        if self.lo < 1 or self.hi < self.lo or self.lo % 2 == 0 or self.hi % 2 == 0:
            raise ValueError(f"{self.name}: sizes must be odd, 1 <= lo <= hi; "
                             f"got {self.lo}, {self.hi}")

    def spec(self):
        return f"{self.name}({self.lo},{self.hi})"

    def transform(self, images, seeds, u, convolve=filters.convolve_separable):
        if self.lo == self.hi:  # one size for all: a pooling pass is cheaper
            p = self.lo // 2
            return tf.nn.avg_pool2d(filters.reflect_pad(images, p, p), self.lo, 1, "VALID")
        k = self.lo + 2 * rnd.randint(0, (self.hi - self.lo) // 2, u[:, 0])
        return convolve(images, filters.box_kernels(k, self.hi))



class MotionBlur(Op):
    """Motion blur: a line of length k in [lo, hi] pixels at an angle uniform
    in [0, 360) per image (2-D per-image kernel, one depthwise convolution)."""
    name = "motion_blur"
    num_params = 2
    static_args = {"convolve": filters.convolve_taps}

    def __init__(self, lo=3, hi=5):
        super().__init__()
        self.lo, self.hi = int(lo), int(hi)
        if self.lo < 1 or self.hi < self.lo:
            raise ValueError(f"{self.name}: need 1 <= lo <= hi, got {self.lo}, {self.hi}")

    def spec(self):
        return f"{self.name}({self.lo},{self.hi})"

    def transform(self, images, seeds, u, convolve=filters.convolve_per_image):
        size = self.hi if self.hi % 2 else self.hi + 1
        k = rnd.randint(self.lo, self.hi, u[:, 0])
        return convolve(images, filters.motion_kernels(k, 360.0 * u[:, 1], size))



class MedianBlur(Op):
    """Median blur with a fixed odd size k, exact (3: shared column sorts and
    max-pools; 5, 7: forgetful selection), XLA-compiled (filters.run_xla_bucketed)."""
    clips = False
    name = "median_blur"
    static_args = {"bucketed": False}

    def __init__(self, k=3):
        super().__init__()
        self.k = int(k)
        if self.k not in (3, 5, 7):
            raise ValueError(f"{self.name}: k must be 3, 5 or 7, got {k}")

    def spec(self):
        return f"{self.name}({self.k})"

    def transform(self, images, seeds, u, bucketed=True):
        if not bucketed:  # the static schedule: one shape per batch already
            return filters.MEDIAN_XLA[self.k](images)
        return filters.run_xla_bucketed(filters.MEDIAN_XLA[self.k], images)


# ---------------------------------------------------------------- JPEG (host)

class Jpeg(Op):
    """JPEG re-compression at an integer quality in [lo, hi] per image.

    Host only: JPEG encode/decode has no GPU kernel. Pixels are rounded to
    uint8 first (what an encoder sees). Runs one image at a time (map_fn),
    and only on the images handed to it (a Sometimes passes only its chosen
    images), because each image has its own quality.
    """
    clips = False
    name = "jpeg"
    host = True
    num_params = 1

    def __init__(self, lo=60, hi=80):
        super().__init__()
        self.lo, self.hi = int(lo), int(hi)
        if not 1 <= self.lo <= self.hi <= 100:
            raise ValueError(f"{self.name}: need 1 <= lo <= hi <= 100, got {self.lo}, {self.hi}")

    def spec(self):
        return f"{self.name}({self.lo},{self.hi})"

    def transform(self, images, seeds, u):
        quality = rnd.randint(self.lo, self.hi, u[:, 0])
        pixels = tf.cast(tf.round(tf.clip_by_value(images, 0.0, 255.0)), tf.uint8)

        def one(args):
            image, q = args
            data = tf.raw_ops.EncodeJpegVariableQuality(images=image, quality=q)
            return tf.io.decode_jpeg(data, channels=3)

        out = tf.map_fn(one, (pixels, quality),
                        fn_output_signature=tf.TensorSpec(images.shape[1:], tf.uint8))
        return tf.cast(out, tf.float32)


# ---------------------------------------------------------------- contrast

class Gamma(RangeOp):
    """255 * (x / 255) ** g, one g per image."""
    pointwise = True
    clips = False
    name = "gamma"
    default = (0.7, 1.3)

    def transform(self, images, seeds, u):
        # exp(g log x) is ~4x cheaper than tf.pow on a CPU; log 0 = -inf -> 0.
        return 255.0 * tf.exp(per_image(self.draw(u)) * tf.math.log(images / 255.0))


class ChannelGamma(Op):
    """Gamma with its own g per image and channel (imgaug per_channel=True)."""
    pointwise = True
    clips = False
    name = "channel_gamma"
    num_params = 3

    def __init__(self, lo=0.7, hi=1.3):
        super().__init__()
        self.lo, self.hi = float(lo), float(hi)

    def spec(self):
        return f"{self.name}({_fmt(self.lo, self.hi)})"

    def transform(self, images, seeds, u):
        g = tf.reshape(rnd.lerp(self.lo, self.hi, u), [-1, 1, 1, 3])
        return 255.0 * tf.exp(g * tf.math.log(images / 255.0))


class SigmoidContrast(Op):
    """255 / (1 + exp(gain (cutoff - x/255))), gain and cutoff per image
    (imgaug SigmoidContrast; its default cutoff range 0.3..0.6)."""
    pointwise = True
    clips = False
    name = "sigmoid_contrast"
    num_params = 2

    def __init__(self, lo=5.0, hi=8.0, cut_lo=0.3, cut_hi=0.6):
        super().__init__()
        self.gain = (float(lo), float(hi))
        self.cutoff = (float(cut_lo), float(cut_hi))

    def spec(self):
        return f"{self.name}({_fmt(*self.gain, *self.cutoff)})"

    def transform(self, images, seeds, u):
        gain = per_image(rnd.lerp(*self.gain, u[:, 0]))
        cutoff = per_image(rnd.lerp(*self.cutoff, u[:, 1]))
        return 255.0 * tf.sigmoid(gain * (images / 255.0 - cutoff))


class LogContrast(RangeOp):
    """255 * gain * log2(1 + x / 255), one gain per image."""
    pointwise = True
    name = "log_contrast"
    default = (0.6, 1.0)

    def transform(self, images, seeds, u):
        return (255.0 / math.log(2.0)) * per_image(self.draw(u)) * tf.math.log1p(images / 255.0)


class LinearContrast(RangeOp):
    """127.5 + a (x - 127.5), one a per image (imgaug LinearContrast /
    ContrastNormalization)."""
    pointwise = True
    name = "linear_contrast"
    default = (0.6, 1.4)

    def transform(self, images, seeds, u):
        return 127.5 + per_image(self.draw(u)) * (images - 127.5)


# ---------------------------------------------------------------- geometry

class Rotate(RangeOp):
    """Small rotation, angle uniform in [lo, hi] degrees per image, bilinear,
    edge fill (no empty corners). Labels unchanged: the turn is far below a
    quarter turn. Inside Sometimes it runs on the whole batch with angle 0
    (an exact identity) for the images not chosen: one static-shape XLA
    kernel instead of regrouping the batch."""
    name = "rotate"
    maskable = True
    default = (-2.0, 2.0)

    def transform(self, images, seeds, u, chosen=None):
        angle = self.draw(u)
        if chosen is not None:
            angle *= tf.cast(chosen, tf.float32)  # angle 0: exactly the image
        return filters.rotate_bilinear(images, angle)


class Zoom(RangeOp):
    """A random window of each image stretched over the whole image.

    Side: a fraction in [lo, hi] of the image side (square images, as in
    training: a square window), uniform; position:
    uniform over the image. Labels unchanged: a quarter turn maps a window to
    a window of the same side at a position that is again uniform (the
    windows' distribution is the same under every turn), so the crop adds
    no trace of the label; tests check the turned-window identity exactly.
    More pictures out of few: a 0.6 window of a photo is a plausible photo.
    Bilinear, not anti-aliased (it only magnifies). Runs anywhere (XLA).
    """
    name = "zoom"
    default = (0.6, 1.0)
    num_params = 3

    def __init__(self, lo=None, hi=None):
        super().__init__(lo, hi)
        if not 0.0 < self.lo <= self.hi <= 1.0:
            raise ValueError(f"{self.name}: need 0 < lo <= hi <= 1, got {self.lo}, {self.hi}")

    def transform(self, images, seeds, u):
        scale = self.draw(u)
        shape = tf.shape(images)
        room = 1.0 - scale
        x0 = u[:, 1] * room * (tf.cast(shape[2], tf.float32) - 1.0)
        y0 = u[:, 2] * room * (tf.cast(shape[1], tf.float32) - 1.0)
        return filters.zoom_window(images, scale, x0, y0)


class Mirror(Op):
    """The mirror image of the upright picture, for a fraction p of the images.

    Mirroring left and right keeps up where it is, so a mirrored picture is
    another upright picture: twice the pictures from a small set, for free.
    The images arrive already turned by their labels k; mirroring the upright
    picture and then turning it equals flipping the turned image left-right
    for even k and top-bottom for odd k, exactly (a permutation of pixels).
    So the op reads the labels and leaves them unchanged. Host only: the
    model-side part of a policy (AugmentLayer) sees no labels, so
    split_policy keeps this op in tf.data; put it first in a policy.
    """
    name = "mirror"
    host = True
    reads_labels = True
    clips = False
    num_params = 1

    def __init__(self, p=0.5):
        super().__init__()
        self.p = float(p)
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"{self.name}: p={self.p} not in [0, 1]")

    def spec(self):
        return f"{self.name}({_fmt(self.p)})"

    def transform(self, images, seeds, u, labels):
        odd = per_image(tf.equal(tf.math.floormod(labels, 2), 1))
        mirrored = tf.where(odd, tf.reverse(images, [1]), tf.reverse(images, [2]))
        return tf.where(per_image(u[:, 0] < self.p), mirrored, images)


# ---------------------------------------------------------------- registry

OPS = {cls.name: cls for cls in (
    Identity, Add, Multiply, HueSaturation, GaussianNoise, LaplaceNoise, PoissonNoise,
    Dropout, Pepper, Salt, FrequencyBlend, GaussianBlur, AverageBlur, MotionBlur,
    MedianBlur, Jpeg, Gamma, ChannelGamma, SigmoidContrast, LogContrast, LinearContrast,
    Rotate, Zoom, Mirror)}
