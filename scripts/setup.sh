#!/usr/bin/env bash
# Creates .venv (idempotent) and installs step-seg with its test extras.
# pip, not uv/poetry: pip takes torch/torchvision from the machine's local wheel store.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
echo "step-seg installed in $(pwd)/.venv"
