"""Built-in models by name: the real lookup (pipeline/builtin.py) pointed at a
temporary models folder holding a tiny TFLite model, the TFLite-only serving
path, the Python API and the orient command."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import upright
from upright.pipeline import builtin, schema, serve
from tests import helpers

S = 16


def write_builtin(models_dir, name="documents", temperature=1.0):
    """models_dir/name/{model.tflite, model_info.json}: the corner model as TFLite."""
    folder = os.path.join(str(models_dir), name)
    model = helpers.corner_model(S)
    serve.export_tflite(model, os.path.join(folder, serve.TFLITE_FILE), image_size=S)
    with open(os.path.join(folder, serve.INFO_FILE), "w") as f:
        json.dump({"image_size": S, "resize": "squash", "convention": schema.convention(),
                   "temperature": temperature}, f)
    return folder, model


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    folder, model = write_builtin(root)
    return {"root": str(root), "folder": folder, "model": model}


def marker_png(path, k, seed=0, size=32):
    Image.fromarray(np.ascontiguousarray(np.rot90(helpers.quadrant_marker_image(seed, size), k))
                    ).save(path, "PNG")
    return str(path)


def test_resolve_prefers_folders_then_builtin_names(models_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(builtin.ENV_MODELS_DIR, models_dir["root"])
    assert builtin.resolve("documents") == models_dir["folder"]
    # The argument beats the environment variable.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(builtin.BuiltinModelError) as e:
        builtin.resolve("documents", models_dir=str(empty))
    message = str(e.value)
    assert "'documents' is not in this install" in message and "model.tflite" in message
    assert "built-in models: documents" in message and "\n" not in message
    # A folder of the same name wins over the built-in.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "documents").mkdir()
    assert builtin.resolve("documents") == "documents"
    with pytest.raises(builtin.BuiltinModelError, match=r"'nope' does not exist.*built-in: "
                                                        r"documents"):
        builtin.resolve("nope")
    # Without any override: the package's own folder.
    monkeypatch.delenv(builtin.ENV_MODELS_DIR)
    assert builtin.lookup_dir() == os.path.join(os.path.dirname(upright.__file__), "models")


def test_tflite_only_folder_serves_like_the_keras_model(models_dir, monkeypatch):
    monkeypatch.setenv(builtin.ENV_MODELS_DIR, models_dir["root"])
    predictor = serve.load_model("documents")
    assert predictor.source.endswith("model.tflite") and predictor.image_size == S
    images = np.stack([np.rot90(helpers.quadrant_marker_image(i, S), i % 4)
                       for i in range(8)]).astype(np.float32)
    keras_probs = models_dir["model"](images).numpy()
    probs = predictor.predict_images(images, batch_size=3)
    np.testing.assert_allclose(probs, keras_probs, atol=2e-2)
    np.testing.assert_array_equal(probs.argmax(1), np.arange(8) % 4)
    # model_info's temperature is applied to the TFLite output, as to Keras.
    folder, _ = write_builtin(models_dir["root"], name="hot", temperature=2.0)
    hot = serve.load_model_dir(folder).predict_images(images)
    np.testing.assert_allclose(hot, serve.scale_probabilities(keras_probs, 2.0).numpy(),
                               atol=2e-2)
    assert np.all(hot.max(1) < probs.max(1))


def test_orient_images_api(models_dir, tmp_path):
    paths = [marker_png(tmp_path / f"k{k}.png", k, seed=k) for k in range(4)]
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(gray)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    results = upright.orient_images(paths + [str(gray), str(tmp_path / "bad.png")],
                                    model="documents", models_dir=models_dir["root"])
    assert [r["angle_ccw"] for r in results[:4]] == [0, 90, 180, 270]
    assert [r["turn_cw"] for r in results[:4]] == [0, 90, 180, 270]
    assert all(r["confidence"] > 0.99 and not r["left_alone"] for r in results[:4])
    assert results[1]["action"] == "turn" and results[0]["action"] == "none"
    assert abs(sum(results[2]["probabilities"].values()) - 1) < 1e-3
    assert results[4]["left_alone"] and results[4]["turn_cw"] == 0
    assert results[5]["error"] and results[5]["angle_ccw"] is None
    assert upright.builtin_models() == ("documents",)


def run_orient(args, env_models_dir):
    env = dict(os.environ, **{builtin.ENV_MODELS_DIR: env_models_dir})
    return subprocess.run([sys.executable, "-m", "upright.tools.orient", *args],
                          capture_output=True, text=True, timeout=180, env=env)


def test_orient_tool_with_builtin_name(models_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    marker_png(src / "turned.png", 1)
    # A PDF whose one page shows the marker turned 180: repaired by /Rotate 180.
    Image.fromarray(np.ascontiguousarray(np.rot90(helpers.quadrant_marker_image(1, 32), 2))
                    ).save(src / "scan.pdf", "PDF")
    proc = run_orient(["--model", "documents", str(src), "--fix", "--dst", str(tmp_path / "out")],
                      models_dir["root"])
    assert proc.returncode == 0, proc.stderr
    assert "turn 90cw" in proc.stdout and "turn 180cw" in proc.stdout
    import pypdf   # the test extra installs the pdf extra's packages
    assert pypdf.PdfReader(str(tmp_path / "out" / "scan.pdf")).pages[0].rotation == 180
    fixed = np.asarray(Image.open(tmp_path / "out" / "turned.png").convert("RGB"))
    np.testing.assert_array_equal(fixed, helpers.quadrant_marker_image(0, 32))
    # Missing from the install, or an unknown name: one line, exit 2.
    for name, expected in (("documents", "orient: error: built-in model 'documents' is not "
                                         "in this install"),
                           ("nosuch", "orient: error: model dir 'nosuch' does not exist, and "
                                      "it is not the name of a built-in model (built-in: "
                                      "documents)")):
        proc = run_orient(["--model", name, str(src)], str(tmp_path / "empty"))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(expected), proc.stderr


def test_every_builtin_model_folder_is_packaged():
    """Each built-in model's folder is a package in pyproject.toml with its two
    files as package data: else a wheel leaves the model out, and setuptools
    prints its "Package would be ignored" box on every install."""
    import tomllib
    with open(os.path.join(os.path.dirname(__file__), os.pardir, "pyproject.toml"), "rb") as f:
        setuptools_config = tomllib.load(f)["tool"]["setuptools"]
    for name in builtin.names():
        package = f"upright.models.{name}"
        assert package in setuptools_config["packages"]
        assert sorted(setuptools_config["package-data"][package]) == sorted(builtin.REQUIRED_FILES)
