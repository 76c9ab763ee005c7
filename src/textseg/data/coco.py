"""COCO-Object (instances JSON rasterised) and COCO-Stuff 164k (label PNGs).

COCO-Object, from the COCO 2017 download unchanged::

    <root>/annotations/instances_val2017.json
    <root>/val2017/<12-digit id>.jpg           (or <root>/images/val2017/)

Each image's instances are rasterised here (no pycocotools needed: polygons with Pillow, RLE decoded
with numpy) into 81 ids: 0 = background (everything that is not a thing), 1..80 = the thing
categories in category-id order. Crowd regions become ignore (255) except where a non-crowd
instance covers them; instances are drawn largest first so smaller ones stay visible on top.
Polygon borders may differ from pycocotools' rasteriser by a pixel (about 0.4 % of pixels).

COCO-Stuff 164k (171 classes: 80 things + 91 stuff)::

    <root>/images/val2017/<id>.jpg             (or <root>/val2017/)
    <root>/annotations/val2017/<id>.png        stuffthingmaps_trainval2017.zip: ids 0..181 (category
                                               id - 1), 11 of them unused; 255 = unlabelled
                                               (or <root>/stuffthingmaps/val2017/<id>.png)

The 182 raw ids map to 171 contiguous ones; mmsegmentation's converted
``annotations/val2017/<id>_labelTrainIds.png`` (already 0..170) are read as they are when present.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from textseg.constants import IGNORE_INDEX
from textseg.data.base import DatasetError, SegDataset, read_label_png
from textseg.data.classnames import ClassList, load_classes

# 0-based COCO category ids with no category (the stuffthingmaps' 182 slots minus 171 classes).
COCO_STUFF_UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
STUFF_LUT = np.full(256, IGNORE_INDEX, dtype=np.uint8)
_used = [i for i in range(182) if i not in COCO_STUFF_UNUSED]
STUFF_LUT[_used] = np.arange(len(_used), dtype=np.uint8)


def _split_name(split: str) -> str:
    return {"val": "val2017", "train": "train2017"}.get(split, split)


def _image_dir(root: Path, split: str) -> Path:
    for cand in (root / "images" / split, root / split):
        if cand.is_dir():
            return cand
    raise DatasetError(f"{root}: no images/{split}/ or {split}/ image folder")


# -- rasterising COCO segmentations ---------------------------------------------------------------------
def rle_decode_string(counts: str) -> list[int]:
    """Decode COCO's compressed RLE string (LEB128-like, 6-bit chars, deltas from the run two back)."""
    out: list[int] = []
    p, data = 0, counts.encode("ascii")
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def rle_to_mask(rle: dict) -> np.ndarray:
    """COCO RLE (``{"size": [h, w], "counts": str | list}``) -> bool ``h x w`` mask."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs = np.asarray(rle_decode_string(counts) if isinstance(counts, str) else counts, dtype=np.int64)
    if runs.sum() != h * w or (runs < 0).any():
        raise ValueError(f"RLE runs sum to {int(runs.sum())}, expected {h * w}")
    values = np.arange(len(runs)) % 2 == 1  # runs alternate 0, 1, 0, ... starting with zeros
    flat = np.repeat(values, runs)
    return flat.reshape(w, h).T  # column-major (Fortran) order


def segmentation_to_mask(seg, height: int, width: int) -> np.ndarray:
    """An annotation's ``segmentation`` (polygons or RLE) -> bool ``height x width`` mask."""
    if isinstance(seg, dict):
        m = rle_to_mask(seg)
        if m.shape != (height, width):
            raise ValueError(f"RLE size {m.shape} differs from image {height}x{width}")
        return m
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in seg:
        if len(poly) >= 6:
            draw.polygon([(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly) - 1, 2)], fill=1)
    return np.asarray(canvas, dtype=bool)


