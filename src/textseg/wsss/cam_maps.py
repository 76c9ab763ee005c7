"""Class activation maps at inference: multi-scale + flip CAMs, their files, masks from them.

The WSSS protocol (IRN, CLIMS): for each image the CAM network's ReLU'd score maps are computed at
several scales and their horizontal flips, resized to one resolution and summed; only the classes
of the image label are kept ("keys"), each divided by its maximum so it lies in [0, 1]. A pixel is
background when every kept map is below a background threshold, else the class of the largest map.

* :func:`multiscale_cam` one image -> ``(keys, K' x h x w`` maps in [0, 1]).
* :func:`save_cam_file` / :func:`load_cam_file` compressed ``.npz`` (float16 maps, int keys, the
  original image size, the class names), read back without pickle.
* :func:`cam_to_mask` maps -> ``H x W`` class ids for a threshold (optional ignore band).
* :class:`ThresholdSweep` confusion matrices for many thresholds in one pass (``textseg cam eval``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from textseg.errors import TextsegError


def image_tensor(img, long_side: int | None = None) -> torch.Tensor:
    """PIL RGB image -> ``3 x H x W`` float in [0, 1], optionally resized so its long side is ``long_side``."""
    if long_side and max(img.size) != long_side:
        r = long_side / max(img.size)
        img = img.resize((max(1, round(img.width * r)), max(1, round(img.height * r))), resample=2)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


@torch.no_grad()
def multiscale_cam(model, image: torch.Tensor, keys: Sequence[int] | None = None,
                   scales: Sequence[float] = (1.0, 0.5, 1.5, 2.0), flip: bool = True) -> tuple[np.ndarray, torch.Tensor]:
    """Multi-scale (+ flip) CAMs of one ``3 x H x W`` image in [0, 1].

    ``keys``: class indices to keep (the image label); ``None`` keeps the classes the network's own
    multi-label head predicts (sigmoid > 0.5 on the scale-1 image). Returns ``(keys, maps)`` with
    maps ``len(keys) x H x W``, each max-normalised to [0, 1].
    """
    h, w = image.shape[-2:]
    total = None
    for s in scales:
        size = (max(1, round(h * s)), max(1, round(w * s)))
        x = F.interpolate(image[None], size, mode="bilinear", align_corners=False) if s != 1 else image[None]
        x = model.normalize(x)
        if flip:
            x = torch.cat([x, x.flip(-1)])
        cam = model.cam(x)
        cam = cam[:1] + cam[1:].flip(-1) if flip else cam
        cam = F.interpolate(cam, (h, w), mode="bilinear", align_corners=False)[0]
        total = cam if total is None else total + cam
    if keys is None:
        probs = torch.sigmoid(model.classify(model.normalize(image[None])))[0]
        keys = torch.nonzero(probs > 0.5).flatten().tolist()
    keys = np.asarray(list(keys), dtype=np.int64)
    maps = total[torch.from_numpy(keys)] if len(keys) else total[:0]
    maps = maps / (maps.flatten(1).amax(dim=1).view(-1, 1, 1) + 1e-5) if len(keys) else maps
    return keys, maps


class SharedBackbone(torch.nn.Module):
    """Wraps a backbone so CAM networks with *identical* backbone weights (e.g. runs that trained only
    the classifier on one frozen backbone) compute features once per input: the first call's output
    is reused for the same input tensor until :meth:`clear`."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.inner = backbone
        self.stride = backbone.stride
        self.out_channels = backbone.out_channels
        self._memo: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for inp, out in self._memo:
            if inp.shape == x.shape and torch.equal(inp, x):
                return out
        out = self.inner(x)
        self._memo.append((x, out))
        return out

    @staticmethod
    def group(models: list) -> list:
        """Make models whose backbone state dicts are equal share one memoising backbone."""
        for i, m in enumerate(models):
            for prev in models[:i]:
                raw = prev.backbone.inner if isinstance(prev.backbone, SharedBackbone) else prev.backbone
                a, b = m.backbone.state_dict(), raw.state_dict()
                same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                if same:
                    if not isinstance(prev.backbone, SharedBackbone):
                        prev.backbone = SharedBackbone(prev.backbone)
                    m.backbone = prev.backbone
                    break
        return models

    @staticmethod
    def clear(models: list) -> None:
        for m in models:
            if isinstance(m.backbone, SharedBackbone):
                m.backbone._memo.clear()


