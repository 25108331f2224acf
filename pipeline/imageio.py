"""Reading one image file as a person sees it: upright, 8-bit RGB, bounded size.

This module runs inside make_records' worker processes, so it imports Pillow
and numpy only, never TensorFlow.

What `read_upright` stores for a readable image:
  * EXIF Orientation (all eight values) applied with `ImageOps.exif_transpose`,
    so the stored pixels match what an image viewer shows; a re-encoded image
    carries no EXIF at all, hence no orientation tag.
  * 8-bit RGB: CMYK, palette, grayscale, 1-bit, 16-bit and 32-bit integer
    images are converted; images with transparency are composited on WHITE
    (`BACKGROUND`), the colour most viewers and browsers show behind them;
    animated files (GIF, WebP, APNG, multi-page TIFF) give their first frame.
  * Longest side at most `max_side` pixels (0: keep the size), downscaled with
    aspect kept by Pillow's LANCZOS filter (JPEG sources are first decoded at
    a reduced DCT scale that still keeps at least `max_side` pixels, which is
    both a proper low-pass filter and several times faster).
  * Stored as JPEG at `jpeg_quality`, except that a source that needs no change
    at all (an RGB JPEG without an EXIF turn, within max_side) is stored byte
    for byte: no second generation of JPEG loss.

Anything that cannot be read this way raises `SkipImage` with a short reason
(see `REASONS`), never a Pillow exception.
"""
import dataclasses
import errno
import hashlib
import io
import math
import os
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps

from upright.pipeline import fileio, schema

BACKGROUND = (255, 255, 255)   # behind transparent pixels: white, as viewers show it
DEFAULT_MAX_SIDE = 512
DEFAULT_JPEG_QUALITY = 95
DEFAULT_MAX_PIXELS = 128_000_000   # declared width * height above this: refused unread
MAX_FILE_BYTES = 1 << 30           # files above 1 GiB are not read into memory
# A progressive JPEG has about 10 scans; each scan makes the decoder pass over
# the whole image again, and Pillow has no limit: 4,000 empty scans in 680 KB
# took minutes. Files with more start-of-scan markers are skipped unread.
MAX_JPEG_SCANS = 100
# Animated decoders (libwebp's, Pillow's GIF/APNG) hold several full canvases
# (measured: a 1 KB animated WebP declaring 11000x11000 took 1.9 GB, 16 bytes a
# pixel, inside Pillow's load()): animated files count this many times their
# pixels against max_pixels.
ANIMATED_PIXEL_COST = 4

# Extensions that name an image format this reader does not decode: reported as
# "unsupported format" rather than "not an image".
UNSUPPORTED_EXTENSIONS = frozenset({
    ".heic", ".heif", ".svg", ".svgz", ".pdf", ".psd", ".xcf", ".raw", ".cr2", ".cr3",
    ".nef", ".arw", ".dng", ".orf", ".rw2", ".raf", ".srw", ".jxl", ".exr", ".hdr",
    ".djvu", ".eps", ".ai",
})
# Extensions of formats Pillow reads; a file with one that does not open is
# "not an image" (a text or other file wearing an image name) or "corrupt".
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib", ".tif", ".tiff",
    ".webp", ".avif", ".ppm", ".pgm", ".pbm", ".pnm", ".ico", ".tga", ".jp2", ".j2k",
    ".pcx", ".sgi", ".qoi", ".dds", ".icns", ".apng",
})

# The reason strings, so callers and tests can match them. Each SkipImage reason
# starts with one of these words.
REASONS = ("zero bytes", "not an image", "unsupported format", "truncated", "corrupt",
           "decompression bomb", "unreadable", "too large", "unsupported mode")


class SkipImage(Exception):
    """The file cannot be stored; str(e) is a short reason starting with one of REASONS."""


