"""Per-image preprocessing: encoded image bytes -> the model's S x S input.

    from upright.pipeline import preprocess
    image = preprocess.preprocess_image(encoded, 224, "squash")  # float32 [224, 224, 3]

Decode + resize, shared by the training input pipeline (inputs.py), the
exported serving signature and orient (serve.py), so that serving sees exactly
what training saw. Importing this module touches no flags and no global state.

Resizing commutes with rot90 for every `resize` option (see `resize_image`):
the model must not be able to read the label from how an image was resized.
JPEG images are cropped to whole 16 x 16 coding blocks and decoded without
libjpeg's "fancy" chroma upsampling (`preprocess_image`): both are needed for
the decoded pixels to carry no trace of where the stored image's top-left was
(tests/test_shortcuts.py).
"""

import tensorflow as tf

from upright.pipeline import schema

RESIZE_METHODS = schema.RESIZE_METHODS

JPEG_BLOCK = schema.JPEG_BLOCK   # crop to whole macroblocks: why in schema.py
# libjpeg's fancy (triangle) chroma upsampling rounds with a bias that alternates
# between neighbouring pixels, starting at the top-left: a sub-LSB pattern a CNN
# can read the label from (measured: 55-58 % on noise). Plain 2 x 2 replication
# of chroma is exactly rot90-symmetric on whole macroblocks.
JPEG_FANCY_UPSCALING = False
# Decoder downscale factors libjpeg offers (decode_jpeg(ratio=...)).
_JPEG_RATIOS = (1, 2, 4, 8)
# Value of the bars that resize="pad" adds.
PAD_VALUE = 0.0


def preprocess_image(encoded, image_size: int, resize: str = "squash"):
    """Encoded JPEG/PNG (or GIF/BMP) bytes -> float32 [S, S, 3] in [0, 255].

    JPEG: cropped to whole 16 x 16 blocks anchored at the top-left (the coding
    grid; images under 16 pixels on a side keep that side whole), chroma
    upsampled by plain replication (no fancy upsampling), and decoded at 1/2,
    1/4 or 1/8 scale when that still leaves at least S pixels on the side that
    `resize` needs (much faster for large images). All three keep
    rot90-equivariance: the kept region is made of whole macroblocks, so its
    block grid, its chroma cells and the decoder's downscaling cells map onto
    themselves under rot90. Other formats: decoded as they are (first frame,
    3 channels). Then `resize_image`.

    Args:
      encoded: scalar tf.string.
      image_size: S.
      resize: one of RESIZE_METHODS.
    """
    if resize not in RESIZE_METHODS:
        raise ValueError(f"resize must be one of {RESIZE_METHODS}, got {resize!r}")
    encoded = tf.convert_to_tensor(encoded, tf.string)
    image = tf.cond(tf.io.is_jpeg(encoded),
                    lambda: _decode_jpeg_aligned(encoded, image_size, resize),
                    lambda: _decode_other(encoded))
    image.set_shape([None, None, 3])
    return resize_image(image, image_size, resize)


def _decode_other(encoded):
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return tf.image.convert_image_dtype(image, tf.uint8)


def _decode_jpeg_aligned(encoded, image_size, resize):
    shape = tf.io.extract_jpeg_shape(encoded)
    height, width = shape[0], shape[1]
    # Keep whole blocks only (images smaller than a block keep everything).
    keep_h = tf.where(height >= JPEG_BLOCK, height // JPEG_BLOCK * JPEG_BLOCK, height)
    keep_w = tf.where(width >= JPEG_BLOCK, width // JPEG_BLOCK * JPEG_BLOCK, width)
    # The side that must keep >= S pixels: the short one for squash/crop, the
    # long one for pad.
    need = (tf.maximum(keep_h, keep_w) if resize == "pad"
            else tf.minimum(keep_h, keep_w))
    aligned = tf.logical_and(tf.equal(keep_h % JPEG_BLOCK, 0),
                             tf.equal(keep_w % JPEG_BLOCK, 0))
    # Largest ratio r with need / r >= S; ratios > 1 only on block-aligned crops
    # (then keep / r is exact and the decoder's r x r cells tile the kept region).
    index = tf.constant(0, tf.int32)
    for i, r in enumerate(_JPEG_RATIOS[1:], start=1):
        index = tf.where(tf.logical_and(aligned, need // r >= image_size), i, index)

    def decode(r):
        def branch():
            image = tf.io.decode_jpeg(encoded, channels=3, ratio=r,
                                      fancy_upscaling=JPEG_FANCY_UPSCALING)
            return image[:keep_h // r, :keep_w // r]
        return branch

    return tf.switch_case(index, [decode(r) for r in _JPEG_RATIOS])


def resize_image(image, image_size: int, resize: str = "squash"):
    """[H, W, 3] image (any real dtype) -> float32 [S, S, 3], rot90-equivariant.

    resize_image(rot90(x, k)) == rot90(resize_image(x), k) up to float error, for
    every method: all three use tf.image.resize (bilinear, half-pixel centres,
    antialias), whose sampling grid is mirror-symmetric and separable, and every
    crop or pad they add is split equally between opposite sides:
      squash: resize to S x S, aspect not kept (the source article's choice).
      pad:    resize the long side to S and the short side to s, with S - s even,
              then pad (S - s) / 2 on both sides with PAD_VALUE. (An odd total would
              put the extra row on one side, a different side for every label.)
      crop:   centre crop to m x m, m = the short side; when the long side's excess
              is odd, keep m + 1 there (an off-centre crop by half a pixel would
              move with the label), then squash the near-square crop to S x S.
    Values stay in the input's range (bilinear weights are a convex combination);
    output clipped to [0, 255].
    """
    image = tf.cast(image, tf.float32)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    if resize == "squash":
        out = _resize(image, image_size, image_size)
    elif resize == "crop":
        short = tf.minimum(height, width)
        crop_h = short + (height - short) % 2
        crop_w = short + (width - short) % 2
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        out = _resize(image[top:top + crop_h, left:left + crop_w], image_size, image_size)
    elif resize == "pad":
        long = tf.cast(tf.maximum(height, width), tf.float64)
        short = tf.cast(tf.minimum(height, width), tf.float64)
        # Half the padding, rounded to whole pixels, so both bars are equal.
        half = tf.cast(tf.round((image_size - image_size * short / long) / 2), tf.int32)
        half = tf.clip_by_value(half, 0, (image_size - 1) // 2)
        inner = image_size - 2 * half
        new_h = tf.where(height >= width, image_size, inner)
        new_w = tf.where(height >= width, inner, image_size)
        pad_h, pad_w = (image_size - new_h) // 2, (image_size - new_w) // 2
        out = tf.pad(_resize(image, new_h, new_w), [[pad_h, pad_h], [pad_w, pad_w], [0, 0]],
                     constant_values=PAD_VALUE)
    else:
        raise ValueError(f"resize must be one of {RESIZE_METHODS}, got {resize!r}")
    out = tf.clip_by_value(out, 0.0, 255.0)
    return tf.ensure_shape(out, [image_size, image_size, 3])


def _resize(image, height, width):
    return tf.image.resize(image, tf.stack([height, width]), method="bilinear",
                           antialias=True)
