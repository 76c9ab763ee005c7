"""ADE20K scene parsing, 150 classes, as in ``ADEChallengeData2016.zip``::

    ADEChallengeData2016/images/{training,validation}/ADE_val_00000001.jpg
    ADEChallengeData2016/annotations/{training,validation}/ADE_val_00000001.png
                                          0 = "other" (ignored), 1..150 = classes

Classes become ids 0..149 and "other" the ignore index (mmseg ``reduce_zero_label``). ``split`` is
``validation`` (2,000 images; ``val`` is accepted) or ``training``. ``root`` may be
``ADEChallengeData2016`` or the folder holding it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from textseg.data.base import DatasetError, SegDataset, read_label_png
from textseg.data.classnames import ClassList, load_classes
from textseg.data.voc import reduce_zero_label

SPLITS = {"val": "validation", "validation": "validation", "train": "training", "training": "training"}


class ADE20KDataset(SegDataset):
    name = "ade"

    def __init__(
        self,
        root: str | Path,
        split: str = "validation",
        classes: str | Path | list | ClassList | None = None,
        transform: Callable | None = None,
    ):
        root = Path(root)
        self.dir = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
        if split not in SPLITS:
            raise DatasetError(f"ADE20K split must be one of {sorted(SPLITS)}, got {split!r}")
        self.split = SPLITS[split]
        img_dir = self.dir / "images" / self.split
        if not img_dir.is_dir():
            raise DatasetError(f"{root}: no images/{self.split}/ (expected ADEChallengeData2016 layout)")
        ids = sorted(p.stem for p in img_dir.glob("*.jpg"))
        if not ids:
            raise DatasetError(f"{img_dir}: no .jpg images")
        super().__init__(ids, load_classes(classes, "ade150"), transform)

    def image_path(self, index: int) -> Path:
        return self.dir / "images" / self.split / f"{self.ids[index]}.jpg"

    def load_mask(self, index: int) -> np.ndarray:
        sid = self.ids[index]
        return reduce_zero_label(read_label_png(self.dir / "annotations" / self.split / f"{sid}.png", sid))
