#!/usr/bin/env bash
# Installs that cannot break: an editable install under pip 23.2 (the pip of
# Debian 12's venv) with `wheel` present (TensorFlow's astunparse brings it).
# Without pyproject.toml that pip fell back to `setup.py develop`, which ignores
# package-dir, and `import upright.pipeline` failed. Run by .ci/run; needs the
# package registry, like every install. Usage: bash tests/install_check.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
pip=("$tmp/venv/bin/pip" --quiet --disable-pip-version-check)
"${pip[@]}" install "pip==23.2" wheel 2>&1 | grep -v "^WARNING: Location" || true
for round in first second; do   # the second install is the one that broke
  "${pip[@]}" install --no-deps -e "$repo" 2>&1 | grep -v "^WARNING: Location" || true
done
cd "$tmp"   # not the repository: the import must come through the install
found=$("$tmp/venv/bin/python" -c 'import importlib.util as u; print(u.find_spec("upright.pipeline").origin, u.find_spec("upright.tools").origin)')
if [ "$found" != "$repo/pipeline/__init__.py $repo/tools/__init__.py" ]; then
  echo "install_check: upright.pipeline/upright.tools resolve to: $found" >&2
  exit 1
fi
echo "install_check: pip 23.2 + wheel editable install imports upright.pipeline and upright.tools from $repo"
