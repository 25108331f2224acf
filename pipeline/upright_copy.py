"""The bytes of a file's upright copy: (file bytes, EXIF orientation, label k)
-> (the upright copy's bytes, the method string).

    from upright.pipeline import upright_copy
    transform = upright_copy.stored_to_upright(exif_orientation, k)
    copy, method = upright_copy.turn(data, transform, jpegtran=shutil.which("jpegtran"),
                                     trim_edges=True, jpeg_quality=95)

k is the model's label: the image as seen (EXIF orientation applied) is
turned k quarter turns counter-clockwise. The copy is upright, with its
metadata (EXIF, ICC profile, XMP, comments) and the EXIF Orientation tag (and
XMP tiff:Orientation) set to 1. The stored pixels undergo one transform of the
square's symmetry group (TRANSFORMS): the EXIF transform followed by the
repair turn (stored_to_upright).
  JPEG: `jpegtran -copy all -perfect -rotate|-flip|-transpose|-transverse`
    (libjpeg-turbo-progs on Debian) moves DCT blocks without decoding:
    lossless. -perfect refuses when the image's width or height is not a
    whole number of coding blocks on an edge that the transform moves (most
    photos: 3000 = 187.5 x 16); then, with trim_edges, the turn is still
    lossless with `jpegtran -trim`, which drops the partial edge blocks: under
    16 pixel columns at the copy's left edge and/or rows at its top (at most
    MAX_TRIM), and the method says exactly how many ("lossless (jpegtran),
    8 px trimmed from the left edge (56x40 -> 32x56)"). When -perfect refuses
    and trim_edges is off (or -trim would drop more), or without jpegtran
    (jpegtran=None), the image is decoded and re-encoded (JPEG quality
    `jpeg_quality`, chroma subsampling kept as 4:4:4 or 4:2:0).
  Other formats: decoded, turned, saved in the same format (PNG stays
    lossless); a copy over MAX_GROWTH times its source's size and over
    MIN_GROWTH_BYTES (a compressed BMP or TIFF written back uncompressed) is
    refused with ValueError.
The method string says which: "lossless (jpegtran)" (every pixel kept), the
trimmed form above, or "re-encoded (...)" with the reason.
Bytes in, bytes out: nothing here reads or writes a file (jpegtran runs on
stdin and stdout), predicts, or decides whether a file is turned; that is
orient's (pipeline/orient.py), which writes the copy into DST.
"""
import io
import re
import struct
import subprocess
import warnings

import numpy as np

# An upright copy in a format other than JPEG or PNG (written by Pillow, often
# uncompressed) may be at most this many times its source's size, or
# MIN_GROWTH_BYTES for small files whose format overhead dominates.
MAX_GROWTH = 4
MIN_GROWTH_BYTES = 1 << 20
# trim_edges drops at most this many pixel rows or columns per edge: the
# partial edge block of the usual 4:2:0 and 4:4:4 files (16 or 8 pixels).
MAX_TRIM = 15
EXIF_ORIENTATION = 0x0112

# The eight transforms of an image (dihedral group of the square), as numpy
# functions on [H, W, ...] arrays, their Pillow names and jpegtran arguments.
TRANSFORMS = {
    "identity": (lambda a: a, None, []),
    "flip_horizontal": (lambda a: a[:, ::-1], "FLIP_LEFT_RIGHT", ["-flip", "horizontal"]),
    "flip_vertical": (lambda a: a[::-1], "FLIP_TOP_BOTTOM", ["-flip", "vertical"]),
    "rotate_ccw_90": (lambda a: np.rot90(a, 1), "ROTATE_90", ["-rotate", "270"]),
    "rotate_180": (lambda a: np.rot90(a, 2), "ROTATE_180", ["-rotate", "180"]),
    "rotate_cw_90": (lambda a: np.rot90(a, -1), "ROTATE_270", ["-rotate", "90"]),
    "transpose": (lambda a: a.swapaxes(0, 1), "TRANSPOSE", ["-transpose"]),
    "transverse": (lambda a: np.rot90(a, 2).swapaxes(0, 1), "TRANSVERSE", ["-transverse"]),
}
# EXIF Orientation value -> the transform that turns stored pixels into what a
# viewer shows (the same table as Pillow's ImageOps.exif_transpose).
EXIF_TRANSFORM = {1: "identity", 2: "flip_horizontal", 3: "rotate_180", 4: "flip_vertical",
                  5: "transpose", 6: "rotate_cw_90", 7: "transverse", 8: "rotate_ccw_90"}
# Repair of label k: k quarter turns clockwise (np.rot90(image, -k)).
REPAIR_TRANSFORM = {0: "identity", 1: "rotate_cw_90", 2: "rotate_180", 3: "rotate_ccw_90"}


# ---------------------------------------------------------------------------
# Geometry.

def compose(first: str, then: str) -> str:
    """The single transform equal to applying `first`, then `then` (names in TRANSFORMS)."""
    probe = np.arange(6).reshape(2, 3)
    target = TRANSFORMS[then][0](TRANSFORMS[first][0](probe))
    for name, (fn, _, _) in TRANSFORMS.items():
        candidate = fn(probe)
        if candidate.shape == target.shape and np.array_equal(candidate, target):
            return name
    raise AssertionError("the eight transforms are closed under composition")


