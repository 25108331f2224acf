"""Per-image random numbers from stateless seeds, in whole-batch tensor ops.

Every augmentation op draws its random numbers here, from int32 [B, 2] seeds,
one per image, so an image's draws depend on its own seed alone (not on its
batch, its place there or the batch size), and never on hidden state:

  * `salt_of(path)`: a stable 31-bit constant for an op's place in a policy;
    `fold_seeds(seeds, salt)` mixes it into every image's seed, so two ops
    never share random numbers;
  * `uniforms(seeds, n)`: n per-image scalars in [0, 1) (a gain, a kernel
    size, a branch choice) from a 32-bit integer hash computed in int64;
  * `pixel_bits(seeds, shape)`: per-pixel noise from a counter-based hash,
    fmix32(element index * golden ^ image key) (MurmurHash3's finaliser), in
    uint32 on the whole batch: no per-image loop, no while_loop, integer ops
    only (the same bits on CPU and GPU); `pixel_uniform`, `bits_to_normal`
    and `pixel_draw` turn the bits into uniforms and fast normals.

Philox (tf.random.stateless_*) takes one seed per call, so per-image draws
with it needed a map_fn/vectorized_map loop: slower, and ~20 s graph builds.
"""
import hashlib
import math

import tensorflow as tf

_MASK32 = 0xFFFFFFFF
_MASK31 = 0x7FFFFFFF
_HASH_MUL = 0x45D9F3B  # < 2**27: x * _HASH_MUL stays below 2**59 in int64


def salt_of(text: str) -> int:
    """A stable 31-bit constant for a name or policy path (not Python hash())."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & _MASK31


def _mix_py(x: int) -> int:
    x &= _MASK32
    x = ((x ^ (x >> 16)) * _HASH_MUL) & _MASK32
    x = ((x ^ (x >> 16)) * _HASH_MUL) & _MASK32
    return x ^ (x >> 16)


def _mix(x):
    """32-bit integer hash (int64 tensor in [0, 2**32) -> same range).

    Done in int64 so that no product overflows (every kernel has CPU and GPU
    implementations for int64, unlike uint32 multiply).
    """
    x = tf.bitwise.bitwise_and(
        tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16)) * _HASH_MUL, _MASK32)
    x = tf.bitwise.bitwise_and(
        tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16)) * _HASH_MUL, _MASK32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))


def _words(seeds):
    seeds = tf.cast(seeds, tf.int64)
    return (tf.bitwise.bitwise_and(seeds[:, 0], _MASK32),
            tf.bitwise.bitwise_and(seeds[:, 1], _MASK32))


def fold_seeds(seeds, salt: int):
    """Per-image seeds with a constant folded in: int32 [B, 2] -> int32 [B, 2].

    Different salts give unrelated seeds (both words depend on both input
    words and on the salt), so ops never share random numbers.
    """
    a, b = _words(seeds)
    h1 = _mix(tf.bitwise.bitwise_xor(b, _mix_py(salt)))
    h2 = _mix(tf.bitwise.bitwise_xor(a, h1))
    h3 = _mix(tf.bitwise.bitwise_xor(h2, tf.bitwise.bitwise_xor(b, _mix_py(salt ^ 0x5BD1E995))))
    out = tf.stack([tf.bitwise.bitwise_and(h2, _MASK31), tf.bitwise.bitwise_and(h3, _MASK31)], 1)
    return tf.cast(out, tf.int32)


def uniforms(seeds, n: int):
    """n per-image uniforms in [0, 1): float32 [B, n], from the seeds alone."""
    a, b = _words(seeds)
    j = tf.constant([_mix_py(0x9E3779B9 * (i + 1)) for i in range(n)], tf.int64)
    h = _mix(tf.bitwise.bitwise_xor(a[:, None], j[None, :]))
    h = _mix(tf.bitwise.bitwise_xor(h, b[:, None]))
    h = _mix(tf.bitwise.bitwise_xor(h, a[:, None]))
    # 24 high bits: exactly representable in float32, so u < 1 always.
    return tf.cast(tf.bitwise.right_shift(h, 8), tf.float32) * (1.0 / (1 << 24))


def lerp(lo, hi, u):
    return lo + (hi - lo) * u


def randint(lo: int, hi: int, u):
    """Integers uniform in [lo, hi] (both included) from uniforms u."""
    return tf.minimum(lo + tf.cast(tf.floor(u * (hi - lo + 1)), tf.int32), hi)


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser (a bijection with full avalanche), uint32."""
    h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, 16))
    h = h * tf.constant(0x85EBCA6B, tf.uint32)
    h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, 13))
    h = h * tf.constant(0xC2B2AE35, tf.uint32)
    return tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, 16))


