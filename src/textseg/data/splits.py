"""Split files, read in one place: which image ids belong to a split.

A split of a dataset root is looked up, in this order, in

1. ``<root>/splits/<split>.txt`` (the folder layout),
2. ``<root>/ImageSets/Segmentation/<split>.txt`` (PASCAL VOC / Context),
3. ``<root>/images_meta.json``: a list of ``{"image": id, "split": name, ...}`` records (COCO-MINI).

A split file lists one id per line; blank lines and ``#`` comments are skipped, only the first
whitespace-separated field counts (VOC's ``ImageSets/Main/<class>_<split>.txt`` style), and a leading
``images/`` and an image extension are stripped, so ``images/0001.jpg`` and ``0001`` name one image.
"""

from __future__ import annotations

import json
from pathlib import Path

from textseg.errors import TextsegError
from textseg.io import IMAGE_EXTENSIONS


def read_split_file(path: str | Path) -> list[str]:
    """Ids of one split file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise TextsegError(f"split file {path} not found")
    ids = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.split()[0]
        if line.startswith("images/"):
            line = line[len("images/") :]
        p = Path(line)
        ids.append(p.stem if p.suffix.lower() in IMAGE_EXTENSIONS else line)
    return ids


def split_files(root: str | Path, split: str) -> list[Path]:
    """The split files that may hold ``split`` under ``root``, in lookup order."""
    root = Path(root)
    return [root / "splits" / f"{split}.txt", root / "ImageSets" / "Segmentation" / f"{split}.txt"]


def available_splits(root: str | Path) -> list[str]:
    """Names of the splits found under ``root`` (every source above)."""
    root = Path(root)
    names = {p.stem for folder in ("splits", "ImageSets/Segmentation") for p in (root / folder).glob("*.txt")}
    meta = root / "images_meta.json"
    if meta.is_file():
        names.update(str(m.get("split")) for m in _meta(meta) if m.get("split"))
    return sorted(names)


def _meta(path: Path) -> list[dict]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TextsegError(f"{path}: unreadable ({e})") from None
    if not isinstance(records, list) or not all(isinstance(m, dict) for m in records):
        raise TextsegError(f"{path}: expected a list of {{'image': id, 'split': name}} records")
    return records


def split_ids(root: str | Path, split: str) -> list[str]:
    """Ids of ``split`` under ``root`` (first source that has it; see the module docstring), in the
    order listed. Raises :class:`TextsegError` naming the available splits when none has it."""
    for f in split_files(root, split):
        if f.is_file():
            return read_split_file(f)
    meta = Path(root) / "images_meta.json"
    if meta.is_file():
        ids = [str(m["image"]) for m in _meta(meta) if m.get("split") == split and "image" in m]
        if ids:
            return ids
    have = available_splits(root)
    raise TextsegError(f"{root}: split {split!r} not found (no splits/{split}.txt, "
                       f"ImageSets/Segmentation/{split}.txt or such split in images_meta.json); "
                       f"available: {have or 'none'}")
