import hashlib

import numpy as np
from PIL import Image

from upright.pipeline import demo


def _digest(paths):
    return [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]


def test_demo_images_deterministic_and_upright_content(tmp_path):
    a = demo.make_demo_images(str(tmp_path / "a"), count=12, seed=3)
    b = demo.make_demo_images(str(tmp_path / "b"), count=12, seed=3)
    c = demo.make_demo_images(str(tmp_path / "c"), count=12, seed=4)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    tops, bottoms = [], []
    for p in a:
        im = Image.open(p)
        assert im.format == "JPEG" and im.mode == "RGB"
        assert 80 <= max(im.size) <= 360
        x = np.asarray(im, np.float32)
        h = x.shape[0]
        tops.append(x[: h // 5])
        bottoms.append(x[-h // 5:])
    # Content carries "up": the top fifth is sky (blue dominates), the bottom is ground.
    blue_excess_top = np.mean([t[..., 2].mean() - t[..., 0].mean() for t in tops])
    blue_excess_bottom = np.mean([b[..., 2].mean() - b[..., 0].mean() for b in bottoms])
    assert blue_excess_top > 30 > blue_excess_bottom


def test_installed_command_help_lists_its_flags():
    """Console scripts run through pip's wrapper; --help must still show the
    tool's docstring and flags (tools.run_tool lends them to __main__)."""
    import os
    import shutil
    import subprocess
    import sys
    exe = shutil.which("make_demo_images") or os.path.join(os.path.dirname(sys.executable),
                                                           "make_demo_images")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert "upright scenes drawn on the fly" in text
    for flag in ("--count", "--out", "--seed", "--min_side", "--max_side"):
        assert flag in text
