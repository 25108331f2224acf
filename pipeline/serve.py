"""Exporting a trained orientation model, and loading one back for prediction.

Three artefacts, all giving the same answers (tests/test_serve.py checks it):

* the Keras model (`model_dir/model.keras`, written by the trainer);
* a SavedModel (`export_saved_model`) with the rotation convention inside it and
  three signatures:
    "serving_default": image_bytes tf.string [B] (encoded JPEG/PNG/GIF/BMP, any
        size) -> outputs below. Bytes are decoded and resized by
        `preprocess.preprocess_image`, the function the training input pipeline
        uses, so serving sees what training saw. EXIF orientation is NOT applied (as in
        training records, which store pixels as a person sees them): send images
        upright-as-seen, e.g. as `orient` does.
    "predict_images": images float32 [B, S, S, 3] in [0, 255] -> outputs below.
    "convention": no input -> the convention (see `convention_tensors`).
  Outputs of both predict signatures, per image b:
    probabilities float32 [B, 4]: softmax over the classes "0", "90", "180", "270";
    class         int32 [B]: argmax k;
    angle_ccw     int32 [B]: 90 * k, degrees the image is turned COUNTER-clockwise
                  from upright (label k = tf.image.rot90(upright, k));
    repair_cw     int32 [B]: 90 * k, degrees to turn it CLOCKWISE to repair it
                  (np.rot90(image, -k)); the same number, named for the action;
    confidence    float32 [B]: max probability, in [0.25, 1].
  With export_saved_model(temperature=T != 1) the probabilities are
  temperature-scaled, softmax(log p / T) (calibration; the class is unchanged),
  and T is stored with the convention. load_model_dir applies model_info.json's
  "temperature" the same way; the TFLite file gives the model's own probabilities.
* a TFLite flatbuffer with float16 weights (`export_tflite`): input float32
  [B, S, S, 3] in [0, 255], output "probabilities" [B, 4].

The convention is stored in the SavedModel three ways, so that no consumer has to
guess: the "convention" signature, non-trainable variables on the root object
(`convention_json`, `class_names`, `angles_ccw`, `image_size`, `resize`) and an
asset file `assets/convention.json` (schema.convention() plus image_size and
resize). `read_export_convention` reads it back.

`load_model_dir` loads what the trainer leaves in a model_dir (model.keras +
model_info.json) -- or a bare SavedModel export, or a TFLite-only folder
(model.tflite + model_info.json, the form of the built-in models) -- as a
`Predictor`. `load_model` also accepts the name of a built-in model
(pipeline/builtin.py), e.g. "documents".
"""
import contextlib
import dataclasses
import io
import json
import logging
import os
import tempfile

import numpy as np
import tensorflow as tf

from upright.pipeline import fileio, preprocess, quiet, schema

MODEL_FILE = "model.keras"
INFO_FILE = "model_info.json"
EXPORT_DIR = "export"
TFLITE_FILE = "model.tflite"
CONVENTION_ASSET = "convention.json"
OUTPUT_KEYS = ("probabilities", "class", "angle_ccw", "repair_cw", "confidence")


def export_info(image_size: int, resize: str, temperature: float = 1.0) -> dict:
    """The convention plus the preprocessing an exported model expects."""
    info = schema.convention()
    info.update({"image_size": int(image_size), "resize": str(resize),
                 "temperature": float(temperature),
                 "outputs": {
                     "probabilities": "float32 [B, 4], softmax over class_names",
                     "class": "int32 [B], argmax k",
                     "angle_ccw": "int32 [B], 90*k: degrees the image is turned "
                                  "counter-clockwise from upright",
                     "repair_cw": "int32 [B], 90*k: degrees to turn it clockwise "
                                  "to repair it",
                     "confidence": "float32 [B], max probability"},
                 "input": "serving_default: image_bytes tf.string [B] (JPEG/PNG, "
                          "pixels as a person sees them; EXIF orientation is not "
                          "applied); predict_images: images float32 [B, S, S, 3] "
                          "in [0, 255]"})
    return info


