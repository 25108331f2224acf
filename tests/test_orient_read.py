"""orient's read path: imageio.open_for_model gives a squash model what the
stored copy (read_upright) and preprocess_image gave it, at a fraction of the
work; serve.Predictor.read_images runs it on worker threads, in order."""
import io

import numpy as np
import pytest
from PIL import Image

from upright.pipeline import imageio, preprocess, serve
from tests import helpers
from tests.test_imageio import jpeg_with_orientation, stored_for_orientation


def page(height=1204, width=930, seed=0) -> np.ndarray:
    """A page-like image: dark lines of 'text' on white, a marker top-left."""
    rng = np.random.default_rng(seed)
    out = np.full([height, width, 3], 245, np.uint8)
    for top in range(60, height - 60, 28):
        length = int(rng.integers(width // 3, width - 120))
        out[top:top + 9, 60:60 + length] = rng.integers(0, 60, 3)
    out[10:80, 10:120] = [200, 30, 30]
    return out


def encoded(array, fmt):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def old_path(data, size):
    stored = imageio.read_upright("x", data=data, max_side=512)
    return preprocess.preprocess_image(stored.encoded, size, "squash").numpy()


def smooth(height, width) -> np.ndarray:
    """Ramps and a slow wave: any shift or scale of the frame changes the pixels."""
    y, x = np.mgrid[0:height, 0:width]
    out = np.stack([255 * x / width, 255 * y / height,
                    128 + 100 * np.sin(x / width * 6) * np.cos(y / height * 5)], -1)
    return out.astype(np.uint8)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("shape,limit", [((1204, 930), 1.5), ((930, 1204), 1.5),
                                         ((40, 24), 4.0)])
def test_open_for_model_matches_the_stored_copy_path(fmt, shape, limit):
    data = encoded(smooth(*shape), fmt)
    new = imageio.open_for_model("x", image_size=96, max_side=512, data=data).decode()
    old = old_path(data, 96)
    assert new.shape == old.shape == (96, 96, 3) and new.dtype == np.float32
    # Same framing (the stored copy cropped to whole 16-pixel blocks), same
    # filter family: they differ by the stored copy's JPEG loss and rounding
    # (measured 0.4-0.9 levels on average; 2.6-2.9 for the 40 x 24 image, which
    # both paths magnify). Without the crop the frame would be 3 % wider:
    old_uncropped = preprocess.resize_image(
        np.asarray(Image.open(io.BytesIO(imageio.read_upright(
            "x", data=data, max_side=512).encoded))), 96).numpy()
    assert np.abs(new - old).mean() < limit
    if shape[0] > 100:
        assert np.abs(new - old_uncropped).mean() > 2 * np.abs(new - old).mean()


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_that_keeps_the_model_size():
    data = encoded(page(2400, 1860), "JPEG")
    opened = imageio.open_for_model("x", image_size=96, max_side=512, data=data)
    # 1/8 of 1860 is 233 >= 96 across the kept region.
    assert opened.image.size == (233, 300)
    assert opened.decode().shape == (96, 96, 3)
    # At S = 288 only 1/4 keeps >= 288 pixels across the short side (1860/8 < 288).
    opened = imageio.open_for_model("x", image_size=288, max_side=512, data=data)
    assert opened.image.size == (465, 600)
    opened.image.close()


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(orientation):
    upright = page(300, 200)
    data = jpeg_with_orientation(stored_for_orientation(upright, orientation), orientation)
    new = imageio.open_for_model("x.jpg", image_size=64, data=data).decode()
    expected = imageio.open_for_model("x.jpg", image_size=64,
                                      data=encoded(upright, "JPEG")).decode()
    assert np.abs(new - expected).mean() < 3.0
    assert np.abs(new - np.rot90(expected, 2)).mean() > 10.0


def test_unreadable_files_give_the_reasons_read_upright_gives():
    with pytest.raises(imageio.SkipImage, match="^not an image"):
        imageio.open_for_model("x.jpg", image_size=32, data=b"not an image at all")
    with pytest.raises(imageio.SkipImage, match="^zero bytes"):
        imageio.open_for_model("x.jpg", image_size=32, data=b"")
    jpeg = encoded(page(300, 200), "JPEG")
    opened = imageio.open_for_model("x.jpg", image_size=32, data=jpeg[:len(jpeg) // 3])
    with pytest.raises(imageio.SkipImage, match="^(truncated|corrupt)"):
        opened.decode()


def test_a_corrupt_exif_block_is_a_note():
    data = helpers.with_corrupt_exif(encoded(page(100, 80), "JPEG"))
    opened = imageio.open_for_model("x.jpg", image_size=32, data=data)
    assert imageio.CORRUPT_EXIF_NOTE in opened.notes
    opened.decode()


def test_read_images_on_threads_keeps_order_and_returns_errors():
    items = [(f"p{i}.jpg", encoded(smooth(200 + 16 * i, 150), "JPEG")) for i in range(6)]
    items.insert(3, ("bad.jpg", b"garbage"))
    info = {"image_size": 48, "resize": "squash"}
    one = serve.Predictor(predict_fn=None, info=info, source="x", workers=1)
    two = serve.Predictor(predict_fn=None, info=info, source="x", workers=2)
    by_one, by_two = one.read_images(items, 512), two.read_images(items, 512)
    assert isinstance(by_one[3], imageio.SkipImage) and isinstance(by_two[3], imageio.SkipImage)
    for a, b in zip(by_one[:3] + by_one[4:], by_two[:3] + by_two[4:]):
        np.testing.assert_array_equal(a[0], b[0])
    with pytest.raises(imageio.SkipImage):
        two.read_image("bad.jpg", b"garbage", 512)


def test_jpeg_block_is_preprocess_s():
    assert imageio.JPEG_BLOCK == preprocess.JPEG_BLOCK


def test_a_tflite_model_with_two_workers_gives_one_interpreter_s_answers(tmp_path):
    model = helpers.corner_model(16)
    folder = tmp_path / "tflite_only"
    folder.mkdir()
    serve.export_tflite(model, str(folder / serve.TFLITE_FILE), image_size=16)
    helpers.write_model_dir(str(tmp_path / "m"), model, 16)
    (folder / serve.INFO_FILE).write_text((tmp_path / "m" / serve.INFO_FILE).read_text())
    images = np.random.default_rng(0).uniform(0, 255, [7, 16, 16, 3]).astype(np.float32)
    one = serve.load_model_dir(str(folder), workers=1)
    two = serve.load_model_dir(str(folder), workers=2)
    assert len(two.handle) == 2
    np.testing.assert_allclose(two.predict_images(images, batch_size=4),
                               one.predict_images(images), atol=1e-6)


def png_with_exif_chunk(array, orientation, after_pixels):
    """PNG bytes carrying an eXIf chunk with `orientation`, before the first IDAT
    (where Pillow writes it) or just before IEND (where the PNG spec allows it too)."""
    import struct
    import zlib
    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = exif.tobytes()
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload + struct.pack(
        ">I", zlib.crc32(b"eXIf" + payload))
    data = encoded(array, "PNG")
    at = data.rindex(b"IEND") - 4 if after_pixels else data.index(b"IDAT") - 4
    return data[:at] + chunk + data[at:]


@pytest.mark.parametrize("after_pixels", [False, True])
def test_png_exif_orientation_is_found_before_or_after_the_pixels(after_pixels):
    data = png_with_exif_chunk(page(60, 40), 6, after_pixels)
    assert imageio.exif_orientation_of(data) == 6
    with Image.open(io.BytesIO(data)) as image:
        assert imageio.exif_orientation(image, data) == 6


def test_png_orientation_is_read_without_decoding_when_nothing_follows_the_pixels():
    data = encoded(page(60, 40), "PNG")
    assert not imageio._png_chunks_after_pixels(data)
    with Image.open(io.BytesIO(data)) as image:
        # Decoding here would run on orient's calling thread, not its workers.
        image.load = lambda: pytest.fail("the orientation lookup decoded the pixels")
        assert imageio.exif_orientation(image, data) is None
    assert imageio._png_chunks_after_pixels(png_with_exif_chunk(page(60, 40), 6, True))
    # What the walk cannot follow counts as "maybe": Pillow's own (decoding) lookup.
    assert imageio._png_chunks_after_pixels(data[:40])
    assert imageio._png_chunks_after_pixels(b"GIF89a" + data[6:])
