"""The one split-file reader (textseg.data.splits): splits/*.txt, VOC ImageSets, images_meta.json,
used by the folder reader, the caption datasets and the CAM commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from textseg.data.folder import FolderDataset
from textseg.data.splits import read_split_file, split_ids
from textseg.errors import TextsegError


def _folder(root, ids):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in ids:
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "images" / f"{i}.jpg")
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "masks" / f"{i}.png")
    (root / "classes.txt").write_text("background\ncat\n")


def test_split_file_normalisation(tmp_path):
    f = tmp_path / "s.txt"
    f.write_text("# header\nimages/a.jpg\n\nb 1\nc.png\nd\n")
    assert read_split_file(f) == ["a", "b", "c", "d"]


def test_lookup_order_and_images_meta(tmp_path):
    root = tmp_path / "set"
    _folder(root, ["a", "b", "c"])
    meta = [{"image": "b", "split": "val"}, {"image": "a", "split": "train"}, {"image": "c", "split": "val"}]
    (root / "images_meta.json").write_text(json.dumps(meta))
    assert split_ids(root, "val") == ["b", "c"]
    assert FolderDataset(root, split="val").ids == ["b", "c"]  # the folder reader reads images_meta.json
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("c\n")
    assert split_ids(root, "val") == ["c"]  # VOC ImageSets before images_meta.json
    (root / "splits").mkdir()
    (root / "splits" / "val.txt").write_text("a\nb\n")
    assert split_ids(root, "val") == ["a", "b"]  # splits/ first
    with pytest.raises(TextsegError, match=r"split 'test' not found.*available: \['train', 'val'\]"):
        split_ids(root, "test")


def test_coco_mini_splits_without_a_splits_folder(coco_mini):
    meta = json.loads((coco_mini / "images_meta.json").read_text())
    val = [m["image"] for m in meta if m["split"] == "val2017"]
    ds = FolderDataset(coco_mini, split="val2017", masks="masks_voc21", classes="classes_voc21.txt")
    assert ds.ids == val and len(val) == 79