def outputs_from_probabilities(probabilities):
    """probabilities float32 [B, 4] -> the dict of OUTPUT_KEYS (tf graph)."""
    probabilities = tf.cast(probabilities, tf.float32)
    k = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
    degrees = k * 90
    return {"probabilities": probabilities,
            "class": k,
            "angle_ccw": degrees,
            # Turning k quarter turns clockwise undoes k counter-clockwise: same number.
            "repair_cw": tf.identity(degrees),
            "confidence": tf.reduce_max(probabilities, axis=-1)}


def scale_probabilities(probabilities, temperature: float):
    """softmax(log p / T) in TensorFlow; identity (exactly) for T == 1."""
    if float(temperature) == 1.0:
        return probabilities
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp = tf.math.log(tf.maximum(tf.cast(probabilities, tf.float32), 1e-12))
    return tf.nn.softmax(logp / float(temperature), axis=-1)


class _ServingModule(tf.Module):
    """What tf.saved_model.save writes: the model plus the convention."""

    def __init__(self, model, image_size: int, resize: str, asset_path: str,
                 temperature: float = 1.0):
        super().__init__()
        # The model's tf.Variables are tracked directly, not the Keras model object:
        # a tracked Keras 3 model saves a second copy of every weight, and without
        # the plain tf.Variables TFLiteConverter.from_saved_model on the export
        # cannot freeze them (the converted file returns NaN; TF 2.21). A closure
        # keeps the model for calling.
        self.model_variables = [getattr(v, "value", v) for v in model.variables]
        self._call_model = lambda images: scale_probabilities(
            model(images, training=False), temperature)
        self._image_size = int(image_size)
        self._resize = resize
        info = export_info(image_size, resize, temperature)
        # Variables, not constants: tf.Module only saves tracked objects, and these
        # are then readable as attributes of the loaded object.
        self.convention_json = tf.Variable(json.dumps(info, sort_keys=True), trainable=False)
        self.class_names = tf.Variable(list(schema.CLASS_NAMES), trainable=False)
        self.angles_ccw = tf.Variable(list(schema.ANGLES_CCW), dtype=tf.int32, trainable=False)
        self.image_size = tf.Variable(self._image_size, dtype=tf.int32, trainable=False)
        self.resize = tf.Variable(resize, trainable=False)
        self.convention_asset = tf.saved_model.Asset(asset_path)

        spec_images = tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")
        spec_bytes = tf.TensorSpec([None], tf.string, name="image_bytes")
        self.predict_images = tf.function(self._predict_images, input_signature=[spec_images])
        self.serve_bytes = tf.function(self._serve_bytes, input_signature=[spec_bytes])
        self.convention = tf.function(self._convention, input_signature=[])

    def _predict_images(self, images):
        return outputs_from_probabilities(self._call_model(images))

    def _serve_bytes(self, image_bytes):
        images = tf.map_fn(
            lambda b: preprocess.preprocess_image(b, self._image_size, self._resize),
            image_bytes,
            fn_output_signature=tf.TensorSpec([self._image_size, self._image_size, 3],
                                              tf.float32))
        return self._predict_images(images)

    def _convention(self):
        return {"convention_json": tf.identity(self.convention_json),
                "class_names": tf.identity(self.class_names),
                "angles_ccw": tf.identity(self.angles_ccw),
                "image_size": tf.identity(self.image_size),
                "resize": tf.identity(self.resize)}


