#!/usr/bin/env bash
# The offline v2 default (bridge + learned dense head) and the v1 bridge-only model, same run, same settings:
# COCO-MINI val2017 (held out) VOC-21 and COCO-Object views, CamVid test (zero-shot). JSON reports -> $OUT.
# MODELS="offline" runs one of them only.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${TEXTSEG_SHARED_DATA:-../shared/data}
OUT=${1:-out/eval_offline_v2}
PY=${PYTHON:-python}
mkdir -p "$OUT"
for model in ${MODELS:-offline offline-bridge}; do
  $PY -m textseg.cli eval --model "$model" --dataset folder --root "$DATA/coco-mini" --split val2017 \
    --masks masks_voc21 --classes classes_voc21.txt --threads 2 --no-progress --out "$OUT/$model-voc21.json"
  $PY -m textseg.cli eval --model "$model" --dataset folder --root "$DATA/coco-mini" --split val2017 \
    --threads 2 --no-progress --out "$OUT/$model-coco81.json"
  $PY -m textseg.cli eval --model "$model" --dataset folder --root "$DATA/camvid" --split test \
    --threads 2 --no-progress --out "$OUT/$model-camvid.json"
done
