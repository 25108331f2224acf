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
  "${pip[@]}" install --no-deps -e "$repo" > "$tmp/pip.log" 2>&1 || { cat "$tmp/pip.log" >&2; exit 1; }
  grep -v "^WARNING: Location" "$tmp/pip.log" || true
  # src/upright is a plain src layout (pyproject.toml): setuptools writes a
  # one-line .pth, never its import hook with the "Editable installation ...
  # folders with the same name as your package" warning.
  # (pip 23.2 hides that warning, newer pips print it: look for the hook itself.)
  hook=$(find "$tmp/venv/lib" -name "__editable___*finder.py")
  if grep -q "Package would be ignored" "$tmp/pip.log"; then
    echo "install_check: setuptools warns that a package folder is missing from pyproject.toml's packages:" >&2
    grep -A3 "is absent from the" "$tmp/pip.log" >&2 || true
    exit 1
  fi
  if [ -n "$hook" ] || grep -q "same name as your package" "$tmp/pip.log"; then
    echo "install_check: the editable install uses setuptools' import hook ($hook), which" \
         "prints the 'Editable installation' warning; keep the src/upright layout" >&2
    exit 1
  fi
done
cd "$tmp"   # not the repository: the import must come through the install
# The package's folders are links to the repository's own (src/upright/pipeline
# -> pipeline/): the real files must be the repository's.
found=$("$tmp/venv/bin/python" -c 'import importlib.util as u, os.path as p; print(*(p.realpath(u.find_spec(n).origin) for n in ("upright.pipeline", "upright.tools", "upright.recipes")))')
if [ "$found" != "$repo/pipeline/__init__.py $repo/tools/__init__.py $repo/recipes/__init__.py" ]; then
  echo "install_check: upright.pipeline/upright.tools/upright.recipes resolve to: $found" >&2
  exit 1
fi
# Only `upright` is importable: no bare top-level pipeline, tools or tests.
bare=$("$tmp/venv/bin/python" -c 'import importlib.util as u; print(*[n for n in ("pipeline", "tools", "recipes", "tests") if u.find_spec(n)])')
if [ -n "$bare" ]; then
  echo "install_check: the editable install exposes top-level packages: $bare" >&2
  exit 1
fi
echo "install_check: pip 23.2 + wheel editable install imports upright.pipeline, upright.tools and upright.recipes from $repo, nothing else top-level, no setuptools warning"
