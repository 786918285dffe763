#!/usr/bin/env bash
# Install into .venv, then quantize the built-in default model and print before/after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh models,onnx  # onnx: `quantwise export` works out of the box
.venv/bin/quantwise quantize "$@"
