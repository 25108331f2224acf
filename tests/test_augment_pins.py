"""Bit-exact pins of every augmentation op's output on a fixed tiny batch.

Written before the augment modules were split (issue 12) and kept since: a
refactor of pipeline/augment*.py must leave each op's output, for a fixed
batch and seed, bit for bit as it was, in every schedule (grouped __call__,
static call_static, the masked Sometimes and the fused/sparse OneOf forms).

The digests are of float32 bytes computed on a CPU with this repository's
TensorFlow; a different TensorFlow version or CPU may round exp/log or
convolutions differently. If only this file fails after such an upgrade
(and test_augment.py passes), regenerate the table:

    .venv/bin/python -m tests.test_augment_pins
"""
import hashlib

import numpy as np
import pytest
import tensorflow as tf

from upright.pipeline import augment
from tests import helpers

SIZE, BATCH = 16, 6

# Every op with its defaults, and the argument choices that take other paths
# (dense sparse ops at large p, the box blur's kernel form, medians 5 and 7).
OP_SPECS = (
    "identity", "add", "multiply", "hue_saturation", "gaussian_noise", "laplace_noise",
    "poisson_noise", "gaussian_noise(2,9,1)", "gaussian_noise(2,9,0)", "dropout", "pepper",
    "salt", "dropout(0.3)", "pepper(0.3)", "salt(0.3)", "frequency_blend", "gaussian_blur",
    "average_blur", "average_blur(3,5)", "motion_blur", "median_blur(3)", "median_blur(5)",
    "median_blur(7)", "jpeg", "gamma", "channel_gamma", "sigmoid_contrast", "log_contrast",
    "linear_contrast", "rotate", "zoom", "mirror",
)
# Composites: fused, sparse and grouped OneOfs, masked and grouped Sometimes,
# the default policy.
POLICY_SPECS = (
    "add|multiply|hue_saturation",
    "gaussian_noise|laplace_noise|poisson_noise",
    "dropout|pepper|salt",
    "gaussian_blur|average_blur|motion_blur|median_blur",
    "sometimes(0.5, frequency_blend)", "sometimes(0.5, rotate)", "sometimes(0.5, add)",
    "sometimes(0.5, gaussian_noise)", "sometimes(0.5, median_blur)", "sometimes(0.5, jpeg)",
    "sometimes(0.5, salt(0.3))",
    "mirror; zoom(0.6,1); default",
    "default",
)


def batch():
    images = np.stack([helpers.upright_image(30 + i, SIZE, SIZE) for i in range(BATCH)])
    images = images.astype(np.float32)
    images[0, :3, :3] = 0.0      # exact 0 and 255 pixels: log(0), clipping
    images[1, -3:, -3:] = 255.0
    labels = np.array([0, 1, 2, 3, 1, 2], np.int32)
    seeds = (np.arange(2 * BATCH, dtype=np.int32).reshape(BATCH, 2) * 7919 + 13)
    return tf.constant(images), tf.constant(labels), tf.constant(seeds)


def digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.asarray(a)
        h.update(str(a.dtype).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def outputs(spec: str, schedule: str) -> str:
    policy = augment.parse_policy(spec)
    images, labels, seeds = batch()
    if schedule == "grouped":
        x, y = policy(images, labels, seeds)
    else:
        x, y = policy.call_static(images, labels, seeds)
    return digest(x.numpy(), y.numpy())


def random_numbers() -> str:
    from upright.pipeline import per_image_random as ao
    _, _, seeds = batch()
    folded = ao.fold_seeds(seeds, ao.salt_of("pins"))
    return digest(folded.numpy(), ao.uniforms(folded, 5).numpy(),
                  ao.pixel_bits(folded, [3, 4, 2]).numpy(),
                  ao.pixel_draw(folded, [4, 4], "normal").numpy(),
                  ao.pixel_draw(folded, [4, 4], "uniform").numpy(),
                  ao.image_keys(folded).numpy(), np.int64(ao.salt_of("pins")))


CASES = [(spec, schedule) for spec in OP_SPECS + POLICY_SPECS
         for schedule in ("grouped", "static")]

PINS = {
    "random numbers": "caf49ea692a4291b",
    "grouped: identity": "1e26c855ef65d28f",
    "static: identity": "1e26c855ef65d28f",
    "grouped: add": "74919ba0d9dfcd57",
    "static: add": "74919ba0d9dfcd57",
    "grouped: multiply": "3b970cd3eb56d000",
    "static: multiply": "3b970cd3eb56d000",
    "grouped: hue_saturation": "4b4d3364f5185e1c",
    "static: hue_saturation": "4b4d3364f5185e1c",
    "grouped: gaussian_noise": "e612907e43088473",
    "static: gaussian_noise": "e612907e43088473",
    "grouped: laplace_noise": "253de994fb0c61ce",
    "static: laplace_noise": "253de994fb0c61ce",
    "grouped: poisson_noise": "6547869cfff4c4de",
    "static: poisson_noise": "6547869cfff4c4de",
    "grouped: gaussian_noise(2,9,1)": "90e6d80cb828acd0",
    "static: gaussian_noise(2,9,1)": "90e6d80cb828acd0",
    "grouped: gaussian_noise(2,9,0)": "2e242e4d8a7a4e1b",
    "static: gaussian_noise(2,9,0)": "2e242e4d8a7a4e1b",
    "grouped: dropout": "72c05b34e65e28e9",
    "static: dropout": "72c05b34e65e28e9",
    "grouped: pepper": "7fa7c286a1587d7a",
    "static: pepper": "f60ffa03072b8b43",
    "grouped: salt": "42e8f87baf3e3a04",
    "static: salt": "42e8f87baf3e3a04",
    "grouped: dropout(0.3)": "da09dbd6d9939ca4",
    "static: dropout(0.3)": "da09dbd6d9939ca4",
    "grouped: pepper(0.3)": "97906e7e374c50c8",
    "static: pepper(0.3)": "97906e7e374c50c8",
    "grouped: salt(0.3)": "2b7a5094fcfc4b86",
    "static: salt(0.3)": "2b7a5094fcfc4b86",
    "grouped: frequency_blend": "ec9a35fc1dbda57e",
    "static: frequency_blend": "ec9a35fc1dbda57e",
    "grouped: gaussian_blur": "0e59f3725a0e86b6",
    "static: gaussian_blur": "f2a2d5390fb86642",
    "grouped: average_blur": "13490d2d4e514596",
    "static: average_blur": "13490d2d4e514596",
    "grouped: average_blur(3,5)": "2bbad734f41d54ce",
    "static: average_blur(3,5)": "c3d78c0fc85ca74c",
    "grouped: motion_blur": "a052d8a0d60d9b1d",
    "static: motion_blur": "490d22a211184a80",
    "grouped: median_blur(3)": "deda1842d1dc0dca",
    "static: median_blur(3)": "deda1842d1dc0dca",
    "grouped: median_blur(5)": "f4ca61cabe0e1e20",
    "static: median_blur(5)": "f4ca61cabe0e1e20",
    "grouped: median_blur(7)": "264a193d92fad5f9",
    "static: median_blur(7)": "264a193d92fad5f9",
    "grouped: jpeg": "605b5baef63e4985",
    "static: jpeg": "605b5baef63e4985",
    "grouped: gamma": "5fd340bfb7d33944",
    "static: gamma": "5fd340bfb7d33944",
    "grouped: channel_gamma": "ed6d8f963f54cf06",
    "static: channel_gamma": "ed6d8f963f54cf06",
    "grouped: sigmoid_contrast": "8e228f6e14e5a0de",
    "static: sigmoid_contrast": "8e228f6e14e5a0de",
    "grouped: log_contrast": "4ec66ccfdcb440b9",
    "static: log_contrast": "4ec66ccfdcb440b9",
    "grouped: linear_contrast": "d44532b7dcbeaaca",
    "static: linear_contrast": "d44532b7dcbeaaca",
    "grouped: rotate": "f0d1333d2e0b541c",
    "static: rotate": "f0d1333d2e0b541c",
    "grouped: zoom": "5aa99f3b5b228e36",
    "static: zoom": "5aa99f3b5b228e36",
    "grouped: mirror": "cbb1e21a9cba57ec",
    "static: mirror": "cbb1e21a9cba57ec",
    "grouped: add|multiply|hue_saturation": "92f4f37ebe966baf",
    "static: add|multiply|hue_saturation": "92f4f37ebe966baf",
    "grouped: gaussian_noise|laplace_noise|poisson_noise": "e6547da6b5bba8e6",
    "static: gaussian_noise|laplace_noise|poisson_noise": "e6547da6b5bba8e6",
    "grouped: dropout|pepper|salt": "1a356125f1fbd88a",
    "static: dropout|pepper|salt": "1a356125f1fbd88a",
    "grouped: gaussian_blur|average_blur|motion_blur|median_blur": "91cd95a7199a252e",
    "static: gaussian_blur|average_blur|motion_blur|median_blur": "a00c0495726070f9",
    "grouped: sometimes(0.5, frequency_blend)": "4bcfc7f30a37d749",
    "static: sometimes(0.5, frequency_blend)": "4bcfc7f30a37d749",
    "grouped: sometimes(0.5, rotate)": "ddbc5600319431cc",
    "static: sometimes(0.5, rotate)": "ddbc5600319431cc",
    "grouped: sometimes(0.5, add)": "e8b8a898102a767b",
    "static: sometimes(0.5, add)": "e8b8a898102a767b",
    "grouped: sometimes(0.5, gaussian_noise)": "1bc8f649f3b97ebd",
    "static: sometimes(0.5, gaussian_noise)": "1bc8f649f3b97ebd",
    "grouped: sometimes(0.5, median_blur)": "2e9a1083cfa5587e",
    "static: sometimes(0.5, median_blur)": "2e9a1083cfa5587e",
    "grouped: sometimes(0.5, jpeg)": "cad840b24c291630",
    "static: sometimes(0.5, jpeg)": "cad840b24c291630",
    "grouped: sometimes(0.5, salt(0.3))": "9af3e42074430ce3",
    "static: sometimes(0.5, salt(0.3))": "9af3e42074430ce3",
    "grouped: mirror; zoom(0.6,1); default": "15a73d8b8d0b4d2d",
    "static: mirror; zoom(0.6,1); default": "55834dd50c6f1f26",
    "grouped: default": "1477cbe641acb6b4",
    "static: default": "d15ae367221c084f",
}


def test_random_numbers_pinned():
    assert random_numbers() == PINS["random numbers"]


@pytest.mark.parametrize("spec,schedule", CASES)
def test_op_output_pinned(spec, schedule):
    assert outputs(spec, schedule) == PINS[f"{schedule}: {spec}"], (spec, schedule)


if __name__ == "__main__":
    print("PINS = {")
    print(f'    "random numbers": "{random_numbers()}",')
    for spec, schedule in CASES:
        print(f'    "{schedule}: {spec}": "{outputs(spec, schedule)}",')
    print("}")
