"""Quality of the offline default model on real photos (COCO-MINI VOC-21 / COCO-Object, CamVid).

Two paths:

* ``--engine own`` (default, fast, used for tuning): per-location ImageNet logits of every image are
  computed once (optionally multi-scale + flip) and cached in memory; the bridge / background settings
  are then swept cheaply. Scores -> argmax -> bilinear upsampling of scores -> ConfusionMatrix.
* ``--engine segmenter``: the shared :class:`~textseg.segment.segmenter.Segmenter` runs the model
  unchanged (the numbers to report).

COCO-MINI's split comes from ``images_meta.json`` ("train2017" = tuning half, "val2017" = held out).

    python benchmarks/offline_quality.py --set voc21 --split train2017
    python benchmarks/offline_quality.py --set voc21 --split val2017 --engine segmenter
    python benchmarks/offline_quality.py --set voc21 --heads src/textseg/assets --output-stride 32 --short 448 \
        --bridge '[{"head_weight": 1.0}, {"head_weight": 0.7}]'     # tune the v2 (dense head + bridge)
    python benchmarks/offline_quality.py --engine segmenter --heads src/textseg/assets --set voc21 --split train2017 \
        --bridge '[{}, {"prior_lift": 0.5}, {"seg": {"threshold": 0.45}}]'  # the v2 as shipped, each image encoded once
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from textseg.metrics import ConfusionMatrix  # noqa: E402
from textseg.models.offline import OfflineCfg, OfflineModel  # noqa: E402

DATA = Path(os.environ.get("TEXTSEG_SHARED_DATA", ROOT.parent / "shared" / "data"))


def dataset(which: str, split: str) -> tuple[list[Path], list[Path], list[str]]:
    """(image paths, mask paths, class names) for ``voc21`` / ``coco81`` / ``camvid``."""
    if which in ("voc21", "coco81"):
        root = DATA / "coco-mini"
        meta = json.loads((root / "images_meta.json").read_text())
        ids = sorted(m["image"] for m in meta if split == "all" or m["split"] == split)
        masks, classes = ("masks_voc21", "classes_voc21.txt") if which == "voc21" else ("masks", "classes.txt")
    else:
        root = DATA / "camvid"
        ids = (root / "splits" / f"{split}.txt").read_text().split()
        masks, classes = "masks", "classes.txt"
    names = (root / classes).read_text().split("\n")
    names = [n.strip() for n in names if n.strip()]
    return [root / "images" / f"{i}.jpg" for i in ids], [root / masks / f"{i}.png" for i in ids], names


def to_pixels(img: Image.Image, short: int, stride: int) -> torch.Tensor:
    w, h = img.size
    s = short / min(w, h)
    nh, nw = max(stride, round(h * s / stride) * stride), max(stride, round(w * s / stride) * stride)
    img = img.resize((nw, nh), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    return ((x - 0.5) / 0.5)[None]


@torch.no_grad()
def class_logits(model: OfflineModel, img: Image.Image, shorts: list[int], flip: bool) -> torch.Tensor:
    """``1000 x h x w`` ImageNet logits averaged over scales (and flip), at the first scale's grid."""
    out, ref = None, None
    for short in shorts:
        x = to_pixels(img, short, model.dense_stride)
        views = [x, x.flip(-1)] if flip else [x]
        for i, v in enumerate(views):
            lg = model.class_logits(v)[0].float()
            if i == 1:
                lg = lg.flip(-1)
            if ref is None:
                ref = lg.shape[-2:]
            elif lg.shape[-2:] != ref:
                lg = F.interpolate(lg[None], size=ref, mode="bilinear", align_corners=False)[0]
            out = lg if out is None else out + lg
    return out / (len(shorts) * (2 if flip else 1))


@torch.no_grad()
def lite_features(model: OfflineModel, img: Image.Image, short: int) -> torch.Tensor:
    """``1280 x h x w`` frozen Lite features (``--heads``: the dense head and the bridge both start here)."""
    return model.features(to_pixels(img, short, model.dense_stride))[0].float()


@torch.no_grad()
def evaluate(model: OfflineModel, cache: list[tuple[torch.Tensor, np.ndarray]], labels: list[str],
             image_temperature: float, power: float = 1.0, scale: float = 1.0,
             oracle: bool = False, heads: bool = False) -> ConfusionMatrix:
    text = model.embed_texts(labels)
    cm = ConfusionMatrix(len(labels))
    for logits, mask in cache:
        probs = model.dense_from_features(logits[None]) if heads else model.class_probs(logits[None])
        s = model.scores(probs, text)[0]
        z = torch.log(s + model.cfg.eps) * power
        if scale != 1.0:
            size = (max(1, round(mask.shape[1] * scale)), max(1, round(mask.shape[0] * scale)))
            mask = np.array(Image.fromarray(mask).resize(size, Image.NEAREST))
        z = F.interpolate(z[None], size=mask.shape, mode="bilinear", align_corners=False)[0]
        if oracle:  # only the labels present in the ground truth compete (an upper bound)
            present = torch.zeros(len(labels), dtype=torch.bool)
            present[[c for c in np.unique(mask).tolist() if c < len(labels)]] = True
            present[0] = True
            z[~present] = -1e9
        cm.update(z.argmax(0), torch.from_numpy(mask.astype(np.int64)))
    return cm


