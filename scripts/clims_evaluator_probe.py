"""How well can a CLIMS evaluator tell a masked object from its masked-out background?

For every (image, class present in the ground-truth mask) pair of a folder dataset, the image is
masked with the *ground-truth* mask exactly as CLIMS masks it with a CAM (``fg = x * M``,
``bg = x * (1 - M)``, normalised for the evaluator, square ``--size``) and scored against the class
prompt with :func:`textseg.wsss.clims.similarity`. Reported:

* ``fg_vs_bg_accuracy``: fraction of pairs with ``s(fg, t_k) > s(bg, t_k)``: the ordering OTM and
  BTM rely on (a perfect mask must beat its complement);
* ``fg_top1``: fraction where class ``k`` has the highest similarity of all classes for ``fg``;
* mean ``s(fg)``, ``s(bg)``, ``s(whole image)`` and the fraction of pairs where the full image scores
  at least as high as the masked object (then OTM alone does not reward a tight mask);
* per-class fg-vs-bg accuracy;
* with ``--checkpoint`` (repeatable): the CLIMS loss terms (unweighted, VOC preset unless --hyper)
  computed with the ground-truth masks as ``P`` and with each CAM network's sigmoid maps: an
  objective that scores the ground truth *worse* than a network's maps cannot pull the maps
  towards it.

    .venv/bin/python scripts/clims_evaluator_probe.py ../shared/data/coco-mini --masks masks_voc21 \\
        --classes classes_voc21.txt [--evaluator offline] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from textseg.data.image_labels import class_file_names, prompt_name
from textseg.io import load_image
from textseg.train.cam import load_evaluator
from textseg.wsss.cam_maps import image_tensor
from textseg.wsss.clims import default_template, similarity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data")
    ap.add_argument("--masks", default="masks_voc21")
    ap.add_argument("--classes", default="classes_voc21.txt")
    ap.add_argument("--evaluator", default="offline")
    ap.add_argument("--weights", default="")
    ap.add_argument("--size", type=int, default=0, help="evaluator input side (0: its own)")
    ap.add_argument("--template", default="")
    ap.add_argument("--min-pixels", type=int, default=1, help="skip objects smaller than this (at mask size)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default="")
    ap.add_argument("--checkpoint", action="append", default=[], help="CAM checkpoint(s) to score with CLIMS")
    ap.add_argument("--crop", type=int, default=320, help="CAM network input side for --checkpoint")
    ap.add_argument("--background", default="voc")
    ap.add_argument("--cbs-threshold", type=float, default=0.26)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.data)
    names = class_file_names(root / args.classes)  # incl. background at 0
    fg_names = names[1:]
    ev = load_evaluator(args.evaluator, args.weights)
    template = args.template or default_template(ev)
    text = ev.embed_texts([template.format(prompt_name(c)) for c in fg_names]).float()
    size = args.size or ev.preprocess_cfg.image_size
    mean = torch.tensor(ev.preprocess_cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(ev.preprocess_cfg.std).view(1, 3, 1, 1)

    pairs = []  # (image tensor normalised S x S, mask S x S, class)
    for mpath in sorted((root / args.masks).glob("*.png")):
        mask = np.asarray(Image.open(mpath), dtype=np.int64)
        present = [c for c in np.unique(mask) if 0 < c < 255 and (mask == c).sum() >= args.min_pixels]
        if not present:
            continue
        img_path = next((root / "images").glob(f"{mpath.stem}.*"))
        x = image_tensor(load_image(img_path))[None]
        x = (F.interpolate(x, (size, size), mode="bilinear", align_corners=False) - mean) / std
        m = torch.from_numpy(mask)
        for c in present:
            mk = F.interpolate((m == c).float()[None, None], (size, size), mode="nearest")[0]
            pairs.append((x[0], mk, int(c) - 1))
    t0 = time.time()
    s_fg, s_bg, s_full, top1 = [], [], [], []
    with torch.no_grad():
        for i in range(0, len(pairs), args.batch):
            chunk = pairs[i : i + args.batch]
            x = torch.stack([p[0] for p in chunk])
            m = torch.stack([p[1] for p in chunk])
            k = torch.tensor([p[2] for p in chunk])
            sims = similarity(ev, ev.encode_image(torch.cat([x * m, x * (1 - m), x])), text)
            n = len(chunk)
            r = torch.arange(n)
            s_fg.append(sims[r, k])
            s_bg.append(sims[n + r, k])
            s_full.append(sims[2 * n + r, k])
            top1.append(sims[:n].argmax(dim=1) == k)
    s_fg, s_bg, s_full, top1 = (torch.cat(v) for v in (s_fg, s_bg, s_full, top1))
    ks = torch.tensor([p[2] for p in pairs])
    per_class = {}
    for c, name in enumerate(fg_names):
        sel = ks == c
        if sel.any():
            per_class[name] = {"pairs": int(sel.sum()), "fg_vs_bg_accuracy": round(float((s_fg[sel] > s_bg[sel]).float().mean()) * 100, 1)}
    out = {
        "evaluator": args.evaluator, "template": template, "size": size, "pairs": len(pairs),
        "fg_vs_bg_accuracy": round(float((s_fg > s_bg).float().mean()) * 100, 2),
        "fg_top1": round(float(top1.float().mean()) * 100, 2),
        "mean_sim_fg": round(float(s_fg.mean()), 4), "mean_sim_bg": round(float(s_bg.mean()), 4),
        "mean_sim_full": round(float(s_full.mean()), 4),
        "full_ge_fg": round(float((s_full >= s_fg).float().mean()) * 100, 2),
        "seconds": round(time.time() - t0, 1), "per_class": per_class,
    }
    if args.checkpoint:
        out["clims_terms"] = clims_terms(args, ev, root, fg_names, size)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


def clims_terms(args, ev, root: Path, fg_names: list[str], size: int) -> dict:
    """Unweighted CLIMS terms (pair-weighted means over the set; CBS per pair) with P = ground truth
    and P = each checkpoint's sigmoid maps."""
    from textseg.wsss.clims import CLIMSLoss
    from textseg.wsss.pseudo_labels import load_cam_model

    loss = CLIMSLoss(ev, fg_names, args.background, cbs_threshold=args.cbs_threshold,
                     template=args.template or None, eval_size=size)
    nets = {Path(c).parent.name or c: load_cam_model(c).eval() for c in args.checkpoint}
    sums = {name: dict.fromkeys(("otm", "btm", "cbs", "reg", "pairs"), 0.0) for name in ["ground_truth", *nets]}
    files = sorted((root / args.masks).glob("*.png"))
    with torch.no_grad():
        for i in range(0, len(files), args.batch):
            xs, gts, labels = [], [], []
            for mpath in files[i : i + args.batch]:
                mask = torch.from_numpy(np.asarray(Image.open(mpath), dtype=np.int64))
                img_path = next((root / "images").glob(f"{mpath.stem}.*"))
                x = image_tensor(load_image(img_path))[None]
                xs.append(F.interpolate(x, (args.crop, args.crop), mode="bilinear", align_corners=False)[0])
                onehot = torch.stack([(mask == k + 1).float() for k in range(len(fg_names))])
                gts.append(F.interpolate(onehot[None], (size, size), mode="nearest")[0])
                labels.append((onehot.flatten(1).sum(1) >= args.min_pixels).float())
            x, gt, lab = torch.stack(xs), torch.stack(gts), torch.stack(labels)
            maps = {"ground_truth": gt, **{n: net.maps(net.normalize(x)) for n, net in nets.items()}}
            for name, p in maps.items():
                o = loss(p, x, lab)
                n = o["pairs"]
                for k in ("otm", "btm", "reg"):
                    sums[name][k] += float(o[k]) * n
                sums[name]["cbs"] += float(o["cbs"])
                sums[name]["pairs"] += n
    return {name: {k: round(v / max(s["pairs"], 1), 4) for k, v in s.items() if k != "pairs"} | {"pairs": int(s["pairs"])}
            for name, s in sums.items()}


if __name__ == "__main__":
    main()
