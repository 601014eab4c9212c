#!/usr/bin/env bash
# Create .venv (if absent) and install the project with its pinned dependencies and test tools.
# torch is pinned to 2.13.0, the CPU build that lies on local disk on our machines; any other version would
# pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