def image_keys(seeds):
    """One uint32 key per image from its (already folded) seed: uint32 [B]."""
    k = tf.bitcast(tf.cast(seeds, tf.int32), tf.uint32)
    return tf.bitwise.bitwise_xor(k[:, 0], _fmix32(k[:, 1] + tf.constant(0x9E3779B9, tf.uint32)))


def hash_bits(keys, counters):
    """Random bits for (key, counter) pairs: fmix32(counter * golden ^ key).

    keys and counters are uint32 and broadcast against each other. One round
    of MurmurHash3's finaliser over a Weyl sequence: each image's stream is a
    full-avalanche scramble of its counters under its own key.
    """
    return _fmix32(tf.bitwise.bitwise_xor(counters * tf.constant(0x9E3779B1, tf.uint32), keys))


def pixel_bits(seeds, shape):
    """Per-image random bits: uint32 [B, *shape], a function of each image's
    seed and the element's index only.

    Counter-based (hash_bits of the element index under the image's key): all
    elementwise uint32 arithmetic on the whole batch: no per-image loop, no
    while_loop in the graph (fast to build), the same bits on CPU and GPU, and
    per-image by construction. (Philox via tf.random.stateless_uniform takes
    one seed per call, so per-image draws would need a loop over the batch.)
    """
    rank = len(shape) if isinstance(shape, (list, tuple)) else int(shape.shape[0])
    shape = tf.cast(shape, tf.int32)
    keys = tf.reshape(image_keys(seeds), [-1] + [1] * rank)
    count = tf.reduce_prod(shape)
    index = tf.bitcast(tf.reshape(tf.range(count, dtype=tf.int32), tf.concat([[1], shape], 0)),
                       tf.uint32)
    return hash_bits(keys, index)


def bits_to_uniform(bits):
    """uint32 bits -> float32 uniforms in [0, 1) (24-bit resolution)."""
    bits = tf.bitwise.right_shift(bits, 8)
    return tf.cast(tf.bitcast(bits, tf.int32), tf.float32) * (1.0 / (1 << 24))


def pixel_uniform(seeds, shape):
    """Per-image uniforms in [0, 1): float32 [B, *shape] (24-bit resolution)."""
    return bits_to_uniform(pixel_bits(seeds, shape))


def bits_to_normal(bits, pop_bits: int = 24):
    """Approximately standard normal values from random uint32 words.

    z = (popcount of `pop_bits` bits - pop_bits/2 + uniform dither) / std: a
    Binomial(pop_bits, 1/2) (normal by the central limit theorem) smoothed by
    an 8-bit uniform dither so it is continuous. Mean 0, variance 1, excess
    kurtosis -0.08 for 24 bits, |z| <= 5.1. It costs one 32-bit draw and a
    few integer ops: about half of tf.random.stateless_normal (Box-Muller) on
    a CPU. Uses bits 8..8+pop_bits-1 for the count and bits 0..7 for the dither.
    """
    bits = tf.bitcast(bits, tf.int32)  # PopulationCount has no uint32 GPU kernel
    count = tf.cast(tf.raw_ops.PopulationCount(x=tf.bitwise.bitwise_and(
        tf.bitwise.right_shift(bits, 8), (1 << pop_bits) - 1)), tf.float32)
    dither = tf.cast(tf.bitwise.bitwise_and(bits, 255), tf.float32) * (1.0 / 256)
    std = math.sqrt(pop_bits / 4.0 + 1.0 / 12.0)
    return (count - (pop_bits / 2.0 - 1.0 / 512 + 0.5) + dither) * (1.0 / std)


def pixel_draw(seeds, shape, kind: str = "uniform"):
    """Per-image noise, float32 [B, *shape]: "uniform" in [0, 1) or "normal"
    (the fast approximation of bits_to_normal)."""
    if kind == "uniform":
        return pixel_uniform(seeds, shape)
    return bits_to_normal(pixel_bits(seeds, shape))
