"""PASCAL VOC 2012 and PASCAL Context, read from the official downloads unchanged.

VOC 2012 (``VOCtrainval_11-May-2012.tar``)::

    VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    VOCdevkit/VOC2012/SegmentationClass/<id>.png        palette PNG: index 0 = background,
                                                        1..20 = classes, 255 = object borders
    VOCdevkit/VOC2012/ImageSets/Segmentation/<split>.txt  train / val (1,449) / trainval

21-class view (``background=True``): ids as stored. 20-class view (``background=False``, "VOC20"):
background becomes ignore and the classes shift to 0..19 (mmseg ``reduce_zero_label``, as SCLIP /
NACLIP / ClearCLIP's ``PascalVOC20Dataset``).

PASCAL Context (VOC 2010 images + ``trainval.tar.gz`` from cs.stanford.edu/~roozbeh/pascal-context)::

    VOCdevkit/VOC2010/JPEGImages/<id>.jpg
    trainval/<id>.mat                 LabelMap: uint16 ids of the 459 full classes (labels.txt,
                                      1-based); 0 = unlabelled
    VOCdevkit/VOC2010/ImageSets/Main/<split>.txt      train (4,998) / val (5,105)

or the mmsegmentation conversion the training-free papers read
(``VOC2010/SegmentationClassContext/<id>.png`` with 0 = background, 1..59 = classes, and
``VOC2010/ImageSets/SegmentationContext/<split>.txt``). From ``.mat`` files the 59 frequent classes
map to 1..59 (alphabetical order, mmseg's table) and all other pixels to background 0, as in the
Detail-API masks mmseg converts. 60-class view (``background=True``): as is; 59-class view: background
becomes ignore and classes shift to 0..58.

``root`` may be the ``VOC20xx`` folder, ``VOCdevkit`` or the folder holding ``VOCdevkit``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from textseg.constants import IGNORE_INDEX
from textseg.data.base import DatasetError, SegDataset, read_label_png
from textseg.data.classnames import ClassList, load_classes
from textseg.data.splits import read_split_file

# The 59 PASCAL Context classes as ids of the 459-class labels.txt (sorted = alphabetical names).
CONTEXT59_IDS = (
    2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113, 115,
    144, 158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326, 347, 349,
    354, 355, 360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458,
)


def find_voc_dir(root: str | Path, year: str) -> Path:
    """The ``VOC<year>`` folder for a root given as that folder, ``VOCdevkit`` or its parent."""
    root = Path(root)
    for cand in (root, root / f"VOC{year}", root / "VOCdevkit" / f"VOC{year}"):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise DatasetError(
        f"{root}: no VOC{year}/JPEGImages found (give the VOC{year} folder, VOCdevkit, or its parent)"
    )


def reduce_zero_label(mask: np.ndarray) -> np.ndarray:
    """0 -> ignore, k -> k - 1 (ignore stays ignore): drops a background class (mmseg convention)."""
    out = mask.astype(np.int64) - 1
    out[(mask == 0) | (mask == IGNORE_INDEX)] = IGNORE_INDEX
    return out


class VOCDataset(SegDataset):
    """PASCAL VOC 2012 semantic segmentation (21 classes, or 20 with ``background=False``)."""

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        background: bool = True,
        classes: str | Path | list | ClassList | None = None,
        transform: Callable | None = None,
    ):
        self.dir = find_voc_dir(root, "2012")
        split_file = self.dir / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not split_file.is_file():
            raise DatasetError(f"{self.dir}: no split {split!r} (ImageSets/Segmentation/{split}.txt)")
        self.background = background
        self.name = "voc" if background else "voc20"
        super().__init__(read_split_file(split_file), load_classes(classes, "voc21" if background else "voc20"),
                         transform)

    def image_path(self, index: int) -> Path:
        return self.dir / "JPEGImages" / f"{self.ids[index]}.jpg"

    def load_mask(self, index: int) -> np.ndarray:
        mask = read_label_png(self.dir / "SegmentationClass" / f"{self.ids[index]}.png", self.ids[index])
        return mask if self.background else reduce_zero_label(mask)


def read_context_mat(path: Path, sample_id: str) -> np.ndarray:
    """``LabelMap`` of a PASCAL Context ``.mat`` file -> 60-class ids (0 = background)."""
    try:
        from scipy.io import loadmat
    except ImportError:  # pragma: no cover - scipy comes with scikit-image in the test extra
        raise DatasetError("reading PASCAL Context .mat files needs scipy (pip install scipy)") from None
    if not path.is_file():
        raise DatasetError(f"{sample_id}: mask {path} is missing")
    try:
        label_map = np.asarray(loadmat(str(path))["LabelMap"])
    except (OSError, ValueError, KeyError) as e:
        raise DatasetError(f"{sample_id}: cannot read {path} ({type(e).__name__}: {e})") from None
    lut = np.zeros(max(int(label_map.max()) + 1, CONTEXT59_IDS[-1] + 1), dtype=np.uint8)
    lut[list(CONTEXT59_IDS)] = np.arange(1, 60, dtype=np.uint8)
    return lut[label_map]


class ContextDataset(SegDataset):
    """PASCAL Context (60 classes with background, or 59 with ``background=False``)."""

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        background: bool = True,
        classes: str | Path | list | ClassList | None = None,
        transform: Callable | None = None,
    ):
        root = Path(root)
        self.dir = find_voc_dir(root, "2010")
        png_dir = self.dir / "SegmentationClassContext"
        mat_dirs = [d for d in (self.dir / "trainval", self.dir.parent / "trainval", root / "trainval",
                                self.dir.parent.parent / "trainval") if d.is_dir()]
        if png_dir.is_dir():
            self.mask_dir, self.mat = png_dir, False
        elif mat_dirs:
            self.mask_dir, self.mat = mat_dirs[0], True
        else:
            raise DatasetError(
                f"{root}: no PASCAL Context labels (trainval/*.mat from trainval.tar.gz, or "
                "VOC2010/SegmentationClassContext/*.png)"
            )
        split_files = [self.dir / "ImageSets" / "SegmentationContext" / f"{split}.txt",
                       self.dir / "ImageSets" / "Main" / f"{split}.txt"]
        split_file = next((f for f in split_files if f.is_file()), None)
        if split_file is None:
            raise DatasetError(f"{self.dir}: no split {split!r} (ImageSets/SegmentationContext or Main)")
        self.background = background
        self.name = "context" if background else "context59"
        super().__init__(read_split_file(split_file), load_classes(classes, "context60" if background else "context59"),
                         transform)

    def image_path(self, index: int) -> Path:
        return self.dir / "JPEGImages" / f"{self.ids[index]}.jpg"

    def load_mask(self, index: int) -> np.ndarray:
        sid = self.ids[index]
        if self.mat:
            mask = read_context_mat(self.mask_dir / f"{sid}.mat", sid)
        else:
            mask = read_label_png(self.mask_dir / f"{sid}.png", sid)
        return mask if self.background else reduce_zero_label(mask)
