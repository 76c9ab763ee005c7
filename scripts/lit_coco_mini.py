"""LiT on COCO-MINI: train projection heads on the offline model's frozen pretrained towers.

EfficientNet-Lite0 (pooled ImageNet features) and MiniLM (sentence embeddings) stay locked; their
features are cached once; only the two linear heads and the logit scale train, with symmetric
InfoNCE, on the 80 train2017 images (5 captions each). Retrieval R@1/5/10 (both directions) and
zero-shot multi-label top-1/top-5 are measured on the 79 held-out val2017 images (split from
``images_meta.json``), before training (random heads) and after, for each seed.

    .venv/bin/python scripts/lit_coco_mini.py --seeds 0 1 2 --steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from textseg.train.clip import ClipRecipeConfig, build_trainer
from textseg.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TEXTSEG_SHARED_DATA", ROOT.parent / "shared" / "data")) / "coco-mini"
KEYS = ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10", "zeroshot_top1", "zeroshot_top5")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default="runs/lit_coco_mini")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for seed in args.seeds:
        cfg = load_config(ClipRecipeConfig, None, [
            "model.arch=lit", "model.lock_image=true", "model.lock_text=true", "model.cache_features=true",
            f"model.feature_cache={args.out}/features",
            f"data.train={DATA}", "data.train_split=train2017", f"data.val={DATA}", "data.val_split=val2017",
            f"train.steps={args.steps}", "train.batch_size=32", "train.lr=1e-3", "train.weight_decay=0.1",
            "train.warmup_steps=10", "train.log_every=50", "train.eval_every=0", f"train.seed={seed}",
            f"train.out_dir={args.out}/seed{seed}", "train.resume=none", "train.progress=false",
            "train.device=cpu",
        ])
        t0 = time.perf_counter()
        trainer = build_trainer(cfg)  # loads the towers, caches train + val features
        t_build = time.perf_counter() - t0
        before = trainer.evaluate()
        t1 = time.perf_counter()
        after = trainer.fit()
        t_train = time.perf_counter() - t1
        rows.append({"seed": seed, "before": before, "after": after, "build_s": t_build, "train_s": t_train})

    def mean(which, k):
        return sum(r[which][k] for r in rows) / len(rows)

    print(f"\nLiT heads on frozen EfficientNet-Lite0 + MiniLM, COCO-MINI val2017 (79 images, 395 captions), "
          f"{args.steps} steps x 32, seeds {args.seeds}")
    print(f"{'metric':<14}{'untrained':>11}{'trained':>10}")
    for k in KEYS:
        print(f"{k:<14}{mean('before', k):>11.1f}{mean('after', k):>10.1f}")
    print(f"time: build + tower features {rows[0]['build_s']:.1f} s (first seed; later seeds reuse the "
          f"feature cache: {sum(r['build_s'] for r in rows[1:]) / max(1, len(rows) - 1):.1f} s), "
          f"training {sum(r['train_s'] for r in rows) / len(rows):.1f} s per seed (incl. final eval + checkpoint)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