def export_saved_model(model, export_dir: str, *, image_size: int,
                       resize: str = "squash", temperature: float = 1.0) -> str:
    """Writes a SavedModel of `model` with the signatures in the module docstring.

    Args:
      model: keras.Model, float32 [B, S, S, 3] in [0, 255] -> softmax [B, 4].
      export_dir: folder to write (replaced atomically if it exists: written to a
        sibling temp folder first, so a crash never leaves a half export).
      image_size: S, as in training.
      resize: the training `resize` method ("squash", "pad", "crop").
      temperature: T > 0 for temperature scaling of the outputs,
        softmax(log p / T) (see evaluation.fit_temperature); 1.0 = the model's
        own probabilities. Stored in the convention info.
    Returns:
      export_dir.
    """
    if resize not in preprocess.RESIZE_METHODS:
        raise ValueError(f"resize must be one of {preprocess.RESIZE_METHODS}, got {resize!r}")
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    export_dir = os.path.abspath(export_dir)
    parent = os.path.dirname(export_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        asset = os.path.join(tmp, CONVENTION_ASSET)
        fileio.write_json(asset, export_info(image_size, resize, temperature), indent=2,
                          sort_keys=True, final_newline=False, durable=False)
        module = _ServingModule(model, image_size, resize, asset, temperature)
        out = os.path.join(tmp, "saved_model")
        with quiet.logger_level("tensorflow", logging.WARNING):
            tf.saved_model.save(module, out, signatures={
                "serving_default": module.serve_bytes,
                "predict_images": module.predict_images,
                "convention": module.convention,
            })
        _replace_dir(out, export_dir)
    finally:
        _remove_tree(tmp)
    return export_dir


def read_export_convention(loaded) -> dict:
    """The convention dict stored in a loaded SavedModel (tf.saved_model.load)."""
    values = loaded.signatures["convention"]()
    info = json.loads(values["convention_json"].numpy().decode())
    # The separately stored tensors must agree with the JSON (they are what
    # graph-only consumers read).
    names = [n.decode() for n in values["class_names"].numpy()]
    if names != info["class_names"] or list(values["angles_ccw"].numpy()) != info["angles_ccw"]:
        raise ValueError("export's convention tensors disagree with its convention_json")
    return info


def export_tflite(model, path: str, *, image_size: int = None) -> int:
    """Converts `model` to TFLite with float16 weights; returns the file size in bytes.

    Optimizations DEFAULT + supported_types [float16]: weights stored as float16
    (about half the float32 size), computation in float32 on CPU. The file has one
    signature "serving_default": float32 [B, S, S, 3] in [0, 255] -> float32
    [B, 4] probabilities (B is dynamic; `tflite_predict` resizes the input).
    image_size: optional S, checked against the model's input shape.
    """
    shape = tuple(model.input_shape)
    if image_size is not None and shape[1:3] not in ((image_size, image_size), (None, None)):
        raise ValueError(f"model input {shape} does not take image_size {image_size}")
    # from_keras_model, not from_concrete_functions on a tf.Module: with Keras 3
    # variables the latter leaves uninitialised READ_VARIABLE ops in TF 2.21
    # (the file loads but returns NaN); tests/test_serve.py guards this.
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
    # Keras prints a summary of its temporary SavedModel to stdout, TensorFlow logs
    # each step at INFO: neither is for the user.
    with contextlib.redirect_stdout(io.StringIO()), quiet.logger_level("tensorflow", logging.WARNING):
        flatbuffer = converter.convert()
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fileio.write_bytes(path, flatbuffer)
    return len(flatbuffer)


def tflite_predict(path: str, images: np.ndarray) -> np.ndarray:
    """Runs a TFLite file from `export_tflite` (or a conversion of the SavedModel's
    predict_images signature) on float32 [B, S, S, 3]; -> probabilities [B, 4]."""
    runner = _tflite_interpreter(path).get_signature_runner()
    (input_name,) = list(runner.get_input_details())
    # The signature runner resizes the input to this batch.
    outputs = runner(**{input_name: np.asarray(images, np.float32)})
    if "probabilities" in outputs:  # a conversion of the SavedModel's predict_images
        return outputs["probabilities"]
    (probabilities,) = outputs.values()  # export_tflite: one output
    return probabilities


def _tflite_interpreter(path, num_threads=None):
    # tf.lite.Interpreter is deprecated in favour of ai_edge_litert; use that when
    # installed, TensorFlow's own otherwise (both read the same flatbuffer).
    # Creating one prints "INFO: Created TensorFlow Lite XNNPACK delegate for
    # CPU." from C++: not for users (quiet.native_logs_hidden keeps other lines).
    with quiet.native_logs_hidden():
        try:
            from ai_edge_litert import interpreter as litert
            return litert.Interpreter(model_path=path, num_threads=num_threads)
        except ImportError:
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return tf.lite.Interpreter(model_path=path, num_threads=num_threads)


# ---------------------------------------------------------------------------
# Loading for prediction.

@dataclasses.dataclass
class Predictor:
    """A loaded orientation model.

    predict_images(float32 [B, S, S, 3] in [0, 255]) -> float32 [B, 4] numpy.
    preprocess(encoded bytes) -> float32 [S, S, 3] (preprocess.preprocess_image).
    read_images([(path, bytes)], max_side) -> per file (image [S, S, 3], notes,
      EXIF orientation or None) or the exception that file raised: what orient
      predicts from.
    info: model_info (image_size, resize, convention, ...); source: what was loaded.
    workers: threads that read_images decodes with and, for a TFLite model,
      interpreters that predict_images runs side by side (1: all in the caller).
    """
    predict_fn: object
    info: dict
    source: str
    handle: object = None   # the loaded keras.Model or SavedModel (kept alive)
    workers: int = 1
    numpy_input: bool = False   # predict_fn takes numpy (TFLite), not tensors
    _pool: object = dataclasses.field(default=None, repr=False)

    @property
    def image_size(self) -> int:
        return int(self.info["image_size"])

    @property
    def resize(self) -> str:
        return str(self.info.get("resize", "squash"))

    def predict_images(self, images, batch_size: int = 64) -> np.ndarray:
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"images must be [B, {self.image_size}, {self.image_size}, 3], "
                             f"got {images.shape}")
        convert = (lambda x: x) if self.numpy_input else tf.constant
        out = [np.asarray(self.predict_fn(convert(images[i:i + batch_size])), np.float32)
               for i in range(0, len(images), batch_size)]
        if not out:
            return np.zeros([0, schema.NUM_CLASSES], np.float32)
        return np.concatenate(out)

    def preprocess(self, encoded: bytes) -> np.ndarray:
        return _preprocess_fn(self.image_size, self.resize)(tf.constant(encoded)).numpy()

    def read_image(self, path, data: bytes, max_side: int) -> tuple:
        """(float32 [S, S, 3], notes, EXIF orientation) for one file's bytes; raises SkipImage (or a
        decoder's error) for a file that cannot be read."""
        (result,) = self.read_images([(path, data)], max_side)
        if isinstance(result, BaseException):
            raise result
        return result

    def read_images(self, items, max_side: int) -> list:
        """Per (path, bytes): (float32 [S, S, 3], notes, the EXIF Orientation
        value 1..8 or None), or the exception that file raised
        (imageio.SkipImage, or a decoder's error).

        A squash model reads straight from the file (imageio.open_for_model:
        no stored copy), decoding on `workers` threads; other resize methods
        take the stored-copy path, imageio.read_upright then `preprocess`.
        """
        from upright.pipeline import imageio
        if self.resize != "squash":
            return [_try(lambda p=path, d=data: self._read_stored(p, d, max_side))
                    for path, data in items]
        opened = [_try(lambda p=path, d=data: imageio.open_for_model(
            p, image_size=self.image_size, max_side=max_side, data=d)) for path, data in items]

        def decode(item):
            if isinstance(item, BaseException):
                return item
            return _try(lambda: (item.decode(), item.notes, item.orientation))

        return self.map(decode, opened)

    def _read_stored(self, path, data, max_side):
        from upright.pipeline import imageio
        stored = imageio.read_upright(path, data=data, max_side=max_side)
        return (self.preprocess(stored.encoded), stored.notes,
                imageio.exif_orientation_of(data))

    def map(self, fn, items) -> list:
        """[fn(item)] in order, on `workers` threads when there are several."""
        items = list(items)
        if self.workers <= 1 or len(items) <= 1:
            return [fn(item) for item in items]
        if self._pool is None:
            import concurrent.futures
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self.workers, thread_name_prefix="upright-predict")
        return list(self._pool.map(fn, items))


