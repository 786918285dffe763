#!/usr/bin/env bash
# Create .venv and install quantwise with the given extras. torch is pinned and installed
# first: an unpinned torch (asked for by any dependency) would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-models}"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