@dataclasses.dataclass(frozen=True)
class StoredImage:
    """One image ready to be written into a record.

    encoded: JPEG bytes of the stored upright RGB image.
    format: "jpeg" (the only format this reader stores).
    height, width: of the stored image, pixels.
    source_height, source_width: of the source as a person sees it (after the
        EXIF turn, before downscaling).
    source_format: Pillow's name of the source format, e.g. "JPEG", "PNG".
    changed: False when `encoded` is the source file byte for byte.
    notes: what was done or found, e.g. ("exif_orientation=6", "mode=CMYK",
      "resized", CORRUPT_EXIF_NOTE).
    signature: near-duplicate signature of the stored pixels (see `signature`).
    """
    encoded: bytes
    format: str
    height: int
    width: int
    source_height: int
    source_width: int
    source_format: str
    changed: bool
    notes: tuple
    signature: bytes


def read_upright(path, *, max_side: int = DEFAULT_MAX_SIDE,
                 jpeg_quality: int = DEFAULT_JPEG_QUALITY,
                 max_pixels: int = DEFAULT_MAX_PIXELS, data: bytes = None) -> StoredImage:
    """Reads an image file as a person sees it (see the module docstring).

    Args:
      path: str or bytes path; used for reading (unless `data` is given) and
        for the extension in reasons.
      max_side: longest side of the stored image in pixels; 0 keeps sizes.
      jpeg_quality: 1..100, quality of re-encoded images.
      max_pixels: images whose header declares more pixels are refused before
        any pixel is decoded.
      data: the file's bytes, if the caller already read them.
    Raises:
      SkipImage: with a short reason.
    """
    data = source_bytes(path, data)
    with warnings.catch_warnings(record=True) as caught:
        # Pillow warns (to stderr, without the file's name, through any progress
        # bar) about a damaged EXIF block and reads on; each such warning becomes
        # a note of this file instead. Scoped to this read: no global filter.
        warnings.simplefilter("always")
        image = open_image(data, path, max_pixels)
        with image:
            stored = convert_image(image, data, max_side=max_side, jpeg_quality=jpeg_quality)
    notes = warning_notes(caught)
    return dataclasses.replace(stored, notes=stored.notes + notes) if notes else stored


def source_bytes(path, data: bytes = None) -> bytes:
    """The file's bytes (`data` when given), refused with SkipImage when empty or
    when too many JPEG scans would make decoding too much work."""
    if data is None:
        data = read_bytes(path)
    if not data:
        raise SkipImage("zero bytes")
    check_jpeg_scans(data)
    return data


