"""Image-level labels (which classes an image contains) for CAM / weakly supervised training.

Sources, all read into one list of :class:`LabeledImage` by :func:`load_image_labels`:

* the folder layout's ``labels.json`` (``{id: [class names]}``, images in ``images/<id>.*``);
* PASCAL VOC: ``Annotations/*.xml`` (object names) or ``ImageSets/Main/<class>_<split>.txt``
  classification files (``1`` present, ``0`` present-but-difficult, ``-1`` absent), images in
  ``JPEGImages/``;
* COCO ``instances_*.json`` (categories of the image's annotations; crowd ones included).

Class names are matched to a class list by :func:`canonical` (case, spaces, ``_``/``-`` ignored) plus
the COCO -> VOC spellings in :data:`ALIASES` (``airplane`` -> ``aeroplane``, ``couch`` -> ``sofa``,
``tv`` -> ``tvmonitor``...), so COCO-named labels train a VOC-named class list directly. Names that
match no class are dropped (e.g. COCO's 60 non-VOC classes for a VOC class list).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import torch

from textseg.errors import TextsegError
from textseg.io import IMAGE_EXTENSIONS
from textseg.text import parse_labels, read_labels_file

ALIASES = {
    "airplane": "aeroplane",
    "motorcycle": "motorbike",
    "couch": "sofa",
    "tv": "tvmonitor",
    "monitor": "tvmonitor",
    "diningtable": "diningtable",
    "pottedplant": "pottedplant",
}

# Compact VOC names -> words a text encoder understands (used for prompts).
PROMPT_NAMES = {
    "aeroplane": "aeroplane",
    "diningtable": "dining table",
    "pottedplant": "potted plant",
    "tvmonitor": "tv monitor",
    "motorbike": "motorbike",
}

BACKGROUND_NAMES = ("background", "_background_", "bg")


def canonical(name: str) -> str:
    """Matching key of a class name: lower case without spaces, ``_`` or ``-``, aliases applied."""
    key = "".join(ch for ch in name.lower() if ch not in " _-")
    return ALIASES.get(key, key)


def prompt_name(name: str) -> str:
    """A class name as words for a prompt (``pottedplant`` -> ``potted plant``, ``tv_monitor`` ->
    ``tv monitor``)."""
    key = "".join(ch for ch in name.lower() if ch not in " _-")
    return PROMPT_NAMES.get(key, name.replace("_", " "))


@dataclass
class LabeledImage:
    """One training image and the class names its label lists."""

    id: str
    path: Path
    names: list[str]


def class_file_names(path: str | Path) -> list[str]:
    """Class names of a ``classes.txt``, one a line, in order (the display name of each line in the
    one label grammar, :func:`textseg.text.read_labels_file`)."""
    return [c.name for c in read_labels_file(path)]


def read_class_list(source: str | Path | list[str]) -> list[str]:
    """Foreground class names from a ``classes.txt`` (:func:`class_file_names`) or a list / comma
    string; a leading ``background`` entry is dropped."""
    if isinstance(source, (list, tuple)):
        names = [str(n).strip() for n in source]
    else:
        p = Path(source)
        if p.is_file():
            names = class_file_names(p)
        elif "," in str(source) or not p.suffix:
            names = [c.name for c in parse_labels(str(source))]
        else:
            raise TextsegError(f"{source}: no such class list file")
    names = [n for n in names if n]
    if names and names[0].lower() in BACKGROUND_NAMES:
        names = names[1:]
    if not names:
        raise TextsegError(f"class list {source!r} is empty")
    return names


def multi_hot(names: list[str], class_names: list[str]) -> torch.Tensor:
    """``K`` float multi-hot vector of ``names`` over ``class_names`` (unknown names ignored)."""
    index = {canonical(c): i for i, c in enumerate(class_names)}
    target = torch.zeros(len(class_names))
    for n in names:
        i = index.get(canonical(n))
        if i is not None:
            target[i] = 1.0
    return target


def _find_image(folder: Path, stem: str) -> Path | None:
    for ext in IMAGE_EXTENSIONS:
        for cand in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
            if cand.is_file():
                return cand
    return None


def read_labels_json(path: str | Path, images: str | Path | None = None) -> list[LabeledImage]:
    """``labels.json`` (``{id: [names]}``) with images in ``images/`` next to it (or ``images``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise TextsegError(f"{path}: cannot read labels ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise TextsegError(f"{path}: expected {{image id: [class names]}}")
    folder = Path(images) if images else path.parent / "images"
    out = []
    for stem in sorted(data):
        img = _find_image(folder, stem)
        if img is None:
            raise TextsegError(f"{path}: image {stem!r} not found in {folder}")
        out.append(LabeledImage(stem, img, [str(n) for n in data[stem]]))
    return out


def read_voc_xml(root: str | Path, ids: list[str] | None = None) -> list[LabeledImage]:
    """VOC ``Annotations/<id>.xml`` object names (images in ``JPEGImages/``)."""
    root = Path(root)
    files = sorted((root / "Annotations").glob("*.xml")) if ids is None else [
        root / "Annotations" / f"{i}.xml" for i in ids
    ]
    out = []
    for f in files:
        try:
            tree = ET.parse(f)
        except (OSError, ET.ParseError) as e:
            raise TextsegError(f"{f}: cannot parse VOC annotation ({e})") from None
        names = sorted({(o.findtext("name") or "").strip() for o in tree.getroot().iter("object")} - {""})
        img = _find_image(root / "JPEGImages", f.stem)
        if img is None:
            raise TextsegError(f"{f}: image not found in {root / 'JPEGImages'}")
        out.append(LabeledImage(f.stem, img, names))
    return out


def read_voc_cls(root: str | Path, split: str = "train") -> list[LabeledImage]:
    """VOC ``ImageSets/Main/<class>_<split>.txt`` files (``1`` and ``0`` = present)."""
    root = Path(root)
    files = sorted((root / "ImageSets" / "Main").glob(f"*_{split}.txt"))
    if not files:
        raise TextsegError(f"{root}: no ImageSets/Main/*_{split}.txt classification files")
    labels: dict[str, set[str]] = {}
    for f in files:
        cls = f.name[: -len(f"_{split}.txt")]
        for line in f.read_text().splitlines():
            parts = line.split()
            if len(parts) != 2:
                continue
            labels.setdefault(parts[0], set())
            if int(parts[1]) >= 0:
                labels[parts[0]].add(cls)
    out = []
    for stem in sorted(labels):
        img = _find_image(root / "JPEGImages", stem)
        if img is None:
            raise TextsegError(f"{root}: image {stem!r} not found in JPEGImages/")
        out.append(LabeledImage(stem, img, sorted(labels[stem])))
    return out


def read_coco_json(path: str | Path, images: str | Path) -> list[LabeledImage]:
    """COCO ``instances_*.json``: each image's annotated category names; images under ``images``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        cats = {c["id"]: c["name"] for c in data["categories"]}
        files = {im["id"]: im["file_name"] for im in data["images"]}
        anns = data.get("annotations", [])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise TextsegError(f"{path}: not a COCO instances file ({e})") from None
    names: dict[int, set[str]] = {i: set() for i in files}
    for a in anns:
        if a.get("image_id") in names and a.get("category_id") in cats:
            names[a["image_id"]].add(cats[a["category_id"]])
    out = []
    for i in sorted(files, key=lambda k: files[k]):
        p = Path(images) / files[i]
        out.append(LabeledImage(Path(files[i]).stem, p, sorted(names[i])))
    return out


def load_image_labels(source: str | Path, labels: str | Path | None = None,
                      images: str | Path | None = None, split: str = "train") -> list[LabeledImage]:
    """Labeled images from a dataset folder or labels file (see the module docstring).

    ``source``: a folder-layout dataset (``labels.json``), a VOC root (``Annotations/`` or
    ``ImageSets/Main``), or a labels file. ``labels``: an explicit labels file (``labels.json`` or a
    COCO instances JSON). ``images``: where the images are, when not the layout's default.
    """
    source = Path(source)
    if labels is None and source.is_file():
        labels, source = source, source.parent
    if labels is not None:
        labels = Path(labels)
        if not labels.is_file():
            raise TextsegError(f"{labels}: no such labels file")
        head = labels.read_text(encoding="utf-8")[:4096]
        if '"categories"' in head or '"annotations"' in head or '"images"' in head:
            return read_coco_json(labels, images or source)
        return read_labels_json(labels, images or (source / "images"))
    if (source / "labels.json").is_file():
        return read_labels_json(source / "labels.json", images)
    if (source / "ImageSets" / "Main").is_dir() and any((source / "ImageSets" / "Main").glob(f"*_{split}.txt")):
        return read_voc_cls(source, split)
    if (source / "Annotations").is_dir():
        return read_voc_xml(source)
    raise TextsegError(
        f"{source}: no image-level labels found (expected labels.json, VOC Annotations/ or "
        "ImageSets/Main/*_<split>.txt, or pass --labels FILE)"
    )
