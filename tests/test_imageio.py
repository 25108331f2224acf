"""imageio.read_upright: pixels as a person sees them, or a reason."""
import io
import os
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from upright.pipeline import imageio
from tests import helpers

EXIF_ORIENTATION = 0x0112


def decode(stored: imageio.StoredImage) -> np.ndarray:
    image = Image.open(io.BytesIO(stored.encoded))
    assert image.mode == "RGB"
    assert (image.height, image.width) == (stored.height, stored.width)
    return np.asarray(image)


def stored_for_orientation(upright: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores when it tags them with `orientation`, written
    from the EXIF specification (not from Pillow's table)."""
    return {
        1: lambda a: a,
        2: np.fliplr,                              # mirrored
        3: lambda a: np.rot90(a, 2),
        4: np.flipud,
        5: lambda a: a.transpose(1, 0, 2),         # mirrored about the main diagonal
        6: lambda a: np.rot90(a, 1),               # viewer turns it 90 deg clockwise
        7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
        8: lambda a: np.rot90(a, -1),              # viewer turns it 90 deg counter-clockwise
    }[orientation](upright)


def jpeg_with_orientation(array: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, "JPEG", quality=98,
                                                      exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations_give_the_same_upright_pixels(tmp_path, orientation):
    upright = helpers.distinct_image(3, 48, 80)
    upright[2:14, 2:20] = [255, 255, 40]   # a marker near the top-left corner
    data = jpeg_with_orientation(stored_for_orientation(upright, orientation), orientation)
    stored = imageio.read_upright("x.jpg", data=data, max_side=0, jpeg_quality=100)
    pixels = decode(stored).astype(int)
    assert pixels.shape == upright.shape
    # JPEG tolerance (the texture noise suffers most); any wrong turn or flip is far off.
    assert np.abs(pixels - upright).mean() < 5.0
    for wrong in (np.fliplr(upright), np.flipud(upright), np.rot90(upright, 2)):
        assert np.abs(pixels - wrong).mean() > 20.0
    assert (stored.source_height, stored.source_width) == (48, 80)
    # The stored image carries no orientation tag that a viewer would apply again.
    assert Image.open(io.BytesIO(stored.encoded)).getexif().get(EXIF_ORIENTATION) in (None, 1)
    if orientation == 1:
        assert not stored.changed and stored.encoded == data
    else:
        assert stored.changed and f"exif_orientation={orientation}" in stored.notes


def test_png_exif_orientation_is_applied_exactly():
    upright = helpers.distinct_image(4, 20, 30)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(buf, "PNG",
                                                                     exif=exif.tobytes())
    pixels = decode(imageio.read_upright("x.png", data=buf.getvalue(), max_side=0,
                                         jpeg_quality=100))
    assert np.abs(pixels.astype(int) - upright).mean() < 5.0   # 4:2:0 chroma on noise
    assert np.abs(pixels.astype(int) - np.rot90(upright, 2)).mean() > 20.0


PATCHES = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0],
                    [0, 255, 255], [128, 64, 32], [255, 255, 255], [0, 0, 0]], np.uint8)


def patch_image() -> np.ndarray:
    """8 flat 16x16 colour patches side by side: [16, 128, 3]."""
    return np.repeat(np.repeat(PATCHES[None], 16, axis=0), 16, axis=1)


def patch_colours(pixels: np.ndarray) -> np.ndarray:
    """Mean colour of the centre of each patch."""
    return np.stack([pixels[4:12, 16 * i + 4:16 * i + 12].reshape(-1, 3).mean(0)
                     for i in range(len(PATCHES))])


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_colours_survive(fmt):
    buf = io.BytesIO()
    Image.fromarray(patch_image()).convert("CMYK").save(buf, fmt)
    stored = imageio.read_upright("x." + fmt.lower(), data=buf.getvalue())
    assert "mode=CMYK" in stored.notes
    np.testing.assert_allclose(patch_colours(decode(stored)), PATCHES, atol=6)


