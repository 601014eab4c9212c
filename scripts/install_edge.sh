#!/usr/bin/env bash
# Install the edge agent alone into a virtualenv (default: .venv-edge): the package without its own dependencies,
# then the pins of its `edge` extra in pyproject.toml (ONNX Runtime, OpenCV, gRPC, zstandard, ...): neither torch,
# Ray nor matplotlib. The agent runs with --runtime onnx on the graphs `rapnet-export CHECKPOINT` writes on a machine
# with the full install (./scripts/setup.sh); see docs/edge.md.
#   ./scripts/install_edge.sh [VENV]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-edge}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --no-deps .
# The edge extra's requirements, as the installed package's metadata lists them ('numpy==2.4.6; extra == "edge"').
mapfile -t EDGE < <("$VENV/bin/python" - <<'PY'
from importlib.metadata import requires
for req in requires("rapnet") or []:
    spec, _, marker = req.partition(";")
    if marker.replace(" ", "").replace("'", '"') == 'extra=="edge"':
        print(spec.strip())
PY
)
if [ ${#EDGE[@]} -eq 0 ]; then
  echo "install_edge.sh: the package lists no requirements for its edge extra" >&2
  exit 1
fi
"$VENV/bin/python" -m pip install --quiet "${EDGE[@]}"
echo "edge install in $VENV: $("$VENV/bin/python" -m pip list --format=freeze 2>/dev/null | wc -l) packages" >&2
