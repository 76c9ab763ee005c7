"""Issue 17: pipeline efficiency of ``textseg eval`` on COCO-MINI (VOC-21 masks) with the offline model.

Measured in one run (never a timed test):

- ``eval``: :func:`textseg.evaluate.evaluate` wall time (reading JPEGs and masks, decode / resize /
  normalise in the background workers, batched tower passes, logits, upsampling, argmax, confusion);
- ``bare``: the image tower alone (``Segmenter._encode``, the same batches of ``cfg.batch_size``
  crops) on the very same already-decoded, resized and normalised tensors, prepared beforehand;
- the same eval with the prefetch only (``--batch-images 1``), the batching only
  (``--decode-workers 0``) and neither (everything in one thread, one image at a time: the baseline).

Efficiency = bare tower seconds / eval seconds (goal >= 90 %: the rest of eval hides behind the tower);
also printed: the share of eval's wall time its tower stage spends inside the model forward
(``SegmenterPredictor.encode_batch``; logits, upsampling, argmax and the confusion counts run in the
finisher thread one group behind, decoding in the prefetch workers). On the shared 2-core machine the
two differ by the CPU the other threads take from the forward.

``OMP_WAIT_POLICY`` is set to ``PASSIVE`` unless already set: on the shared, oversubscribed 2-core
machine libgomp's active spinning made torch's 2-thread main-thread kernels 5-8x slower than the same
kernels with passive waiting (or with a second Python thread alive, which makes libgomp throttle its
spinning), which would flatter the pipeline; with passive waiting every variant runs at the same speed.

    PYTHONPATH=src python benchmarks/bench_pipeline.py [--limit 40] [--workers 1] [--batch 4] [--precision fp32] [--repeats 2]
        [--model offline|vit-b16]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp (see the docstring)

import torch  # noqa: E402

from textseg.data.folder import FolderDataset  # noqa: E402
from textseg.evaluate import SegmenterPredictor, evaluate  # noqa: E402
from textseg.models.clip import CLIP, CLIPConfig  # noqa: E402
from textseg.weights.load import load_model  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "coco-mini"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=os.environ.get("TEXTSEG_COCO_MINI", str(DATA)))
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--model", default="offline", choices=["offline", "vit-b16"],
                    help="the offline default (a light tower: ~0.12 s per image on 2 cores) or a random-weight "
                         "ViT-B/16 CLIP, naclip, whole image (a heavy one, ~1.3 s)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    root = Path(args.root)
    if not (root / "images").is_dir():
        sys.exit(f"COCO-MINI not found at {root} (pass --root)")
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = FolderDataset(root, masks="masks_voc21", classes=str(root / "classes_voc21.txt"))
    if args.model == "vit-b16":
        torch.manual_seed(0)
        model = CLIP(CLIPConfig()).eval()  # ViT-B/16 shapes, random weights (no CLIP weights exist here)
        model.inference_precision = args.precision
        pred = SegmenterPredictor(model, ds, mode="naclip", short_side=448, templates="none")
    else:
        model = load_model(None, None, precision=args.precision)
        pred = SegmenterPredictor(model, ds)
    seg = pred.segmenter
    n = min(args.limit, len(ds))
    seg.segment(ds[0]["image"], pred.labels)  # warm-up: text embeddings cached, kernels initialised

    busy = [0.0]  # seconds the eval's tower stage spends in the model forward (Predictor.encode_batch)
    encode = pred.encode_batch

    def timed_encode(items, encode=encode):
        t = time.perf_counter()
        try:
            return encode(items)
        finally:
            busy[0] += time.perf_counter() - t

    prepared = [seg.prepare(ds[i]["image"]) for i in range(n)]  # the same tensors, decoded beforehand
    variants = {"pipeline": (args.workers, args.batch), "prefetch only": (args.workers, 1),
                "batching only": (0, args.batch), "no pipeline": (0, 1)}
    best = dict.fromkeys(["bare", *variants], float("inf"))
    in_forward = {}  # the best run's share of wall time inside the model forward
    moved = {}  # pixels whose (prediction, truth) cell differs from the first variant's
    base = None
    for _ in range(args.repeats):  # interleaved, best of each: the shared machine's load drifts
        t0 = time.perf_counter()
        for k in range(0, n, args.batch):
            seg.encode_prepared(prepared[k : k + args.batch])
        best["bare"] = min(best["bare"], time.perf_counter() - t0)
        for name, (workers, batch) in variants.items():
            pred.encode_batch, busy[0] = timed_encode, 0.0
            t0 = time.perf_counter()
            res = evaluate(ds, pred, limit=n, progress=False, workers=workers, prefetch_depth=args.prefetch,
                           batch=batch)
            wall = time.perf_counter() - t0
            pred.encode_batch = encode
            if wall < best[name]:
                best[name], in_forward[name] = wall, busy[0] / wall
            base = base or res
            # batched matrix products may round differently from one-image ones (float associativity):
            # with random ViT weights a few near-tied pixels flip (2 of 2.4 M seen); the offline model is exact
            moved[name] = int((res.confusion.mat - base.confusion.mat).abs().sum()) // 2
            assert moved[name] <= 1e-4 * int(base.confusion.mat.sum()), "the pipeline changed the confusion matrix"

    print(f"COCO-MINI VOC-21, {n} images, {args.model} model ({seg.precision}), {seg.cfg.short_side} short side; "
          f"threads {torch.get_num_threads()}, OMP_WAIT_POLICY {os.environ['OMP_WAIT_POLICY']}, workers "
          f"{args.workers}, batch {args.batch}, best of {args.repeats}; mIoU {100 * base.metrics().miou:.2f}")
    print(f"  bare image tower        {best['bare']:7.2f} s  {n / best['bare']:6.2f} img/s (same decoded tensors)")
    for name in variants:
        t = best[name]
        print(f"  eval, {name:17s} {t:7.2f} s  {n / t:6.2f} img/s  efficiency (bare tower / wall) {100 * best['bare'] / t:5.1f} %"
              f"  wall time in the model forward {100 * in_forward[name]:5.1f} %  pixels moved {moved[name]}")
    print(f"  load {os.getloadavg()}")

if __name__ == "__main__":
    main()
