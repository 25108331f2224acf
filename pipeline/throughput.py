"""Training speed on the real input stream vs. a cached batch (--measure_steps).

    from upright.pipeline import throughput
    throughput.measure_throughput(config, steps=10)

Separate from the stage fit: it builds a throwaway model, trains it on no
run's behalf and writes nothing; outputs.finish puts its result into
metrics.json when the config asks for it. Also reachable as
train.measure_throughput (benchmarks/README.md).
"""
import time

from upright.pipeline import cluster, trainer_models
from upright.pipeline import model as model_lib


def measure_throughput(config, *, steps: int = 10, warmup: int = 3, stage: int = 2) -> dict:
    """Training speed with the real input stream vs. a cached batch.

    Builds a throwaway model of the same architecture (random weights: speed does
    not depend on them), then times `steps` training steps (after `warmup`) fed
    (a) from one batch held in memory: the compute-only step time t_c, and
    (b) from the real input_fn stream: the step time t_r.
    input_wait_fraction = max(0, 1 - t_c / t_r): the share of a step spent
    waiting for input. The model is frozen as in `stage` (2: everything trains,
    the slower stage). Uses the config's augment_on.
    """
    augment_on = cluster.resolve_augment_on(config.augment_on)
    classifier = trainer_models.build_classifier(config, None)
    model = trainer_models.training_model(classifier, config, augment_on)
    settings = config.stage(stage)
    model_lib.set_trainable(classifier, freeze_below_block=settings.freeze_below_block,
                            train_batchnorm=settings.train_batchnorm)
    trainer_models.compile_model(model, config, settings.lr)
    from upright.pipeline import streams
    stream = streams.train_stream(config, stage=stage, augment_on=augment_on)
    cached = stream.take(1).cache().repeat()
    t_cached = _seconds_per_step(model, cached, steps=steps, warmup=warmup)
    t_real = _seconds_per_step(model, stream, steps=steps, warmup=warmup)
    return {"stage": stage, "steps": steps, "batch_size": config.batch_size,
            "images_per_s": round(config.batch_size / t_real, 2),
            "compute_only_images_per_s": round(config.batch_size / t_cached, 2),
            "input_wait_fraction": round(max(0.0, 1.0 - t_cached / t_real), 3)}


def _seconds_per_step(model, dataset, *, steps, warmup):
    """Mean seconds of one train_on_batch over `steps` batches of `dataset`,
    after `warmup` untimed ones (tracing, the input pipeline filling up)."""
    it = iter(dataset)
    for _ in range(warmup):
        model.train_on_batch(*next(it))
    t0 = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(*next(it))
    return (time.perf_counter() - t0) / steps
