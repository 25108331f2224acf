"""Errors shared by the model builders (model, efficientnet_lite, torch_pickle).

A module of its own, importing nothing, so that the three can raise the same
error without importing each other (model imports efficientnet_lite, which
imports torch_pickle). model.ModelError remains the name callers use.
"""


class ModelError(ValueError):
    """A model choice that cannot work (unknown backbone, size, weights file)."""
