"""How well can a CLIMS evaluator tell a masked object from its masked-out background?

``textseg cam probe DATA --weights EVALUATOR`` (or :func:`probe_evaluator`). For every (image, class
present in the ground-truth mask) pair of a folder dataset, the image is masked with the
*ground-truth* mask as CLIMS masks it with a CAM (``fg = x * M``, ``bg = x * (1 - M)``, normalised
for the evaluator, square side ``size``) and scored against the class prompt with
:func:`textseg.wsss.clims.similarity`. Reported:

* ``fg_vs_bg_accuracy``: % of pairs with ``s(fg, t_k) > s(bg, t_k)``: the ordering OTM and BTM rely
  on (a perfect mask must beat its complement);
* ``fg_top1``: % of pairs where class ``k`` is the best of all classes for ``fg`` (right class first);
* mean ``s(fg)``, ``s(bg)``, ``s(whole image)`` and ``full_ge_fg``, the % of pairs where the full image
  scores at least as high as the masked object (then OTM alone does not reward a tight mask);
* per-class fg-vs-bg accuracy;
* with ``checkpoints``: the CLIMS loss terms (unweighted) computed with the ground-truth masks as
  ``P`` and with each CAM network's sigmoid maps (:func:`clims_terms`): an objective that scores
  the ground truth *worse* than a network's maps cannot pull the maps towards it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from textseg.data.image_labels import _find_image, class_file_names, prompt_name
from textseg.errors import TextsegError
from textseg.io import load_image
from textseg.models.base import DualEncoder
from textseg.wsss.cam_maps import image_tensor
from textseg.wsss.clims import default_template, similarity


def _read_mask(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path), dtype=np.int64)


def _image_of(root: Path, stem: str) -> Path:
    p = _find_image(root / "images", stem)
    if p is None:
        raise TextsegError(f"{root / 'images'}: no image for mask {stem}")
    return p


def probe_evaluator(root: str | Path, evaluator: DualEncoder, masks: str = "masks", classes: str = "classes.txt",
                    size: int = 0, template: str = "", min_pixels: int = 1, batch: int = 16) -> dict:
    """The probe (module docstring) of ``evaluator`` on ``root/masks/*.png`` (class ids of
    ``root/classes``, background first; 255 ignored)."""
    root = Path(root)
    names = class_file_names(root / classes)
    fg_names = names[1:]
    template = template or default_template(evaluator)
    with torch.no_grad():
        text = evaluator.embed_texts([template.format(prompt_name(c)) for c in fg_names]).float()
    size = size or evaluator.preprocess_cfg.image_size
    mean = torch.tensor(evaluator.preprocess_cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(evaluator.preprocess_cfg.std).view(1, 3, 1, 1)
    pairs = []  # (image tensor normalised S x S, mask 1 x S x S, class)
    files = sorted((root / masks).glob("*.png"))
    if not files:
        raise TextsegError(f"{root / masks}: no .png masks")
    for mpath in files:
        mask = _read_mask(mpath)
        present = [c for c in np.unique(mask) if 0 < c < 255 and (mask == c).sum() >= min_pixels]
        if not present:
            continue
        x = image_tensor(load_image(_image_of(root, mpath.stem)))[None]
        x = (F.interpolate(x, (size, size), mode="bilinear", align_corners=False) - mean) / std
        m = torch.from_numpy(mask)
        for c in present:
            mk = F.interpolate((m == c).float()[None, None], (size, size), mode="nearest")[0]
            pairs.append((x[0], mk, int(c) - 1))
    if not pairs:
        raise TextsegError(f"{root / masks}: no object of the class list in any mask")
    t0 = time.time()
    s_fg, s_bg, s_full, top1 = [], [], [], []
    with torch.no_grad():
        for i in range(0, len(pairs), batch):
            chunk = pairs[i : i + batch]
            x = torch.stack([p[0] for p in chunk])
            m = torch.stack([p[1] for p in chunk])
            k = torch.tensor([p[2] for p in chunk])
            sims = similarity(evaluator, evaluator.encode_image(torch.cat([x * m, x * (1 - m), x])), text)
            n, r = len(chunk), torch.arange(len(chunk))
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
            per_class[name] = {"pairs": int(sel.sum()),
                               "fg_vs_bg_accuracy": round(float((s_fg[sel] > s_bg[sel]).float().mean()) * 100, 1)}
    return {
        "template": template, "size": size, "pairs": len(pairs),
        "fg_vs_bg_accuracy": round(float((s_fg > s_bg).float().mean()) * 100, 2),
        "fg_top1": round(float(top1.float().mean()) * 100, 2),
        "mean_sim_fg": round(float(s_fg.mean()), 4), "mean_sim_bg": round(float(s_bg.mean()), 4),
        "mean_sim_full": round(float(s_full.mean()), 4),
        "full_ge_fg": round(float((s_full >= s_fg).float().mean()) * 100, 2),
        "seconds": round(time.time() - t0, 1), "per_class": per_class,
    }


def clims_terms(root: str | Path, evaluator: DualEncoder, checkpoints: Sequence[str | Path], masks: str = "masks",
                classes: str = "classes.txt", background: str = "voc", cbs_threshold: float | None = 0.26,
                template: str = "", size: int = 0, crop: int = 320, min_pixels: int = 1, batch: int = 16) -> dict:
    """Unweighted CLIMS terms (pair-weighted means over the set; CBS per pair) with ``P`` = the
    ground truth and ``P`` = each checkpoint's sigmoid maps."""
    from textseg.wsss.clims import CLIMSLoss
    from textseg.wsss.pseudo_labels import load_cam_model

    root = Path(root)
    fg_names = class_file_names(root / classes)[1:]
    size = size or evaluator.preprocess_cfg.image_size
    loss = CLIMSLoss(evaluator, fg_names, background, cbs_threshold=cbs_threshold, template=template or None,
                     eval_size=size)
    nets = {Path(c).parent.name or str(c): load_cam_model(c).eval() for c in checkpoints}
    sums = {name: dict.fromkeys(("otm", "btm", "cbs", "reg", "pairs"), 0.0) for name in ["ground_truth", *nets]}
    files = sorted((root / masks).glob("*.png"))
    with torch.no_grad():
        for i in range(0, len(files), batch):
            xs, gts, labels = [], [], []
            for mpath in files[i : i + batch]:
                mask = torch.from_numpy(_read_mask(mpath))
                x = image_tensor(load_image(_image_of(root, mpath.stem)))[None]
                xs.append(F.interpolate(x, (crop, crop), mode="bilinear", align_corners=False)[0])
                onehot = torch.stack([(mask == k + 1).float() for k in range(len(fg_names))])
                gts.append(F.interpolate(onehot[None], (size, size), mode="nearest")[0])
                labels.append((onehot.flatten(1).sum(1) >= min_pixels).float())
            x, gt, lab = torch.stack(xs), torch.stack(gts), torch.stack(labels)
            maps = {"ground_truth": gt, **{n: net.maps(net.normalize(x)) for n, net in nets.items()}}
            for name, p in maps.items():
                o = loss(p, x, lab)
                n = o["pairs"]
                for k in ("otm", "btm", "reg"):
                    sums[name][k] += float(o[k]) * n
                sums[name]["cbs"] += float(o["cbs"])
                sums[name]["pairs"] += n
    return {name: {k: round(v / max(s["pairs"], 1), 4) for k, v in s.items() if k != "pairs"}
            | {"pairs": int(s["pairs"])} for name, s in sums.items()}
