#!/usr/bin/env bash
# Set up (first run) and run the test suite: unit, multi-process, CLI and the bounded
# torture scenarios. Long torture runs: tools/torture.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
