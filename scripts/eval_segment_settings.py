"""mIoU of many Segmenter settings in one pass: each image is encoded once per encoding setting and
scored under every label / background / refinement setting from the cached features.

    .venv/bin/python scripts/eval_segment_settings.py --root ../shared/data/coco-mini \
        [--model NAME] [--weights W] [--modes cam] [--flip] [--limit N] [--out report.json]

Reports mIoU (percent, background counted as a class) on COCO-MINI's VOC-21 view for all images
and separately for the train2017 / val2017 halves (from images_meta.json). Background settings:
the background class scored by the word "background" alone vs by SCLIP's stuff words (the shipped
voc21 prompts), with probability thresholds none / the model's default (0.5 if it has none) / 0.7,
plus min-area 2 % and PAMR on the default.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[2] / "shared/data/coco-mini"))
    ap.add_argument("--model", default=None)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--modes", default=None, help="comma-separated dense modes (default: the model's default)")
    ap.add_argument("--short-side", type=int, default=448)
    ap.add_argument("--slide", type=int, nargs=2, default=None)
    ap.add_argument("--flip", action="store_true")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-pamr", action="store_true", help="skip the PAMR setting (the slowest)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from textseg.data.benchmarks import build_dataset
    from textseg.metrics import ConfusionMatrix
    from textseg.segment import SegmentCfg, Segmenter
    from textseg.text import LabelClass
    from textseg.weights.load import load_model

    root = Path(args.root)
    ds = build_dataset("folder", root, masks="masks_voc21", classes="voc21")
    split_of = {m["image"]: m["split"] for m in json.loads((root / "images_meta.json").read_text())}
    model = load_model(args.model, args.weights)
    default_t = getattr(model, "default_background_threshold", None)
    stuff = [LabelClass(n, tuple(p)) for n, p in zip(ds.class_names, ds.class_prompts)]
    plain = [LabelClass(n, (n,)) for n in ds.class_names]
    assert stuff[0].name == "background"
    t_def = default_t if default_t is not None else 0.5
    predict_settings = [
        ("bg=word thr=none", plain, dict(threshold=None)),
        (f"bg=word thr={t_def}", plain, dict(threshold=t_def)),
        ("bg=stuff thr=none", stuff, dict(threshold=None)),
        (f"bg=stuff thr={t_def}", stuff, dict(threshold=t_def)),
        ("bg=stuff thr=0.7", stuff, dict(threshold=0.7)),
        (f"bg=stuff thr={t_def} min_area=0.02", stuff, dict(threshold=t_def, min_area=0.02)),
    ]
    if not args.no_pamr:
        predict_settings.append((f"bg=stuff thr={t_def} pamr", stuff, dict(threshold=t_def, pamr=True)))

    modes = args.modes.split(",") if args.modes else [None]
    n = len(ds) if args.limit is None else min(args.limit, len(ds))
    conf = {}
    t0 = time.time()
    for mode in modes:
        cfg = SegmentCfg(mode=mode, short_side=args.short_side, slide=tuple(args.slide) if args.slide else None,
                         flip=args.flip, templates="imagenet")
        seg = Segmenter(model, cfg)
        for i in tqdm(range(n), desc=f"mode {seg.mode}", file=sys.stderr):
            sample = ds[i]
            seg.set_image(sample["image"])
            split = split_of.get(sample["id"], "unknown")
            for name, labels, kw in predict_settings:
                seg.cfg.threshold = kw["threshold"]
                seg.cfg.min_area = kw.get("min_area", 0.0)
                seg.cfg.pamr = kw.get("pamr", False)
                res = seg.predict(labels)
                pred = torch.from_numpy(res.label_map.astype(np.int64))
                target = torch.from_numpy(np.asarray(sample["mask"]).astype(np.int64))
                for key in ((seg.mode, name, "all"), (seg.mode, name, split)):
                    if key not in conf:
                        conf[key] = ConfusionMatrix(ds.num_classes)
                    conf[key].update(pred, target)
    rows = {}
    for (mode, name, part), cm in conf.items():
        rows.setdefault((mode, name), {})[part] = 100 * float(cm.compute().miou)
    print(f"\nCOCO-MINI VOC-21 view, {n} images, model {getattr(model, 'name', '?')}, short side {args.short_side}, "
          f"slide {args.slide}, flip {args.flip}, {time.time() - t0:.0f} s")
    print(f"{'mode':10s} {'setting':36s} {'all':>6s} {'train':>6s} {'val':>6s}")
    for (mode, name), r in rows.items():
        print(f"{mode:10s} {name:36s} {r.get('all', float('nan')):6.2f} {r.get('train2017', float('nan')):6.2f} "
              f"{r.get('val2017', float('nan')):6.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({f"{m} | {s}": r for (m, s), r in rows.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
