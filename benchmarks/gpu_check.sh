#!/usr/bin/env bash
# The accelerator check (< 8 minutes on one GPU): see benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh                 # GPU machine: installs, then the full table
#   bash benchmarks/gpu_check.sh --smoke         # CPU: tiny sizes (what CI runs)
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh --work_dir /tmp/gc
#
# Installs only what is missing: the project (pip install -e .) when `upright`
# does not import, and TensorFlow's CUDA libraries (tensorflow[and-cuda]) when
# nvidia-smi sees a GPU that TensorFlow does not. Extra arguments go to gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
if ! "$PY" -c "import upright.pipeline" 2>/dev/null; then
  "$PY" -m pip install --quiet -e .
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  if ! "$PY" -c "import tensorflow as tf, sys; sys.exit(0 if tf.config.list_physical_devices('GPU') else 1)" 2>/dev/null; then
    TF_VERSION="$("$PY" -c 'import tensorflow as tf; print(tf.__version__)')"
    "$PY" -m pip install --quiet "tensorflow[and-cuda]==${TF_VERSION}"
  fi
fi
exec timeout 470 "$PY" benchmarks/gpu_check.py "$@"