def _try(fn):
    """fn(), or the Exception it raised (returned, not raised)."""
    try:
        return fn()
    except Exception as e:
        return e


_PREPROCESS_CACHE = {}


def _preprocess_fn(image_size, resize):
    key = (image_size, resize)
    if key not in _PREPROCESS_CACHE:
        _PREPROCESS_CACHE[key] = tf.function(
            lambda b: preprocess.preprocess_image(b, image_size, resize),
            input_signature=[tf.TensorSpec([], tf.string)])
    return _PREPROCESS_CACHE[key]


class ModelDirError(ValueError):
    """A model_dir that cannot be used; str(e) says why in one line."""


def load_model_dir(model_dir: str, *, trust_model: bool = False, workers: int = 1) -> Predictor:
    """Loads a trained model for prediction.

    Accepts a trainer model_dir (model.keras + model_info.json; falls back to
    model_dir/export, then model_dir/model.tflite, when model.keras is missing),
    a SavedModel folder from export_saved_model, or a TFLite-only folder
    (model.tflite + model_info.json: the built-in models). Checks that the
    stored convention is this project's. model_info.json's "temperature" is
    applied to Keras and TFLite outputs (the SavedModel carries its own).
    model.keras is loaded with Keras' safe_mode (no Python code from the file).
    A SavedModel is a program: unless trust_model, its op types are scanned
    (`check_saved_model_ops`) before TensorFlow loads it, and its metadata is
    read from its assets/convention.json, never by calling a signature.
    workers: threads Predictor.read_images decodes with; a TFLite model gets
    that many one-thread interpreters (Predictor.workers).

    Raises:
      ModelDirError: missing files, unreadable model, a foreign convention, or
      a SavedModel with ops outside the allowlist.
    """
    if not os.path.isdir(model_dir):
        raise ModelDirError(f"model dir {model_dir!r} does not exist")
    if os.path.exists(os.path.join(model_dir, "saved_model.pb")):
        return dataclasses.replace(_load_export(model_dir, trust_model), workers=workers)
    info_path = os.path.join(model_dir, INFO_FILE)
    if not os.path.exists(info_path):
        raise ModelDirError(f"{info_path} is missing: not a trained model_dir "
                            "(train writes it at the end of a run)")
    info = read_model_info(info_path)
    keras_path = os.path.join(model_dir, MODEL_FILE)
    if not os.path.exists(keras_path):
        export = os.path.join(model_dir, EXPORT_DIR)
        if os.path.exists(os.path.join(export, "saved_model.pb")):
            return dataclasses.replace(_load_export(export, trust_model), workers=workers)
        tflite_path = os.path.join(model_dir, TFLITE_FILE)
        if os.path.isfile(tflite_path):
            return _load_tflite(tflite_path, info, workers)
        raise ModelDirError(f"{model_dir} has none of {MODEL_FILE}, {EXPORT_DIR}/, "
                            f"{TFLITE_FILE}")
    model = load_keras_model(keras_path)
    # model_info may carry a calibration temperature (1.0 when absent).
    temperature = info.get("temperature", 1.0)
    fn = tf.function(lambda x: scale_probabilities(model(x, training=False), temperature),
                     reduce_retracing=True)
    return Predictor(predict_fn=fn, info=info, source=keras_path, handle=model,
                     workers=workers)


