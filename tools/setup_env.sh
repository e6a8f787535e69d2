#!/usr/bin/env bash
# Create .venv and install the project with everything the demo and tests need.
# torch is installed first and pinned exactly (a CPU build is available locally); an
# unpinned torch would pull gigabytes of CUDA packages.
# A second run installs nothing when nothing changed: .venv/.setup-stamp records a hash of
# pyproject.toml and of this script, and the checkout .venv's package points to. Any change
# (or a clean clone, as in CI, which has no .venv) installs everything again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
STAMP=.venv/.setup-stamp
want="$(cat pyproject.toml tools/setup_env.sh | sha256sum | cut -d' ' -f1) $PWD"
if [ -x .venv/bin/python ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] &&
    .venv/bin/python -c "import importlib.util as u, sys, lmdb_embeddings as le
sys.exit(not (le.__file__.startswith('$PWD/') and u.find_spec('torch')))" 2>/dev/null; then
    echo "setup_env: .venv is up to date (pyproject.toml unchanged), nothing to install" >&2
    exit 0
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
rm -f "$STAMP"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test,bench]"
echo "$want" > "$STAMP"
