"""upright: image orientation classifiers with TensorFlow.

The library lives in `upright.pipeline` (the repository's pipeline/ folder), the
commands in `upright.tools` (tools/).
"""
