"""``textseg cam``: weakly supervised segmentation from image-level labels, after training
(``textseg train cam``, the CAM baseline and CLIMS). The work is in :mod:`textseg.wsss.pseudo_labels`.

    textseg cam make   DATA --checkpoint RUN/model.safetensors --out CAMS   multi-scale + flip CAMs (.npz)
    textseg cam eval   DATA --cams CAMS [--masks masks_voc21]               mIoU over a threshold sweep
    textseg cam labels DATA --cams CAMS --out PSEUDO [--pamr]               a folder dataset of pseudo masks
    textseg cam probe  DATA --weights EVALUATOR [--masks masks_voc21]       can a CLIMS evaluator tell a
                                                                           masked object from its background?

DATA is a folder-layout dataset (``labels.json`` + ``images/``), a VOC root or, with ``--labels``,
a COCO instances JSON (``--images`` then names the image folder).
"""

from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("cam", help="weakly supervised segmentation: CAMs of a trained CAM network (textseg train cam), their eval, pseudo labels")
    cmds = p.add_subparsers(dest="cam_command", metavar="STEP", required=True)

    def data_args(q, classes_help="class list: classes.txt or comma list (default DATA/classes.txt)"):
        q.add_argument("data", help="dataset folder (labels.json / VOC root) or labels file")
        q.add_argument("--labels", default="", help="labels file (labels.json or COCO instances JSON)")
        q.add_argument("--images", default="", help="image folder when not DATA/images (COCO: required)")
        q.add_argument("--split", default="", help="use only the ids in DATA/splits/<SPLIT>.txt")
        q.add_argument("--classes", default="", help=classes_help)

    m = cmds.add_parser("make", help="multi-scale + flip CAMs of every image, saved as compressed .npz")
    data_args(m, "unused (the checkpoint holds the classes)")
    m.add_argument("--checkpoint", required=True, action="append",
                   help="CAM model (RUN/model.safetensors); repeat with one --out each to make several runs' "
                   "CAMs at once (runs sharing a frozen backbone compute its features once)")
    m.add_argument("--out", required=True, action="append", help="folder for <id>.npz (one per --checkpoint)")
    m.add_argument("--scales", default="1.0,0.5,1.5,2.0", help="comma list of scales (default as IRN/CLIMS)")
    m.add_argument("--no-flip", action="store_true")
    m.add_argument("--long-side", type=int, default=0, help="resize images so the long side is this first (0: as is)")
    m.add_argument("--keys", choices=("labels", "predicted"), default="labels",
                   help="which classes get a map: the image labels (WSSS protocol) or the network's predictions")
    m.add_argument("--threads", type=int, default=0)
    m.add_argument("--no-progress", action="store_true")
    m.set_defaults(func=run_make)

    e = cmds.add_parser("eval", help="CAM mIoU against masks over a sweep of background thresholds")
    e.add_argument("data", help="dataset folder with masks")
    e.add_argument("--cams", required=True, help="folder written by `textseg cam make`")
    e.add_argument("--masks", default="masks", help="mask folder under DATA (e.g. masks_voc21)")
    e.add_argument("--mask-classes", default="", help="classes of the masks (default: DATA/classes.txt, or "
                   "DATA/classes_<suffix>.txt for masks_<suffix>)")
    e.add_argument("--thresholds", default="0.05:0.95:0.05", help="start:stop:step or comma list")
    e.add_argument("--split", default="")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=run_eval)

    lab = cmds.add_parser("labels", help="pseudo masks from CAMs -> a folder dataset (images/, masks/, classes.txt)")
    lab.add_argument("data", help="dataset folder (for the images)")
    lab.add_argument("--cams", required=True)
    lab.add_argument("--out", required=True)
    lab.add_argument("--images", default="", help="image folder when not DATA/images")
    lab.add_argument("--bg-threshold", type=float, default=0.15)
    lab.add_argument("--ignore-band", type=float, default=0.0,
                     help="pixels whose best score is within this of the threshold become 255 (ignored)")
    lab.add_argument("--pamr", action="store_true", help="refine the maps with PAMR before thresholding")
    lab.add_argument("--link", action="store_true", help="symlink images instead of copying them")
    lab.add_argument("--no-progress", action="store_true")
    lab.set_defaults(func=run_labels)

    pr = cmds.add_parser("probe", help="how well a CLIMS evaluator tells a ground-truth-masked object from its "
                         "masked-out background (textseg.wsss.probe)")
    pr.add_argument("data", help="folder dataset with images/ and masks")
    pr.add_argument("--masks", default="masks", help="mask folder under DATA (e.g. masks_voc21)")
    pr.add_argument("--classes", default="", help="class list of the masks, background first (default: "
                    "DATA/classes_<suffix>.txt for masks_<suffix>, else DATA/classes.txt)")
    pr.add_argument("--evaluator", default="", help="model name (default: offline unless --weights)")
    pr.add_argument("--weights", default="", help="evaluator weights file / folder (e.g. a CLIP's model.safetensors)")
    pr.add_argument("--size", type=int, default=0, help="evaluator input side (0: its own)")
    pr.add_argument("--template", default="", help="prompt template (default: CLIMS' 'a photo of {}.'; offline '{}')")
    pr.add_argument("--min-pixels", type=int, default=1, help="skip objects smaller than this")
    pr.add_argument("--batch", type=int, default=16)
    pr.add_argument("--checkpoint", action="append", default=[],
                    help="CAM model(s) whose sigmoid maps also get the CLIMS terms, beside the ground truth")
    pr.add_argument("--crop", type=int, default=320, help="CAM input side for --checkpoint")
    pr.add_argument("--background", default="voc", help="CBS words for --checkpoint: voc | coco | FILE")
    pr.add_argument("--cbs-threshold", type=float, default=0.26)
    pr.add_argument("--threads", type=int, default=0)
    pr.add_argument("--json", default="", help="also write the result here")
    pr.set_defaults(func=run_probe)


