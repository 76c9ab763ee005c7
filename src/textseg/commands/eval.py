"""``textseg eval``: mIoU of a model (or the ground truth itself) on a segmentation benchmark.

    textseg eval --dataset folder --root data/coco-mini --masks masks_voc21 --classes classes_voc21.txt
    textseg eval --dataset voc --root VOCdevkit --weights ViT-B-16.pt --protocol naclip --out voc.json
    torchrun --nproc_per_node 2 -m textseg.cli eval --dataset ade --root ADEChallengeData2016 ...

Shards images over ``torchrun`` processes (gloo on CPU, nccl on GPU) and reduces the confusion
matrices, so the numbers equal a single-process run. ``--model oracle`` scores the ground truth
against itself (100.0: a check of the reader and the metric).
"""

from __future__ import annotations

import argparse
import json
import sys

from textseg.commands import (
    add_pipeline_arguments,
    add_precision_argument,
    add_templates_argument,
    threshold_type,
)
from textseg.data import DATASETS

# Past this fraction of failed images the run exits with code 1 (the mIoU would not be the benchmark's).
DEFAULT_MAX_FAILED = 0.05


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate mIoU on a benchmark dataset (torchrun-shardable)",
                       description=__doc__.split("\n\n")[0])
    d = p.add_argument_group("data")
    d.add_argument("--dataset", required=True, choices=DATASETS, help="benchmark layout of --root")
    d.add_argument("--root", required=True, help="dataset folder as downloaded (see textseg.data.*)")
    d.add_argument("--split", default=None, help="split (default: the benchmark's evaluation split; "
                   "folder: all images, or splits/<split>.txt)")
    d.add_argument("--masks", default=None, help="folder layout: mask folder (default masks)")
    d.add_argument("--classes", default=None, help="class-name file overriding the shipped one (the "
                   "labels-file format: one class a line, 'name: prompt; prompt') or a shipped list name "
                   "(voc21, ade150, ...)")
    d.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N images only")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, help="model name (default: the offline model); 'oracle' = "
                   "ground truth as prediction")
    m.add_argument("--weights", default=None, help="checkpoint file or folder (any supported format)")
    m.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    m.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: torch's; "
                   "under torchrun on CPU: cores / processes). On a busy machine 1 thread per process "
                   "(and torchrun for parallelism) is far faster than several threads in one process")
    m.add_argument("--protocol", default=None, metavar="NAME[:BENCHMARK]",
                   help="published settings preset: sclip or naclip (per benchmark short side, crop, stride, "
                   "threshold, logit scale, PAMR); folder datasets borrow one, e.g. naclip:voc")
    m.add_argument("--mode", default=None, help="dense mode of the model (e.g. naclip, sclip, maskclip)")
    add_precision_argument(m)
    m.add_argument("--slide", type=int, nargs=2, metavar=("CROP", "STRIDE"), default=None,
                   help="sliding-window crop and stride")
    m.add_argument("--short-side", type=int, default=None, help="resize short side to S pixels")
    m.add_argument("--threshold", type=threshold_type, default=None,
                   help="background threshold on the best class probability (number, auto, none)")
    m.add_argument("--pamr", action=argparse.BooleanOptionalAction, default=None,
                   help="refine logits with PAMR (default: the protocol's, else the model's own)")
    add_templates_argument(m, None)  # None: the protocol's templates, else SegmentCfg's (imagenet)
    add_pipeline_arguments(m)
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="write the JSON report here")
    o.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    o.add_argument("--dump-worst", nargs=2, metavar=("K", "DIR"), default=None,
                   help="write predictions / ground truth / overlays of the K worst images to DIR")
    o.add_argument("--strict", action="store_true", help="stop at the first per-image error")
    o.add_argument("--max-failed", type=float, default=DEFAULT_MAX_FAILED, metavar="FRACTION",
                   help="exit with code 1 when more than this fraction of the images failed (default "
                   f"{DEFAULT_MAX_FAILED:g}; the report is still written)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from textseg.distributed import cleanup, init_distributed
    from textseg.errors import TextsegError
    from textseg.evaluate import format_table, run_benchmark
    from textseg.io import write_text

    info = init_distributed(args.device, share_cpu_threads=True)
    rank, device = info.rank, info.device
    if args.threads is not None:
        if args.threads < 1:
            raise TextsegError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    keep, dump = 5, None  # the report always names the 5 worst images
    if args.dump_worst:
        try:
            keep = int(args.dump_worst[0])
        except ValueError:
            raise TextsegError(f"--dump-worst K DIR: K must be an integer, got {args.dump_worst[0]!r}") from None
        dump = args.dump_worst[1]
    options = {} if args.model == "oracle" else dict(
        protocol=args.protocol, mode=args.mode, slide=tuple(args.slide) if args.slide else None,
        short_side=args.short_side, threshold=args.threshold, pamr=args.pamr, templates=args.templates)
    result, report, warnings = run_benchmark(
        args.dataset, args.root, split=args.split, masks=args.masks, classes=args.classes, model=args.model,
        weights=args.weights, device=device, precision=args.precision, limit=args.limit, strict=args.strict, progress=not args.no_progress,
        keep_worst=keep, dump_worst=dump, workers=args.decode_workers, prefetch_depth=args.prefetch,
        batch=args.batch_images, cast_weights=args.cast_weights, **options)
    if rank == 0:
        for w in warnings:
            print(f"textseg eval: warning: {w}", file=sys.stderr)
        if args.out:
            write_text(args.out, json.dumps(report, indent=2))
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print(format_table(result))
            for e in result.errors[:20]:
                print(f"error: {e['error']}", file=sys.stderr)
            if len(result.errors) > 20:
                print(f"... and {len(result.errors) - 20} more errors (see --out)", file=sys.stderr)
    cleanup()
    attempted = result.images + len(result.errors)
    failed = len(result.errors) / max(1, attempted)
    if result.images == 0 or failed > args.max_failed:
        if rank == 0:
            print(f"textseg eval: {len(result.errors)} of {attempted} images failed "
                  f"(more than --max-failed {args.max_failed:g})" if result.images else
                  "textseg eval: no image was evaluated", file=sys.stderr)
        return 1
    return 0

