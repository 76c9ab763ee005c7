#!/usr/bin/env bash
# The main job, out of the box: install, then segment an example photo with the offline default
# model and write the label map, overlay (with legend) and JSON to out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
img=$(.venv/bin/python -m textseg.examples chelsea)
.venv/bin/textseg segment "$img" --labels "cat,wall,floor,background" --out out/demo
# before / after of the offline default (v1 bridge only vs v2 bridge + learned dense head): docs/offline_v2.png
.venv/bin/python scripts/offline_v2_figure.py --image "$img" --labels "cat,wall,floor,background"
