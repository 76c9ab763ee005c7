"""Score many offline-model scoring settings on the tuning splits, each image encoded once.

    .venv/bin/python scripts/tune_offline.py '[{}, {"prior_lift": 0.5}]' [--splits voc21,camvid,coco81]
        [--data ../shared/data] [--heads-dir DIR] [--seg '{"flip": false}'] [--per-class] [--out report.json]

Each entry of the JSON list is a set of :class:`~textseg.models.offline.OfflineCfg` fields applied on
top of the default v2 model (scoring fields only: the image tower, its stride, smoothing and the
short side stay as encoded), with optionally ``"seg": {...}``, predict-time
:class:`~textseg.segment.SegmentCfg` fields (threshold, temperature, min_area...); ``--seg`` sets encoding
ones (flip, scales) for all. The splits are the ones issue 20's settings were chosen on -- never the
held-out ones: COCO-MINI train2017 in its VOC-21 (``voc21``) and COCO-Object (``coco81``) views and
CamVid val (``camvid``). Prints one line per setting (mIoU per split) and, with ``--per-class``, the
IoU of each class on each split. The held-out numbers come from ``scripts/eval_offline_v2.sh``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

SPLITS = {  # name -> (dataset root below --data, split, masks, classes)
    "voc21": ("coco-mini", "train2017", "masks_voc21", "classes_voc21.txt"),
    "camvid": ("camvid", "val", None, None),
    "coco81": ("coco-mini", "train2017", None, None),
}
PREDICT_FIELDS = ("threshold", "temperature", "min_area", "area_threshold", "background_words")  # "seg" entries
ENCODE_FIELDS = ("variant", "channels_last", "output_stride", "float32_blocks", "image_temperature",
                 "global_prior", "smooth", "short_side", "heads")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("settings", help="JSON list of OfflineCfg field overrides (scoring fields)")
    ap.add_argument("--splits", default="voc21,camvid,coco81")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data"))
    ap.add_argument("--heads-dir", default=None, help="a head file folder (build_offline_heads.py --out) to tune")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seg", default="{}", help="JSON SegmentCfg overrides for every setting (e.g. flip)")
    ap.add_argument("--per-class", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from textseg.data.benchmarks import build_dataset
    from textseg.evaluate import SegmenterPredictor
    from textseg.metrics import ConfusionMatrix
    from textseg.text import _CACHES
    from textseg.weights.load import load_model

    settings = json.loads(args.settings)
    bad = sorted({k for s in settings for k in s if k in ENCODE_FIELDS}
                 | {k for s in settings for k in s.get("seg", {}) if k not in PREDICT_FIELDS})
    if bad:
        sys.exit(f"tune_offline: {', '.join(bad)} change the encoding; evaluate them with scripts/eval_offline_v2.sh")
    if args.heads_dir:
        from textseg.models.offline import OfflineModel

        model = OfflineModel(heads_dir=args.heads_dir).eval()
    else:
        model = load_model("offline")
    base = model.cfg
    report: list[dict] = [{"setting": s} for s in settings]
    for split in args.splits.split(","):
        sub, name, masks, classes = SPLITS[split]
        ds = build_dataset("folder", Path(args.data) / sub, split=name, masks=masks, classes=classes)
        pred = SegmenterPredictor(model, ds, **json.loads(args.seg))
        seg_cfg = pred.segmenter.cfg
        cms = [ConfusionMatrix(ds.num_classes, ds.ignore_index) for _ in settings]
        for i in range(len(ds)):
            sample = ds[i]
            prepared = pred.prepare(sample)
            views = pred.encode_batch([prepared])[0]
            for j, s in enumerate(settings):
                s = dict(s)
                over = dict(s.pop("seg", {}))
                if seg_cfg.threshold is None:  # a dataset without background (CamVid): no threshold to set
                    over.pop("threshold", None)
                pred.segmenter.cfg = replace(seg_cfg, **over)  # predict-time SegmentCfg fields
                model.cfg = replace(base, **s)
                _CACHES.pop(model, None)  # text rows depend on the setting
                cms[j].update(pred.finish(sample, prepared, views), sample["mask"])
            model.cfg = base
        for j, cm in enumerate(cms):
            m = cm.compute()
            iou = m.iou
            report[j][split] = round(100 * m.miou, 2)
            report[j][f"{split}_cm"] = cm.mat.tolist()
            report[j][f"{split}_classes"] = list(ds.class_names)
            if args.per_class:
                report[j][f"{split}_iou"] = {n: round(100 * float(v), 1) for n, v in zip(ds.class_names, iou)}
    for r in report:
        print(json.dumps({k: v for k, v in r.items() if not k.endswith(("_iou", "_cm", "_classes"))}))
        if args.per_class:
            for split in args.splits.split(","):
                print(f"  {split}: " + ", ".join(f"{n} {v}" for n, v in r[f"{split}_iou"].items()))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
