#!/usr/bin/env bash
# Evaluate the offline default model on the real data in ../shared/data (COCO-MINI VOC-21 view and
# CamVid test) with `textseg eval`; prints the tables and the wall time of each run.
# Usage: scripts/eval_shared.sh [NPROC]   (NPROC > 1: torchrun with NPROC CPU processes, 1 thread each)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${TEXTSEG_SHARED_DATA:-../shared/data}"
NPROC="${1:-1}"
OUT="${OUT:-runs/eval}"
mkdir -p "$OUT"
if [ "$NPROC" -gt 1 ]; then
  RUN=(.venv/bin/python -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m textseg.cli)
else
  RUN=(.venv/bin/python -m textseg.cli)
fi
run() {
  local name=$1; shift
  local t0=$SECONDS
  "${RUN[@]}" eval "$@" --threads 1 --no-progress --out "$OUT/$name.json"
  echo "== $name: $((SECONDS - t0)) s wall (report: $OUT/$name.json)"
}
run coco-mini-voc21 --dataset folder --root "$DATA/coco-mini" --masks masks_voc21 --classes classes_voc21.txt
run camvid-test --dataset folder --root "$DATA/camvid" --split test
