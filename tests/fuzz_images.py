"""Hostile image files for the reading path of make_records and orient.

Hypothesis draws inputs of these kinds:
  header_noise   random bytes behind a real image signature (JPEG, PNG, GIF,
                 WebP, BMP, TIFF, ICO, ...);
  truncated      a real small file of one of 20 formats/modes, cut anywhere;
  bitflip        the same, with 1-16 bits flipped and/or a byte run overwritten;
  huge_dims      the same, with its declared width/height patched (up to 2^31),
                 PNG CRCs recomputed so the header is believed;
  odd_exif       a JPEG/PNG/WebP carrying a hand-made EXIF block: Orientation
                 of the wrong type or count, out of range (0, 9, 65535, ...),
                 IFD chains that loop (next-IFD and Exif/GPS sub-IFD pointers
                 back to themselves), offsets past the end;
  exif_mutated   an odd_exif file, then truncated or bit-flipped.

For each input, `check_one` runs `imageio.read_upright` (the reader of
make_records, and of orient for pad/crop models), `imageio.open_for_model`
with its decode (orient's direct read for squash models) and serve's EXIF
probe, and accepts only: SkipImage with a reason from imageio.REASONS, a
StoredImage that is a well-formed JPEG of the stated size within max_side,
and a float32 model input in [0, 255] of the asked size. Stored images are later
decoded with TensorFlow as inspect_records and the input pipeline do
(`check_stored_with_tensorflow`).
"""
import io
import struct
import time
import traceback
import zlib

import numpy as np
from hypothesis import HealthCheck, Phase, given, seed as hseed, settings
from hypothesis import strategies as st
from PIL import Image

from upright.pipeline import imageio

MAX_SIDE = imageio.DEFAULT_MAX_SIDE
STORED = []          # (encoded, height, width) of stored images, for the TensorFlow check
_TF_SAMPLE = 400     # at most this many are decoded with TensorFlow


# ---------------------------------------------------------------- seed corpus

def _pixels(h=24, w=32, seed=0):
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 255, h)[:, None, None]
    img = np.broadcast_to(y, (h, w, 3)) + rng.normal(0, 20, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _save(image, fmt, **kw):
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _corpus():
    rgb = Image.fromarray(_pixels())
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(_pixels(seed=1)[:, :, 0]))
    frames = [Image.fromarray(_pixels(seed=s)).convert("P") for s in range(3)]
    exif6 = Image.Exif()
    exif6[0x0112] = 6
    files = {
        "jpeg": _save(rgb, "JPEG", quality=90),
        "jpeg_progressive": _save(rgb, "JPEG", quality=80, progressive=True),
        "jpeg_gray": _save(rgb.convert("L"), "JPEG"),
        "jpeg_cmyk": _save(rgb.convert("CMYK"), "JPEG"),
        "jpeg_exif6": _save(rgb, "JPEG", exif=exif6.tobytes()),
        "png": _save(rgb, "PNG"),
        "png_rgba": _save(rgba, "PNG"),
        "png_palette_transparency": _save(rgb.convert("P"), "PNG", transparency=3),
        "png_16bit": _save(Image.fromarray(_pixels()[:, :, 0].astype(np.uint16) * 257),
                           "PNG"),
        "png_optimized": _save(rgb, "PNG", optimize=True),
        "gif_animated": _save(frames[0], "GIF", save_all=True, append_images=frames[1:],
                              duration=50, loop=0),
        "webp_lossy": _save(rgb, "WEBP", quality=70),
        "webp_lossless_alpha": _save(rgba, "WEBP", lossless=True),
        "webp_animated": _save(rgb, "WEBP", save_all=True,
                               append_images=[Image.fromarray(_pixels(seed=5))]),
        "tiff": _save(rgb, "TIFF"),
        "tiff_multipage": _save(rgb, "TIFF", save_all=True, append_images=[rgb.convert("L")]),
        "bmp": _save(rgb, "BMP"),
        "ico": _save(rgb, "ICO"),
        "ppm": _save(rgb, "PPM"),
        "tga": _save(rgb, "TGA"),
    }
    return files


CORPUS = _corpus()
CORPUS_NAMES = sorted(CORPUS)
EXTENSION = {"jpeg": ".jpg", "png": ".png", "gif": ".gif", "webp": ".webp", "tiff": ".tif",
             "bmp": ".bmp", "ico": ".ico", "ppm": ".ppm", "tga": ".tga"}
