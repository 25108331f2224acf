"""The end of a run: what a model_dir holds once both stages are done.

    metrics = outputs.finish(config, model_dir, stages)

model.keras (the best epoch's checkpoint, as float32), model_info.json (what
serving needs: size, resize, convention, the fitted temperature), the
calibration scores of evaluation.score_classifier, the SavedModel and
model.tflite (--export), and the metrics dict that train.train_and_evaluate
writes to metrics.json. Separate from the stage fit: it reads only the
checkpoints the stages left, so a run resumed after its last stage redoes
just this part.
"""
import os

from upright.pipeline import resume, schema, trainer_models


def finish(config, model_dir: str, stages: dict) -> dict:
    """Writes model.keras (best epoch), model_info.json and the exports.

    Args:
      stages: {"1": summary, "2": summary} of the stages (train._Run.stage).
    Returns:
      the metrics (stages, best, final scores, model sizes, images/s, and the
      throughput block when config.measure_steps > 0).
    """
    import keras
    from upright.pipeline import evaluation
    best_info = resume.read_json(os.path.join(model_dir, "checkpoints", "best.json"))
    final = keras.saving.load_model(os.path.join(model_dir, "checkpoints", "best.keras"),
                                    compile=False)
    final = _as_float32(final, config)
    model_path = os.path.join(model_dir, "model.keras")
    resume.save_keras(final, model_path)
    model_info = {"image_size": config.image_size, "resize": config.resize,
                  "backbone": config.backbone, "head": config.head,
                  "convention": schema.convention(),
                  "input": "float32 [B, S, S, 3] in [0, 255]",
                  "output": "float32 softmax [B, 4] over convention.class_names",
                  "best": best_info}
    scores = evaluation.score_classifier(final, config.records,
                                         batch_size=config.batch_size,
                                         image_size=config.image_size, resize=config.resize)
    model_info["temperature"] = scores["temperature"]
    resume.write_json(os.path.join(model_dir, "model_info.json"), model_info)
    sizes = {"keras_bytes": os.path.getsize(model_path)}
    if config.export:
        sizes.update(_export(final, model_dir, config, scores["temperature"]))
    rates = [s["train_images_per_s"] for s in stages.values() if s.get("train_images_per_s")]
    metrics = {
        "stages": stages,
        "best": best_info,
        "final": scores,
        "model": {"backbone": config.backbone, "head": config.head,
                  "image_size": config.image_size, "params": int(final.count_params()),
                  **sizes},
        "train_images_per_s": rates[-1] if rates else None,
    }
    if config.measure_steps:
        from upright.pipeline import throughput
        metrics["throughput"] = throughput.measure_throughput(config, steps=config.measure_steps)
    return metrics


def _export(model, model_dir, config, temperature: float = 1.0) -> dict:
    """The SavedModel (with the fitted temperature) and model.tflite; -> their sizes."""
    from upright.pipeline import serve
    export_dir = serve.export_saved_model(model, os.path.join(model_dir, serve.EXPORT_DIR),
                                          image_size=config.image_size, resize=config.resize,
                                          temperature=temperature)
    tflite_bytes = serve.export_tflite(model, os.path.join(model_dir, serve.TFLITE_FILE),
                                       image_size=config.image_size)
    return {"saved_model_bytes": serve.file_size(export_dir), "tflite_bytes": int(tflite_bytes)}


def _as_float32(model, config):
    """A float32 copy of a mixed-precision model (export and TFLite want float32).

    Rebuilt from the config under the float32 policy, then given the weights.
    """
    if not config.mixed_precision:
        return model
    import keras
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        copy = trainer_models.build_classifier(config, None)
    finally:
        keras.config.set_dtype_policy(previous)
    copy.set_weights(model.get_weights())
    return copy