def save_cam_file(path: str | Path, keys: np.ndarray, maps: torch.Tensor, size: tuple[int, int],
                  class_names: Sequence[str]) -> None:
    """Compressed ``.npz``: ``keys`` (int64), ``cams`` (float16 ``K' x h x w``), ``size`` (original
    ``H, W``), ``class_names`` (all classes of the network, unicode)."""
    np.savez_compressed(
        path, keys=np.asarray(keys, dtype=np.int64), cams=maps.cpu().numpy().astype(np.float16),
        size=np.asarray(size, dtype=np.int64), class_names=np.asarray(list(class_names), dtype=str),
    )


def load_cam_file(path: str | Path, size: tuple[int, int] | None = None) -> tuple[np.ndarray, torch.Tensor, list[str]]:
    """Read a CAM ``.npz`` -> ``(keys, maps K' x H x W float32, class_names)``; maps are resized
    (bilinear) to ``size`` or to the stored original image size."""
    try:
        with np.load(path, allow_pickle=False) as f:
            keys, cams, orig, names = f["keys"], f["cams"], f["size"], f["class_names"]
    except (OSError, ValueError, KeyError) as e:
        raise TextsegError(f"{path}: not a CAM file written by `textseg cam make` ({e})") from None
    maps = torch.from_numpy(cams.astype(np.float32))
    target = tuple(size) if size is not None else (int(orig[0]), int(orig[1]))
    if len(keys) and tuple(maps.shape[-2:]) != target:
        maps = F.interpolate(maps[None], target, mode="bilinear", align_corners=False)[0]
    elif not len(keys):
        maps = torch.zeros(0, *target)
    return keys, maps, [str(n) for n in names]


def cam_to_mask(keys: np.ndarray, maps: torch.Tensor, threshold: float, class_ids: np.ndarray | None = None,
                ignore_band: float = 0.0, ignore_index: int = 255) -> torch.Tensor:
    """``H x W`` long mask: 0 (background) where every map is <= ``threshold``, else the id of the
    largest map. ``class_ids[k]`` is the output id of CAM class ``k`` (default ``k + 1``). Pixels whose
    largest map lies within ``ignore_band`` of the threshold become ``ignore_index``."""
    h, w = maps.shape[-2:]
    if not len(keys):
        return torch.zeros(h, w, dtype=torch.long)
    ids = torch.from_numpy(np.asarray(keys) + 1 if class_ids is None else np.asarray(class_ids)[keys])
    best, arg = maps.max(dim=0)
    mask = torch.where(best > threshold, ids[arg], torch.zeros_like(arg))
    if ignore_band > 0:
        mask[(best - threshold).abs() < ignore_band] = ignore_index
    return mask


class ThresholdSweep:
    """One :class:`~textseg.metrics.ConfusionMatrix` per background threshold, updated in one pass."""

    def __init__(self, thresholds: Sequence[float], num_classes: int, ignore_index: int = 255):
        from textseg.metrics import ConfusionMatrix

        self.thresholds = [float(t) for t in thresholds]
        self.matrices = [ConfusionMatrix(num_classes, ignore_index) for _ in self.thresholds]

    def update(self, keys: np.ndarray, maps: torch.Tensor, target: torch.Tensor, class_ids: np.ndarray) -> None:
        """Add one image: ``maps`` ``K' x H x W`` of CAM classes ``keys``, ``target`` ``H x W`` ids,
        ``class_ids[k]`` the target id of CAM class ``k``. One bincount per threshold over the valid
        pixels (the checks run once per image, not per threshold)."""
        n = self.matrices[0].num_classes
        ignore = self.matrices[0].ignore_index
        target = target.reshape(-1).long()
        t = target[target != ignore]
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
            raise TextsegError(f"ground truth holds a class id outside 0..{n - 1} (and not {ignore})")
        base = t * n
        if not len(keys):
            counts = torch.bincount(base, minlength=n * n).view(n, n)
            for cm in self.matrices:
                cm.mat += counts
            return
        ids = torch.from_numpy(np.asarray(class_ids)[keys])
        best, arg = maps.max(dim=0)
        keep = target != ignore
        best, fg = best.reshape(-1)[keep], base + ids[arg.reshape(-1)[keep]]
        for thr, cm in zip(self.thresholds, self.matrices):
            cm.mat += torch.bincount(torch.where(best > thr, fg, base), minlength=n * n).view(n, n)

    def results(self):
        """``[(threshold, SegMetrics)]`` in sweep order."""
        return [(t, cm.compute()) for t, cm in zip(self.thresholds, self.matrices)]
