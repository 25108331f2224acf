"""serve: the Keras model, the SavedModel (both signatures) and TFLite agree;
the rotation convention is readable from the export."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from upright.pipeline import preprocess, schema, serve
from upright.pipeline import model as model_lib
from tests import helpers

S = 32


def project_model(image_size=S, backbone="tiny", head="dense", seed=0):
    """The project's own classifier (tiny backbone), with non-trivial BatchNorm
    statistics and confident logits, so that a conversion that drops state or
    scrambles weights cannot pass by luck."""
    import keras
    keras.utils.set_random_seed(seed)
    model = model_lib.build_model(backbone=backbone, image_size=image_size, weights=None,
                                  head=head)
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([gamma * rng.uniform(0.5, 1.5, gamma.shape), beta + 0.1,
                               mean + rng.normal(0, 0.1, mean.shape),
                               var * rng.uniform(0.5, 2.0, var.shape)])
    logits = model.get_layer("head_logits")
    kernel, bias = logits.get_weights()
    logits.set_weights([kernel * 10, bias])
    return model


def encoded_test_images(n=6):
    """Encoded test images (PNG and JPEG, non-square, all four orientations)."""
    out = []
    for i in range(n):
        image = np.rot90(helpers.upright_image(i, 40 + 8 * (i % 2), 56), i % 4)
        out.append(helpers.encode(np.ascontiguousarray(image), "png" if i % 2 else "jpeg"))
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("model_dir"))
    model = project_model()
    helpers.write_model_dir(root, model, S)
    export_dir = serve.export_saved_model(model, os.path.join(root, "export"), image_size=S,
                                          resize="squash")
    tflite_path = os.path.join(root, "model.tflite")
    tflite_bytes = serve.export_tflite(model, tflite_path, image_size=S)
    return {"root": root, "model": model, "export": export_dir, "tflite": tflite_path,
            "tflite_bytes": tflite_bytes}


def test_keras_savedmodel_tflite_agree(exported, capsys):
    encoded = encoded_test_images()
    images = np.stack([preprocess.preprocess_image(b, S, "squash").numpy() for b in encoded])

    # Saved Keras model, loaded back the way evaluate/orient load it.
    predictor = serve.load_model_dir(exported["root"])
    keras_probs = predictor.predict_images(images)
    np.testing.assert_allclose(keras_probs, exported["model"](images).numpy(), atol=1e-6)
    top1 = keras_probs.argmax(1)
    assert keras_probs.max(1).min() > 0.5 and len(set(top1)) > 1   # confident, not constant

    loaded = tf.saved_model.load(exported["export"])
    by_images = loaded.signatures["predict_images"](images=tf.constant(images))
    by_bytes = loaded.signatures["serving_default"](image_bytes=tf.constant(encoded))
    for out in (by_images, by_bytes):
        np.testing.assert_allclose(out["probabilities"].numpy(), keras_probs, atol=1e-5)
        np.testing.assert_array_equal(out["class"].numpy(), top1)
        np.testing.assert_array_equal(out["angle_ccw"].numpy(), 90 * top1)
        np.testing.assert_array_equal(out["repair_cw"].numpy(), 90 * top1)
        np.testing.assert_allclose(out["confidence"].numpy(), keras_probs.max(1), atol=1e-5)
        assert out["class"].dtype == tf.int32 and out["probabilities"].dtype == tf.float32

    # The export loaded as a model dir of its own gives the same answers.
    from_export = serve.load_model_dir(exported["export"])
    np.testing.assert_allclose(from_export.predict_images(images), keras_probs, atol=1e-5)

    # TFLite, float16 weights: same top-1, probabilities close.
    lite = serve.tflite_predict(exported["tflite"], images)
    assert np.all(np.isfinite(lite))
    np.testing.assert_array_equal(lite.argmax(1), top1)
    # Measured max |TFLite - Keras| here: 3.5e-4 (float16 weights; per image
    # 2.7e-4..3.5e-4). Bound 1e-3: about 3x margin for other TFLite kernels
    # (XNNPACK or not), still 20x tighter than a conversion that drops state.
    np.testing.assert_allclose(lite, keras_probs, atol=1e-3)

    # Users who convert the SavedModel themselves get the same answers too.
    converter = tf.lite.TFLiteConverter.from_saved_model(exported["export"],
                                                         signature_keys=["predict_images"])
    user_lite = str(exported["tflite"]) + ".from_saved_model"
    with open(user_lite, "wb") as f:
        f.write(converter.convert())
    np.testing.assert_allclose(serve.tflite_predict(user_lite, images), keras_probs, atol=1e-4)

    sizes = {"keras": serve.file_size(os.path.join(exported["root"], "model.keras")),
             "saved_model": serve.file_size(exported["export"]),
             "tflite": exported["tflite_bytes"]}
    assert sizes["tflite"] == os.path.getsize(exported["tflite"])
    weights_f32 = sum(int(np.prod(w.shape)) * 4 for w in exported["model"].weights)
    # float16 weights: about half of the float32 weight bytes (plus the graph).
    assert sizes["tflite"] < 0.5 * weights_f32 + 40_000
    with capsys.disabled():
        print(f"\nexport sizes (tiny backbone, {weights_f32} float32 weight bytes): {sizes}")


def test_convention_is_stored_in_the_export(exported):
    loaded = tf.saved_model.load(exported["export"])
    assert set(loaded.signatures) == {"serving_default", "predict_images", "convention"}
    info = serve.read_export_convention(loaded)
    expected = schema.convention()
    for key, value in expected.items():
        assert info[key] == value
    assert info["image_size"] == S and info["resize"] == "squash"
    # Also as attributes of the loaded object and as an asset file.
    assert [n.decode() for n in loaded.class_names.numpy()] == list(schema.CLASS_NAMES)
    assert list(loaded.angles_ccw.numpy()) == [0, 90, 180, 270]
    assert int(loaded.image_size.numpy()) == S and loaded.resize.numpy() == b"squash"
    assert json.loads(loaded.convention_json.numpy())["rotation"] == "counter-clockwise"
    with open(os.path.join(exported["export"], "assets", serve.CONVENTION_ASSET)) as f:
        assert json.load(f)["class_names"] == list(schema.CLASS_NAMES)
    # The serving signature's inputs and outputs are named as documented.
    sig = loaded.signatures["serving_default"]
    assert list(sig.structured_input_signature[1]) == ["image_bytes"]
    assert set(sig.structured_outputs) == set(serve.OUTPUT_KEYS)


def test_serving_follows_the_convention_on_turned_images(tmp_path):
    """A model that is right on every orientation, served from bytes: the class is
    the number of counter-clockwise quarter turns, repair_cw undoes it."""
    model = helpers.corner_model(16)
    export = serve.export_saved_model(model, str(tmp_path / "export"), image_size=16)
    upright = helpers.quadrant_marker_image(0, 32)
    encoded = [helpers.encode(np.ascontiguousarray(np.rot90(upright, k)), "png")
               for k in range(4)]
    out = tf.saved_model.load(export).signatures["serving_default"](
        image_bytes=tf.constant(encoded))
    np.testing.assert_array_equal(out["class"].numpy(), [0, 1, 2, 3])
    np.testing.assert_array_equal(out["angle_ccw"].numpy(), [0, 90, 180, 270])
    for k, degrees in enumerate(out["repair_cw"].numpy()):
        repaired = np.rot90(np.rot90(upright, k), -(degrees // 90))   # clockwise turns
        np.testing.assert_array_equal(repaired, upright)
    # Re-exporting over an existing export replaces it.
    serve.export_saved_model(model, export, image_size=16)
    assert os.path.exists(os.path.join(export, "saved_model.pb"))


def test_temperature_scaling_in_export_and_model_dir(tmp_path):
    from upright.pipeline import evaluation
    model = project_model(image_size=16, seed=1)
    images = np.stack([preprocess.preprocess_image(b, 16, "squash").numpy()
                       for b in encoded_test_images(4)])
    raw = model(images).numpy()
    expected = evaluation.apply_temperature(raw, 2.0)
    export = serve.export_saved_model(model, str(tmp_path / "export"), image_size=16,
                                      temperature=2.0)
    loaded = tf.saved_model.load(export)
    out = loaded.signatures["predict_images"](images=tf.constant(images))
    np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-5)
    np.testing.assert_array_equal(out["class"].numpy(), raw.argmax(1))
    assert serve.read_export_convention(loaded)["temperature"] == 2.0
    root = helpers.write_model_dir(str(tmp_path / "m"), model, 16)
    with open(os.path.join(root, "model_info.json")) as f:
        info = json.load(f)
    info["temperature"] = 2.0
    with open(os.path.join(root, "model_info.json"), "w") as f:
        json.dump(info, f)
    np.testing.assert_allclose(serve.load_model_dir(root).predict_images(images), expected,
                               atol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        serve.export_saved_model(model, str(tmp_path / "bad"), image_size=16, temperature=0)


def test_load_model_dir_refuses_a_foreign_convention(tmp_path):
    root = helpers.write_model_dir(str(tmp_path / "m"), helpers.corner_model(16), 16)
    with open(os.path.join(root, "model_info.json")) as f:
        info = json.load(f)
    info["convention"]["rotation"] = "clockwise"
    with open(os.path.join(root, "model_info.json"), "w") as f:
        json.dump(info, f)
    with pytest.raises(serve.ModelDirError, match="rotation convention"):
        serve.load_model_dir(root)
    with pytest.raises(serve.ModelDirError, match="does not exist"):
        serve.load_model_dir(str(tmp_path / "nothing"))


@pytest.mark.slow
@pytest.mark.parametrize("backbone,head", [("efficientnetb0", "linear"),
                                           ("efficientnetb1", "dense")])
def test_export_sizes_efficientnet(tmp_path, backbone, head, capsys):
    """Sizes of the three artefacts for the article's models at 128 (random weights:
    sizes do not depend on the values), and their agreement."""
    model = model_lib.build_model(backbone=backbone, image_size=128, weights=None, head=head)
    root = helpers.write_model_dir(str(tmp_path / backbone), model, 128)
    export = serve.export_saved_model(model, os.path.join(root, "export"), image_size=128)
    tflite = os.path.join(root, "model.tflite")
    serve.export_tflite(model, tflite)
    images = np.stack([preprocess.preprocess_image(b, 128, "squash").numpy()
                       for b in encoded_test_images(4)])
    keras_probs = serve.load_model_dir(root).predict_images(images)
    saved = serve.load_model_dir(export).predict_images(images)
    np.testing.assert_allclose(saved, keras_probs, atol=1e-5)
    lite = serve.tflite_predict(tflite, images)
    # Measured max |TFLite - Keras|: 0 (b0/linear) and 3e-8 (b1/dense); bound
    # 1e-6, 30x margin. Weak here: random-weight EfficientNets give nearly
    # uniform probabilities (0.25 +- 2e-6), so test_keras_savedmodel_tflite_agree
    # (a confident tiny model) is the real agreement check.
    np.testing.assert_allclose(lite, keras_probs, atol=1e-6)
    sizes = {name: serve.file_size(p) / 1e6 for name, p in
             (("keras", os.path.join(root, "model.keras")), ("saved_model", export),
              ("tflite", tflite))}
    with capsys.disabled():
        print(f"\n{backbone}/{head} params {model.count_params()}: "
              + ", ".join(f"{k} {v:.1f} MB" for k, v in sizes.items()))
