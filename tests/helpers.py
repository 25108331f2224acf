"""Tiny real data for tests: upright images with orientation, and records.

Everything here writes real files through the project's own code paths.
"""
import hashlib
import io
import os
import stat
import struct
import warnings

import numpy as np
from PIL import Image

from upright.pipeline import recordio, schema


def upright_image(seed: int, height: int = 48, width: int = 64) -> np.ndarray:
    """uint8 [H, W, 3] with an unmistakable 'up': a sky-to-ground gradient,
    a bright block near the top-left and random texture. Not rot90-symmetric."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height)[:, None, None]
    img = np.concatenate([200 - 150 * y, 180 - 100 * y, 80 + 120 * y], axis=2)
    img = np.broadcast_to(img, (height, width, 3)).copy()
    img += rng.normal(0, 12, size=img.shape)
    img[2:height // 4, 2:width // 4] = [255, 255, 40]
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str = "jpeg", quality: int = 95) -> bytes:
    """Encodes a uint8 RGB array as JPEG or PNG bytes with Pillow."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG" if fmt == "jpeg" else "PNG",
                                **({"quality": quality} if fmt == "jpeg" else {}))
    return buf.getvalue()


def write_records(out_dir: str, splits: dict, fmt: str = "png",
                  shards_per_split: int = 1) -> dict:
    """Writes a records folder straight from arrays (no make_records run).

    Args:
      splits: {split: list of uint8 [H, W, 3] arrays}.
      fmt: "png" (lossless: exact pixel checks) or "jpeg".
    Returns:
      the info dict written to info.json.
    """
    os.makedirs(out_dir, exist_ok=True)
    entries = {}
    for split, arrays in splits.items():
        examples = []
        for i, a in enumerate(arrays):
            data = encode(a, fmt)
            examples.append(schema.encode_example(schema.Record(
                encoded=data, format=fmt, height=a.shape[0], width=a.shape[1],
                source_id=f"{split}/{i:05d}.{fmt}",
                sha256=hashlib.sha256(data).hexdigest())))
        entries[split] = recordio.write_split(out_dir, split, examples,
                                              min(shards_per_split, max(1, len(examples))))
    return recordio.write_info(out_dir, entries, source="tests.helpers")


# ---------------------------------------------------------------------------
# Stub orientation models with outputs the tests control (serve, evaluate,
# orient). Plain Keras layers only, so they round-trip through model.keras.

