"""The Keras models the trainer builds from a TrainConfig, and how it compiles them.

A module of its own so that the stage fit (train.py), the float32 copy of the
final model (outputs.py) and the speed measurement (throughput.py) build the
same architecture the same way without importing each other. Imports no
TensorFlow at module level: train.check_config stays cheap.
"""
from upright.pipeline import model as model_lib


def build_classifier(config, weights):
    """The classifier of `config` (backbone, size, head, dropout, bn_momentum)
    with `weights` ("imagenet", a backbone weights file, or None: random)."""
    return model_lib.build_model(backbone=config.backbone, image_size=config.image_size,
                                 weights=weights, head=config.head, dropout=config.dropout,
                                 bn_momentum=config.bn_momentum)


def training_model(classifier, config, augment_on):
    """The model fit() trains: the classifier, behind the AugmentLayer on device."""
    if augment_on != "device":
        return classifier
    import keras
    from upright.pipeline import augment
    s = config.image_size
    inputs = {"images": keras.Input((s, s, 3), dtype="float32", name="images"),
              "seeds": keras.Input((2,), dtype="int32", name="seeds")}
    images = augment.AugmentLayer(config.augment_policy, name="augment")(inputs)
    return keras.Model(inputs, classifier(images), name="train_model")


def compile_model(model, config, lr, metrics=()):
    """A fresh Adam at `lr` (a float or a schedule), the loss, and jit_compile
    as the config says."""
    import keras
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(),
                  metrics=list(metrics) or None, jit_compile=jit(config.jit_compile))


def jit(value):
    """compile()'s jit_compile: "auto" is Keras' auto (XLA when a GPU/TPU is
    visible and no distribution strategy; off on a CPU-only machine), true and
    false force it. With augment_on=device the AugmentLayer compiles too (its
    static schedule), so XLA covers the augmentation and the backbone in one
    step.
    """
    return {"auto": "auto", "true": True, "false": False}[str(value).lower()]