def stored_to_upright(exif_orientation, k: int) -> str:
    """Transform from the file's stored pixels to the upright image: EXIF, then repair."""
    return compose(EXIF_TRANSFORM.get(exif_orientation or 1, "identity"), REPAIR_TRANSFORM[k])

# ---------------------------------------------------------------------------
# Turning the bytes.

def turn_jpeg_lossless(data: bytes, transform: str, jpegtran: str, *,
                       trim: bool = False) -> bytes:
    """jpegtran the JPEG bytes by `transform` (DCT domain, all markers copied),
    then set the EXIF (and XMP) orientation to 1. Raises RuntimeError with
    jpegtran's message when it refuses (-perfect on partial edge blocks).
    trim: -trim instead of -perfect (drops the partial edge blocks)."""
    args = ([jpegtran, "-copy", "all", "-trim" if trim else "-perfect"]
            + TRANSFORMS[transform][2])
    proc = subprocess.run(args, input=data, capture_output=True, timeout=300)
    if proc.returncode != 0 or not proc.stdout:
        lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        message = lines[-1] if lines else f"exit status {proc.returncode}"
        # "/usr/bin/jpegtran: transformation is not perfect" -> the message alone.
        raise RuntimeError(message.split(": ", 1)[-1] if message.startswith(jpegtran) else message)
    return reset_jpeg_orientation(proc.stdout)


_XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"
_XMP_ORIENTATION = re.compile(rb'(tiff:Orientation\s*=\s*["\']|<tiff:Orientation>)[1-8]')


def reset_jpeg_orientation(data: bytes) -> bytes:
    """JPEG bytes with the EXIF Orientation tag (IFD0) and XMP tiff:Orientation set
    to 1, patched in place (same length, pixels and all other bytes untouched)."""
    out = bytearray(data)
    i = 2
    while i + 4 <= len(out) and out[0:2] == b"\xff\xd8":
        if out[i] != 0xFF:
            break
        marker = out[i + 1]
        if marker == 0xFF:          # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end: no more metadata
            break
        length = struct.unpack(">H", out[i + 2:i + 4])[0]
        start, end = i + 4, i + 2 + length
        if marker == 0xE1 and out[start:start + 6] == b"Exif\x00\x00":
            _patch_exif_orientation(out, start + 6, end)
        elif marker == 0xE1 and out[start:start + len(_XMP_HEADER)] == _XMP_HEADER:
            segment = bytes(out[start:end])
            out[start:end] = _XMP_ORIENTATION.sub(lambda m: m.group(1) + b"1", segment)
        i = end
    return bytes(out)


def _patch_exif_orientation(out: bytearray, tiff: int, end: int) -> None:
    try:
        order = {b"II": "<", b"MM": ">"}[bytes(out[tiff:tiff + 2])]
        ifd = tiff + struct.unpack(order + "I", out[tiff + 4:tiff + 8])[0]
        count = struct.unpack(order + "H", out[ifd:ifd + 2])[0]
        for j in range(count):
            entry = ifd + 2 + 12 * j
            if entry + 12 > end:
                return
            tag, kind = struct.unpack(order + "HH", out[entry:entry + 4])
            if tag == EXIF_ORIENTATION and kind == 3:  # SHORT, value inline
                out[entry + 8:entry + 10] = struct.pack(order + "H", 1)
                return
    except (KeyError, struct.error):
        return  # unreadable EXIF: leave it as it is (Pillow ignores it too)


def turn_with_pillow(data: bytes, transform: str, *, jpeg_quality: int) -> tuple:
    """Decodes, applies `transform` to the stored pixels, re-encodes in the same
    format with metadata kept and EXIF orientation 1. -> (bytes, method)."""
    from PIL import Image, JpegImagePlugin
    # Pillow's warnings on this file (a damaged EXIF block) are already the
    # row's notes (read_upright): not printed again.
    with warnings.catch_warnings(record=True), Image.open(io.BytesIO(data)) as image:
        warnings.simplefilter("always")
        image.load()
        fmt = image.format
        info = dict(image.info)
        exif = image.getexif()
        sampling = JpegImagePlugin.get_sampling(image) if fmt == "JPEG" else None
        pil_name = TRANSFORMS[transform][1]
        turned = image.transpose(getattr(Image.Transpose, pil_name)) if pil_name else image.copy()
    kwargs = {}
    if exif:
        exif[EXIF_ORIENTATION] = 1
        kwargs["exif"] = exif.tobytes()
    for key in ("icc_profile", "dpi", "comment"):
        if info.get(key):
            kwargs[key] = info[key]
    if info.get("xmp"):
        xmp = info["xmp"] if isinstance(info["xmp"], bytes) else str(info["xmp"]).encode()
        kwargs["xmp"] = _XMP_ORIENTATION.sub(lambda m: m.group(1) + b"1", xmp)
    buffer = io.BytesIO()
    if fmt == "JPEG":
        method = f"re-encoded (JPEG quality {jpeg_quality})"
        turned.save(buffer, "JPEG", quality=jpeg_quality,
                    subsampling=0 if sampling == 0 else 2, **kwargs)
    elif fmt == "PNG":
        method = "re-encoded (PNG, lossless)"
        turned.save(buffer, "PNG", **kwargs)
    else:
        method = f"re-encoded ({fmt})"
        try:
            turned.save(buffer, fmt, **kwargs)
        except (TypeError, ValueError):  # a format that takes fewer metadata options
            buffer = io.BytesIO()
            turned.save(buffer, fmt)
            method += ", metadata not kept"
    payload = buffer.getvalue()
    if fmt not in ("JPEG", "PNG") and len(payload) > max(MAX_GROWTH * len(data),
                                                         MIN_GROWTH_BYTES):
        # A run-length-encoded BMP (or TIFF) is written back uncompressed: 991 KB
        # became 121 MB. The copy would not be the file the user gave.
        raise ValueError(f"the {fmt} copy would be {len(payload) / 1e6:.1f} MB from "
                         f"{len(data) / 1e6:.1f} MB (a compressed source written back "
                         "uncompressed); convert it to PNG or JPEG first")
    return payload, method


