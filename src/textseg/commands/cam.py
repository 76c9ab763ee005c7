"""``textseg cam``: weakly supervised segmentation from image-level labels (CAM baseline and CLIMS).

    textseg cam train  DATA --classes C --mode baseline|clims|baseline+clims --out RUN   (torchrun ok)
    textseg cam make   DATA --checkpoint RUN/cam.safetensors --out CAMS     multi-scale + flip CAMs (.npz)
    textseg cam eval   DATA --cams CAMS [--masks masks_voc21]               mIoU over a threshold sweep
    textseg cam labels DATA --cams CAMS --out PSEUDO [--pamr]               a folder dataset of pseudo masks

DATA is a folder-layout dataset (``labels.json`` + ``images/``), a VOC root or, with ``--labels``,
a COCO instances JSON (``--images`` then names the image folder).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("cam", help="weakly supervised segmentation: train CAMs (baseline / CLIMS), make, eval, labels")
    cmds = p.add_subparsers(dest="cam_command", metavar="STEP", required=True)

    def data_args(q, classes_help="class list: classes.txt or comma list (default DATA/classes.txt)"):
        q.add_argument("data", help="dataset folder (labels.json / VOC root) or labels file")
        q.add_argument("--labels", default="", help="labels file (labels.json or COCO instances JSON)")
        q.add_argument("--images", default="", help="image folder when not DATA/images (COCO: required)")
        q.add_argument("--split", default="", help="use only the ids in DATA/splits/<SPLIT>.txt")
        q.add_argument("--classes", default="", help=classes_help)

    t = cmds.add_parser("train", help="train a CAM network (multi-label baseline and/or CLIMS)")
    data_args(t)
    t.add_argument("--out", default="runs/cam", help="run folder (cam.safetensors, config.yaml, log.jsonl)")
    t.add_argument("--mode", default=None, choices=("baseline", "clims", "baseline+clims"))
    t.add_argument("--backbone", default=None, help="efficientnet_lite0 (default, pretrained) | resnet50 | tiny")
    t.add_argument("--backbone-weights", default=None,
                   help="backbone weights file (e.g. torchvision resnet50 ImageNet .pth/.safetensors)")
    t.add_argument("--init", default=None, help="start from this CAM checkpoint (CLIMS: the baseline's)")
    t.add_argument("--freeze-backbone", action="store_true", help="train only the 1x1 classifier")
    t.add_argument("--cache-features", nargs="?", const="", default=None, metavar="FILE",
                   help="with --freeze-backbone: compute backbone features once (mirroring is the only "
                   "augmentation), optionally stored in / reused from FILE: the fast CPU setting")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--crop-size", type=int, default=None)
    t.add_argument("--evaluator", default=None, help="CLIMS image-text model name (default: offline)")
    t.add_argument("--evaluator-weights", default=None, help="CLIMS evaluator weights file / folder")
    t.add_argument("--background", default=None, help="co-occurring background words: voc | coco | FILE")
    t.add_argument("--hyper", default=None, help="alpha,beta,gamma,delta (OTM, BTM, CBS, REG weights)")
    t.add_argument("--preset", choices=("voc", "coco"), default=None,
                   help="the official CLIMS recipe for VOC or COCO: loss weights, CBS threshold, background "
                   "list, 'player' prompt, optimiser (lr, 10x classifier, poly), batch, epochs, crop; flags win")
    t.add_argument("--cbs-threshold", default=None, help="CBS similarity threshold, or 'none'")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--threads", type=int, default=None, help="torch threads per process")
    t.add_argument("--config", default=None, help="YAML config (textseg.train.clims.CAMTrainCfg)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (e.g. --set clims.eval_size=160); repeatable; flags win")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--json", action="store_true", help="print the summary as JSON")
    t.set_defaults(func=run_train)

    m = cmds.add_parser("make", help="multi-scale + flip CAMs of every image, saved as compressed .npz")
    data_args(m, "unused (the checkpoint holds the classes)")
    m.add_argument("--checkpoint", required=True, action="append",
                   help="CAM checkpoint (RUN/cam.safetensors); repeat with one --out each to make several runs' "
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


# ------------------------------------------------------------------------------------------ train
def run_train(args) -> int:
    from textseg.errors import TextsegError
    from textseg.train.clims import CAMTrainCfg, preset_overrides, train_cam
    from textseg.train.config import load_config

    # precedence: defaults < --config < --preset < --set < flags
    cfg = load_config(CAMTrainCfg, args.config, args.overrides)
    if args.preset:  # the preset's optimiser depends on the stage (mode)
        presets = preset_overrides(args.preset, args.mode or cfg.mode)
        cfg = load_config(CAMTrainCfg, args.config, [*presets, *args.overrides])
    c, d = cfg.clims, cfg.data
    d.root, d.labels, d.images, d.split = args.data, args.labels, args.images, args.split
    if args.classes:
        d.classes = args.classes
    if args.steps is not None:
        cfg.epochs = 0  # an explicit step count wins over the preset's epochs
    simple = {"out": args.out, "mode": args.mode, "backbone": args.backbone, "init": args.init,
              "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
              "threads": args.threads,
              "backbone_weights": args.backbone_weights}
    for k, v in simple.items():
        if v is not None:
            setattr(cfg, k, v)
    if args.crop_size is not None:
        d.crop_size = args.crop_size
    if args.freeze_backbone:
        cfg.freeze_backbone = True
    if args.cache_features is not None:
        cfg.cache_features, cfg.cache_file = True, args.cache_features
    for k, v in {"evaluator": args.evaluator, "evaluator_weights": args.evaluator_weights,
                 "background": args.background}.items():
        if v is not None:
            setattr(c, k, v)
    if args.hyper:
        try:
            c.alpha, c.beta, c.gamma, c.delta = (float(x) for x in args.hyper.split(","))
        except ValueError:
            raise TextsegError(f"--hyper needs four comma-separated numbers, got {args.hyper!r}") from None
    if args.cbs_threshold is not None:
        c.cbs_threshold = None if args.cbs_threshold.lower() == "none" else float(args.cbs_threshold)
    summary = train_cam(cfg, progress=not args.no_progress)
    if summary.get("world_size", 1) > 1 and _rank() != 0:
        return 0
    if args.json:
        print(json.dumps(summary))
    else:
        first, last = summary["first"] or {}, summary["last"] or {}
        print(f"trained {summary['mode']} for {summary['steps']} steps in {summary['seconds']} s: "
              f"loss {first.get('loss', float('nan')):.4f} -> {last.get('loss', float('nan')):.4f}; "
              f"wrote {summary['checkpoint']}")
    return 0


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", 0))


# ------------------------------------------------------------------------------------------- make
def _items(args):
    from textseg.data.image_labels import load_image_labels
    from textseg.data.splits import split_ids

    items = load_image_labels(args.data, args.labels or None, args.images or None)
    if args.split:
        keep = set(split_ids(args.data, args.split))
        items = [it for it in items if it.id in keep]
    return items


def run_make(args) -> int:
    import torch

    from textseg.data.image_labels import multi_hot
    from textseg.errors import TextsegError
    from textseg.io import load_image
    from textseg.models.cam import load_cam
    from textseg.segment.cam_maps import SharedBackbone, image_tensor, multiscale_cam, save_cam_file

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        scales = [float(s) for s in args.scales.split(",")]
    except ValueError:
        raise TextsegError(f"--scales must be comma-separated numbers, got {args.scales!r}") from None
    if len(args.checkpoint) != len(args.out):
        raise TextsegError(f"give one --out per --checkpoint ({len(args.checkpoint)} vs {len(args.out)})")
    models = [load_cam(c).eval() for c in args.checkpoint]
    models = SharedBackbone.group(models)
    items = _items(args)
    outs = [Path(o) for o in args.out]
    for o in outs:
        o.mkdir(parents=True, exist_ok=True)
    it = items
    if not args.no_progress:
        from tqdm import tqdm

        it = tqdm(items, desc="cam make", dynamic_ncols=True)
    for item in it:
        img = load_image(item.path)
        x = image_tensor(img, args.long_side or None)
        for model, out in zip(models, outs):
            keys = None
            if args.keys == "labels":
                keys = torch.nonzero(multi_hot(item.names, model.class_names)).flatten().tolist()
            keys, maps = multiscale_cam(model, x, keys, scales, flip=not args.no_flip)
            save_cam_file(out / f"{item.id}.npz", keys, maps.half(), (img.height, img.width), model.class_names)
        SharedBackbone.clear(models)
    for model, out in zip(models, outs):
        (out / "classes.txt").write_text("\n".join(model.class_names) + "\n")
    print(f"wrote {len(items)} CAM files to {', '.join(map(str, outs))}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------- eval
def parse_thresholds(spec: str) -> list[float]:
    from textseg.errors import TextsegError

    try:
        if ":" in spec:
            a, b, s = (float(x) for x in spec.split(":"))
            n = int(round((b - a) / s)) + 1
            return [round(a + i * s, 6) for i in range(n)]
        return [float(x) for x in spec.split(",")]
    except ValueError:
        raise TextsegError(f"--thresholds must be start:stop:step or a comma list, got {spec!r}") from None


def mask_class_ids(cam_classes: list[str], mask_classes: list[str]):
    """Index in the mask class list of every CAM class (matched like labels)."""
    import numpy as np

    from textseg.data.image_labels import canonical
    from textseg.errors import TextsegError

    index = {canonical(c): i for i, c in enumerate(mask_classes)}
    missing = [c for c in cam_classes if canonical(c) not in index]
    if missing:
        raise TextsegError(f"CAM classes {missing[:5]} are not among the mask classes; evaluate against "
                           "masks of the same class list (e.g. --masks masks_voc21)")
    return np.asarray([index[canonical(c)] for c in cam_classes], dtype=np.int64)


def _mask_classes_file(root: Path, masks: str, explicit: str) -> Path:
    if explicit:
        return Path(explicit)
    if masks.startswith("masks_") and (root / f"classes_{masks[6:]}.txt").is_file():
        return root / f"classes_{masks[6:]}.txt"
    return root / "classes.txt"


def run_eval(args) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from textseg.data.image_labels import class_file_names
    from textseg.errors import TextsegError
    from textseg.segment.cam_maps import ThresholdSweep, load_cam_file

    root, cams = Path(args.data), Path(args.cams)
    files = sorted(cams.glob("*.npz"))
    if args.split:
        from textseg.data.splits import split_ids

        keep = set(split_ids(root, args.split))
        files = [f for f in files if f.stem in keep]
    if not files:
        raise TextsegError(f"{cams}: no .npz CAM files (run `textseg cam make` first)")
    cls_file = _mask_classes_file(root, args.masks, args.mask_classes)
    if not cls_file.is_file():
        raise TextsegError(f"{cls_file}: no class list for the masks (pass --mask-classes)")
    mask_classes = class_file_names(cls_file)
    thresholds = parse_thresholds(args.thresholds)
    sweep = ThresholdSweep(thresholds, len(mask_classes))
    ids = None
    for f in files:
        mpath = root / args.masks / f"{f.stem}.png"
        if not mpath.is_file():
            raise TextsegError(f"{mpath}: no mask for CAM {f.name}")
        target = torch.from_numpy(np.asarray(Image.open(mpath), dtype=np.int64))
        keys, maps, names = load_cam_file(f, tuple(target.shape))
        if ids is None:
            ids = mask_class_ids(names, mask_classes)
        sweep.update(keys, maps, target, ids)
    results = sweep.results()
    best_t, best = max(results, key=lambda r: r[1].miou)
    out = {"images": len(files), "best_threshold": best_t, "best": best.to_dict(mask_classes),
           "sweep": [{"threshold": t, "miou": round(m.miou * 100, 4)} for t, m in results]}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"CAM mIoU over {len(files)} images ({args.masks}, {len(mask_classes)} classes)")
    print("threshold  mIoU")
    for t, m in results:
        mark = "  <- best" if t == best_t else ""
        print(f"{t:9.2f}  {m.miou * 100:5.2f}{mark}")
    print(f"best: mIoU {best.miou * 100:.2f} at background threshold {best_t:.2f}")
    for name, v in zip(mask_classes, best.iou):
        if v == v:
            print(f"  {name:16s} {v * 100:6.2f}")
    return 0


# ----------------------------------------------------------------------------------------- labels
def run_labels(args) -> int:
    import shutil

    import numpy as np
    from PIL import Image

    from textseg.errors import TextsegError
    from textseg.io import load_image
    from textseg.segment.cam_maps import cam_to_mask, load_cam_file

    root, cams, out = Path(args.data), Path(args.cams), Path(args.out)
    files = sorted(cams.glob("*.npz"))
    if not files:
        raise TextsegError(f"{cams}: no .npz CAM files (run `textseg cam make` first)")
    img_dir = Path(args.images) if args.images else root / "images"
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    labels, class_names = {}, None
    it = files
    if not args.no_progress:
        from tqdm import tqdm

        it = tqdm(files, desc="cam labels", dynamic_ncols=True)
    from textseg.data.image_labels import _find_image

    for f in it:
        src = _find_image(img_dir, f.stem)
        if src is None:
            raise TextsegError(f"{img_dir}: no image for CAM {f.name}")
        keys, maps, names = load_cam_file(f)
        class_names = class_names or names
        if args.pamr and len(keys):
            maps = _refine(maps, load_image(src))
        mask = cam_to_mask(keys, maps, args.bg_threshold, ignore_band=args.ignore_band)
        Image.fromarray(mask.numpy().astype(np.uint8), mode="L").save(out / "masks" / f"{f.stem}.png")
        dst = out / "images" / src.name
        if dst.exists() or dst.is_symlink():
            dst.unlink()
        if args.link:
            dst.symlink_to(src.resolve())
        else:
            shutil.copyfile(src, dst)
        labels[f.stem] = [names[k] for k in keys.tolist()]
    (out / "classes.txt").write_text("\n".join(["background", *class_names]) + "\n")
    (out / "labels.json").write_text(json.dumps(labels, indent=1))
    print(f"wrote {len(files)} pseudo masks to {out} (threshold {args.bg_threshold}, "
          f"ignore band {args.ignore_band}, pamr {'on' if args.pamr else 'off'})", file=sys.stderr)
    return 0


def _refine(maps, image):
    """PAMR (pixel-adaptive mask refinement) of ``K' x H x W`` maps with the image's colours, then
    each map re-normalised to a maximum of 1."""
    from textseg.segment.cam_maps import image_tensor
    from textseg.segment.pamr import pamr

    refined = pamr(image_tensor(image)[None], maps[None])[0]
    return refined / (refined.flatten(1).amax(dim=1).view(-1, 1, 1) + 1e-5)
