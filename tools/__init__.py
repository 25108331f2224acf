"""upright.tools: the command-line tools, one thin absl module per command."""
import os

# TensorFlow's C++ INFO lines (oneDNN, CPU features) drown the tools' own
# output; warnings and errors still show. A user's explicit setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
