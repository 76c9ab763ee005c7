#!/usr/bin/env bash
# LSeg on CamVid (EfficientNet-Lite0 + frozen offline MiniLM), CPU recipe, then evaluation on the
# test split with the 11 training labels and with synonyms the model never saw.
#   scripts/lseg_camvid.sh [CAMVID_ROOT] [OUT_DIR]
# The recipe reported in issue 7 (2 shared CPU cores, ~44 min of training): light decoder
# (separable convs, stride 4), half-size training crops, stem + 4 stages frozen, 8 epochs.
set -euo pipefail
DATA=${1:-../shared/data/camvid}
OUT=${2:-runs/lseg_camvid}
textseg train lseg --data "$DATA" --backbone lite0 --text-encoder minilm --light \
  --crop 160 224 --scale 0.4 0.75 --epochs 8 --batch-size 4 --lr 1e-3 --backbone-lr-mult 0.25 \
  --class-balance --freeze-bn --freeze-stages 4 --workers 1 --threads 1 \
  --val-every 3 --eval-scale 0.5 --image-size 180 --out "$OUT" --resume

printf "sky\nbuilding\npole\nstreet\nsidewalk\ntrees\nsign symbol\nfence\nautomobile\nperson\ncyclist\n" \
  > "$OUT/camvid_synonyms.txt"
for classes in "" "--classes $OUT/camvid_synonyms.txt"; do
  # shellcheck disable=SC2086
  textseg eval --dataset folder --root "$DATA" --split test --model lseg --weights "$OUT/model.safetensors" \
    --short-side 270 --templates none --threshold none $classes
done