def diagnose(model: OfflineModel, cache, names: list[str], k: int = 12) -> None:
    """Mean ImageNet probability over each ground-truth class's pixels (top ``k``)."""
    acc = torch.zeros(len(names), 1000)
    cnt = torch.zeros(len(names))
    for logits, mask in cache:
        p = logits.softmax(0)
        m = torch.from_numpy(np.array(Image.fromarray(mask).resize(p.shape[::-1][:2], Image.NEAREST))).long()
        for c in m.unique().tolist():
            if c < len(names):
                sel = m == c
                acc[c] += p[:, sel].sum(1)
                cnt[c] += sel.sum()
    for c, n in enumerate(names):
        if cnt[c]:
            v, i = (acc[c] / cnt[c]).topk(k)
            print(f"{n} ({int(cnt[c])} cells): " + ", ".join(f"{i_}:{model.class_names[i_]} {v_:.3f}"
                                                           for v_, i_ in zip(v.tolist(), i.tolist())))


# predict-time SegmentCfg fields a --bridge setting may set under "seg" (the others change the encoding: --segment)
PREDICT_FIELDS = ("threshold", "temperature", "min_area", "area_threshold", "background_words")


def run_segmenter(args) -> None:
    """The shared path: textseg.evaluate's SegmenterPredictor (the numbers to report). Per ``--segment`` setting
    each image is encoded once and scored under every ``--bridge`` setting: OfflineCfg scoring fields, plus
    predict-time SegmentCfg fields under ``"seg"`` (each setting embeds its labels once, in its own text cache)."""
    from dataclasses import replace

    from textseg.data.folder import FolderDataset
    from textseg.evaluate import SegmenterPredictor
    from textseg.text import TextEmbeddingCache

    if args.set == "camvid":
        ds = FolderDataset(DATA / "camvid", split=args.split)
    else:
        # COCO-MINI's splits come from its images_meta.json (textseg.data.splits reads it)
        root = DATA / "coco-mini"
        masks, classes = ("masks_voc21", "classes_voc21.txt") if args.set == "voc21" else ("masks", "classes.txt")
        ds = FolderDataset(root, split=None if args.split == "all" else args.split, masks=masks, classes=classes)
    model = OfflineModel(OfflineCfg(variant=args.variant, output_stride=args.output_stride,
                                    heads=args.heads is not None), heads_dir=args.heads)
    settings = json.loads(args.bridge)
    settings = settings if isinstance(settings, list) else [settings]
    bad = sorted({k for st in settings for k in st.get("seg", {}) if k not in PREDICT_FIELDS})
    if bad:
        raise SystemExit(f"{', '.join(bad)}: not predict-time SegmentCfg fields; set them with --segment")
    base = model.cfg  # every setting starts from the model's own (overrides do not accumulate)
    n = len(ds) if not args.limit else min(args.limit, len(ds))
    for ov in (json.loads(args.segment) if args.segment.startswith("[") else [json.loads(args.segment)]):
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in ov.items()}
        pred = SegmenterPredictor(model, ds, **kw)
        seg_cfg = pred.segmenter.cfg
        runs = []  # per setting: (model cfg, segment cfg, text cache, confusion matrix)
        for st in settings:
            seg = {k: v for k, v in st.get("seg", {}).items() if seg_cfg.threshold is not None or k != "threshold"}
            runs.append((replace(base, **{k: v for k, v in st.items() if k != "seg"}), replace(seg_cfg, **seg),
                         TextEmbeddingCache(model), ConfusionMatrix(ds.num_classes, ds.ignore_index)))
        t0 = time.time()
        for i in range(n):
            sample = ds[i]
            prepared = pred.prepare(sample)
            views = pred.encode_batch([prepared])[0]
            for cfg, seg, cache, cm in runs:
                model.cfg, pred.segmenter.cfg, pred.segmenter.text_cache = cfg, seg, cache
                cm.update(pred.finish(sample, prepared, views), sample["mask"])
        model.cfg = base
        for st, (_, _, _, cm) in zip(settings, runs):
            m = cm.compute()
            print(f"[segmenter] {args.set}/{args.split} {ov} {st}: mIoU {100 * m.miou:.2f} pixAcc "
                  f"{100 * m.pixel_accuracy:.2f} ({n} images, {time.time() - t0:.0f} s)", flush=True)
            if args.per_class:
                print("  " + ", ".join(f"{c} {100 * v:.1f}" for c, v in zip(ds.class_names, m.iou) if v == v))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", default="voc21", choices=["voc21", "coco81", "camvid"])
    ap.add_argument("--split", default="train2017")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--variant", default="lite0")
    ap.add_argument("--output-stride", type=int, default=16)
    ap.add_argument("--short", default="480", help="comma-separated short sides (multi-scale)")
    ap.add_argument("--flip", action="store_true")
    ap.add_argument("--temps", default="1.0", help="comma-separated image temperatures to sweep")
    ap.add_argument("--bridge", default="{}", help="JSON dict of OfflineCfg overrides, or a list of them (segmenter "
                    "engine: a setting's \"seg\" dict sets predict-time SegmentCfg fields: threshold, temperature...)")
    ap.add_argument("--background", default="background", help="label used for class 0")
    ap.add_argument("--per-class", action="store_true")
    ap.add_argument("--prior", action="store_true", help="class prior = mean probability over these images")
    ap.add_argument("--oracle", action="store_true", help="restrict to ground-truth image labels")
    ap.add_argument("--eval-scale", type=float, default=1.0, help="score masks downsampled by this (tuning)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, help="file to keep the encoded logits in (reused when present)")
    ap.add_argument("--diagnose", action="store_true", help="print the ImageNet classes that fire per GT class")
    ap.add_argument("--heads", type=Path, default=None,
                    help="own engine: folder of a dense head (offline_heads.*) to score with the bridge; "
                         "the cache then holds Lite features (one scale, no flip)")
    ap.add_argument("--engine", default="own", choices=["own", "segmenter"])
    ap.add_argument("--segment", default="{}", help="JSON SegmentCfg overrides (or a list) for --engine segmenter")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.engine == "segmenter":
        return run_segmenter(args)

    images, masks, names = dataset(args.set, args.split)
    if args.limit:
        images, masks = images[: args.limit], masks[: args.limit]
    labels = list(names)
    if args.set != "camvid":
        labels[0] = args.background
    heads = args.heads is not None
    model = OfflineModel(OfflineCfg(variant=args.variant, output_stride=args.output_stride, heads=heads),
                         heads_dir=args.heads)
    shorts = [int(s) for s in args.short.split(",")]
    t0 = time.time()
    if args.cache and args.cache.is_file():
        cache = [(lg.float(), mk) for lg, mk in torch.load(args.cache, weights_only=False)]
    else:
        cache = []
        for ip, mp in zip(images, masks):
            img = Image.open(ip).convert("RGB")
            enc = lite_features(model, img, shorts[0]) if heads else class_logits(model, img, shorts, args.flip)
            cache.append((enc.half().float(), np.array(Image.open(mp))))
        if args.cache:
            torch.save([(lg.half(), mk) for lg, mk in cache], args.cache)
    enc = time.time() - t0
    if args.diagnose and not heads:
        diagnose(model, cache, names)
    print(f"{args.set}/{args.split}: {len(cache)} images encoded in {enc:.1f} s "
          f"({enc / len(cache):.2f} s/img; {args.variant} os{args.output_stride} short {shorts} flip {args.flip})")
    if args.prior:
        prior = torch.zeros(1000)
        n = 0
        for lg, _ in cache:
            p = model.class_probs(lg[None])[0]
            prior += p.flatten(1).sum(1)
            n += p[0].numel()
        model.class_prior = prior / n
        print("class prior from these images: top", [model.class_names[i] for i in model.class_prior.topk(5).indices])
    overrides = json.loads(args.bridge)
    overrides = overrides if isinstance(overrides, list) else [overrides]
    results = []
    base = model.cfg  # every setting of the sweep starts from the model's own (overrides do not accumulate)
    for ov, temp in itertools.product(overrides, [float(t) for t in args.temps.split(",")]):
        from dataclasses import replace

        model.cfg = replace(base, image_temperature=temp, **ov)
        m = evaluate(model, cache, labels, temp, model.cfg.score_power, args.eval_scale, args.oracle,
                     heads).compute()
        results.append((m.miou, ov, temp))
        print(f"mIoU {100 * m.miou:5.1f}  pixAcc {100 * m.pixel_accuracy:5.1f}  T={temp} {ov}", flush=True)
        if args.per_class:
            print("  " + ", ".join(f"{n} {100 * v:.0f}" for n, v in zip(names, m.iou) if v == v))
    best = max(results, key=lambda r: r[0])
    print(f"best mIoU {100 * best[0]:.1f} with T={best[2]} {best[1]}")


if __name__ == "__main__":
    main()