def open_for_model(path, *, image_size: int, max_side: int = DEFAULT_MAX_SIDE,
                   max_pixels: int = DEFAULT_MAX_PIXELS, data: bytes = None) -> "ModelInput":
    """A model's squashed S x S input straight from the file, without the stored
    copy: what `read_upright` then preprocess.preprocess_image(resize="squash")
    see, framed the same way, at a fraction of the work.

    The header is read here (same checks and SkipImage reasons as read_upright;
    Pillow's warnings become `notes`); `ModelInput.decode()` does the pixel work
    and may run in another thread (Pillow releases the GIL while decoding and
    resizing). Framing: the stored copy's size (longest side max_side) cropped
    to whole 16 x 16 JPEG blocks at the top-left, as preprocess_image crops it,
    is mapped back onto the source and resized from there to S x S. A JPEG is
    decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, an area filter)
    when that still leaves >= S pixels across that region; the resize is
    Pillow's antialiased bilinear, the filter tf.image.resize(antialias=True)
    applies. Skipped: the LANCZOS stored copy, its JPEG encoding and decoding,
    and the near-duplicate signature, none of which the prediction needs.
    """
    data = source_bytes(path, data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")   # as in read_upright
        image = open_image(data, path, max_pixels)
        try:
            orientation = exif_orientation(image, data)
            raw_w, raw_h = image.size
            width, height = (raw_h, raw_w) if orientation in (5, 6, 7, 8) else (raw_w, raw_h)
            box = _model_box(width, height, max_side)
            if image.format == "JPEG":
                # Smallest decode that leaves >= S pixels across the box.
                need = image_size / min(box)
                if need < 0.5:
                    image.draft(None, (max(1, math.ceil(raw_w * need)),
                                       max(1, math.ceil(raw_h * need))))
        except BaseException:
            image.close()
            raise
    return ModelInput(image, orientation, (width, height), box, int(image_size),
                      warning_notes(caught))


def _model_box(width: int, height: int, max_side: int) -> tuple:
    """(w, h) of the source region preprocess_image keeps of read_upright's stored
    copy: the copy's size, cropped to whole JPEG_BLOCK blocks, in source pixels."""
    scale = max_side / max(width, height) if max_side and max(width, height) > max_side else 1
    stored_w, stored_h = max(1, round(width * scale)), max(1, round(height * scale))
    keep_w = stored_w // JPEG_BLOCK * JPEG_BLOCK if stored_w >= JPEG_BLOCK else stored_w
    keep_h = stored_h // JPEG_BLOCK * JPEG_BLOCK if stored_h >= JPEG_BLOCK else stored_h
    return width * keep_w / stored_w, height * keep_h / stored_h


JPEG_BLOCK = schema.JPEG_BLOCK


@dataclasses.dataclass
class ModelInput:
    """An image opened by `open_for_model`; decode() -> float32 [S, S, 3] in
    [0, 255] (SkipImage on a decoder error). notes: as StoredImage.notes."""
    image: Image.Image
    orientation: object
    size: tuple      # (width, height) of the source as a person sees it
    box: tuple       # (w, h) of the region to resize, in those pixels
    image_size: int
    notes: tuple

    def decode(self) -> np.ndarray:
        with self.image:
            rgb = decode_rgb(self.image, self.orientation)
            # The decoded image may be a DCT-scaled one: the box in its pixels.
            box = (0, 0, self.box[0] * rgb.width / self.size[0],
                   self.box[1] * rgb.height / self.size[1])
            out = rgb.resize((self.image_size, self.image_size),
                             Image.Resampling.BILINEAR, box=box)
        return np.asarray(out, np.float32)


# The note of a file whose EXIF block Pillow found damaged (and ignored, as
# viewers do): the image is stored as its pixels show it.
CORRUPT_EXIF_NOTE = "corrupt EXIF data ignored"


def warning_notes(caught) -> tuple:
    """Notes for the warnings Pillow raised while reading one file.

    caught: warnings.WarningMessage list from catch_warnings(record=True).
    Pillow's EXIF warnings ("Corrupt EXIF data.  Expecting to read 12 bytes but
    only got 2.", "Possibly corrupt EXIF data ...") give CORRUPT_EXIF_NOTE once;
    another Pillow warning gives "Pillow warning: <its first line>". A warning
    from elsewhere (another thread importing TensorFlow, say) is not this
    file's: it is issued again as it came.
    """
    notes = []
    for w in caught:
        if f"{os.sep}PIL{os.sep}" not in (w.filename or ""):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            continue
        text = _short(w.message)
        note = CORRUPT_EXIF_NOTE if "corrupt exif" in text.lower() else f"Pillow warning: {text}"
        if note not in notes:
            notes.append(note)
    return tuple(notes)


def read_bytes(path) -> bytes:
    """The file's bytes; SkipImage("unreadable: ...") or ("too large") on failure.

    The name may have been swapped since a walk saw a regular file there (for a
    FIFO, which would block the read forever, or a link to /dev/zero, which
    never ends): fileio.read_regular opens without blocking, refuses anything
    but a regular file after opening, and reads at most the size fstat gives,
    itself at most MAX_FILE_BYTES.
    """
    try:
        return fileio.read_regular(path, max_bytes=MAX_FILE_BYTES)
    except fileio.NotRegularFileError as e:
        raise SkipImage(e.strerror if e.errno == errno.EFBIG else f"unreadable: {e.strerror}") \
            from None
    except OSError as e:
        raise SkipImage(f"unreadable: {e.strerror or e}") from None


def check_jpeg_scans(data: bytes, limit: int = None) -> None:
    """SkipImage for a JPEG with more than MAX_JPEG_SCANS start-of-scan markers.

    Counting FF DA is exact enough: inside entropy-coded data a 0xFF byte is
    always followed by 00 (stuffing) or a restart marker, so FF DA there is a
    real scan; an embedded thumbnail adds its own few.
    """
    limit = MAX_JPEG_SCANS if limit is None else limit
    if data[:2] == b"\xff\xd8":
        scans = data.count(b"\xff\xda")
        if scans > limit:
            raise SkipImage(f"too much work to decode: {scans} JPEG scans > limit {limit}")


def open_image(data: bytes, path, max_pixels: int) -> Image.Image:
    """Opens (header only) and refuses decompression bombs before decoding."""
    ext = os.path.splitext(os.fsdecode(path))[1].lower()
    with warnings.catch_warnings():
        # Pillow warns, then raises, on large declared sizes; we apply our own limit.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise SkipImage(f"decompression bomb: {e}") from None
        except Image.UnidentifiedImageError:
            if ext in UNSUPPORTED_EXTENSIONS:
                raise SkipImage(f"unsupported format ({ext})") from None
            if ext in IMAGE_EXTENSIONS:
                raise SkipImage(f"not an image: the content of this {ext} file is "
                                "not in any image format (or its header is corrupt)") from None
            raise SkipImage("not an image: unknown file format") from None
        except (OSError, ValueError, SyntaxError, EOFError, struct.error) as e:
            raise SkipImage(f"corrupt: {_short(e)}") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise SkipImage(f"decompression bomb: declares {width}x{height} = "
                        f"{width * height / 1e6:.0f} MP > limit {max_pixels / 1e6:.0f} MP")
    if width < 1 or height < 1:
        image.close()
        raise SkipImage(f"corrupt: declares size {width}x{height}")
    if width * height * ANIMATED_PIXEL_COST > max_pixels and _is_animated(image):
        image.close()
        raise SkipImage(f"decompression bomb: animated, declares {width}x{height} = "
                        f"{width * height / 1e6:.0f} MP > limit "
                        f"{max_pixels / ANIMATED_PIXEL_COST / 1e6:.0f} MP for animated files")
    return image


def _is_animated(image: Image.Image) -> bool:
    try:
        return bool(getattr(image, "is_animated", False))
    except Exception:  # a broken second frame: convert_image reads the first one only
        return False


def convert_image(image: Image.Image, data: bytes, *, max_side: int,
                  jpeg_quality: int) -> StoredImage:
    """Decodes an opened image and makes the stored, upright RGB version."""
    source_format = image.format or "unknown"
    orientation = exif_orientation(image, data)
    notes = []
    if orientation not in (None, 1):
        notes.append(f"exif_orientation={orientation}")
    # is_animated looks for a second frame only; n_frames would walk them all.
    if _is_animated(image):
        notes.append("animated: first frame")
    if image.mode != "RGB":
        notes.append(f"mode={image.mode}")
    unchanged = (source_format == "JPEG" and image.mode == "RGB"
                 and orientation in (None, 1)
                 and (max_side == 0 or max(image.size) <= max_side))
    # Size as a person sees it: orientations 5-8 swap width and height.
    width, height = image.size
    source_size = (width, height) if orientation in (5, 6, 7, 8) else (height, width)
    if not unchanged and source_format == "JPEG" and max_side:
        reduce_jpeg_decode(image, max_side)
    rgb = decode_rgb(image, orientation)
    if not unchanged:
        rgb = downscale(rgb, max_side)
        if rgb.size != source_size[::-1]:
            notes.append("resized")
    sig = signature(rgb)
    if unchanged:
        encoded = data
    else:
        encoded = encode_jpeg(rgb, jpeg_quality)
    return StoredImage(encoded=encoded, format="jpeg", height=rgb.height, width=rgb.width,
                       source_height=source_size[0], source_width=source_size[1],
                       source_format=source_format, changed=not unchanged,
                       notes=tuple(notes), signature=sig)


def decode_rgb(image: Image.Image, orientation) -> Image.Image:
    """Decodes an opened image's pixels, applies its EXIF `orientation` and gives
    8-bit RGB; decoder errors become SkipImage ("truncated: ...", "corrupt: ...")."""
    try:
        image.load()
        # exif_transpose also drops the orientation tag from the result.
        upright = ImageOps.exif_transpose(image) if orientation not in (None, 1) else image
        return to_rgb(upright)
    except SkipImage:
        raise
    except OSError as e:
        message = _short(e)
        if "truncated" in message:
            raise SkipImage(f"truncated: {message}") from None
        raise SkipImage(f"corrupt: {message}") from None
    except (ValueError, SyntaxError, EOFError, struct.error, MemoryError) as e:
        raise SkipImage(f"corrupt: {_short(e)}") from None


def exif_orientation_of(data: bytes):
    """exif_orientation of encoded bytes (None when unreadable); Pillow's
    warnings about the file are not printed (the reader made them notes)."""
    try:
        with warnings.catch_warnings(record=True), Image.open(io.BytesIO(data)) as image:
            warnings.simplefilter("always")
            return exif_orientation(image, data)
    except Exception:
        return None


def exif_orientation(image: Image.Image, data: bytes = None):
    """The EXIF Orientation value 1..8, or None when absent or invalid.

    data: the file's bytes, when at hand. Pillow's PngImageFile.getexif decodes
    every pixel to look for an eXIf chunk after them (20 ms for a 1000 x 1300
    page, on the calling thread); when `data` shows no chunk past the pixels,
    all the metadata was read when the file was opened, and the base method
    reads the same answer from it without decoding.
    """
    try:
        if (image.format == "PNG" and data is not None and "exif" not in image.info
                and not _png_chunks_after_pixels(data)):
            value = Image.Image.getexif(image).get(0x0112)
        else:
            value = image.getexif().get(0x0112)
    except Exception:  # a broken EXIF block: Pillow ignores it too when showing the image
        return None
    return value if value in range(1, 9) else None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunks_after_pixels(data: bytes) -> bool:
    """Whether a PNG has a chunk other than IDAT and IEND after its first IDAT
    (Pillow reads those only when it decodes). Walks the 8-byte chunk headers:
    no decompression. True, the safe answer, for anything it cannot walk."""
    if not data.startswith(_PNG_SIGNATURE):
        return True
    offset, seen_pixels = len(_PNG_SIGNATURE), False
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        if kind == b"IEND":
            return False
        if kind == b"IDAT":
            seen_pixels = True
        elif seen_pixels:
            return True
        offset += 12 + length   # length, type, data, CRC
    return True


def reduce_jpeg_decode(image: Image.Image, max_side: int) -> None:
    """Asks libjpeg to decode at 1/2, 1/4 or 1/8 scale, keeping >= max_side pixels
    on the longest side (the DCT-domain reduction is an area filter)."""
    width, height = image.size
    longest = max(width, height)
    if longest <= 2 * max_side:
        return
    scale = max_side / longest
    # draft() picks the largest reduction that keeps both sides >= the request.
    image.draft(None, (max(1, int(width * scale + 0.999)), max(1, int(height * scale + 0.999))))


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of any Pillow mode; transparency composited on BACKGROUND."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _wide_gray_to_rgb(image)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB", "1") and "transparency" in image.info)
    try:
        if has_alpha:
            # Pasting through the alpha channel onto an RGB background is the
            # same "over" blend as alpha_composite on an opaque background, with
            # two image buffers instead of four: a file that declares a huge
            # canvas (within max_pixels) costs 7 bytes a pixel, not 15.
            rgba = image if mode == "RGBA" else image.convert("RGBA")
            rgb = Image.new("RGB", rgba.size, BACKGROUND)
            rgb.paste(rgba, mask=rgba)
            return rgb
        return image.convert("RGB")
    except ValueError as e:
        raise SkipImage(f"unsupported mode {mode}: {_short(e)}") from None


