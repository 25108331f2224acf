"""Built-in models: trained models shipped inside the package, used by name.

    orient --model documents scans/ --fix --dst fixed/
    upright.orient_images(["page.png"], model="documents")

A built-in model is a TFLite-only model folder (serve.load_model_dir):
    <models dir>/<name>/model.tflite      float16 weights, float32 [B, S, S, 3] -> [B, 4]
    <models dir>/<name>/model_info.json   image_size, resize, convention, temperature,
                                          and how the model was built (provenance)
The models dir is, in this order:
  1. the `models_dir` argument of `resolve` (the Python API's override);
  2. the environment variable UPRIGHT_MODELS_DIR (tests point it at a temporary
     folder holding a tiny model, so CI exercises this lookup without a shipped
     model);
  3. the package's own folder, upright/models/ (declared as package data in
     pyproject.toml, so wheels and installs carry it).
A folder always wins over a built-in name: `--model documents` loads ./documents
when that folder exists.

The `documents` model is produced by benchmarks/build_documents_model.py (see
upright/models/README.md); an install without it says so in one line.
"""
import os

# name -> one line for the error message and --help.
BUILTIN_MODELS = {
    "documents": "scanned and photographed document pages (TFLite, EfficientNet-Lite0)",
}
ENV_MODELS_DIR = "UPRIGHT_MODELS_DIR"
REQUIRED_FILES = ("model.tflite", "model_info.json")


class BuiltinModelError(ValueError):
    """An unknown name, or a built-in model missing from this install (one line)."""


def package_models_dir() -> str:
    """upright/models/ of the installed package (it may hold no model yet)."""
    import upright
    return os.path.join(os.path.dirname(os.path.abspath(upright.__file__)), "models")


def lookup_dir(override: str = None) -> str:
    """The folder built-in models are looked up in (see the module docstring)."""
    return override or os.environ.get(ENV_MODELS_DIR) or package_models_dir()


def names() -> tuple:
    return tuple(sorted(BUILTIN_MODELS))


def is_builtin_name(model: str) -> bool:
    return model in BUILTIN_MODELS


def resolve(model: str, *, models_dir: str = None) -> str:
    """The model folder for `model`: itself when it is a folder, else the
    built-in model of that name.

    Raises:
      BuiltinModelError: `model` is neither an existing folder nor a built-in
        name, or it is a built-in name whose files are missing from this install.
    """
    if os.path.isdir(model):
        return model
    listed = ", ".join(names())
    if not is_builtin_name(model):
        raise BuiltinModelError(f"model dir {model!r} does not exist, and it is not the name "
                                f"of a built-in model (built-in: {listed})")
    folder = os.path.join(lookup_dir(models_dir), model)
    missing = [name for name in REQUIRED_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise BuiltinModelError(
            f"built-in model {model!r} is not in this install ({', '.join(missing)} missing "
            f"from {folder}); built-in models: {listed}. Build it with "
            "benchmarks/build_documents_model.py, or pass a trained model folder")
    return folder