def load_model(model: str, *, models_dir: str = None, trust_model: bool = False,
               workers: int = 1) -> Predictor:
    """load_model_dir for a folder; otherwise `model` names a built-in model
    (builtin.resolve: shipped in the package, or under models_dir /
    $UPRIGHT_MODELS_DIR). Raises ModelDirError (one line) when neither."""
    from upright.pipeline import builtin
    try:
        folder = builtin.resolve(model, models_dir=models_dir)
    except builtin.BuiltinModelError as e:
        raise ModelDirError(str(e)) from None
    return load_model_dir(folder, trust_model=trust_model, workers=workers)


def _load_tflite(path, info, workers=1):
    """A Predictor running the TFLite file (float32 [B, S, S, 3] -> [B, 4]),
    with model_info's temperature applied in numpy (the file holds the model's
    own probabilities). workers > 1: that many interpreters of one thread each,
    each running its share of a batch on the Predictor's threads (TFLite's
    invoke releases the GIL), instead of one interpreter."""
    temperature = float(info.get("temperature", 1.0))
    if not temperature > 0:
        raise ModelDirError(f"{path}: model_info temperature must be > 0, got {temperature}")
    workers = max(1, int(workers))
    runners = [_tflite_runner(path, int(info["image_size"]),
                              num_threads=1 if workers > 1 else None)
               for _ in range(workers)]
    predictor = Predictor(predict_fn=None, info=info, source=path, handle=runners,
                          workers=workers, numpy_input=True)

    def run_one(runner, input_name, image):
        outputs = runner(**{input_name: image[None]})
        probabilities = outputs.get("probabilities")
        if probabilities is None:
            (probabilities,) = outputs.values()
        return probabilities

    def run(job):
        # One image per invoke: XNNPACK on CPU takes 20% less time per image at
        # batch 1 than at batch 16 (documents model, 288 px, one thread: 15.9 vs
        # 20.2 ms; the activations stay in cache), and the input tensor keeps
        # its shape, so the interpreter never re-plans its memory.
        (runner, input_name), images = job
        return np.concatenate([run_one(runner, input_name, image) for image in images])

    def predict(images):
        images = np.asarray(images, np.float32)
        shares = [c for c in np.array_split(images, min(len(runners), len(images))) if len(c)]
        probabilities = np.concatenate(predictor.map(run, zip(runners, shares)))
        return scale_probabilities_np(probabilities, temperature)

    predictor.predict_fn = predict
    return predictor


