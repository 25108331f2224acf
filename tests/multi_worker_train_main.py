"""One worker of the slow multi-worker trainer test (tests/test_multi_worker.py).

    TF_CONFIG=... python tests/multi_worker_train_main.py RECORDS MODEL_DIR

Runs train.train_and_evaluate with strategy="multi_worker" (tiny backbone, one
short epoch per stage), exactly as `train --strategy=multi_worker` does: the
trainer itself patches Keras (train.make_strategy), sends non-chief workers to
cluster.worker_dir(MODEL_DIR) and averages BatchNorm statistics every epoch.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from upright.pipeline import train  # noqa: E402


def main(records, model_dir):
    config = train.TrainConfig(
        records=records, model_dir=model_dir, batch_size=8,
        image_size=16, backbone="tiny", weights=None, head="linear", seed=3,
        augment_policy="none", augment_on="host", stage1_epochs=1, stage2_epochs=1,
        stage1_freeze_below_block=0, steps_per_epoch=2, validation_steps=1,
        strategy="multi_worker", export=False, verbose=0)
    metrics = train.train_and_evaluate(config)
    print("VAL_ACCURACY", metrics["final"]["val_accuracy"])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
