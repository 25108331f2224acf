"""pipeline/model.py: backbones, heads, input scaling, freezing by block, weights files."""
import os

import keras
import numpy as np
import pytest

from upright.pipeline import model as model_lib


def _images(n=2, size=32, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


@pytest.fixture(scope="module")
def resnet():
    return model_lib.build_model(backbone="resnet50", image_size=32, weights=None, head="dense")


@pytest.fixture(scope="module")
def effnet():
    return model_lib.build_model(backbone="efficientnetb0", image_size=32, head="dense")


@pytest.mark.parametrize("backbone, head", [("tiny", "dense"), ("tiny", "linear"),
                                            ("mobilenetv3small", "linear")])
def test_model_maps_0_255_images_to_float32_probabilities(backbone, head):
    net = model_lib.build_model(backbone=backbone, image_size=32, weights=None, head=head,
                                dropout=0.1)
    probs = np.asarray(net(_images(), training=False))
    assert probs.shape == (2, 4) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs > 0).all()
    names = [layer.name for layer in net.layers]
    assert ("head_dense" in names) == (head == "dense")
    assert ("head_bn" in names) == (head == "dense")
    assert names[-1] == "probs"


def test_resnet50_scaling_equals_keras_preprocess_input(resnet):
    net = resnet
    x = _images(3)
    ours = np.asarray(net.get_layer("resnet50_preprocess")(x))
    expected = keras.applications.resnet50.preprocess_input(x.copy())
    np.testing.assert_allclose(ours, expected, atol=1e-4)
    model_lib.set_trainable(net, freeze_below_block=0, train_batchnorm=True)
    assert not net.get_layer("resnet50_preprocess").trainable


# What each backbone family's Keras application expects its input to be, from
# [0, 255] RGB pixels: (the documented preprocess_input of that family, whether
# a plain keras.applications model stands behind it). EfficientNet and
# MobileNetV3 scale inside the application (their preprocess_input is a
# pass-through); ResNet50 wants caffe-style BGR minus the ImageNet mean. A new
# family in model.BACKBONES fails test_input_scaling_matches_keras_application
# until it gets a row here.
EXPECTED_SCALING = {
    "efficientnet": (keras.applications.efficientnet.preprocess_input, True),
    "resnet": (keras.applications.resnet50.preprocess_input, True),
    "mobilenetv3": (keras.applications.mobilenet_v3.preprocess_input, True),
    # No Keras application: the reference EfficientNet-Lite (and the PyTorch
    # weights the project converts) feed (x - 127) / 128.
    "efficientnet_lite": (lambda x: (x - 127.0) / 128.0, False),
    # Test-only backbone, no Keras application: its stem divides by 255.
    "tiny": (lambda x: x / 255.0, False),
}
# One backbone per family (the first listed: the cheapest); the members of a
# family share build_model's code path, and building all eight EfficientNets
# would cost a minute of CPU.
_FAMILIES = {}
for _name in model_lib.known_backbones():
    _FAMILIES.setdefault(model_lib.backbone_spec(_name).family, _name)


def _first_conv(net):
    return next(layer for layer in net.layers if isinstance(layer, keras.layers.Conv2D))


@pytest.mark.parametrize("family, backbone", sorted(_FAMILIES.items()))
def test_input_scaling_matches_keras_application(family, backbone):
    """Real [0, 255] pixels through the built model's layers up to its backbone's
    first convolution give what the plain Keras application (same weights) feeds
    that convolution after the family's own preprocess_input: a missing, doubled
    or wrong scaling changes these values."""
    assert family in EXPECTED_SCALING, (
        f"backbone family {family!r} ({backbone}) has no row in EXPECTED_SCALING: "
        "add the input scaling its Keras application expects")
    scaling, has_application = EXPECTED_SCALING[family]
    spec = model_lib.backbone_spec(backbone)
    net = model_lib.build_model(backbone=backbone, image_size=32, weights=None, head="linear")
    x = _images(3, seed=1)
    # The model's own path: the layers before the nested backbone, then the
    # backbone up to (not including) its first convolution.
    h = x
    for layer in net.layers[1:]:
        if layer.name == model_lib.BACKBONE_NAME:
            break
        h = layer(h)
    backbone_net = model_lib.get_backbone(net)
    ours = np.asarray(keras.Model(backbone_net.input, _first_conv(backbone_net).input)(h))
    if has_application:
        # Keras defaults (no include_preprocessing argument): the documented use
        # is application(preprocess_input(pixels)).
        app = getattr(keras.applications, spec.constructor)(
            include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg")
        app.set_weights(backbone_net.get_weights())   # e.g. Normalization statistics
        expected = np.asarray(keras.Model(app.input, _first_conv(app).input)(
            scaling(x.copy())))
    else:
        expected = scaling(x)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-4)
    # The check has teeth: what the network expects is far from the raw pixels
    # (unscaled, the convolution would see values up to about 255).
    assert np.abs(expected).max() < 200 < x.max()


