#!/usr/bin/env bash
# CAM baseline vs CLIMS on COCO-MINI, VOC-21 view, CPU (frozen EfficientNet-Lite0 backbone, cached
# features; only the 1x1 CAM classifier trains, so both runs share one backbone and one budget).
#
#   1. baseA:  multi-label BCE baseline, STEPS_A steps from the ImageNet backbone
#   2. base:   baseA + STEPS_B more BCE steps             } same backbone, same steps, same lr schedule
#   3. clims:  baseA + STEPS_B CLIMS steps (VOC preset)   } (CLIMS starts from the baseline, as the paper)
#   4. ablations: clims without BTM / CBS / REG, and OTM only (ABLATE=1; ran as 8 jobs by hand, see the E8 report)
#   5. cam make (multi-scale + flip, GT image labels as keys) and cam eval (threshold sweep) on the
#      same 159 training images, against masks_voc21 (WSSS protocol: CAM quality on the train set).
#   6. the evaluator probe: offline model's accuracy at telling GT-masked foreground from background.
#
# Usage: bash scripts/clims_coco_mini.sh [OUT]   (env: STEPS_A STEPS_B EVAL_SIZE SCALES LONG ABLATE)
set -euo pipefail
cd "$(dirname "$0")/.."
D=${DATA:-../shared/data/coco-mini}
OUT=${1:-runs/clims_coco_mini}
STEPS_A=${STEPS_A:-300}
STEPS_B=${STEPS_B:-100}
EVAL_SIZE=${EVAL_SIZE:-128}
SCALES=${SCALES:-1.0,0.5}  # the WSSS protocol is 1.0,0.5,1.5,2.0 (4x the CPU time)
LONG=${LONG:-320}
T=${THREADS:-1}
PY=".venv/bin/python -m textseg.cli"
COMMON=(--set data.root="$D" --set data.classes="$D/classes_voc21.txt" --set backbone=efficientnet_lite0
        --set train.batch_size=8 --set data.crop_size=320 --set threads="$T" --set train.progress=false
        --set freeze_backbone=true --set cache_features=true --set cache_file="$OUT/cache320.pt"
        --set train.log_every=5)
mkdir -p "$OUT"

$PY train cam "${COMMON[@]}" --set train.steps="$STEPS_A" --set train.lr=0.01 --set train.out_dir="$OUT/baseA"
$PY train cam "${COMMON[@]}" --set train.steps="$STEPS_B" --set train.lr=0.003 \
    --set init="$OUT/baseA/model.safetensors" --set train.out_dir="$OUT/base"
# --set wins over the preset wherever it is; epochs=0 keeps the step budget equal to the baseline's
$PY train cam "${COMMON[@]}" --preset voc --set mode=clims --set epochs=0 --set train.steps="$STEPS_B" \
    --set train.lr=0.003 --set init="$OUT/baseA/model.safetensors" --set clims.eval_size="$EVAL_SIZE" --set train.out_dir="$OUT/clims"
RUNS=(base clims)
if [ "${ABLATE:-0}" = 1 ]; then
  for spec in "no_btm 10 0 1 0.2" "no_cbs 10 24 0 0.2" "no_reg 10 24 1 0" "otm_only 10 0 0 0" "no_otm 0 24 1 0.2"; do
    set -- $spec
    $PY train cam "${COMMON[@]}" --preset voc --set mode=clims --set epochs=0 --set train.steps="$STEPS_B" \
        --set train.lr=0.003 --set init="$OUT/baseA/model.safetensors" --set clims.alpha="$2" --set clims.beta="$3" \
        --set clims.gamma="$4" --set clims.delta="$5" --set clims.eval_size="$EVAL_SIZE" \
        --set train.out_dir="$OUT/clims_$1"
    RUNS+=("clims_$1")
  done
fi
MAKE=()
for r in "${RUNS[@]}"; do MAKE+=(--checkpoint "$OUT/$r/model.safetensors" --out "$OUT/cams_$r"); done
$PY cam make "$D" "${MAKE[@]}" --scales "$SCALES" --long-side "$LONG" --threads "$T" --no-progress
for r in "${RUNS[@]}"; do
  $PY cam eval "$D" --cams "$OUT/cams_$r" --masks masks_voc21 --json > "$OUT/eval_$r.json"
  echo "$r: $(.venv/bin/python -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['best']['miou'], 'at', d['best_threshold'])" "$OUT/eval_$r.json")"
done
$PY cam probe "$D" --masks masks_voc21 --threads "$T" --json "$OUT/probe_offline.json" > /dev/null