def _wide_gray_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer or float) grayscale to 8-bit RGB.

    Pillow's own convert clips such values at 255 instead of scaling them, which
    turns most 16-bit images white. 16-bit data is scaled by 255/65535; 32-bit
    integers and floats are scaled by their own range when it exceeds 0..255.
    """
    # Scaled in blocks of about a million pixels: a whole float64 copy would
    # cost 8 bytes a pixel (1 GB for a 128 MP file that declares a huge size).
    width, height = image.size
    scale, offset = 1.0, 0.0
    if image.mode.startswith("I;16"):
        scale = 255.0 / 65535.0
    else:
        lo, hi = (float(v) for v in image.getextrema())
        if image.mode == "F" and hi <= 1.0 and lo >= 0.0:
            scale = 255.0
        elif lo < 0.0 or hi > 255.0:
            scale, offset = 255.0 / max(hi - lo, 1e-12), lo
    gray = np.empty((height, width), np.uint8)
    rows = max(1, (1 << 20) // width)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        block = np.asarray(image.crop((0, top, width, bottom)), dtype=np.float64)
        gray[top:bottom] = np.clip(np.rint((block - offset) * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")


def downscale(image: Image.Image, max_side: int) -> Image.Image:
    """Longest side <= max_side (0: unchanged), aspect kept, LANCZOS."""
    width, height = image.size
    longest = max(width, height)
    if max_side == 0 or longest <= max_side:
        return image
    scale = max_side / longest
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """Baseline JPEG, no metadata (so no orientation tag). Deterministic bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def signature(image: Image.Image) -> bytes:
    """A near-duplicate signature: the 16x16 RGB area-average thumbnail, uint8.

    Returns SIGNATURE_BYTES = 768 bytes ([16, 16, 3] row-major). Re-encoding or
    resizing a picture changes it by a few grey levels (see `are_near_duplicates`).
    A 64-bit DCT pHash (`imagehash.phash`) was measured first and rejected: on
    the photo corpus, re-encoding at quality 75 alone flipped up to 28 of its
    64 bits on smooth or fine-textured pictures (sky, wood grain), so no
    threshold separated copies from different pictures.
    """
    thumb = image.convert("RGB").resize((SIGNATURE_SIDE, SIGNATURE_SIDE),
                                        Image.Resampling.BOX)
    return np.asarray(thumb, dtype=np.uint8).tobytes()


