"""Issue 17: Segmenter time at fp32 vs bf16 (and the label-map agreement) for a ViT-B/16 CLIP at 448 x 600,
random weights, one run; prints the ratio measured in this run (never a timed test).

    PYTHONPATH=src python benchmarks/bench_precision.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from textseg.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from textseg.precision import cpu_has_native_bf16
from textseg.segment import SegmentCfg, Segmenter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = CLIPConfig(embed_dim=512, vision=VisionConfig(image_size=224, layers=12, width=768, patch_size=16, heads=12),
                     text=TextConfig(context_length=77, width=512, heads=8, layers=1))
    model = CLIP(cfg).eval()
    img = (np.random.default_rng(0).random((448, 600, 3)) * 255).astype(np.uint8)
    labels = "cat, dog, grass, sky, road, person"
    out = {}
    for prec in ("fp32", "bf16"):
        seg = Segmenter(model, SegmentCfg(short_side=448, templates="none", precision=prec, threshold=None))
        seg.segment(img, labels)  # warm-up (text cache, oneDNN kernels)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = seg.segment(img, labels)
            times.append(time.perf_counter() - t0)
        out[prec] = (min(times), res.label_map)
        print(f"{prec}: best of {args.repeats} = {min(times):.3f} s")
    agree = (out["fp32"][1] == out["bf16"][1]).mean()
    print(f"cpu native bf16: {cpu_has_native_bf16()}; threads {torch.get_num_threads()}; load {os.getloadavg()}")
    print(f"bf16 speed-up over fp32: {out['fp32'][0] / out['bf16'][0]:.2f}x; label-map agreement {100 * agree:.2f}% "
          "(random weights)")


if __name__ == "__main__":
    main()