def test_palette_colours_and_transparency():
    image = Image.fromarray(patch_image()).quantize(colors=8, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    np.testing.assert_allclose(
        patch_colours(decode(imageio.read_upright("p.png", data=buf.getvalue()))),
        PATCHES, atol=4)
    # Palette index of the black patch made transparent: it shows white (BACKGROUND).
    black = int(np.asarray(image)[8, 16 * 7 + 8])
    buf = io.BytesIO()
    image.save(buf, "PNG", transparency=black)
    colours = patch_colours(decode(imageio.read_upright("p.png", data=buf.getvalue())))
    np.testing.assert_allclose(colours[7], imageio.BACKGROUND, atol=4)
    np.testing.assert_allclose(colours[:7], PATCHES[:7], atol=4)


def test_alpha_is_composited_on_white():
    rgba = np.zeros((16, 48, 4), np.uint8)
    rgba[:, :, :3] = [0, 0, 200]
    rgba[:, :16, 3] = 255      # opaque blue
    rgba[:, 16:32, 3] = 0      # transparent: white
    rgba[:, 32:, 3] = 128      # half: blend
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    pixels = decode(imageio.read_upright("a.png", data=buf.getvalue(), jpeg_quality=100))
    np.testing.assert_allclose(pixels[4:12, 4:12].reshape(-1, 3).mean(0), [0, 0, 200], atol=3)
    np.testing.assert_allclose(pixels[4:12, 20:28].reshape(-1, 3).mean(0), [255] * 3, atol=3)
    np.testing.assert_allclose(pixels[4:12, 36:44].reshape(-1, 3).mean(0), [127, 127, 227],
                               atol=4)


def test_16_bit_grayscale_and_1_bit_become_8_bit_rgb():
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")   # 16-bit grayscale PNG
    pixels = decode(imageio.read_upright("g.png", data=buf.getvalue(), jpeg_quality=100))
    expected = ramp.astype(float) * 255 / 65535
    assert np.abs(pixels[..., 0] - expected).mean() < 2.0
    assert np.abs(pixels[..., 0].astype(int) - pixels[..., 2]).max() <= 2
    bits = np.zeros((16, 16), bool)
    bits[:, 8:] = True
    buf = io.BytesIO()
    Image.fromarray(bits).save(buf, "PNG")
    pixels = decode(imageio.read_upright("b.png", data=buf.getvalue(), jpeg_quality=100))
    assert pixels[:, :6].max() < 10 and pixels[:, 10:].min() > 245


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (20, 20), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    stored = imageio.read_upright("a.gif", data=buf.getvalue())
    assert "animated: first frame" in stored.notes
    np.testing.assert_allclose(decode(stored).reshape(-1, 3).mean(0), [255, 0, 0], atol=4)


def test_downscale_keeps_aspect_and_unchanged_jpegs_are_kept_byte_for_byte():
    big = helpers.distinct_image(1, 400, 1000)
    data = helpers.encode(big, "jpeg")
    stored = imageio.read_upright("b.jpg", data=data, max_side=512)
    assert (stored.height, stored.width) == (205, 512) and stored.changed
    assert (stored.source_height, stored.source_width) == (400, 1000)
    reference = np.asarray(Image.fromarray(big).resize((512, 205), Image.Resampling.LANCZOS))
    assert np.abs(decode(stored).astype(int) - reference).mean() < 4.0
    kept = imageio.read_upright("b.jpg", data=data, max_side=0)
    assert not kept.changed and kept.encoded == data and (kept.height, kept.width) == (400, 1000)
    assert imageio.read_upright("b.jpg", data=data, max_side=1000).encoded == data
    png = imageio.read_upright("b.png", data=helpers.encode(big, "png"), max_side=0)
    assert png.changed and png.format == "jpeg" and (png.height, png.width) == (400, 1000)


@pytest.mark.parametrize("max_side", [0, 64])
def test_corrupt_exif_becomes_a_note_not_a_warning(max_side):
    """Pillow's "Corrupt EXIF data" UserWarning carries no file name and would
    cut through a progress bar: it becomes this file's note, and the image is
    still stored (byte for byte when unchanged, downscaled otherwise)."""
    picture = helpers.distinct_image(3, 96, 128)
    data = helpers.with_corrupt_exif(helpers.encode(picture, "jpeg"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stored = imageio.read_upright("bad_exif.jpg", data=data, max_side=max_side)
    assert [str(w.message) for w in caught] == []
    assert stored.notes.count(imageio.CORRUPT_EXIF_NOTE) == 1
    assert (stored.source_height, stored.source_width) == (96, 128)
    if max_side == 0:
        assert not stored.changed and stored.encoded == data
    else:
        assert stored.changed and "resized" in stored.notes and stored.width == 64
        reference = np.asarray(Image.fromarray(picture).resize((64, 48),
                                                               Image.Resampling.LANCZOS))
        assert np.abs(decode(stored).astype(int) - reference).mean() < 4.0
    # A clean file of the same picture has no such note.
    clean = imageio.read_upright("ok.jpg", data=helpers.encode(picture, "jpeg"))
    assert imageio.CORRUPT_EXIF_NOTE not in clean.notes


@pytest.mark.parametrize("width,height,limit", [(60000, 60000, imageio.DEFAULT_MAX_PIXELS),
                                                (20000, 8000, imageio.DEFAULT_MAX_PIXELS),
                                                (200, 200, 10000)])
def test_decompression_bombs_are_refused_before_decoding(width, height, limit, monkeypatch):
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        lambda self: loads.append(self.size) or real_load(self))
    with pytest.raises(imageio.SkipImage, match="^decompression bomb"):
        imageio.read_upright("bomb.png", data=helpers.png_header_only(width, height), max_pixels=limit)
    assert loads == []   # refused from the header: no pixel was decoded
    # The probe sees decoding where there is some.
    imageio.read_upright("small.png", data=helpers.encode(helpers.distinct_image(0, 8, 8), "png"))
    assert set(loads) == {(8, 8)}


def truncated_jpeg() -> bytes:
    data = helpers.encode(helpers.distinct_image(2, 64, 64), "jpeg")
    return data[:len(data) // 2]


def corrupt_jpeg() -> bytes:
    data = helpers.encode(helpers.distinct_image(1, 64, 64), "jpeg")
    return data[:200] + b"\xff\xd9garbage" * 30 + data[440:]   # garbage inside the scan


@pytest.mark.parametrize("name,data,reason", [
    ("zero.jpg", b"", "zero bytes"),
    ("notes.jpg", b"this is a text file, not a JPEG\n" * 4, "not an image"),
    ("photo.heic", b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64, "unsupported format"),
    ("drawing.svg", b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", "unsupported format"),
    ("cut.jpg", truncated_jpeg(), "truncated"),
    ("bad.jpg", corrupt_jpeg(), "corrupt"),
    ("bad-header.png", helpers.png_header_only(16, 16)[:20] + b"\x00" * 30, "not an image"),
])
def test_bad_files_give_their_reason(name, data, reason):
    with pytest.raises(imageio.SkipImage) as caught:
        imageio.read_upright(name, data=data)
    assert str(caught.value).startswith(reason), str(caught.value)
    assert str(caught.value).split(":")[0].split(" (")[0] in imageio.REASONS


def test_unreadable_file_gives_its_reason(tmp_path):
    path = tmp_path / "folder.jpg"
    path.mkdir()      # a folder is unreadable as a file, even for root
    with pytest.raises(imageio.SkipImage, match="^unreadable"):
        imageio.read_upright(str(path))
    if os.path.exists("/proc/self/mem"):
        # fstat gives size 0 and reads stop at the size fstat gives (a file
        # swapped for /dev/zero must not be read forever): skipped as empty.
        with pytest.raises(imageio.SkipImage, match="^zero bytes"):
            imageio.read_upright("/proc/self/mem")


def test_signature_matches_copies_and_separates_pictures():
    originals = [helpers.distinct_image(s, 120, 160) for s in range(12)]
    for a in originals:
        sig = imageio.signature(Image.fromarray(a))
        assert len(sig) == imageio.SIGNATURE_BYTES
        small = Image.fromarray(a).resize((80, 60), Image.Resampling.BICUBIC)
        copy = Image.open(io.BytesIO(helpers.encode(np.asarray(small), "jpeg", quality=70)))
        assert imageio.are_near_duplicates(sig, imageio.signature(copy))
    sigs = [imageio.signature(Image.fromarray(a)) for a in originals]
    for i in range(len(sigs)):
        for j in range(i + 1, len(sigs)):
            assert not imageio.are_near_duplicates(sigs[i], sigs[j])
    assert imageio.signature_distance(sigs[0], sigs[0]) == 0.0
