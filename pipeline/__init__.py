"""upright.pipeline: records, the tf.data input function and augmentation.

Importing this package is cheap and touches no global state: it imports neither
TensorFlow nor absl flags. Submodules are loaded on first use, so that
image-reading worker processes never pay for a TensorFlow import.

    from upright import pipeline
    ds = pipeline.input_fn("records/photos", split="train", batch_size=32,
                           image_size=128, training=True, seed=0)
"""
import importlib

_LAZY = {
    # public name -> (module, attribute)
    "input_fn": ("inputs", "input_fn"),
}


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{name}":
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        raise
