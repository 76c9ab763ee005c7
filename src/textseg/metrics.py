"""Exact semantic-segmentation metrics from a confusion matrix.

:class:`ConfusionMatrix` accumulates a ``C x C`` int64 matrix (rows = ground truth, columns =
prediction) with one ``torch.bincount`` per update, so it is exact (integers, no running means), cheap,
and *summable*: matrices from different images, workers or processes add up to the matrix of the
whole set (:meth:`ConfusionMatrix.merge`, :meth:`ConfusionMatrix.all_reduce`).

Conventions (:meth:`ConfusionMatrix.compute`):

* Pixels whose ground truth equals ``ignore_index`` (255) are skipped, whatever was predicted
  there. Any other ground-truth value outside ``[0, C)``, and any prediction outside ``[0, C)``, is
  an error (a prediction cannot abstain: it would silently raise the score).
* ``IoU_c = TP_c / (TP_c + FP_c + FN_c)``; it is undefined (NaN) when class ``c`` appears neither in
  the ground truth nor in the predictions (union 0).
* ``mIoU`` (default ``average="union"``) is the mean over classes whose union is non-zero, i.e.
  classes present in ground truth **or** predictions. A class only predicted counts with IoU 0.
  This is the mmsegmentation convention (``nanmean`` of per-class IoU over the whole set) used by
  every published training-free number (MaskCLIP, SCLIP, ClearCLIP, NACLIP, ...).
  ``average="gt"`` averages only over classes present in the ground truth instead.
* ``pixel_accuracy = sum_c TP_c / #valid pixels``; ``mean_accuracy`` = mean over classes present in
  the ground truth of ``TP_c / GT_c``; ``fw_iou = sum_c (GT_c / #valid) * IoU_c`` over classes
  present in the ground truth.

Values are fractions in ``[0, 1]`` (the CLI reports percent). An empty matrix gives NaN everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from textseg.errors import TextsegError

AVERAGES = ("union", "gt")


@dataclass
class SegMetrics:
    """The numbers computed from one confusion matrix (fractions, NaN where undefined)."""

    iou: list[float]  # per class, NaN when union is 0
    miou: float
    pixel_accuracy: float
    mean_accuracy: float
    fw_iou: float
    average: str = "union"
    gt_pixels: list[int] = field(default_factory=list)  # per class ground-truth pixel count
    pred_pixels: list[int] = field(default_factory=list)  # per class predicted pixel count

    def to_dict(self, class_names: list[str] | None = None, percent: bool = True) -> dict:
        """JSON-ready dict; NaN becomes ``None``; percent by default."""
        s = 100.0 if percent else 1.0

        def f(x: float) -> float | None:
            return None if math.isnan(x) else round(x * s, 4)

        names = class_names or [str(i) for i in range(len(self.iou))]
        return {
            "miou": f(self.miou),
            "miou_average": self.average,
            "pixel_accuracy": f(self.pixel_accuracy),
            "mean_accuracy": f(self.mean_accuracy),
            "fw_iou": f(self.fw_iou),
            "per_class_iou": {n: f(v) for n, v in zip(names, self.iou)},
        }


def _as_int_tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x) if x.flags.writeable else np.array(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex():
        raise TypeError(f"{what} must hold integer class ids, got dtype {x.dtype}")
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    return x


class ConfusionMatrix:
    """Accumulates ``mat[gt, pred]`` pixel counts for ``num_classes`` classes.

    >>> cm = ConfusionMatrix(3)
    >>> cm.update(pred, target)        # any matching shapes: H x W, B x H x W, ...
    >>> cm.all_reduce().compute().miou # after sharded evaluation
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: str | torch.device = "cpu"):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.mat = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)

    @staticmethod
    def counts(pred, target, num_classes: int, ignore_index: int | None = 255) -> torch.Tensor:
        """The ``C x C`` confusion matrix of one prediction / ground-truth pair (no accumulation).

        Ignore pixels are dropped, ids range-checked (min / max), then one ``bincount`` of
        ``target * C + pred`` in int32 (numpy's on CPU, torch's on GPU)."""
        pred = _as_int_tensor(pred, "pred")
        target = _as_int_tensor(target, "target")
        if pred.shape != target.shape:
            raise TextsegError(
                f"prediction shape {tuple(pred.shape)} differs from ground-truth shape {tuple(target.shape)}"
            )
        n = num_classes
        t = target.reshape(-1)
        p = pred.reshape(-1).to(t.device)
        ignoring = ignore_index is not None and not (0 <= ignore_index < n)
        if t.device.type == "cpu":  # numpy: the faster bincount / compaction on CPU
            t, p = t.numpy(), p.numpy()
        if ignoring:
            keep = t != ignore_index
            t, p = t[keep], p[keep]
        if t.shape[0] == 0:
            return torch.zeros(n, n, dtype=torch.int64, device=target.device)
        for arr, what in ((t, "ground truth"), (p, "prediction")):
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= n:
                extra = f" (and not ignore {ignore_index})" if what == "ground truth" and ignoring else ""
                raise TextsegError(f"{what} holds class id {hi if hi >= n else lo}, outside 0..{n - 1}{extra}")
        if isinstance(t, np.ndarray):
            hist = torch.from_numpy(np.bincount(t.astype(np.int32) * n + p, minlength=n * n))
        else:
            hist = torch.bincount(t.to(torch.int32) * n + p.to(torch.int32), minlength=n * n)
        return hist.reshape(n, n).to(torch.int64)

    def update(self, pred, target) -> ConfusionMatrix:
        """Add the pixels of ``pred`` vs ``target`` (same shape, integer ids). Returns ``self``."""
        self.mat += self.counts(pred, target, self.num_classes, self.ignore_index).to(self.mat.device)
        return self

    def merge(self, other: ConfusionMatrix | torch.Tensor) -> ConfusionMatrix:
        """Add another matrix (same class count) into this one. Returns ``self``."""
        mat = other.mat if isinstance(other, ConfusionMatrix) else other
        if tuple(mat.shape) != tuple(self.mat.shape):
            raise ValueError(f"cannot merge a {tuple(mat.shape)} matrix into {tuple(self.mat.shape)}")
        self.mat += mat.to(self.mat.device, torch.int64)
        return self

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the matrices of all processes (``torch.distributed``) in place; a no-op when not
        initialised. With NCCL the sum travels through the current CUDA device."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        mat = self.mat
        if dist.get_backend() == "nccl" and mat.device.type != "cuda":
            mat = mat.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(mat, op=dist.ReduceOp.SUM)
        self.mat = mat.to(self.mat.device)
        return self

    def reset(self) -> None:
        self.mat.zero_()

    def compute(self, average: str = "union") -> SegMetrics:
        """IoU per class, mIoU (``average="union"``: classes in GT or predictions; ``"gt"``: classes
        in GT), pixel accuracy, mean accuracy and frequency-weighted IoU (see the module docstring)."""
        if average not in AVERAGES:
            raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
        m = self.mat.double().cpu()
        tp = m.diag()
        gt = m.sum(dim=1)
        pr = m.sum(dim=0)
        union = gt + pr - tp
        total = m.sum()
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
        in_gt = gt > 0
        avg_mask = union > 0 if average == "union" else in_gt

        def mean(x: torch.Tensor, mask: torch.Tensor) -> float:
            return float(x[mask].mean()) if bool(mask.any()) else float("nan")

        pixel_acc = float(tp.sum() / total) if total > 0 else float("nan")
        mean_acc = mean(tp / gt.clamp(min=1), in_gt)
        fw = float((gt[in_gt] / total * iou[in_gt]).sum()) if total > 0 else float("nan")
        return SegMetrics(
            iou=iou.tolist(),
            miou=mean(iou, avg_mask),
            pixel_accuracy=pixel_acc,
            mean_accuracy=mean_acc,
            fw_iou=fw,
            average=average,
            gt_pixels=[int(v) for v in self.mat.sum(dim=1).tolist()],
            pred_pixels=[int(v) for v in self.mat.sum(dim=0).tolist()],
        )
