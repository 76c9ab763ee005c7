"""The plain folder layout (the one in ``../shared/data``)::

    <root>/images/<id>.jpg          RGB photos (any extension textseg.io reads)
    <root>/masks/<id>.png           single-channel; value = 0-based line in classes.txt; 255 = ignore
    <root>/classes.txt              one class per line (``;`` or ``,`` separate synonyms)
    <root>/splits/<split>.txt       optional: ids, one per line
    <root>/labels.json              optional: {id: [class names present]} (image-level labels)

``masks=`` / ``classes=`` pick another mask folder / class file (relative to ``root`` or absolute),
e.g. ``FolderDataset(root, masks="masks_voc21", classes="classes_voc21.txt")``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from textseg.data.base import DatasetError, SegDataset, read_label_png
from textseg.data.classnames import load_classes
from textseg.data.splits import split_ids
from textseg.errors import TextsegError
from textseg.io import IMAGE_EXTENSIONS


def _resolve(root: Path, value: str | Path, what: str, is_dir: bool) -> Path:
    for cand in (root / value, Path(value)):
        if (cand.is_dir() if is_dir else cand.is_file()):
            return cand
    raise DatasetError(f"{what} {value!r} found neither under {root} nor as a path")


class FolderDataset(SegDataset):
    """Images + single-channel masks + a class list in one folder (see the module docstring)."""

    name = "folder"

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        masks: str | Path = "masks",
        classes: str | Path | list | None = None,
        transform: Callable | None = None,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"dataset root {self.root} is not a directory")
        images_dir = self.root / "images"
        if not images_dir.is_dir():
            raise DatasetError(f"{self.root}: no images/ folder (expected images/<id>.jpg)")
        self.masks_dir = _resolve(self.root, masks, "mask folder", is_dir=True)
        if classes is None:
            classes = _resolve(self.root, "classes.txt", "class file", is_dir=False)
        elif isinstance(classes, (str, Path)):
            from textseg.data.classnames import BUILTIN

            try:
                classes = _resolve(self.root, classes, "class file", is_dir=False)
            except DatasetError:
                if str(classes) not in BUILTIN:  # a shipped list by name, e.g. "voc21"
                    raise
        self._images = {
            p.stem: p for p in sorted(images_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS
        }
        if split is None:
            ids = sorted(self._images)
        else:
            try:
                ids = split_ids(self.root, split)
            except TextsegError as e:
                raise DatasetError(str(e)) from None
        if not ids:
            raise DatasetError(f"{self.root}: no images found" + (f" in split {split!r}" if split else ""))
        super().__init__(ids, load_classes(classes, default="voc21"), transform)
        self.split = split
        self._labels: dict[str, list[str]] | None = None

    def image_path(self, index: int) -> Path:
        sid = self.ids[index]
        return self._images.get(sid, self.root / "images" / f"{sid}.jpg")

    def mask_path(self, index: int) -> Path:
        return self.masks_dir / f"{self.ids[index]}.png"

    def load_mask(self, index: int) -> np.ndarray:
        return read_label_png(self.mask_path(index), self.ids[index])

    @property
    def image_labels(self) -> dict[str, list[str]] | None:
        """``labels.json`` ({id: [class names present]}) when the folder has one, else ``None``."""
        if self._labels is None:
            path = self.root / "labels.json"
            if not path.is_file():
                return None
            try:
                self._labels = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}: invalid JSON ({e})") from None
        return self._labels

    def labels_from_mask(self, index: int) -> list[int]:
        """Class ids present in sample ``index``'s mask (ignore excluded): image-level labels for
        any class list, e.g. the VOC-21 view where labels.json's COCO names do not apply."""
        mask = self.load_mask(index)
        return [int(v) for v in np.unique(mask) if v != self.ignore_index]
