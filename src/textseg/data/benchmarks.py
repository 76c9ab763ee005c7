"""Build any supported segmentation dataset by name (the ``--dataset`` choices of ``textseg eval``).

========== ============================ ========= ===================================
name       reader                       classes   default split
========== ============================ ========= ===================================
voc        PASCAL VOC 2012              21        val
voc20      PASCAL VOC 2012, no bg       20        val
context    PASCAL Context               60        val
context59  PASCAL Context, no bg        59        val
coco-object COCO 2017 instances         81        val2017
coco-stuff COCO-Stuff 164k              171       val2017
ade        ADE20K                       150       validation
cityscapes Cityscapes gtFine            19        val
folder     images/ + masks/ + classes   any       all images (or splits/<split>.txt)
========== ============================ ========= ===================================
"""

from __future__ import annotations

from pathlib import Path

from textseg.data import DATASETS
from textseg.data.base import DatasetError, SegDataset

__all__ = ["DATASETS", "build_dataset"]


def build_dataset(
    name: str,
    root: str | Path,
    split: str | None = None,
    masks: str | None = None,
    classes: str | Path | list | None = None,
) -> SegDataset:
    """``name`` in :data:`DATASETS`; ``split`` None = the benchmark's evaluation split; ``masks`` only
    for ``folder``; ``classes`` overrides the shipped class-name file (a path or built-in name)."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if masks is not None and name != "folder":
        raise DatasetError("--masks applies to --dataset folder only")
    if name == "folder":
        from textseg.data.folder import FolderDataset

        return FolderDataset(root, split=split, masks=masks or "masks", classes=classes)
    kw = {"classes": classes}
    if split is not None:
        kw["split"] = split
    if name in ("voc", "voc20"):
        from textseg.data.voc import VOCDataset

        return VOCDataset(root, background=name == "voc", **kw)
    if name in ("context", "context59"):
        from textseg.data.voc import ContextDataset

        return ContextDataset(root, background=name == "context", **kw)
    if name == "coco-object":
        from textseg.data.coco import COCOObjectDataset

        return COCOObjectDataset(root, **kw)
    if name == "coco-stuff":
        from textseg.data.coco import COCOStuffDataset

        return COCOStuffDataset(root, **kw)
    if name == "ade":
        from textseg.data.ade import ADE20KDataset

        return ADE20KDataset(root, **kw)
    from textseg.data.cityscapes import CityscapesDataset

    return CityscapesDataset(root, **kw)