def test_output_stays_float32_under_mixed_precision():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        net = model_lib.build_model(backbone="tiny", image_size=32, head="dense")
        probs = net(_images())
    finally:
        keras.config.set_dtype_policy(previous)
    assert probs.dtype == "float32"
    assert net.get_layer("head_logits").compute_dtype == "float16"


def test_saved_model_loads_without_custom_objects(tmp_path, resnet):
    net = resnet
    path = str(tmp_path / "m.keras")
    net.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    x = _images(2)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(net(x)), atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(backbone="vgg16"), "unknown backbone 'vgg16'; known: efficientnetb0"),
    (dict(backbone="efficientnetb1", image_size=31), "too small for backbone"),
    (dict(backbone="tiny", image_size=8), "too small for backbone"),
    (dict(head="mlp"), "unknown head 'mlp'"),
    (dict(dropout=1.0), "dropout must be in [0, 1)"),
    (dict(weights="/no/such/file.h5"), "does not exist"),
    (dict(weights="imagenet"), "no imagenet weights"),
])
def test_bad_choices_fail_with_one_line(kwargs, message):
    args = dict(backbone="tiny", image_size=32, weights=None, head="dense", dropout=0.0)
    args.update(kwargs)
    with pytest.raises(model_lib.ModelError) as e:
        model_lib.build_model(**args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_efficientnet_blocks_follow_layer_names(effnet):
    net = effnet
    probs = np.asarray(net(_images(), training=False))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    blocks = {layer.name: block for layer, block in model_lib.layer_blocks(net)}
    assert blocks["stem_conv"] == 1 and blocks["block1a_dwconv"] == 1
    assert blocks["block4c_project_conv"] == 4 and blocks["block5a_expand_conv"] == 5
    assert blocks["block7a_project_bn"] == 7 and blocks["top_conv"] == 8
    info = model_lib.set_trainable(net, freeze_below_block=5, train_batchnorm=False)
    backbone = model_lib.get_backbone(net)
    for layer in backbone.layers:
        frozen_block = blocks[layer.name] < 5
        assert layer.trainable == (not frozen_block), layer.name
    assert net.get_layer("head_dense").trainable
    assert info["frozen_layers"] > 0 and info["trainable_layers"] > 0
    # The article's stage 1: BatchNorm layers of frozen blocks keep training.
    model_lib.set_trainable(net, freeze_below_block=5, train_batchnorm=True)
    assert backbone.get_layer("block2a_expand_bn").trainable
    assert not backbone.get_layer("block2a_expand_conv").trainable
    assert backbone.get_layer("block5a_expand_conv").trainable


def test_resnet_mobilenet_and_tiny_blocks(resnet):
    blocks = {layer.name: b for layer, b in model_lib.layer_blocks(resnet)}
    assert blocks["conv1_conv"] == 1 and blocks["conv2_block1_1_conv"] == 2
    assert blocks["conv5_block3_out"] == 5
    assert model_lib.max_block(resnet) == 5
    mobile = model_lib.build_model(backbone="mobilenetv3small", image_size=32, head="linear")
    blocks = {layer.name: b for layer, b in model_lib.layer_blocks(mobile)}
    assert blocks["conv"] == 1 and blocks["expanded_conv_depthwise"] == 1
    assert blocks["expanded_conv_1_expand"] == 2 and blocks["expanded_conv_10_project"] == 11
    assert blocks["conv_1"] == 12 == model_lib.max_block(mobile)
    tiny = model_lib.build_model(backbone="tiny", image_size=32, head="linear")
    assert {b for _, b in model_lib.layer_blocks(tiny)} == {1, 2, 3, 4}
    with pytest.raises(model_lib.ModelError, match=r"outside \[0, 5\]"):
        model_lib.set_trainable(tiny, freeze_below_block=6, train_batchnorm=False)
    info = model_lib.set_trainable(tiny, freeze_below_block=5, train_batchnorm=False)
    assert info["trainable_layers"] == 0   # whole backbone frozen; only the head trains
    assert tiny.get_layer("head_logits").trainable


def test_weights_file_loads_and_wrong_architecture_is_refused(tmp_path):
    source = model_lib.build_model(backbone="tiny", image_size=32, head="linear")
    path = str(tmp_path / "tiny_backbone.weights.h5")
    model_lib.get_backbone(source).save_weights(path)
    loaded = model_lib.build_model(backbone="tiny", image_size=32, weights=path, head="linear")
    for a, b in zip(model_lib.get_backbone(source).get_weights(),
                    model_lib.get_backbone(loaded).get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(model_lib.ModelError, match="does not fit backbone MobileNetV3Small"):
        model_lib.build_model(backbone="mobilenetv3small", image_size=32, weights=path)
    with pytest.raises(model_lib.ModelError, match="does not fit"):
        model_lib.check_weights_file(backbone="mobilenetv3small", image_size=32, path=path)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not a weights file")
    with pytest.raises(model_lib.ModelError, match="does not fit backbone tiny"):
        model_lib.build_model(backbone="tiny", image_size=32, weights=str(garbage))
    assert os.path.exists(path)


_KERAS_APPLICATIONS = [name for name, spec in model_lib.BACKBONES.items()
                       if spec.family not in ("tiny", "efficientnet_lite")]


@pytest.mark.parametrize("backbone", _KERAS_APPLICATIONS)
def test_imagenet_weights_are_the_file_keras_itself_asks_for(backbone, tmp_path, monkeypatch):
    """weights="imagenet" asks keras.utils.get_file for the same file name, origin and
    hash as the Keras constructor under its default name, and loads what it gets.
    Offline: get_file is intercepted (every keras.applications module calls it as
    keras.src.utils.file_utils.get_file) and hands back a file of random weights."""
    from keras.src.utils import file_utils
    spec = model_lib.backbone_spec(backbone)
    requests = []

    def fake_get_file(fname, origin, **kwargs):
        requests.append((fname, origin, kwargs.get("file_hash"), kwargs.get("cache_subdir")))
        return str(tmp_path / "random.weights.h5")

    monkeypatch.setattr(file_utils, "get_file", fake_get_file)
    kwargs = dict(include_top=False, input_shape=(32, 32, 3), pooling="avg")
    if spec.family == "mobilenetv3":
        kwargs["include_preprocessing"] = True
    # Keras's own constructor, default name, with weights="imagenet": record its
    # request, skip its load, keep its random init as the file to hand back.
    with monkeypatch.context() as m:
        m.setattr(keras.Model, "load_weights", lambda self, path, **kw: None)
        reference = getattr(keras.applications, spec.constructor)(weights="imagenet", **kwargs)
    reference.save_weights(str(tmp_path / "random.weights.h5"))
    ours = model_lib.build_model(backbone=backbone, image_size=32, weights="imagenet")

    assert len(requests) == 2 and requests[0] == requests[1], requests
    fname, origin, file_hash, _ = requests[1]
    assert origin.endswith("/" + fname) and file_hash
    if spec.family == "efficientnet":
        assert fname == f"{backbone}_notop.h5"    # not backbone_notop.h5
    backbone_net = model_lib.get_backbone(ours)
    assert backbone_net.name == model_lib.BACKBONE_NAME
    # The same layers (by class and shapes: Keras numbers its auto-named layers
    # globally), with the values of the file handed back.
    def layout(net):
        return [(type(layer).__name__, [tuple(w.shape) for w in layer.weights])
                for layer in net.layers]
    assert layout(backbone_net) == layout(reference)
    for a, b in zip(reference.get_weights(), backbone_net.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
