"""The datasets the trainer's fit() reads: a stage's resumable training stream
and the validation stream, plain, under a tf.distribute strategy or from a
tf.data service; and the naming of a damaged shard met while reading them.

Every function takes the run's train.TrainConfig. `strategy` None means no
distribution (Keras takes the plain dataset); with one, each input pipeline
builds its own dataset from its InputContext
(strategy.distribute_datasets_from_function).
"""
import contextlib
import dataclasses

import tensorflow as tf

from upright.pipeline import inputs, resume


def train_stream(config, *, stage: int, skip_batches: int = 0,
                 augment_on: str = "host", input_context=None):
    """The training batches of a stage, resumable.

    One input_fn stream per stage, seeded by resume.stream_seed(seed, stage),
    repeated forever; with a fixed number of steps per epoch, epoch e is batches
    [e * steps, (e + 1) * steps) of it, so a run resumed at epoch e skips e *
    steps batches (input_fn's skip_batches: decoding only, never augmentation)
    and then sees exactly what an uninterrupted run saw.

    Returns:
      input_fn's training stream: augment_on "host" -> (images float32
      [B, S, S, 3] in [0, 255], labels int32 [B]); "device" -> ({"images": host
      part applied, "seeds": int32 [B, 2]}, labels) for a model behind
      augment.AugmentLayer.
    """
    return inputs.input_fn(config.records, split="train", batch_size=config.batch_size,
                           image_size=config.image_size, training=True,
                           seed=resume.stream_seed(config.seed, stage), resize=config.resize,
                           policy=config.augment_policy, augment_on=augment_on,
                           input_context=input_context, repeat=True,
                           skip_batches=skip_batches)


def train_data(config, *, stage: int, start_epoch: int, steps: int, augment_on: str,
               strategy=None):
    """The stage's training stream from epoch `start_epoch` on (see train_stream)."""
    if not config.data_service:
        return _distribute(strategy, lambda ctx: train_stream(
            config, stage=stage, skip_batches=start_epoch * steps,
            augment_on=augment_on, input_context=ctx))
    from upright.pipeline import data_service

    def dataset_fn(ctx):
        # All consumers share one service job: no file sharding here, and no
        # skip on resume (the service's batch order is not reproducible anyway).
        batch = ctx.get_per_replica_batch_size(config.batch_size) if ctx else config.batch_size
        ds = train_stream(dataclasses.replace(config, batch_size=batch), stage=stage,
                          augment_on=augment_on, input_context=None)
        return data_service.maybe_distribute(
            ds, config.data_service,
            job_name=data_service.job_name(config.model_dir, stage, start_epoch))
    return _distribute(strategy, dataset_fn)


def val_data(config, *, augment_on: str, strategy=None):
    """The whole val split in 4 orientations; in the dict form of the training
    model with augment_on "device" (zero seeds: AugmentLayer is the identity here)."""

    def dataset_fn(input_context):
        ds = inputs.input_fn(config.records, split="val", batch_size=config.batch_size,
                             image_size=config.image_size, training=False,
                             resize=config.resize, input_context=input_context)
        if augment_on == "device":
            ds = ds.map(lambda x, y: ({"images": x,
                                       "seeds": tf.zeros([tf.shape(x)[0], 2], tf.int32)}, y))
        return ds

    return _distribute(strategy, dataset_fn)


def naming_damaged_records(records: str):
    """A DataLossError of a damaged train or val shard -> RecordsError naming
    the shard file and the record (the inner context looks at val, the outer
    at train: a damage in train passes the inner one unnamed)."""
    stack = contextlib.ExitStack()
    stack.enter_context(inputs.naming_damaged_records(records, "train"))
    stack.enter_context(inputs.naming_damaged_records(records, "val"))
    return stack


def _distribute(strategy, dataset_fn):
    if strategy is None:
        return dataset_fn(None)
    return strategy.distribute_datasets_from_function(dataset_fn)
