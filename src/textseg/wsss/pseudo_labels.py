"""From a trained CAM network to pseudo masks: CAM files, their threshold sweep, pseudo-label datasets.

* :func:`make_cams` multi-scale + flip CAMs of every image, one ``.npz`` each (``textseg cam make``).
* :func:`evaluate_cams` mIoU against ground-truth masks over a sweep of background thresholds
  (``textseg cam eval``).
* :func:`write_pseudo_labels` a folder dataset (``images/``, ``masks/``, ``classes.txt``,
  ``labels.json``) of thresholded, optionally PAMR-refined CAMs (``textseg cam labels``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from textseg.data.image_labels import (
    _find_image,
    canonical,
    class_file_names,
    load_image_labels,
    multi_hot,
)
from textseg.data.splits import split_ids
from textseg.errors import CheckpointError, TextsegError
from textseg.io import load_image
from textseg.wsss.cam import CAMNet, load_cam
from textseg.wsss.cam_maps import (
    SharedBackbone,
    ThresholdSweep,
    cam_to_mask,
    image_tensor,
    load_cam_file,
    multiscale_cam,
    save_cam_file,
)


def load_cam_model(path: str | Path) -> CAMNet:
    """A CAM network from a native model file (``textseg train cam``'s ``model.safetensors``) or an
    older :func:`~textseg.wsss.cam.save_cam` file."""
    try:
        return load_cam(path)
    except CheckpointError as e:
        if "not a textseg CAM" not in str(e):
            raise
    from textseg.weights.load import load_model

    model = load_model(weights=str(path))
    if not isinstance(model, CAMNet):
        raise CheckpointError(f"{path}: a {getattr(model, 'name', type(model).__name__)} model, not a CAM network")
    return model


def labelled_items(root, labels: str = "", images: str = "", split: str = ""):
    """The labelled images of a dataset (``labels.json`` folder, VOC root or COCO JSON), optionally
    restricted to a split."""
    items = load_image_labels(root, labels or None, images or None)
    if split:
        keep = set(split_ids(root, split))
        items = [it for it in items if it.id in keep]
    return items


def make_cams(models: Sequence[CAMNet], items, outs: Sequence[str | Path], scales: Sequence[float] = (1.0, 0.5, 1.5, 2.0),
              flip: bool = True, long_side: int | None = None, keys: str = "labels", progress: bool = False) -> int:
    """Write ``<out>/<id>.npz`` for every item and model (``outs[i]`` for ``models[i]``) and
    ``<out>/classes.txt``. ``keys``: ``"labels"`` (the image label's classes, the WSSS protocol) or
    ``"predicted"`` (the network's multi-label head). Models sharing a frozen backbone compute its
    features once. Returns the number of images."""
    if len(models) != len(outs):
        raise TextsegError(f"give one output folder per CAM model ({len(models)} vs {len(outs)})")
    if keys not in ("labels", "predicted"):
        raise TextsegError(f"keys must be 'labels' or 'predicted', got {keys!r}")
    models = SharedBackbone.group([m.eval() for m in models])
    outs = [Path(o) for o in outs]
    for o in outs:
        o.mkdir(parents=True, exist_ok=True)
    it = items
    if progress:
        from tqdm import tqdm

        it = tqdm(items, desc="cam make", dynamic_ncols=True)
    for item in it:
        img = load_image(item.path)
        x = image_tensor(img, long_side or None)
        for model, out in zip(models, outs):
            idx = None
            if keys == "labels":
                idx = torch.nonzero(multi_hot(item.names, model.class_names)).flatten().tolist()
            idx, maps = multiscale_cam(model, x, idx, scales, flip=flip)
            save_cam_file(out / f"{item.id}.npz", idx, maps.half(), (img.height, img.width), model.class_names)
        SharedBackbone.clear(models)
    for model, out in zip(models, outs):
        (out / "classes.txt").write_text("\n".join(model.class_names) + "\n")
    return len(items)


def parse_thresholds(spec: str) -> list[float]:
    """``"start:stop:step"`` (inclusive) or a comma list -> thresholds."""
    try:
        if ":" in spec:
            a, b, s = (float(x) for x in spec.split(":"))
            n = int(round((b - a) / s)) + 1
            return [round(a + i * s, 6) for i in range(n)]
        return [float(x) for x in spec.split(",")]
    except ValueError:
        raise TextsegError(f"thresholds must be start:stop:step or a comma list, got {spec!r}") from None


def mask_class_ids(cam_classes: list[str], mask_classes: list[str]) -> np.ndarray:
    """Index in the mask class list of every CAM class (matched like labels)."""
    index = {canonical(c): i for i, c in enumerate(mask_classes)}
    missing = [c for c in cam_classes if canonical(c) not in index]
    if missing:
        raise TextsegError(f"CAM classes {missing[:5]} are not among the mask classes; evaluate against "
                           "masks of the same class list (e.g. --masks masks_voc21)")
    return np.asarray([index[canonical(c)] for c in cam_classes], dtype=np.int64)


def mask_classes_file(root: Path, masks: str, explicit: str = "") -> Path:
    """The class list of ``root/masks``: ``explicit``, else ``classes_<suffix>.txt`` for
    ``masks_<suffix>``, else ``classes.txt``."""
    if explicit:
        return Path(explicit)
    if masks.startswith("masks_") and (root / f"classes_{masks[6:]}.txt").is_file():
        return root / f"classes_{masks[6:]}.txt"
    return root / "classes.txt"


def _cam_files(cams: Path) -> list[Path]:
    files = sorted(cams.glob("*.npz"))
    if not files:
        raise TextsegError(f"{cams}: no .npz CAM files (run `textseg cam make` first)")
    return files


def evaluate_cams(root: str | Path, cams: str | Path, masks: str = "masks", mask_classes: str = "",
                  thresholds: Sequence[float] | str = "0.05:0.95:0.05", split: str = "") -> dict:
    """CAM mIoU against ``root/masks/<id>.png`` for each background threshold. Returns
    ``{"images", "classes", "best_threshold", "best" (per-class dict), "best_metrics"
    (:class:`~textseg.metrics.SegMetrics`), "sweep": [{"threshold", "miou"}]}``."""
    from PIL import Image

    root, cams = Path(root), Path(cams)
    files = _cam_files(cams)
    if split:
        keep = set(split_ids(root, split))
        files = [f for f in files if f.stem in keep]
        if not files:
            raise TextsegError(f"{cams}: no CAM file of split {split!r}")
    cls_file = mask_classes_file(root, masks, mask_classes)
    if not cls_file.is_file():
        raise TextsegError(f"{cls_file}: no class list for the masks (pass --mask-classes)")
    names_of_masks = class_file_names(cls_file)
    if isinstance(thresholds, str):
        thresholds = parse_thresholds(thresholds)
    sweep = ThresholdSweep(thresholds, len(names_of_masks))
    ids = None
    for f in files:
        mpath = root / masks / f"{f.stem}.png"
        if not mpath.is_file():
            raise TextsegError(f"{mpath}: no mask for CAM {f.name}")
        target = torch.from_numpy(np.asarray(Image.open(mpath), dtype=np.int64))
        keys, maps, names = load_cam_file(f, tuple(target.shape))
        if ids is None:
            ids = mask_class_ids(names, names_of_masks)
        sweep.update(keys, maps, target, ids)
    results = sweep.results()
    best_t, best = max(results, key=lambda r: r[1].miou)
    return {"images": len(files), "classes": names_of_masks, "best_threshold": best_t,
            "best": best.to_dict(names_of_masks), "best_metrics": best,
            "sweep": [{"threshold": t, "miou": round(m.miou * 100, 4)} for t, m in results]}


def refine_maps(maps: torch.Tensor, image) -> torch.Tensor:
    """PAMR (pixel-adaptive mask refinement) of ``K' x H x W`` maps with the image's colours, then
    each map re-normalised to a maximum of 1."""
    from textseg.segment.pamr import pamr

    refined = pamr(image_tensor(image)[None], maps[None])[0]
    return refined / (refined.flatten(1).amax(dim=1).view(-1, 1, 1) + 1e-5)


def write_pseudo_labels(root: str | Path, cams: str | Path, out: str | Path, images: str = "",
                        bg_threshold: float = 0.15, ignore_band: float = 0.0, pamr: bool = False,
                        link: bool = False, progress: bool = False) -> int:
    """Pseudo masks from CAM files -> a folder dataset at ``out`` (``images/``, ``masks/``,
    ``classes.txt`` with ``background`` first, ``labels.json``). Pixels whose best map is within
    ``ignore_band`` of ``bg_threshold`` become 255. Returns the number of images."""
    from PIL import Image

    root, cams, out = Path(root), Path(cams), Path(out)
    files = _cam_files(cams)
    img_dir = Path(images) if images else root / "images"
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    labels, class_names = {}, None
    it = files
    if progress:
        from tqdm import tqdm

        it = tqdm(files, desc="cam labels", dynamic_ncols=True)
    for f in it:
        src = _find_image(img_dir, f.stem)
        if src is None:
            raise TextsegError(f"{img_dir}: no image for CAM {f.name}")
        keys, maps, names = load_cam_file(f)
        class_names = class_names or names
        if pamr and len(keys):
            maps = refine_maps(maps, load_image(src))
        mask = cam_to_mask(keys, maps, bg_threshold, ignore_band=ignore_band)
        Image.fromarray(mask.numpy().astype(np.uint8), mode="L").save(out / "masks" / f"{f.stem}.png")
        dst = out / "images" / src.name
        if dst.exists() or dst.is_symlink():
            dst.unlink()
        if link:
            dst.symlink_to(src.resolve())
        else:
            shutil.copyfile(src, dst)
        labels[f.stem] = [names[k] for k in keys.tolist()]
    (out / "classes.txt").write_text("\n".join(["background", *class_names]) + "\n")
    (out / "labels.json").write_text(json.dumps(labels, indent=1))
    return len(files)
