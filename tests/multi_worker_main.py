"""One worker of the multi-worker test (run by tests/test_multi_worker.py with TF_CONFIG).

    TF_CONFIG=... python tests/multi_worker_main.py RECORDS OUT.npz STEPS

A tiny Keras model trained by model.fit with MultiWorkerMirroredStrategy on
input_fn batches (each worker reads its share of the shard files through its
InputContext), with cluster.patch_keras_for_multi_worker applied; writes the final
weights, the logged loss and accuracy and this worker's pipeline id to OUT.npz.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from upright.pipeline import cluster, inputs  # noqa: E402

GLOBAL_BATCH = 8
IMAGE_SIZE = 16


def main(records, out, steps):
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    me = cluster.task()
    keras.utils.set_random_seed(1234 + me["index"])   # different draws: the broadcast must win
    pipelines = []

    def dataset_fn(input_context):
        pipelines.append(input_context.input_pipeline_id)
        return inputs.input_fn(records, split="train", batch_size=GLOBAL_BATCH,
                               image_size=IMAGE_SIZE, training=True, seed=5, policy="none",
                               input_context=input_context)

    data = strategy.distribute_datasets_from_function(dataset_fn)
    cluster.patch_keras_for_multi_worker()   # Keras 3.15 bugs, see cluster.py
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(4, 3, strides=2, activation="relu"),
            keras.layers.BatchNormalization(),   # moving statistics: not synced by Keras
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(4),
            keras.layers.Activation("softmax", dtype="float32"),
        ])
        model.compile(optimizer=keras.optimizers.SGD(0.5),
                      loss=keras.losses.SparseCategoricalCrossentropy(),
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    initial = [w.copy() for w in model.get_weights()]
    callbacks = [cluster.average_non_trainable_callback(model, strategy)]
    history = model.fit(data, epochs=2, steps_per_epoch=steps // 2, verbose=0,
                        callbacks=callbacks).history
    weights = model.get_weights()
    np.savez(out, *weights, initial_kernel=initial[0], pipelines=np.array(pipelines),
             loss=np.array(history["loss"]), accuracy=np.array(history["accuracy"]),
             index=me["index"], replicas=strategy.num_replicas_in_sync)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
