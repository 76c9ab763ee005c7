"""The map-style dataset every semantic-segmentation reader implements.

A reader lists sample ids and knows where each image and mask lives; :class:`SegDataset` loads,
checks and returns them::

    ds = FolderDataset("/data/coco-mini", masks="masks_voc21", classes="classes_voc21.txt")
    s = ds[0]    # {"image": PIL RGB, "mask": uint8 H x W numpy (255 = ignore), "id": str}
    ds.class_names        # display names, index = class id
    ds.class_prompts      # per class, the prompts (synonyms) a model scores it by

Every per-image problem (missing mask, mask size differing from the image, a class id beyond the
class list, an unreadable file) raises :class:`DatasetError` naming the sample, so an evaluator can
report it and go on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from textseg.constants import IGNORE_INDEX  # noqa: F401  (re-exported)
from textseg.data.classnames import ClassList
from textseg.errors import TextsegError
from textseg.io import load_image


class DatasetError(TextsegError):
    """A problem with one sample (or a dataset root) of a segmentation dataset."""


def read_label_png(path: Path, sample_id: str = "") -> np.ndarray:
    """A single-channel label image (``L``, ``P`` palette indices, ``I;16`` ...) -> ``H x W`` array of
    raw integer values (int64 for 16-bit files, uint8 otherwise)."""
    what = f"{sample_id}: " if sample_id else ""
    if not path.is_file():
        raise DatasetError(f"{what}mask {path} is missing")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGB", "RGBA"):
                raise DatasetError(
                    f"{what}mask {path} is {img.mode}; label masks must be single-channel "
                    "(class ids, or a palette PNG)"
                )
            arr = np.asarray(img)
    except DatasetError:
        raise
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"{what}cannot read mask {path} ({type(e).__name__}: {e})") from None
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    return arr if arr.dtype == np.uint8 else arr.astype(np.int64)


class SegDataset(torch.utils.data.Dataset):
    """Base class: subclasses pass ``ids`` and a :class:`ClassList` and implement ``image_path`` and
    ``load_mask``.

    ``load_mask`` returns class ids (``0..C-1``, 255 = ignore) as an ``H x W`` uint8 array.
    ``transform`` (optional) maps the sample dict to whatever a training loop needs.
    """

    name: str = "segmentation"
    ignore_index: int = IGNORE_INDEX

    def __init__(self, ids: list[str], classes: ClassList, transform: Callable | None = None):
        if len(classes) > 255:
            raise DatasetError(f"{len(classes)} classes do not fit uint8 masks with 255 = ignore")
        self.ids = list(ids)
        self.classes = classes
        self.transform = transform

    # -- what a reader provides -------------------------------------------------------------------
    def image_path(self, index: int) -> Path:
        raise NotImplementedError

    def load_mask(self, index: int) -> np.ndarray:
        raise NotImplementedError

    # -- shared behaviour ---------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return list(self.classes.names)

    @property
    def class_prompts(self) -> list[list[str]]:
        return [list(p) for p in self.classes.prompts]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, index: int) -> Image.Image:
        path = self.image_path(index)
        if not path.is_file():
            raise DatasetError(f"{self.ids[index]}: image {path} is missing")
        try:
            return load_image(path)
        except TextsegError as e:
            raise DatasetError(f"{self.ids[index]}: {e}") from None

    def check_mask(self, mask: np.ndarray, image: Image.Image, index: int) -> np.ndarray:
        """Validate size and ids of ``mask`` for ``image``; return it as uint8."""
        sid = self.ids[index]
        if mask.ndim != 2:
            raise DatasetError(f"{sid}: mask has shape {mask.shape}, expected H x W")
        if mask.shape != (image.height, image.width):
            raise DatasetError(
                f"{sid}: mask is {mask.shape[1]}x{mask.shape[0]} but image is {image.width}x{image.height}"
            )
        bad = (mask != self.ignore_index) & ((mask < 0) | (mask >= self.num_classes))
        if bad.any():
            ids = np.unique(mask[bad])
            raise DatasetError(
                f"{sid}: mask holds class id {', '.join(map(str, ids[:5].tolist()))} beyond the "
                f"{self.num_classes} classes (0..{self.num_classes - 1}, 255 = ignore)"
            )
        return np.array(mask, dtype=np.uint8)  # a writable copy (PIL arrays are read-only)

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        image = self.load_image(index)
        mask = self.check_mask(self.load_mask(index), image, index)
        sample = {"image": image, "mask": mask, "id": self.ids[index]}
        return self.transform(sample) if self.transform is not None else sample

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {self.num_classes} classes)"