def signature_distance(a: bytes, b: bytes) -> float:
    """RMS difference of two signatures, in grey levels (0..255)."""
    x = np.frombuffer(a, np.uint8).astype(np.float64)
    y = np.frombuffer(b, np.uint8).astype(np.float64)
    return float(np.sqrt(np.mean((x - y) ** 2)))


def near_duplicate_threshold(std_a: float, std_b: float, limit: float = None) -> float:
    """Largest signature distance at which two images count as the same picture.

    NEAR_ABS grey levels, or NEAR_REL of the smaller signature's standard
    deviation for contrasty pictures (a relative bound: a copy of a contrasty
    picture differs more in absolute terms). Measured on the photo corpus
    (benchmarks/README.md, "Near-duplicate signature"): re-encoding at quality
    60-90 and downscaling to 1/4 stayed
    within it for every picture; pairs of different pictures fell inside it
    only when both were nearly flat (same colour, no content).
    `limit` (grey levels, default NEAR_ABS) scales both parts by
    limit / NEAR_ABS: the threshold is max(limit, limit * min std / 20).
    """
    scale = 1.0 if limit is None else limit / NEAR_ABS
    return scale * max(NEAR_ABS, NEAR_REL * min(std_a, std_b))


def are_near_duplicates(a: bytes, b: bytes, limit: float = None) -> bool:
    """True when two signatures are the same picture, re-encoded or resized
    (`limit`: see near_duplicate_threshold; 0 makes only identical signatures near)."""
    std = [float(np.frombuffer(s, np.uint8).std()) for s in (a, b)]
    return signature_distance(a, b) <= near_duplicate_threshold(*std, limit=limit)


SIGNATURE_SIDE = 16
SIGNATURE_BYTES = SIGNATURE_SIDE * SIGNATURE_SIDE * 3
NEAR_ABS = 4.0
NEAR_REL = 0.2


def sha256_hex(data: bytes) -> str:
    """Hex digest of a file's bytes (the record's image/key/sha256)."""
    return hashlib.sha256(data).hexdigest()


def _short(error: BaseException, limit: int = 160) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
