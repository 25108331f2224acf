#!/usr/bin/env bash
# The whole flow on built-in demo data, on CPU, without downloads:
# install -> demo scenes -> records -> inspect -> train (demo.flags) -> evaluate -> orient.
# Usage: bash demo.sh        (from the repository root)
# Measured on 2 cores shared with other jobs (load average 5-6): 2 min 53 s
# with .venv/ installed; a first run adds the install (114 s here).
set -euo pipefail
cd "$(dirname "$0")"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e ".[test]"
export PATH="$PWD/.venv/bin:$PATH"

step() { printf '\n== %s\n' "$*"; }

step "1. demo data: upright scenes drawn on the fly (train folder + a held-out folder)"
make_demo_images --out demo_data/scenes --count 900 --seed 0
make_demo_images --out demo_data/holdout --count 150 --seed 1

step "2. make_records: upright images -> sharded TFRecords"
make_records --src demo_data/scenes --out records/demo --overwrite
make_records --src demo_data/holdout --out records/demo_holdout --overwrite --val_fraction 1.0

step "3. inspect_records: verify every record, draw a contact sheet"
inspect_records records/demo --contact_sheet demo_data/contact_sheet.png

step "4. train: the staged fine-tune, CPU-sized (demo.flags)"
train --flagfile=demo.flags --records records/demo --model_dir runs/demo

step "5. evaluate on held-out scenes, every image in all four orientations"
evaluate --model runs/demo --records records/demo_holdout --split val --tta

step "6. orient: turn a few rotated files back upright"
rm -rf demo_data/turned demo_data/fixed
.venv/bin/python - <<'PY'
import os
from PIL import Image
os.makedirs("demo_data/turned", exist_ok=True)
for i, k in enumerate([0, 1, 2, 3]):
    im = Image.open(f"demo_data/holdout/scene-{i:05d}.jpg")
    im.rotate(90 * k, expand=True).save(f"demo_data/turned/scene-{i}-ccw{90 * k}.jpg", quality=92)
PY
# JPEGs are turned in the DCT domain by jpegtran when it is installed (no
# second JPEG generation; a partial edge block of < 16 px is trimmed where the
# size needs it, and each line says so); without it they are re-encoded.
if command -v jpegtran >/dev/null 2>&1; then
  echo "jpegtran found ($(command -v jpegtran)): JPEGs are turned losslessly"
else
  echo "jpegtran not found: JPEGs are re-encoded at quality 95" \
       "(for lossless turns: apt-get install libjpeg-turbo-progs)"
fi
orient --model runs/demo demo_data/turned --fix --dst demo_data/fixed --report demo_data/orient_report.csv

step "done: model, exports and metrics in runs/demo; records in records/demo"
