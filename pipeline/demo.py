"""Built-in demo data: procedurally drawn upright outdoor scenes.

The demo must run without downloads, and its model must learn content, not
artefacts. So every picture is a small landscape whose "up" is carried by
what is in it, the way it is in photos: sky above a horizon at a random
height, ground below with a texture, a sun or clouds in the sky, trees and
houses standing on the ground (trunks below crowns, roofs above walls),
shadows under things. Colours, sizes, horizon, lighting and object counts
vary per image; pictures come in photo-like sizes and aspect ratios and are
saved as JPEG, so the demo goes through the same path as a user's photos.

Pure Pillow + numpy: no TensorFlow import.
"""
import os
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from upright.pipeline import fileio

ASPECTS = (4 / 3, 3 / 4, 16 / 9, 9 / 16, 3 / 2, 2 / 3, 1.0)


def make_demo_images(out_dir: str, *, count: int = 600, seed: int = 0,
                     min_side: int = 160, max_side: int = 360) -> list:
    """Writes `count` upright demo scenes as JPEG files into out_dir.

    Files are named scene-00000.jpg ...; the same (count, seed) gives the same
    files byte for byte. Returns the list of written paths.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i in range(count):
        rng = random.Random(seed * 1_000_003 + i)
        image = draw_scene(rng, min_side=min_side, max_side=max_side)
        path = os.path.join(out_dir, f"scene-{i:05d}.jpg")
        with fileio.atomic_write(path, "wb", durable=False) as f:
            image.save(f, format="JPEG", quality=rng.randint(80, 95))
        paths.append(path)
    return paths


def draw_scene(rng: random.Random, *, min_side: int = 160,
               max_side: int = 360) -> Image.Image:
    """One upright RGB scene, width x height in [min_side, max_side]."""
    long_side = rng.randint(min_side, max_side)
    aspect = rng.choice(ASPECTS)
    w, h = (long_side, round(long_side / aspect)) if aspect >= 1 else (
        round(long_side * aspect), long_side)
    w, h = max(w, min_side // 2), max(h, min_side // 2)
    # Draw at twice the size and downscale: cheap anti-aliasing.
    W, H = 2 * w, 2 * h
    horizon = int(H * rng.uniform(0.35, 0.7))
    sky_top = _jitter(rng, (70, 120, 200), 30)
    sky_low = _jitter(rng, (190, 210, 235), 20)
    ground_top = _jitter(rng, rng.choice([(90, 140, 60), (150, 130, 80), (120, 120, 110)]), 25)
    ground_low = tuple(max(0, c - rng.randint(30, 60)) for c in ground_top)

    pixels = np.zeros((H, W, 3), np.float32)
    t = np.linspace(0, 1, horizon)[:, None]
    pixels[:horizon] = (np.array(sky_top) * (1 - t) + np.array(sky_low) * t)[:, None, :]
    t = np.linspace(0, 1, H - horizon)[:, None]
    pixels[horizon:] = (np.array(ground_top) * (1 - t) + np.array(ground_low) * t)[:, None, :]
    # Ground texture grows coarser towards the viewer (bottom), like perspective.
    nrng = np.random.default_rng(rng.getrandbits(32))
    noise = nrng.normal(0, 1, (H - horizon, W)) * np.linspace(4, 14, H - horizon)[:, None]
    pixels[horizon:] += noise[..., None]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)

    light_from_left = rng.random() < 0.5
    if rng.random() < 0.6:
        r = rng.randint(H // 30 + 4, H // 12 + 6)
        cx = rng.randint(r, W - r)
        cy = rng.randint(r, max(r + 1, horizon // 2))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_jitter(rng, (255, 235, 150), 15))
    for _ in range(rng.randint(0, 4)):
        _draw_cloud(draw, rng, W, horizon)
    if rng.random() < 0.5:
        _draw_hills(draw, rng, W, horizon)

    objects = []
    for _ in range(rng.randint(1, 7)):
        base_y = rng.randint(horizon + 2, H - 2)
        scale = 0.3 + 0.9 * (base_y - horizon) / max(1, H - horizon)  # nearer = larger
        objects.append((base_y, scale, rng.random() < 0.6))
    for base_y, scale, is_tree in sorted(objects):  # far ones first
        x = rng.randint(0, W)
        size = int(H * 0.25 * scale) + 6
        _draw_shadow(draw, x, base_y, size, light_from_left)
        if is_tree:
            _draw_tree(draw, rng, x, base_y, size)
        else:
            _draw_house(draw, rng, x, base_y, size)

    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    return image.resize((w, h), Image.Resampling.LANCZOS)


def _jitter(rng, colour, amount):
    return tuple(int(min(255, max(0, c + rng.randint(-amount, amount)))) for c in colour)


def _draw_cloud(draw, rng, W, horizon):
    cx, cy = rng.randint(0, W), rng.randint(0, max(1, int(horizon * 0.6)))
    size = rng.randint(W // 20 + 4, W // 7 + 8)
    colour = _jitter(rng, (245, 245, 248), 8)
    for _ in range(rng.randint(3, 6)):
        dx, dy = rng.randint(-size, size), rng.randint(-size // 3, size // 4)
        r = rng.randint(size // 3, size // 2 + 2)
        # Flat bottoms: clouds are puffy on top, flatter below.
        draw.ellipse([cx + dx - r, cy + dy - r, cx + dx + r, cy + dy + r // 2], fill=colour)


def _draw_hills(draw, rng, W, horizon):
    colour = _jitter(rng, (100, 120, 140), 20)
    points = [(0, horizon)]
    for x in range(0, W + W // 6, max(1, W // 6)):
        points.append((x, horizon - rng.randint(0, max(1, horizon // 4))))
    points.append((W, horizon))
    draw.polygon(points, fill=colour)


def _draw_shadow(draw, x, base_y, size, light_from_left):
    dx = size // 2 if light_from_left else -size // 2
    draw.ellipse([x - size // 3 + dx, base_y - size // 12, x + size // 3 + dx, base_y + size // 12],
                 fill=(40, 50, 35))


def _draw_tree(draw, rng, x, base_y, size):
    trunk_w = max(2, size // 10)
    crown_base = base_y - size // 2
    draw.rectangle([x - trunk_w // 2, crown_base, x + trunk_w // 2, base_y], fill=_jitter(rng, (90, 60, 35), 15))
    green = _jitter(rng, (40, 110, 45), 25)
    if rng.random() < 0.5:  # conifer: a triangle pointing up
        draw.polygon([(x - size // 3, crown_base), (x + size // 3, crown_base), (x, base_y - size)], fill=green)
    else:  # broadleaf: a crown resting on the trunk
        r = size // 3
        draw.ellipse([x - r, crown_base - 2 * r + r // 3, x + r, crown_base + r // 3], fill=green)


def _draw_house(draw, rng, x, base_y, size):
    w, h = int(size * rng.uniform(0.6, 1.0)), int(size * rng.uniform(0.4, 0.6))
    wall = _jitter(rng, rng.choice([(200, 180, 150), (180, 80, 60), (220, 220, 210)]), 20)
    draw.rectangle([x - w // 2, base_y - h, x + w // 2, base_y], fill=wall)
    roof = _jitter(rng, (120, 40, 30), 25)
    draw.polygon([(x - w // 2 - w // 10, base_y - h), (x + w // 2 + w // 10, base_y - h),
                  (x, base_y - h - int(h * rng.uniform(0.5, 0.9)))], fill=roof)
    door_w = max(2, w // 6)
    draw.rectangle([x - door_w // 2, base_y - h // 2, x + door_w // 2, base_y], fill=(70, 45, 30))
