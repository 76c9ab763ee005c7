"""FolderDataset on a synthetic tree and on the real ../shared/data folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from textseg.data.base import DatasetError
from textseg.data.folder import FolderDataset


def _tree(root, n=3, size=(12, 8)):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("sky\nroad; street\ncar, automobile\n")
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            root / "images" / f"im{i}.jpg"
        )
        m = rng.integers(0, 3, (size[1], size[0]), dtype=np.uint8)
        m[0, 0] = 255
        Image.fromarray(m).save(root / "masks" / f"im{i}.png")
    return root


def test_reads_layout_splits_and_synonyms(tmp_path):
    root = _tree(tmp_path / "set")
    (root / "splits").mkdir()
    (root / "splits" / "test.txt").write_text("im2\n\nimages/im0.jpg\n")
    ds = FolderDataset(root)
    assert len(ds) == 3 and ds.ids == ["im0", "im1", "im2"]
    assert ds.class_names == ["sky", "road", "car"]
    assert ds.class_prompts[1] == ["road", "street"] and ds.class_prompts[2] == ["car", "automobile"]
    s = ds[1]
    assert s["id"] == "im1" and s["image"].mode == "RGB" and s["image"].size == (12, 8)
    assert s["mask"].dtype == np.uint8 and s["mask"].shape == (8, 12)
    assert np.array_equal(s["mask"], np.asarray(Image.open(root / "masks" / "im1.png")))
    test = FolderDataset(root, split="test")
    assert test.ids == ["im2", "im0"]
    with pytest.raises(DatasetError, match="available: \\['test'\\]"):
        FolderDataset(root, split="val")


def test_overrides_and_labels(tmp_path):
    root = _tree(tmp_path / "set")
    (root / "masks_two").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 12), i % 2, np.uint8)).save(root / "masks_two" / f"im{i}.png")
    (root / "classes_two.txt").write_text("background\nthing\n")
    (root / "labels.json").write_text(json.dumps({"im0": ["road"]}))
    ds = FolderDataset(root, masks="masks_two", classes="classes_two.txt")
    assert ds.class_names == ["background", "thing"] and int(ds[1]["mask"].max()) == 1
    assert ds.image_labels == {"im0": ["road"]} and ds.labels_from_mask(1) == [1]
    assert FolderDataset(root, masks="masks_two", classes="voc21").num_classes == 21  # shipped list
    with pytest.raises(DatasetError, match="mask folder 'nope'"):
        FolderDataset(root, masks="nope")


def test_per_image_errors_are_clear(tmp_path):
    root = _tree(tmp_path / "set", n=4)
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "masks" / "im0.png")  # wrong size
    Image.fromarray(np.full((8, 12), 7, np.uint8)).save(root / "masks" / "im1.png")  # id 7 of 3 classes
    (root / "masks" / "im2.png").unlink()  # missing
    ds = FolderDataset(root)
    with pytest.raises(DatasetError, match="im0: mask is 5x5 but image is 12x8"):
        ds[0]
    with pytest.raises(DatasetError, match="im1: mask holds class id 7 beyond the 3 classes"):
        ds[1]
    with pytest.raises(DatasetError, match="im2: mask .* is missing"):
        ds[2]
    assert ds[3]["id"] == "im3"  # the others still load
    with pytest.raises(DatasetError, match="no images/ folder"):
        FolderDataset(tmp_path)


def test_real_coco_mini_voc21_view(coco_mini):
    ds = FolderDataset(coco_mini, masks="masks_voc21", classes="classes_voc21.txt")
    assert len(ds) == 159 and ds.num_classes == 21 and ds.class_names[0] == "background"
    s = ds[0]
    assert s["mask"].shape == (s["image"].height, s["image"].width)
    full = FolderDataset(coco_mini)
    assert full.num_classes == 81 and full.image_labels is not None


def test_real_camvid_test_split(camvid):
    ds = FolderDataset(camvid, split="test")
    assert len(ds) == 233 and ds.num_classes == 11
    s = ds[0]
    assert s["image"].size == (480, 360) and s["mask"].shape == (360, 480)


def test_class_file_format_and_shipped_lists(tmp_path):
    from textseg.data.classnames import BUILTIN, load_classes
    from textseg.text import LabelClass, parse_class_spec

    assert parse_class_spec("tvmonitor: tv monitor; television") == LabelClass("tvmonitor", ("tv monitor", "television"))
    assert parse_class_spec("person, person in shirt") == LabelClass("person", ("person", "person in shirt"))
    assert parse_class_spec("sign symbol") == LabelClass("sign symbol", ("sign symbol",))
    sizes = {"voc21": 21, "voc20": 20, "context60": 60, "context59": 59, "coco_object": 81,
             "coco_stuff": 171, "ade150": 150, "cityscapes": 19}
    assert set(sizes) == set(BUILTIN)
    for name, n in sizes.items():
        cl = load_classes(name, default=name)
        assert len(cl) == n and len(cl.prompts) == n and all(cl.prompts), name
    voc = load_classes(None, default="voc21")
    assert voc.names[0] == "background" and "sky" in voc.prompts[0] and "background" not in voc.prompts[0]
    assert voc.names[20] == "tvmonitor" and "tv monitor" in voc.prompts[20]
    assert voc.names[15] == "person" and "person in shirt" in voc.prompts[15]
    assert load_classes(["a: x; y", "b"], default="voc21").prompts == [["x", "y"], ["b"]]
