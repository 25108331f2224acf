"""Tiny real data for tests: upright images with orientation, and records.

Everything here writes real files through the project's own code paths.
"""
import hashlib
import io
import os

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
