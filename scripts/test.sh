#!/usr/bin/env bash
# Install everything the tests need into .venv, then run the whole suite (ruff runs inside it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,serve
exec .venv/bin/python -m pytest "$@"
