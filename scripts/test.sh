#!/usr/bin/env bash
# Install everything the tests need into .venv (and Debian's Chromium for the browser test, when
# running as root with apt), then run the whole suite (ruff runs inside it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,serve
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's chromium for the browser test..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core) >/dev/null
fi
exec .venv/bin/python -m pytest "$@"