def rasterize_instances(anns: list[dict], height: int, width: int, cat_to_label: dict[int, int]) -> np.ndarray:
    """Semantic ``height x width`` uint8 map of one image's instance annotations: 0 background, crowd
    255, non-crowd instances drawn largest first with ``cat_to_label[category_id]``."""
    out = np.zeros((height, width), dtype=np.uint8)
    for a in anns:
        if a.get("iscrowd", 0):
            out[segmentation_to_mask(a["segmentation"], height, width)] = IGNORE_INDEX
    for a in sorted((a for a in anns if not a.get("iscrowd", 0)), key=lambda a: -float(a.get("area", 0))):
        out[segmentation_to_mask(a["segmentation"], height, width)] = cat_to_label[a["category_id"]]
    return out


Classes = str | Path | list | ClassList | None  # a reader's ``classes`` argument


class COCOObjectDataset(SegDataset):
    """COCO-Object: background + the 80 thing classes, from ``instances_<split>.json``."""

    name = "coco-object"

    def __init__(self, root: str | Path, split: str = "val2017", classes: Classes = None,
                 transform: Callable | None = None):
        self.root, self.split = Path(root), _split_name(split)
        ann_file = self.root / "annotations" / f"instances_{self.split}.json"
        if not ann_file.is_file():
            raise DatasetError(f"{self.root}: no annotations/instances_{self.split}.json")
        try:
            data = json.loads(ann_file.read_text(encoding="utf-8"))
            cats = sorted(data["categories"], key=lambda c: c["id"])
            images = sorted(data["images"], key=lambda im: im["id"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DatasetError(f"{ann_file}: not a COCO instances file ({type(e).__name__}: {e})") from None
        self.cat_to_label = {c["id"]: i + 1 for i, c in enumerate(cats)}
        if classes is None and len(cats) != 80:  # a custom COCO-format set: its own category names
            classes = ["background"] + [c["name"] for c in cats]
        self.image_dir = _image_dir(self.root, self.split)
        self.images = images
        self.anns: dict[int, list[dict]] = defaultdict(list)
        for a in data.get("annotations", []):
            self.anns[a["image_id"]].append(a)
        ids = [Path(im["file_name"]).stem for im in images]
        super().__init__(ids, load_classes(classes, "coco_object"), transform)
        if self.num_classes != len(cats) + 1:
            raise DatasetError(
                f"{ann_file} has {len(cats)} categories but the class list has {self.num_classes} "
                f"classes (expected background + {len(cats)})"
            )

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.images[index]["file_name"]

    def load_mask(self, index: int) -> np.ndarray:
        im = self.images[index]
        try:
            return rasterize_instances(self.anns.get(im["id"], []), im["height"], im["width"], self.cat_to_label)
        except (KeyError, ValueError, TypeError) as e:
            raise DatasetError(f"{self.ids[index]}: bad annotation ({type(e).__name__}: {e})") from None


class COCOStuffDataset(SegDataset):
    """COCO-Stuff 164k: 171 classes from the stuffthingmaps label PNGs."""

    name = "coco-stuff"

    def __init__(self, root: str | Path, split: str = "val2017", classes: Classes = None,
                 transform: Callable | None = None):
        self.root, self.split = Path(root), _split_name(split)
        self.image_dir = _image_dir(self.root, self.split)
        cands = [self.root / "annotations" / self.split, self.root / "stuffthingmaps" / self.split]
        self.label_dir = next((d for d in cands if d.is_dir()), None)
        if self.label_dir is None:
            raise DatasetError(f"{self.root}: no annotations/{self.split}/ or stuffthingmaps/{self.split}/")
        ids = sorted(p.stem for p in self.image_dir.glob("*.jpg"))
        if not ids:
            raise DatasetError(f"{self.image_dir}: no .jpg images")
        super().__init__(ids, load_classes(classes, "coco_stuff"), transform)

    def image_path(self, index: int) -> Path:
        return self.image_dir / f"{self.ids[index]}.jpg"

    def load_mask(self, index: int) -> np.ndarray:
        sid = self.ids[index]
        converted = self.label_dir / f"{sid}_labelTrainIds.png"
        if converted.is_file():
            return read_label_png(converted, sid)
        raw = read_label_png(self.label_dir / f"{sid}.png", sid)
        return STUFF_LUT[np.clip(raw, 0, 255)]