def is_lossless(method: str) -> bool:
    """True when a copy's pixels are its source's, turned: a jpegtran block move
    (trimmed ones too, which drop only partial edge blocks; the summary counts
    those apart) or a PNG written again. What orient's summary counts as lossless."""
    return method.startswith(("lossless", "re-encoded (PNG, lossless)"))


def trimmed_edges(before: bytes, after: bytes, transform: str) -> tuple:
    """(columns, rows) that `jpegtran -trim` dropped, and the sizes "WxH -> WxH".

    jpegtran can move only whole coding blocks (iMCUs: 8 or 16 pixels, 32 for
    rare 4:1:1 files); the partial blocks at the stored image's right and
    bottom edges stay whole only where the transform leaves them at the
    output's right or bottom. Those it would move to the output's left or top
    are what -trim drops, so the lost columns are always at the upright copy's
    LEFT edge and the lost rows at its TOP edge.
    """
    from PIL import Image
    # Headers only; a damaged EXIF block (copied by jpegtran) is already the
    # row's note: Pillow's warning about it is not printed again.
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with Image.open(io.BytesIO(before)) as a, Image.open(io.BytesIO(after)) as b:
            (w, h), (out_w, out_h) = a.size, b.size
    if TRANSFORMS[transform][0](np.zeros((2, 1))).shape == (1, 2):   # axes swapped
        w, h = h, w
    return w - out_w, h - out_h, f"{a.size[0]}x{a.size[1]} -> {out_w}x{out_h}"


def describe_trim(columns: int, rows: int) -> str:
    """"8 px trimmed from the left edge" (the upright copy's edges)."""
    parts = [f"{n} px trimmed from the {edge} edge"
             for n, edge in ((columns, "left"), (rows, "top")) if n]
    return " and ".join(parts) if parts else "nothing trimmed"


def turn(data: bytes, transform: str, *, jpegtran, trim_edges: bool,
         jpeg_quality: int) -> tuple:
    """The upright copy of `data` by `transform` (a name in TRANSFORMS, from
    stored_to_upright) -> (bytes, method). The method, exactly:
    "lossless (jpegtran)" (every pixel kept), "lossless (jpegtran), 8 px trimmed
    from the left edge (56x40 -> 32x56)" (trim_edges: the partial edge blocks
    a lossless turn cannot keep), or "re-encoded (...)" with the reason.
    jpegtran: the executable, or None (JPEGs are re-encoded)."""
    method, payload = None, None
    if jpegtran and data[:2] == b"\xff\xd8":
        try:
            payload = turn_jpeg_lossless(data, transform, jpegtran)
            method = "lossless (jpegtran)"
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            note = f"jpegtran refused: {e}"
            if not trim_edges:
                note += " (trim_edges off: every pixel kept)"
            else:
                try:
                    trimmed = turn_jpeg_lossless(data, transform, jpegtran, trim=True)
                    columns, rows, sizes = trimmed_edges(data, trimmed, transform)
                    if max(columns, rows) <= MAX_TRIM:
                        payload = trimmed
                        method = (f"lossless (jpegtran), {describe_trim(columns, rows)} "
                                  f"({sizes})")
                    else:
                        note += (f"; a lossless turn would drop {describe_trim(columns, rows)}"
                                 f" (more than {MAX_TRIM} px)")
                except (RuntimeError, OSError, subprocess.TimeoutExpired) as e2:
                    note += f"; -trim failed: {e2}"
    else:
        # Without jpegtran (or with lossless off) the reason is said once, in
        # orient's summary (format_summary), not on every file's line.
        note = None
    if payload is None:
        payload, method = turn_with_pillow(data, transform, jpeg_quality=jpeg_quality)
        if note:
            method += f"; {note}"
    return payload, method
