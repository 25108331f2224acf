"""upright_copy: the eight transforms, the EXIF table, the orientation reset in
JPEG bytes, lossless turns and what -trim drops."""
import io
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image, ImageOps

from upright.pipeline import upright_copy
from tests import helpers

JPEGTRAN = shutil.which("jpegtran")


def decode(data: bytes):
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def jpegtran(data: bytes, *args) -> bytes:
    return subprocess.run([JPEGTRAN, *args], input=data, capture_output=True,
                          check=True).stdout


def test_transforms_match_pillow_and_exif_table():
    probe = np.arange(24, dtype=np.uint8).reshape(4, 6)
    for name, (fn, pil_name, _) in upright_copy.TRANSFORMS.items():
        if pil_name:
            pil = np.asarray(Image.fromarray(probe).transpose(getattr(Image.Transpose, pil_name)))
            np.testing.assert_array_equal(fn(probe), pil, err_msg=name)
    # The EXIF table is Pillow's exif_transpose, value by value.
    for value, name in upright_copy.EXIF_TRANSFORM.items():
        buf = io.BytesIO()
        exif = Image.Exif()
        exif[upright_copy.EXIF_ORIENTATION] = value
        Image.fromarray(probe).save(buf, "PNG", exif=exif.tobytes())
        with Image.open(io.BytesIO(buf.getvalue())) as im:
            seen = np.asarray(ImageOps.exif_transpose(im))
        np.testing.assert_array_equal(upright_copy.TRANSFORMS[name][0](probe), seen,
                                      err_msg=str(value))
    # Repairs undo the label's turn; composing EXIF then repair is one transform.
    for k, name in upright_copy.REPAIR_TRANSFORM.items():
        np.testing.assert_array_equal(upright_copy.TRANSFORMS[name][0](np.rot90(probe, k)), probe)
    assert upright_copy.stored_to_upright(6, 3) == "identity"
    assert upright_copy.stored_to_upright(None, 1) == "rotate_cw_90"
    assert upright_copy.stored_to_upright(1, 2) == "rotate_180"
    # Transposed pixels (tag 5) shown turned 90 ccw: transpose, then 90 cw = mirror.
    assert upright_copy.stored_to_upright(5, 1) == "flip_horizontal"
    np.testing.assert_array_equal(np.rot90(probe.swapaxes(0, 1), -1), probe[:, ::-1])


def test_reset_jpeg_orientation_patches_exif_and_xmp_in_place():
    xmp = b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[upright_copy.EXIF_ORIENTATION] = 6
    exif[0x010F] = "camera"
    Image.fromarray(helpers.upright_image(0, 16, 32)).save(buf, "JPEG", exif=exif.tobytes(),
                                                           xmp=xmp)
    data = buf.getvalue()
    patched = upright_copy.reset_jpeg_orientation(data)
    assert len(patched) == len(data)
    assert sum(a != b for a, b in zip(data, patched)) == 2   # the EXIF value, the XMP digit
    with Image.open(io.BytesIO(patched)) as im:
        assert im.getexif()[upright_copy.EXIF_ORIENTATION] == 1
        assert im.getexif()[0x010F] == "camera"
        assert b'tiff:Orientation="1"' in im.info["xmp"]
    # A JPEG without EXIF is returned unchanged.
    plain = helpers.encode(helpers.upright_image(1, 16, 16))
    assert upright_copy.reset_jpeg_orientation(plain) == plain


INVERSE = {"rotate_cw_90": "rotate_ccw_90", "rotate_ccw_90": "rotate_cw_90"}



@pytest.mark.skipif(not JPEGTRAN, reason="jpegtran not installed")
@pytest.mark.parametrize("subsampling", [2, 0])   # 4:2:0 (16 x 16 blocks), 4:4:4 (8 x 8)
@pytest.mark.parametrize("transform", [t for t in upright_copy.TRANSFORMS if t != "identity"])
def test_trimmed_strip_is_where_the_report_says_for_every_transform(transform, subsampling):
    """trimmed_edges' claim: what -trim drops is always at the copy's left
    (columns) and top (rows); checked exactly in the DCT domain and on pixels."""
    source = helpers.distinct_image(4, 37, 44)           # 44 x 37: partial blocks both ways
    buf = io.BytesIO()
    Image.fromarray(source).save(buf, "JPEG", quality=90, subsampling=subsampling)
    data = buf.getvalue()
    try:
        copy, trimmed = upright_copy.turn_jpeg_lossless(data, transform, JPEGTRAN), False
    except RuntimeError:
        copy, trimmed = upright_copy.turn_jpeg_lossless(data, transform, JPEGTRAN, trim=True), True
    columns, rows, sizes = upright_copy.trimmed_edges(data, copy, transform)
    assert trimmed == bool(columns or rows) and max(columns, rows) <= upright_copy.MAX_TRIM
    turned = upright_copy.TRANSFORMS[transform][0](decode(data)).astype(int)
    fixed = decode(copy).astype(int)
    assert fixed.shape == turned[rows:, columns:].shape
    assert sizes.endswith(f"{fixed.shape[1]}x{fixed.shape[0]}")
    assert np.abs(fixed - turned[rows:, columns:]).mean() < 1.0
    # Exact: turned back, the copy is the source cut at block boundaries.
    kept_w, kept_h = (fixed.shape[1], fixed.shape[0])
    if transform in ("rotate_ccw_90", "rotate_cw_90", "transpose", "transverse"):
        kept_w, kept_h = kept_h, kept_w
    back = upright_copy.turn_jpeg_lossless(copy, INVERSE.get(transform, transform), JPEGTRAN)
    np.testing.assert_array_equal(decode(back),
                                  decode(jpegtran(data, "-crop", f"{kept_w}x{kept_h}+0+0")))


def test_trim_is_described_by_the_copy_edges():
    assert upright_copy.describe_trim(8, 0) == "8 px trimmed from the left edge"
    assert upright_copy.describe_trim(0, 5) == "5 px trimmed from the top edge"
    assert upright_copy.describe_trim(12, 5) == ("12 px trimmed from the left edge and "
                                                 "5 px trimmed from the top edge")
