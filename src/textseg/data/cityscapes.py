"""Cityscapes fine annotations (``leftImg8bit_trainvaltest.zip`` + ``gtFine_trainvaltest.zip``)::

    leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png    ids 0..33

``labelIds`` become the 19 evaluation ``trainIds`` of the official cityscapesScripts table (road 7 ->
0, ..., bicycle 33 -> 18); every other id is ignored. Ids are ``<city>/<city>_<seq>_<frame>``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from textseg.constants import IGNORE_INDEX
from textseg.data.base import DatasetError, SegDataset, read_label_png
from textseg.data.classnames import ClassList, load_classes

# labelId -> trainId for the 19 evaluated classes (cityscapesScripts labels.py).
LABEL_TO_TRAIN = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
    27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
LUT = np.full(256, IGNORE_INDEX, dtype=np.uint8)
LUT[list(LABEL_TO_TRAIN)] = list(LABEL_TO_TRAIN.values())

IMG_SUFFIX = "_leftImg8bit.png"
GT_SUFFIX = "_gtFine_labelIds.png"


class CityscapesDataset(SegDataset):
    name = "cityscapes"

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        classes: str | Path | list | ClassList | None = None,
        transform: Callable | None = None,
    ):
        self.root = Path(root)
        self.split = split
        img_dir = self.root / "leftImg8bit" / split
        if not img_dir.is_dir():
            raise DatasetError(f"{self.root}: no leftImg8bit/{split}/ (expected the Cityscapes layout)")
        ids = sorted(
            f"{p.parent.name}/{p.name[: -len(IMG_SUFFIX)]}" for p in img_dir.glob(f"*/*{IMG_SUFFIX}")
        )
        if not ids:
            raise DatasetError(f"{img_dir}: no */*{IMG_SUFFIX} images")
        super().__init__(ids, load_classes(classes, "cityscapes"), transform)

    def image_path(self, index: int) -> Path:
        return self.root / "leftImg8bit" / self.split / f"{self.ids[index]}{IMG_SUFFIX}"

    def load_mask(self, index: int) -> np.ndarray:
        sid = self.ids[index]
        raw = read_label_png(self.root / "gtFine" / self.split / f"{sid}{GT_SUFFIX}", sid)
        return LUT[np.clip(raw, 0, 255)] if raw.dtype != np.uint8 else LUT[raw]