def _tflite_runner(path, size, num_threads=None):
    """(signature runner, input name) of a TFLite file, run once on zeros."""
    try:
        runner = _tflite_interpreter(path, num_threads).get_signature_runner()
        (input_name,) = list(runner.get_input_details())
    except (ValueError, RuntimeError) as e:
        raise ModelDirError(f"cannot load {path}: {_first_line(e)}") from None
    # The first call applies the XNNPACK delegate, whose C++ runtime prints an
    # INFO line straight to file descriptor 2 (TF_CPP_MIN_LOG_LEVEL does not
    # reach it): make that call here, on zeros, with fd 2 silenced. A model
    # that fails on it is reported as unloadable.
    try:
        with quiet.native_logs_hidden():
            runner(**{input_name: np.zeros([1, size, size, 3], np.float32)})
    except (ValueError, RuntimeError) as e:
        raise ModelDirError(f"cannot run {path} on [1, {size}, {size}, 3]: "
                            f"{_first_line(e)}") from None
    return runner, input_name


def scale_probabilities_np(probabilities, temperature: float) -> np.ndarray:
    """scale_probabilities in numpy: softmax(log p / T); identity for T == 1."""
    p = np.asarray(probabilities, np.float32)
    if float(temperature) == 1.0:
        return p
    logits = np.log(np.maximum(p.astype(np.float64), 1e-12)) / float(temperature)
    logits -= logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


MAX_IMAGE_SIZE = 4096


def read_model_info(info_path: str, convention_key="convention") -> dict:
    """model_info.json, checked: a model folder may come from someone else, so
    every field used is of its type and range (one ModelDirError line, never a
    traceback later): a JSON object, the project's convention, image_size an
    integer in [1, MAX_IMAGE_SIZE], resize one of preprocess.RESIZE_METHODS,
    temperature (when present) a finite number > 0."""
    try:
        info = fileio.load_json(info_path)
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ModelDirError(f"{fileio.show(info_path)} is not valid JSON: {reason}") from None
    if not isinstance(info, dict):
        raise ModelDirError(f"{fileio.show(info_path)} is not a JSON object")
    check_convention(info.get(convention_key) if convention_key else info, info_path)
    size = info.get("image_size")
    if size is None:
        raise ModelDirError(f"{info_path} lacks image_size")
    if type(size) is not int or not 1 <= size <= MAX_IMAGE_SIZE:
        raise ModelDirError(f"{info_path}: image_size must be an integer in "
                            f"[1, {MAX_IMAGE_SIZE}], got {size!r:.40}")
    if info.get("resize", "squash") not in preprocess.RESIZE_METHODS:
        raise ModelDirError(f"{info_path}: resize must be one of {preprocess.RESIZE_METHODS}, "
                            f"got {info.get('resize')!r:.40}")
    temperature = info.get("temperature", 1.0)
    if type(temperature) not in (int, float) or not 0 < temperature < float("inf"):
        raise ModelDirError(f"{info_path}: temperature must be a finite number > 0, "
                            f"got {temperature!r:.40}")
    return info


def load_keras_model(path: str):
    """keras.saving.load_model without the optimizer; custom layers registered first."""
    import keras
    try:
        # The trainer's module registers its custom layers (if any) on import.
        import upright.pipeline.model  # noqa: F401
    except ImportError:
        pass
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as e:  # Keras raises many types for a bad file
        raise ModelDirError(f"cannot load {path}: {str(e).splitlines()[0]}") from None


