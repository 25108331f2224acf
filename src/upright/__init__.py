"""upright: image orientation classifiers with TensorFlow.

The library lives in `upright.pipeline` (the repository's pipeline/ folder), the
commands in `upright.tools` (tools/). One call for the common case:

    import upright
    for r in upright.orient_images(["scan1.png", "pages/"], model="documents"):
        print(r["path"], r["angle_ccw"], r["confidence"], r["turn_cw"], r["left_alone"])

`model` is a model folder or a built-in model name (upright/models/, or the
folder named by $UPRIGHT_MODELS_DIR). Importing `upright` stays cheap:
TensorFlow is imported on the first call.
"""


def orient_images(paths, *, model="documents", min_confidence=0.9, batch_size=32,
                  models_dir=None, tta=False):
    """Per image (PDF: per page) a dict: path, angle_ccw (degrees turned
    counter-clockwise), confidence, turn_cw (degrees to turn clockwise to repair
    it; 0 when upright or left alone), left_alone (confidence < min_confidence),
    action, probabilities, error. tta: combine each image's four quarter turns
    (4x the work; removes a model's bias towards one turn). See
    upright.pipeline.orient.orient_images."""
    from upright.pipeline import orient
    return orient.orient_images(paths, model=model, min_confidence=min_confidence,
                                batch_size=batch_size, models_dir=models_dir, tta=tta)


def builtin_models():
    """Names of the built-in models (shipped or not in this install)."""
    from upright.pipeline import builtin
    return builtin.names()