def quadrant_marker_image(seed: int, size: int = 32) -> np.ndarray:
    """uint8 [size, size, 3]: dim noise (about 70) with a bright top-left quadrant
    (about 200). Upright = bright quadrant at the top-left."""
    rng = np.random.default_rng(seed)
    img = rng.normal(70, 8, size=(size, size, 3))
    img[:size // 2, :size // 2] += 130
    return np.clip(img, 0, 255).astype(np.uint8)


def _quadrant_model(image_size: int, kernel: np.ndarray, bias: np.ndarray):
    """Input float32 [B, S, S, 3] in [0, 255] -> softmax(flatten(quadrant means) @ kernel + bias).

    Flattened quadrant means: [TL rgb, TR rgb, BL rgb, BR rgb] (12 values).
    """
    import keras
    model = keras.Sequential([
        keras.Input((image_size, image_size, 3)),
        keras.layers.AveragePooling2D(pool_size=image_size // 2),
        keras.layers.Flatten(),
        keras.layers.Dense(4),
        keras.layers.Activation("softmax", dtype="float32"),
    ])
    model.layers[-2].set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return model


# Which quadrant holds the upright top-left after k quarter turns counter-
# clockwise (np.rot90(x, k)): k=0 TL, k=1 BL, k=2 BR, k=3 TR. Index into
# [TL, TR, BL, BR].
MARKER_QUADRANT = (0, 2, 3, 1)


def corner_model(image_size: int, scale: float = 0.05):
    """A model that is right on every orientation of quadrant_marker_image:
    logit k = scale * (sum of the mean RGB of the quadrant where the marker sits
    for label k). On content without a marker it outputs about 0.25 each."""
    kernel = np.zeros([12, 4])
    for k, q in enumerate(MARKER_QUADRANT):
        kernel[3 * q:3 * q + 3, k] = scale
    return _quadrant_model(image_size, kernel, np.zeros(4))


def upright_only_model(image_size: int, scale: float = 0.05):
    """Recognises only the upright marker: logit 0 = scale * (TL - mean of the
    other quadrants), logits 1-3 = 0. Confidently right on label 0, wrong or
    unsure elsewhere: test-time agreement over rotations should fix it."""
    kernel = np.zeros([12, 4])
    kernel[0:3, 0] = scale
    kernel[3:12, 0] = -scale / 3
    return _quadrant_model(image_size, kernel, np.zeros(4))


def fixed_output_model(image_size: int, probs):
    """A model whose output is `probs` [4] for every input (zero kernel, bias log p)."""
    probs = np.asarray(probs, np.float64)
    return _quadrant_model(image_size, np.zeros([12, 4]), np.log(probs))


def write_model_dir(model_dir: str, model, image_size: int, resize: str = "squash") -> str:
    """Writes what the trainer leaves for prediction: model.keras + model_info.json."""
    import json
    os.makedirs(model_dir, exist_ok=True)
    model.save(os.path.join(model_dir, "model.keras"))
    with open(os.path.join(model_dir, "model_info.json"), "w") as f:
        json.dump({"image_size": image_size, "resize": resize, "backbone": "stub",
                   "convention": schema.convention()}, f)
    return model_dir


def distinct_image(seed: int, height: int = 40, width: int = 56) -> np.ndarray:
    """uint8 [H, W, 3]: a random low-frequency colour field plus fine texture.

    Different seeds give clearly different pictures (far apart for the
    near-duplicate test of make_records), unlike upright_image, whose seeds
    share one layout."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC),
                       dtype=np.float64)
    field += rng.normal(0, 6, size=field.shape)
    return np.clip(field, 0, 255).astype(np.uint8)


def write_image_file(path, array: np.ndarray, fmt: str = "jpeg", quality: int = 95,
                     **save_kwargs) -> bytes:
    """Writes an array as an image file (str or bytes path); returns its bytes."""
    buf = io.BytesIO()
    image = Image.fromarray(array)
    if fmt == "jpeg":
        save_kwargs.setdefault("quality", quality)
    image.save(buf, format={"jpeg": "JPEG", "png": "PNG"}.get(fmt, fmt.upper()), **save_kwargs)
    data = buf.getvalue()
    with open(path, "wb") as f:
        f.write(data)
    return data


def with_corrupt_exif(jpeg: bytes) -> bytes:
    """The JPEG with an APP1 EXIF block whose IFD0 declares 4 entries but holds
    one and then ends: Pillow warns "Corrupt EXIF data.  Expecting to read 12
    bytes but only got 0." (a UserWarning, printed without the file's name) and
    reads the image anyway. Checked here, so a test never passes on a block
    Pillow silently accepts."""
    tiff = (b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 4)
            + struct.pack("<HHI4s", 0x010F, 2, 4, b"abc\x00"))   # Make = "abc", then nothing
    payload = b"Exif\x00\x00" + tiff
    data = jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Image.open(io.BytesIO(data)) as image:
            image.getexif()
            image.load()
    assert any("Corrupt EXIF data" in str(w.message) for w in caught), caught
    return data


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height, with almost no pixel data:
    a decompression bomb as far as the declared size goes."""
    import struct
    import zlib

    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def listing(folder) -> dict:
    """{relative path: bytes, or "dir"} of everything under folder (links not
    followed): what a planted link must leave unchanged."""
    out = {}
    for root, dirs, names in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder)] = "dir"
        for n in names:
            path = os.path.join(root, n)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def is_regular(path) -> bool:
    """A regular file itself, not a link to one."""
    return stat.S_ISREG(os.lstat(path).st_mode)
