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
#   6. the evaluator probe: the evaluator's accuracy at telling GT-masked foreground from background,
#      at its own input side and at EVAL_SIZE (the side CLIMS feeds it).
#
# EVALUATOR=offline (default): the packaged offline model judges the maps (runs clims, clims_*).
# EVALUATOR=lit: first a LiT evaluator, `textseg train clip` heads on the frozen EfficientNet-Lite0 +
#   MiniLM towers (the LiT recipe of scripts/lit_coco_mini.py, LIT_STEPS steps), trained on COCO-MINI
#   train2017 + flickr8k-1k captions (scripts/lit_caption_mix.py; val2017 only for its zero-shot
#   report), then CLIMS with it (runs clims_lit, clims_lit_*). Runs already finished in OUT (a
#   model.safetensors, an eval_*.json) are reused, so the second evaluator shares the baseline.
#
# Usage: bash scripts/clims_coco_mini.sh [OUT]
#   (env: EVALUATOR STEPS_A STEPS_B EVAL_SIZE SCALES LONG ABLATE LIT_STEPS FLICKR PYTHON THREADS SEED)
# SEED (default 0): the seed of the runs after baseA (crops, batch order); SEED > 0 names them *_sSEED,
#   all from the same baseA, so a second seed measures the spread of base vs clims.
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
PYTHON=${PYTHON:-.venv/bin/python}
PY="$PYTHON -m textseg.cli"
EVALUATOR=${EVALUATOR:-offline}
case "$EVALUATOR" in
  offline) SUF=""; EV=(); PROBE_EV=() ;;
  lit) SUF="_lit"; LIT="$OUT/lit"; W="$LIT/run/model.safetensors"
       EV=(--set clims.evaluator_weights="$W"); PROBE_EV=(--weights "$W") ;;
  *) echo "EVALUATOR must be offline or lit, got $EVALUATOR" >&2; exit 2 ;;
esac
SEED=${SEED:-0}
S=""; [ "$SEED" = 0 ] || S="_s$SEED"
done_run() { [ -f "$OUT/$1/model.safetensors" ]; }
COMMON=(--set data.root="$D" --set data.classes="$D/classes_voc21.txt" --set backbone=efficientnet_lite0
        --set train.batch_size=8 --set data.crop_size=320 --set threads="$T" --set train.progress=false
        --set freeze_backbone=true --set cache_features=true --set cache_file="$OUT/cache320.pt"
        --set train.log_every=5)
mkdir -p "$OUT"

if [ "$EVALUATOR" = lit ] && ! [ -f "$W" ]; then
  $PYTHON scripts/lit_caption_mix.py "$D" "${FLICKR:-../shared/data/flickr8k-1k}" "$LIT/data"
  $PY train clip --set model.arch=lit --set model.lock_image=true --set model.lock_text=true \
      --set model.cache_features=true --set model.feature_cache="$LIT/features" \
      --set data.train="$LIT/data" --set data.train_split=train --set data.val="$LIT/data" --set data.val_split=val \
      --set train.steps="${LIT_STEPS:-600}" --set train.batch_size=32 --set train.lr=1e-3 --set train.weight_decay=0.1 \
      --set train.warmup_steps=10 --set train.log_every=100 --set train.eval_every=0 --set train.seed=0 \
      --set train.out_dir="$LIT/run" --set train.progress=false --set train.device=cpu --set train.threads="$T"
fi
done_run baseA || $PY train cam "${COMMON[@]}" --set train.steps="$STEPS_A" --set train.lr=0.01 --set train.out_dir="$OUT/baseA"
done_run "base$S" || $PY train cam "${COMMON[@]}" --set train.steps="$STEPS_B" --set train.lr=0.003 \
    --set init="$OUT/baseA/model.safetensors" --set train.seed="$SEED" --set train.out_dir="$OUT/base$S"
# --set wins over the preset wherever it is; epochs=0 keeps the step budget equal to the baseline's
done_run "clims$SUF$S" || $PY train cam "${COMMON[@]}" --preset voc --set mode=clims --set epochs=0 \
    --set train.steps="$STEPS_B" --set train.lr=0.003 --set init="$OUT/baseA/model.safetensors" --set train.seed="$SEED" \
    --set clims.eval_size="$EVAL_SIZE" "${EV[@]}" --set train.out_dir="$OUT/clims$SUF$S"
RUNS=("base$S" "clims$SUF$S")
if [ "${ABLATE:-0}" = 1 ]; then
  for spec in "no_btm 10 0 1 0.2" "no_cbs 10 24 0 0.2" "no_reg 10 24 1 0" "otm_only 10 0 0 0" "no_otm 0 24 1 0.2"; do
    set -- $spec
    done_run "clims${SUF}_$1$S" || $PY train cam "${COMMON[@]}" --preset voc --set mode=clims --set epochs=0 \
        --set train.steps="$STEPS_B" --set train.lr=0.003 --set init="$OUT/baseA/model.safetensors" \
        --set clims.alpha="$2" --set clims.beta="$3" --set clims.gamma="$4" --set clims.delta="$5" \
        --set clims.eval_size="$EVAL_SIZE" "${EV[@]}" --set train.seed="$SEED" --set train.out_dir="$OUT/clims${SUF}_$1$S"
    RUNS+=("clims${SUF}_$1$S")
  done
fi
MAKE=()
for r in "${RUNS[@]}"; do
  [ -f "$OUT/eval_$r.json" ] || MAKE+=(--checkpoint "$OUT/$r/model.safetensors" --out "$OUT/cams_$r")
done
[ ${#MAKE[@]} = 0 ] || $PY cam make "$D" "${MAKE[@]}" --scales "$SCALES" --long-side "$LONG" --threads "$T" --no-progress
for r in "${RUNS[@]}"; do
  [ -f "$OUT/eval_$r.json" ] || $PY cam eval "$D" --cams "$OUT/cams_$r" --masks masks_voc21 --json > "$OUT/eval_$r.json.tmp"
  [ -f "$OUT/eval_$r.json" ] || mv "$OUT/eval_$r.json.tmp" "$OUT/eval_$r.json"
  echo "$r: CAM mIoU $($PYTHON -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['best']['miou'], 'at', d['best_threshold'])" "$OUT/eval_$r.json")"
done
for size in 0 "$EVAL_SIZE"; do  # 0: the evaluator's own input side
  P="$OUT/probe_${EVALUATOR}_$size.json"
  [ -f "$P" ] || $PY cam probe "$D" --masks masks_voc21 "${PROBE_EV[@]}" --size "$size" --threads "$T" --json "$P" > /dev/null
  echo "probe $EVALUATOR (side $size): $($PYTHON -c "import json,sys; d=json.load(open(sys.argv[1])); print('fg over bg', d['fg_vs_bg_accuracy'], '%, right class first', d['fg_top1'], '%, pairs', d['pairs'])" "$P")"
done
