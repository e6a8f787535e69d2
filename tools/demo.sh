#!/usr/bin/env bash
# Set up (first run) and run the demo (examples/demo.py): a 1M x 64 store trained for one epoch,
# with 2 DataLoader workers reading it, committed, reopened and checked.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
exec .venv/bin/python examples/demo.py "$@"