def check_convention(convention, where: str) -> None:
    """Raises ModelDirError unless `convention` matches schema.convention()."""
    expected = schema.convention()
    if convention is None:
        raise ModelDirError(f"{where} stores no rotation convention")
    if not isinstance(convention, dict):
        raise ModelDirError(f"{where}: the rotation convention is not a JSON object")
    for key in ("class_names", "angles_ccw", "rotation"):
        if convention.get(key) != expected[key]:
            raise ModelDirError(
                f"{where}: rotation convention {key}={convention.get(key)!r} differs from "
                f"this project's {expected[key]!r}; refusing to guess")


def _load_export(export_dir, trust_model=False):
    if not trust_model:
        check_saved_model_ops(export_dir)
    info_path = os.path.join(export_dir, "assets", CONVENTION_ASSET)
    try:
        if trust_model and not os.path.exists(info_path):
            loaded = tf.saved_model.load(export_dir)
            info = read_export_convention(loaded)      # trusted: may call a signature
        else:
            info = _read_export_info(info_path)
            loaded = tf.saved_model.load(export_dir)
    except ModelDirError:
        raise
    except Exception as e:  # TensorFlow raises many types for a bad SavedModel
        raise ModelDirError(f"cannot load SavedModel {export_dir}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else e!r}") \
            from None
    check_convention(info, export_dir)
    if "predict_images" not in getattr(loaded, "signatures", {}):
        raise ModelDirError(f"SavedModel {export_dir} has no predict_images signature")
    signature = loaded.signatures["predict_images"]
    return Predictor(predict_fn=lambda x: signature(images=x)["probabilities"],
                     info=info, source=export_dir, handle=loaded)


def _read_export_info(info_path):
    """The export's own model info (assets/convention.json, written by
    export_saved_model), checked like model_info.json."""
    if not os.path.exists(info_path):
        raise ModelDirError(f"{info_path} is missing: not an export of this project "
                            "(pass --trust_model to load it anyway)")
    info = read_model_info(info_path, convention_key=None)
    return info


# The op types a SavedModel may hold to be loaded without --trust_model: those
# that this project's own exports contain (export_saved_model of every backbone
# family, tiny included, each resize method, temperature != 1; see
# tests/test_hostile.py, which checks that real exports pass). Nothing here
# touches files, the network, or Python: no ReadFile/WriteFile, PyFunc,
# MatchingFiles, no dataset, queue, reader or summary ops.
SAFE_OPS = frozenset({
    "AddV2", "ArgMax", "AssignVariableOp", "AvgPool", "BiasAdd", "Cast", "Const", "Conv2D",
    "DecodeImage", "DecodeJpeg", "DepthwiseConv2dNative", "DisableCopyOnRead",
    "EnsureShape", "Equal", "ExpandDims", "ExtractJpegShape", "FloorDiv", "FloorMod",
    "GreaterEqual", "Identity", "IdentityN", "LeakyRelu", "Less", "Log", "LogicalAnd",
    "MatMul", "Max", "MaxPool", "Maximum", "Mean", "Minimum", "Mul", "NoOp", "Pack", "Pad",
    "Placeholder", "ReadVariableOp", "RealDiv", "Relu", "Relu6", "Reshape", "Round", "Rsqrt",
    "ScaleAndTranslate", "Select", "SelectV2", "Shape", "Sigmoid", "Softmax", "Sqrt",
    "Square", "Squeeze", "StatefulPartitionedCall", "PartitionedCall", "StatelessCase",
    "StatelessIf", "StatelessWhile", "StaticRegexFullMatch", "StridedSlice", "StringJoin",
    "Sub", "Substr", "Sum", "TensorListFromTensor", "TensorListGetItem",
    "TensorListReserve", "TensorListSetItem", "TensorListStack", "VarHandleOp",
    "VarIsInitializedOp",
})
# Checkpoint ops write and read files: allowed only in the save and restore
# functions that tf.saved_model.save adds for the saver_def (which
# tf.saved_model.load never runs: it restores variables with its own reader),
# and only when nothing else refers to those functions.
SAVER_OPS = frozenset({"SaveV2", "RestoreV2", "MergeV2Checkpoints", "ShardedFilename"})
MAX_SAVED_MODEL_BYTES = 512 << 20


