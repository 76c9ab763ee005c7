#!/usr/bin/env bash
# LSeg on CamVid (EfficientNet-Lite0 + frozen offline MiniLM), CPU recipe, then evaluation on the
# test split with the 11 training labels and with synonyms the model never saw.
#   scripts/lseg_camvid.sh [CAMVID_ROOT] [OUT_DIR]
# The recipe reported in issue 7 (2 shared CPU cores, ~44 min of training): light decoder
# (separable convs, stride 4), half-size training crops, stem + 4 stages frozen, 8 epochs.
set -euo pipefail
DATA=${1:-../shared/data/camvid}
OUT=${2:-runs/lseg_camvid}
# A rerun resumes from the newest checkpoint in $OUT (train.resume=auto).
textseg train lseg --set "data.roots=[$DATA]" --set model.backbone=lite0 --set model.text_encoder=minilm \
  --set model.light=true --set "data.crop=[160,224]" --set "data.scale=[0.4,0.75]" --set train.epochs=8 \
  --set train.batch_size=4 --set train.lr=1e-3 --set model.backbone_lr_mult=0.25 --set data.class_balance=true \
  --set model.freeze_bn=true --set model.freeze_stages=4 --set train.num_workers=1 --set train.threads=1 \
  --set train.eval_every_epochs=3 --set data.eval_scale=0.5 --set model.image_size=180 --set "train.out_dir=$OUT"

printf "sky\nbuilding\npole\nstreet\nsidewalk\ntrees\nsign symbol\nfence\nautomobile\nperson\ncyclist\n" \
  > "$OUT/camvid_synonyms.txt"
for classes in "" "--classes $OUT/camvid_synonyms.txt"; do
  # shellcheck disable=SC2086
  textseg eval --dataset folder --root "$DATA" --split test --model lseg --weights "$OUT/model.safetensors" \
    --short-side 270 --templates none --threshold none $classes
done
