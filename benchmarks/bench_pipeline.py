"""Issue 17: pipeline efficiency of ``textseg eval`` on COCO-MINI (VOC-21 masks) with the offline model.

Measured in one run (never a timed test):

- ``eval``: :func:`textseg.evaluate.evaluate` wall time (reading JPEGs and masks, decode / resize /
  normalise in the background workers, batched tower passes, logits, upsampling, argmax, confusion);
- ``bare``: the image tower alone (``Segmenter._encode``, the same batches of ``cfg.batch_size``
  crops) on the very same already-decoded, resized and normalised tensors, prepared beforehand;
- ``no pipeline``: ``evaluate`` with ``--decode-workers 0 --batch-images 1`` (everything in one
  thread, one image at a time), the baseline.

Efficiency = bare tower seconds / eval seconds (goal >= 90 %: the rest of eval hides behind the tower).

``OMP_WAIT_POLICY`` is set to ``PASSIVE`` unless already set: on the shared, oversubscribed 2-core
machine libgomp's active spinning made torch's 2-thread main-thread kernels 5-8x slower than the same
kernels with passive waiting (or with a second Python thread alive, which makes libgomp throttle its
spinning), which would flatter the pipeline; with passive waiting every variant runs at the same speed.

    PYTHONPATH=src python benchmarks/bench_pipeline.py [--limit 40] [--workers 1] [--batch 4] [--precision fp32] [--repeats 2]
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
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    root = Path(args.root)
    if not (root / "images").is_dir():
        sys.exit(f"COCO-MINI not found at {root} (pass --root)")
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = FolderDataset(root, masks="masks_voc21", classes=str(root / "classes_voc21.txt"))
    model = load_model(None, None, precision=args.precision)
    pred = SegmenterPredictor(model, ds)
    seg = pred.segmenter
    n = min(args.limit, len(ds))
    seg.segment(ds[0]["image"], pred.labels)  # warm-up: text embeddings cached, kernels initialised

    prepared = [seg.prepare(ds[i]["image"]) for i in range(n)]  # the same tensors, decoded beforehand
    t_eval = t_plain = t_bare = float("inf")
    for _ in range(args.repeats):  # interleaved, best of each: the shared machine's load drifts
        t0 = time.perf_counter()
        for k in range(0, n, args.batch):
            seg.encode_prepared(prepared[k : k + args.batch])
        t_bare = min(t_bare, time.perf_counter() - t0)
        t0 = time.perf_counter()
        res = evaluate(ds, pred, limit=n, progress=False, workers=args.workers, prefetch_depth=args.prefetch,
                       batch=args.batch)
        t_eval = min(t_eval, time.perf_counter() - t0)
        t0 = time.perf_counter()
        base = evaluate(ds, pred, limit=n, progress=False, workers=0, batch=1)
        t_plain = min(t_plain, time.perf_counter() - t0)
        assert torch.equal(res.confusion.mat, base.confusion.mat), "the pipeline changed the confusion matrix"

    print(f"COCO-MINI VOC-21, {n} images, offline model ({seg.precision}), {seg.cfg.short_side} short side; "
          f"threads {torch.get_num_threads()}, OMP_WAIT_POLICY {os.environ['OMP_WAIT_POLICY']}, workers {args.workers}, batch {args.batch}, best of {args.repeats}; load {os.getloadavg()}")
    print(f"eval (pipeline):    {t_eval:7.2f} s  {n / t_eval:6.2f} img/s  mIoU {100 * res.metrics().miou:.2f}")
    print(f"eval (no pipeline): {t_plain:7.2f} s  {n / t_plain:6.2f} img/s")
    print(f"bare image tower:   {t_bare:7.2f} s  {n / t_bare:6.2f} img/s (same decoded tensors)")
    print(f"pipeline efficiency (tower time / eval wall time): {100 * t_bare / t_eval:.1f} % "
          f"(without the pipeline: {100 * t_bare / t_plain:.1f} %)")


if __name__ == "__main__":
    main()