def check_saved_model_ops(export_dir: str) -> None:
    """Refuses a SavedModel that could touch files, the network or Python when loaded.

    Reads saved_model.pb (bounded, no TensorFlow runtime involved) and checks
    the op type of every node of every MetaGraphDef's graph and of every
    function in its library against SAFE_OPS; checkpoint ops (SAVER_OPS) only
    in the saver_def's own save/restore functions, referred to by nothing else.
    An object graph is required (a TF1-style SavedModel would have its init
    and restore ops run at load).
    Raises:
      ModelDirError: one line naming the first op refused and where it is.
    """
    from tensorflow.core.protobuf import saved_model_pb2
    pb = os.path.join(export_dir, "saved_model.pb")
    try:
        data = fileio.read_regular(pb, max_bytes=MAX_SAVED_MODEL_BYTES)
        saved = saved_model_pb2.SavedModel.FromString(data)
    except OSError as e:
        raise ModelDirError(f"cannot read {fileio.show(pb)}: {e.strerror or e}") from None
    except Exception as e:   # protobuf's DecodeError, a nesting limit
        raise ModelDirError(f"{fileio.show(pb)} is not a SavedModel: {type(e).__name__}") \
            from None
    refuse = lambda what: ModelDirError(  # noqa: E731
        f"refusing to load SavedModel {fileio.show(export_dir)}: {what}; a SavedModel is "
        "a program: pass --trust_model only if you trust whoever made it")
    if not saved.meta_graphs:
        raise refuse("it holds no graph")
    for meta in saved.meta_graphs:
        if not meta.object_graph_def.nodes:
            raise refuse("it is a TF1-style SavedModel (no object graph)")
        library = {f.signature.name: f for f in meta.graph_def.library.function}
        saver_nodes = {meta.saver_def.save_tensor_name.split(":")[0],
                       meta.saver_def.restore_op_name.split(":")[0]} - {""}
        saver_fns, other_refs = set(), set()
        for node in meta.graph_def.node:
            if node.op not in SAFE_OPS:
                raise refuse(f"graph node {fileio.show(node.name)!r} has op "
                             f"{fileio.show(node.op)!r}")
            refs = _function_refs(node)
            (saver_fns if node.name in saver_nodes else other_refs).update(refs)
        for name, function in library.items():
            for node in function.node_def:
                other_refs.update(_function_refs(node))
                if node.op in library:
                    other_refs.add(node.op)
        for item in meta.object_graph_def.nodes:
            other_refs.update(_object_refs(item))
        if saver_fns & other_refs:
            raise refuse("its checkpoint functions are also called from elsewhere")
        for name, function in library.items():
            allowed = SAFE_OPS | (SAVER_OPS if name in saver_fns else frozenset())
            for node in function.node_def:
                if node.op not in allowed and node.op not in library:
                    raise refuse(f"function {fileio.show(name)!r} has op "
                                 f"{fileio.show(node.op)!r}")
                if name in saver_fns and (node.op in library or _function_refs(node)):
                    raise refuse(f"checkpoint function {fileio.show(name)!r} calls others")


def _function_refs(node) -> set:
    """Names of the functions a NodeDef refers to through its attributes."""
    refs = set()
    for value in node.attr.values():
        if value.HasField("func"):
            refs.add(value.func.name)
        refs.update(f.name for f in value.list.func)
    return refs


def _object_refs(item) -> set:
    """Functions an object-graph node makes the loader create or call (resources'
    initializers and saveables' save/restore functions are "function" nodes too)."""
    kind = item.WhichOneof("kind")
    refs = set()
    if kind == "function":
        refs.update(item.function.concrete_functions)
    elif kind == "bare_concrete_function":
        refs.add(item.bare_concrete_function.concrete_function_name)
    elif kind == "captured_tensor":
        refs.add(item.captured_tensor.concrete_function)
    return refs - {""}


def file_size(path: str) -> int:
    """Bytes of a file, or of all files under a folder."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)


def _replace_dir(src, dst):
    # os.replace cannot replace a non-empty folder: move the old one aside first.
    # lexists: a link planted at dst is moved aside and unlinked, never followed.
    old = None
    if os.path.lexists(dst):
        old = dst + ".old"
        _remove_tree(old)
        os.replace(dst, old)
    os.replace(src, dst)
    if old:
        _remove_tree(old)


def _remove_tree(path):
    fileio.remove_tree(path, ignore_errors=True)   # a link is unlinked, never followed
