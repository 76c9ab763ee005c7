#!/usr/bin/env bash
# Create .venv (if missing) and install textseg with the given extras.
# torch is pinned to the CPU build first so pip never pulls a multi-GB CUDA wheel on CPU machines;
# set TEXTSEG_TORCH="torch" (or another spec) to choose your own build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "${TEXTSEG_TORCH:-torch==2.13.0}"
if [ -n "$extras" ]; then
  .venv/bin/pip install -q -e ".[${extras}]"
else
  .venv/bin/pip install -q -e .
fi