# ---------------------------------------------------------------------------------------- steps
def run_make(args) -> int:
    import torch

    from textseg.errors import TextsegError
    from textseg.wsss.pseudo_labels import labelled_items, load_cam_model, make_cams

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        scales = [float(s) for s in args.scales.split(",")]
    except ValueError:
        raise TextsegError(f"--scales must be comma-separated numbers, got {args.scales!r}") from None
    if len(args.checkpoint) != len(args.out):
        raise TextsegError(f"give one --out per --checkpoint ({len(args.checkpoint)} vs {len(args.out)})")
    models = [load_cam_model(c) for c in args.checkpoint]
    items = labelled_items(args.data, args.labels, args.images, args.split)
    n = make_cams(models, items, args.out, scales, flip=not args.no_flip, long_side=args.long_side or None,
                  keys=args.keys, progress=not args.no_progress)
    print(f"wrote {n} CAM files to {', '.join(args.out)}", file=sys.stderr)
    return 0


def run_eval(args) -> int:
    from textseg.wsss.pseudo_labels import evaluate_cams

    out = evaluate_cams(args.data, args.cams, args.masks, args.mask_classes, args.thresholds, args.split)
    best, best_t, classes = out.pop("best_metrics"), out["best_threshold"], out.pop("classes")
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"CAM mIoU over {out['images']} images ({args.masks}, {len(classes)} classes)")
    print("threshold  mIoU")
    for row in out["sweep"]:
        mark = "  <- best" if row["threshold"] == best_t else ""
        print(f"{row['threshold']:9.2f}  {row['miou']:5.2f}{mark}")
    print(f"best: mIoU {best.miou * 100:.2f} at background threshold {best_t:.2f}")
    for name, v in zip(classes, best.iou):
        if v == v:
            print(f"  {name:16s} {v * 100:6.2f}")
    return 0


def run_labels(args) -> int:
    from textseg.wsss.pseudo_labels import write_pseudo_labels

    n = write_pseudo_labels(args.data, args.cams, args.out, args.images, args.bg_threshold, args.ignore_band,
                            pamr=args.pamr, link=args.link, progress=not args.no_progress)
    print(f"wrote {n} pseudo masks to {args.out} (threshold {args.bg_threshold}, "
          f"ignore band {args.ignore_band}, pamr {'on' if args.pamr else 'off'})", file=sys.stderr)
    return 0


def run_probe(args) -> int:
    from pathlib import Path

    import torch

    from textseg.train.cam import load_evaluator
    from textseg.wsss.probe import clims_terms, probe_evaluator
    from textseg.wsss.pseudo_labels import mask_classes_file

    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.data)
    classes = str(mask_classes_file(root, args.masks, args.classes).relative_to(root)) if not args.classes \
        else args.classes
    ev = load_evaluator(args.evaluator or ("" if args.weights else "offline"), args.weights)
    out = {"evaluator": args.evaluator or args.weights or "offline",
           **probe_evaluator(root, ev, args.masks, classes, args.size, args.template, args.min_pixels, args.batch)}
    if args.checkpoint:
        out["clims_terms"] = clims_terms(root, ev, args.checkpoint, args.masks, classes, args.background,
                                         args.cbs_threshold, args.template, args.size, args.crop, args.min_pixels,
                                         args.batch)
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0