SIGNATURES = [b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xe1", b"\xff\xd8\xff\xdb",
              b"\x89PNG\r\n\x1a\n", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
              b"GIF89a", b"GIF87a", b"RIFF\x00\x00\x00\x00WEBPVP8 ",
              b"RIFF\xff\xff\xff\x7fWEBPVP8L",
              b"RIFF\x00\x01\x00\x00WEBPVP8X", b"BM", b"II*\x00", b"MM\x00*", b"\x00\x00\x01\x00",
              b"P6\n", b"P5\n99999 99999\n255\n", b"\x00\x00\x00\x0cjP  \r\n\x87\n",
              b"\x00\x00\x00\x1cftypavif", b"qoif", b"DDS "]


def _ext(name):
    return EXTENSION.get(name.split("_")[0], ".bin")


# ---------------------------------------------------------------- dimension patches

def _png_chunk(kind, body):
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))


def patch_dims(data: bytes, width: int, height: int) -> bytes:
    """Rewrites the declared size in the first header the format has."""
    d = bytearray(data)
    if d[:8] == b"\x89PNG\r\n\x1a\n":
        body = bytearray(d[16:29])
        body[0:8] = struct.pack(">II", width & 0xFFFFFFFF, height & 0xFFFFFFFF)
        return bytes(d[:8] + _png_chunk(b"IHDR", bytes(body)) + d[33:])
    if d[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(d):
            if d[i] != 0xFF:
                break
            marker = d[i + 1]
            length = struct.unpack(">H", d[i + 2:i + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                d[i + 5:i + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
                return bytes(d)
            i += 2 + length
        return bytes(d)
    if d[:3] == b"GIF":
        d[6:10] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
        j = bytes(d).find(b"\x2c", 13)
        if j > 0:
            d[j + 5:j + 9] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
        return bytes(d)
    if d[:2] == b"BM":
        d[18:26] = struct.pack("<ii", _int32(width), _int32(-height if height % 3 == 0 else height))
        return bytes(d)
    if d[:4] == b"RIFF" and d[8:12] == b"WEBP":
        kind = bytes(d[12:16])
        if kind == b"VP8X":
            d[24:30] = struct.pack("<I", (width - 1) & 0xFFFFFF)[:3] + struct.pack(
                "<I", (height - 1) & 0xFFFFFF)[:3]
        elif kind == b"VP8 ":
            d[26:30] = struct.pack("<HH", width & 0x3FFF, height & 0x3FFF)
        elif kind == b"VP8L":
            bits = ((width - 1) & 0x3FFF) | (((height - 1) & 0x3FFF) << 14)
            d[21:25] = struct.pack("<I", bits | (d[24] & 0xF0) << 24)
        return bytes(d)
    if d[:4] in (b"II*\x00", b"MM\x00*"):
        order = "<" if d[:2] == b"II" else ">"
        ifd = struct.unpack(order + "I", d[4:8])[0]
        if ifd + 2 <= len(d):
            count = struct.unpack(order + "H", d[ifd:ifd + 2])[0]
            for k in range(count):
                e = ifd + 2 + 12 * k
                if e + 12 > len(d):
                    break
                tag, typ = struct.unpack(order + "HH", d[e:e + 4])
                if tag in (256, 257):
                    value = width if tag == 256 else height
                    if typ == 3:
                        d[e + 8:e + 10] = struct.pack(order + "H", value & 0xFFFF)
                    else:
                        d[e + 8:e + 12] = struct.pack(order + "I", value & 0xFFFFFFFF)
        return bytes(d)
    if d[:2] == b"P6":
        return b"P6\n%d %d\n255\n" % (width, height) + bytes(d[data.find(b"255\n") + 4:])
    return bytes(d)


def _int32(v):
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


# ---------------------------------------------------------------- EXIF blocks

TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8}


@st.composite
def exif_blocks(draw):
    """Raw TIFF-structured EXIF (with the 'Exif\\0\\0' header)."""
    order = draw(st.sampled_from(["<", ">"]))
    entries = []
    orient_type = draw(st.sampled_from([3, 3, 1, 2, 4, 5, 7, 9, 12, 0, 99]))
    count = draw(st.sampled_from([1, 1, 0, 2, 7, 70000, 0x7FFFFFFF]))
    value = draw(st.sampled_from([1, 3, 6, 8, 0, 9, 255, 65535, 0xFFFFFFFF, 0x80000000]))
    entries.append((0x0112, orient_type, count, value))
    loop = draw(st.sampled_from(["none", "next_self", "exif_self", "exif_to_ifd0", "gps_self",
                                 "past_end", "deep_chain"]))
    types = st.sampled_from(list(TYPE_SIZES) + [0, 13])
    extra = draw(st.lists(st.tuples(st.integers(0, 0xFFFF), types, st.integers(0, 0xFFFFFFFF),
                                    st.integers(0, 0xFFFFFFFF)), max_size=4))
    entries += extra
    ifd0 = 8
    if loop == "exif_self":
        entries.append((0x8769, 4, 1, ifd0))
    elif loop == "exif_to_ifd0":
        entries.append((0x8769, 4, 1, 8))
    elif loop == "gps_self":
        entries.append((0x8825, 4, 1, ifd0))
    elif loop == "past_end":
        entries.append((0x8769, 4, 1, 0x7FFFFFF0))
    entries.sort(key=lambda e: e[0])
    body = struct.pack(order + "H", len(entries))
    for tag, typ, cnt, val in entries:
        size = TYPE_SIZES.get(typ, 1) * min(cnt, 1 << 20)
        if typ == 3 and cnt == 1:
            field = struct.pack(order + "HH", val & 0xFFFF, 0)
        elif size <= 4:
            field = struct.pack(order + "I", val & 0xFFFFFFFF)
        else:  # an offset: to itself, inside, or past the end
            field = struct.pack(order + "I", draw(st.sampled_from([ifd0, 8, 26, 0xFFFFFFF0])))
        body += struct.pack(order + "HHI", tag, typ & 0xFFFF, cnt & 0xFFFFFFFF) + field
    next_ifd = {"next_self": ifd0, "deep_chain": ifd0 + 2 + 12 * len(entries) + 4}.get(loop, 0)
    body += struct.pack(order + "I", next_ifd)
    if loop == "deep_chain":   # a chain of 200 empty IFDs, the last pointing at the first
        for k in range(200):
            nxt = ifd0 + 2 + 12 * len(entries) + 4 + 6 * (k + 1) if k < 199 else ifd0
            body += struct.pack(order + "HI", 0, nxt)
    tiff = (b"II*\x00" if order == "<" else b"MM\x00*") + struct.pack(order + "I", ifd0) + body
    tiff += draw(st.binary(max_size=32))
    return b"Exif\x00\x00" + tiff


@st.composite
def odd_exif_files(draw):
    exif = draw(exif_blocks())
    fmt = draw(st.sampled_from(["JPEG", "PNG", "WEBP"]))
    rgb = Image.fromarray(_pixels(seed=draw(st.integers(0, 3))))
    try:
        data = _save(rgb, fmt, exif=exif)
    except Exception:  # Pillow refuses to write some blocks: keep the plain file
        data = _save(rgb, fmt)
    return data, {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}[fmt]


# ---------------------------------------------------------------- inputs

def _mutate(draw, data: bytes) -> bytes:
    d = bytearray(data)
    for _ in range(draw(st.integers(1, 16))):
        if not d:
            break
        pos = draw(st.integers(0, len(d) - 1))
        d[pos] ^= 1 << draw(st.integers(0, 7))
    if d and draw(st.booleans()):
        pos = draw(st.integers(0, len(d) - 1))
        run = draw(st.binary(min_size=1, max_size=64))
        d[pos:pos + len(run)] = run
    return bytes(d)


@st.composite
def fuzz_inputs(draw):
    """(kind, bytes, file extension)."""
    kind = draw(st.sampled_from(["header_noise", "truncated", "bitflip", "huge_dims",
                                 "odd_exif", "exif_mutated"]))
    if kind == "header_noise":
        sig = draw(st.sampled_from(SIGNATURES))
        data = sig + draw(st.binary(max_size=2048))
        return kind, data, draw(st.sampled_from([".jpg", ".png", ".gif", ".webp", ".bmp",
                                                 ".tif", ".ico", ".bin"]))
    if kind in ("odd_exif", "exif_mutated"):
        data, ext = draw(odd_exif_files())
        if kind == "exif_mutated":
            data = (data[:draw(st.integers(0, len(data)))] if draw(st.booleans())
                    else _mutate(draw, data))
        return kind, data, ext
    name = draw(st.sampled_from(CORPUS_NAMES))
    data = CORPUS[name]
    if kind == "truncated":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif kind == "bitflip":
        data = _mutate(draw, data)
    else:
        side = st.sampled_from([0, 1, 3, 16383, 16384, 65535, 65536, 100000, 1 << 24,
                                (1 << 31) - 1, 1 << 31, 11000, 11313])
        data = patch_dims(data, draw(side), draw(side))
        if draw(st.booleans()):
            data = _mutate(draw, data)
    return kind, data, _ext(name)


# ---------------------------------------------------------------- checks

def check_one(data: bytes, ext: str) -> str:
    """Reads one input as make_records and orient do. Returns "stored ..." or the
    skip reason; raises AssertionError (or the reader's exception) on a bug."""
    path = "fuzz" + ext
    imageio.exif_orientation_of(data)   # serve's EXIF probe: must never raise
    _check_model_read(path, data)
    try:
        stored = imageio.read_upright(path, data=data)
    except imageio.SkipImage as e:
        reason = str(e)
        assert reason.startswith(imageio.REASONS), f"reason not in REASONS: {reason!r}"
        return reason
    assert stored.format == "jpeg" and stored.encoded[:2] == b"\xff\xd8"
    assert 1 <= stored.height and 1 <= stored.width
    assert max(stored.height, stored.width) <= MAX_SIDE
    assert len(stored.signature) == imageio.SIGNATURE_BYTES
    if not stored.changed:
        assert stored.encoded == data
    with Image.open(io.BytesIO(stored.encoded)) as im:
        assert im.size == (stored.width, stored.height), (im.size, stored)
        if stored.changed:
            assert im.mode == "RGB"
        im.load()
    if len(STORED) < _TF_SAMPLE:
        STORED.append((stored.encoded, stored.height, stored.width))
    return f"stored {stored.width}x{stored.height}"


def _check_model_read(path: str, data: bytes) -> None:
    """orient's direct read (imageio.open_for_model, then decode on a worker):
    a float32 [S, S, 3] in [0, 255], or SkipImage with a known reason."""
    try:
        pixels = imageio.open_for_model(path, image_size=8, data=data).decode()
    except imageio.SkipImage as e:
        assert str(e).startswith(imageio.REASONS), f"reason not in REASONS: {e}"
        return
    assert pixels.shape == (8, 8, 3) and pixels.dtype == np.float32, pixels.shape
    assert 0 <= pixels.min() and pixels.max() <= 255


def run_fuzz(*, examples: int, seed: int, before, after) -> list:
    """Runs `examples` hypothesis inputs through check_one; returns failures
    [{"kind", "error", "input_hex" (first 256 bytes), "size"}]."""
    failures = []

    @hseed(seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=False)
    @given(fuzz_inputs())
    def one(drawn):
        kind, data, ext = drawn
        before(data, kind)
        start = time.monotonic()
        try:
            outcome = check_one(data, ext)
        except BaseException as e:  # noqa: B902 -- every other outcome is a finding
            outcome = f"FAILED: {type(e).__name__}"
            failures.append({"kind": kind, "ext": ext, "size": len(data),
                             "error": f"{type(e).__name__}: {e}"[:300],
                             "where": traceback.format_exc(limit=-3)[-800:],
                             "input_hex": data[:256].hex()})
        after(outcome, kind, time.monotonic() - start)

    one()
    return failures


def check_stored_with_tensorflow():
    """Decodes the stored images as inspect_records (decode_image) and the input
    pipeline / orient (preprocess.preprocess_image) do. Returns (count, failures)."""
    import tensorflow as tf
    from upright.pipeline import preprocess
    failures = []
    for encoded, height, width in STORED:
        try:
            image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
            assert tuple(image.shape) == (height, width, 3), (image.shape, height, width)
            x = preprocess.preprocess_image(tf.constant(encoded), 32, "squash").numpy()
            assert x.shape == (32, 32, 3) and np.isfinite(x).all()
            assert 0.0 <= x.min() and x.max() <= 255.0
        except Exception as e:  # noqa: BLE001
            failures.append({"kind": "tensorflow_decode", "error": f"{type(e).__name__}: {e}"[:300],
                             "input_hex": encoded[:256].hex(), "size": len(encoded)})
    return len(STORED), failures
