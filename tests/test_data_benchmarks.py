"""Each benchmark reader on a tiny synthetic tree in the exact official layout (names, palette PNGs,
.mat files, COCO JSON schema), generated here."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from textseg.data.base import DatasetError
from textseg.data.benchmarks import DATASETS, build_dataset
from textseg.data.coco import rle_decode_string, rle_to_mask, segmentation_to_mask


def _jpg(path, w, h):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(path)


def _png(path, arr, palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    img = Image.frombytes("P" if palette else "L", (arr.shape[1], arr.shape[0]), arr.tobytes())
    if palette:  # VOC's SegmentationClass PNGs: palette indices = class ids
        img.putpalette(_voc_palette())
    img.save(path)


def _voc_palette():
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def test_voc_palette_pngs_21_and_20_class_views(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    mask = np.array([[0, 0, 15, 15], [255, 20, 20, 1]], np.uint8)
    _jpg(voc / "JPEGImages" / "2007_000033.jpg", 4, 2)
    _png(voc / "SegmentationClass" / "2007_000033.png", mask, palette=True)
    assert Image.open(voc / "SegmentationClass" / "2007_000033.png").mode == "P"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n")
    for root in (tmp_path, tmp_path / "VOCdevkit", voc):  # any of the three levels
        ds = build_dataset("voc", root)
        assert ds.num_classes == 21 and ds.ids == ["2007_000033"]
        assert np.array_equal(ds[0]["mask"], mask)
    ds20 = build_dataset("voc20", tmp_path)
    assert ds20.num_classes == 20 and ds20.class_names[14] == "person"
    assert ds20[0]["mask"].tolist() == [[255, 255, 14, 14], [255, 19, 19, 0]]
    with pytest.raises(DatasetError, match="no split 'test'"):
        build_dataset("voc", tmp_path, split="test")


def test_context_mat_and_mmseg_png_layouts(tmp_path):
    from scipy.io import savemat

    voc = tmp_path / "VOCdevkit" / "VOC2010"
    _jpg(voc / "JPEGImages" / "2008_000002.jpg", 3, 2)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "val.txt").write_text("2008_000002\n")
    (tmp_path / "trainval").mkdir()
    # 459-class ids: 2 aeroplane, 458 wood, 284 person, 5 (not among the 59), 0 unlabelled
    label_map = np.array([[2, 458, 284], [5, 0, 2]], np.uint16)
    savemat(tmp_path / "trainval" / "2008_000002.mat", {"LabelMap": label_map})
    ds = build_dataset("context", tmp_path)
    assert ds.num_classes == 60 and ds.class_names[37] == "person"
    assert ds[0]["mask"].tolist() == [[1, 59, 37], [0, 0, 1]]
    assert build_dataset("context59", tmp_path)[0]["mask"].tolist() == [[0, 58, 36], [255, 255, 0]]
    # mmseg conversion in VOC2010/SegmentationClassContext takes precedence
    _png(voc / "SegmentationClassContext" / "2008_000002.png", np.array([[0, 1, 2], [59, 0, 0]]))
    assert build_dataset("context", tmp_path)[0]["mask"].tolist() == [[0, 1, 2], [59, 0, 0]]


def test_ade20k(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    _jpg(root / "images" / "validation" / "ADE_val_00000001.jpg", 3, 1)
    _png(root / "annotations" / "validation" / "ADE_val_00000001.png", np.array([[0, 1, 150]]))
    ds = build_dataset("ade", tmp_path)
    assert ds.num_classes == 150 and ds.ids == ["ADE_val_00000001"] and ds.class_names[0] == "wall"
    assert ds[0]["mask"].tolist() == [[255, 0, 149]]


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    stem = "frankfurt_000000_000294"
    _jpg(tmp_path / "leftImg8bit" / "val" / "frankfurt" / f"{stem}_leftImg8bit.png", 5, 1)
    _png(tmp_path / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelIds.png", np.array([[7, 33, 0, 26, 1]]))
    ds = build_dataset("cityscapes", tmp_path)
    assert ds.ids == [f"frankfurt/{stem}"] and ds.num_classes == 19
    assert ds[0]["mask"].tolist() == [[0, 18, 255, 13, 255]]


def test_coco_stuff_raw_and_converted(tmp_path):
    _jpg(tmp_path / "images" / "val2017" / "000000000139.jpg", 6, 1)
    raw = np.array([[0, 12, 91, 181, 11, 255]])  # 11 = an unused slot
    _png(tmp_path / "annotations" / "val2017" / "000000000139.png", raw)
    ds = build_dataset("coco-stuff", tmp_path)
    assert ds.num_classes == 171 and ds.class_names[80] == "banner"
    assert ds[0]["mask"].tolist() == [[0, 11, 80, 170, 255, 255]]
    _png(tmp_path / "annotations" / "val2017" / "000000000139_labelTrainIds.png", np.array([[5, 5, 5, 5, 5, 255]]))
    assert ds[0]["mask"].tolist() == [[5, 5, 5, 5, 5, 255]]


def _rle_encode(mask):
    """Reference COCO compressed-RLE encoder (column-major runs, delta + 5-bit chunks)."""
    flat = mask.T.ravel().astype(np.uint8)
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    out = []
    for i, x in enumerate(runs):
        if i > 2:
            x -= runs[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out), runs


def test_rle_and_polygon_rasterisers():
    # uncompressed RLE by hand: column-major 0,1,1,0,0,0 on a 2x3 image
    m = rle_to_mask({"size": [2, 3], "counts": [1, 2, 3]})
    assert m.astype(int).tolist() == [[0, 1, 0], [1, 0, 0]]
    rng = np.random.default_rng(0)
    mask = rng.random((13, 17)) < 0.4
    s, runs = _rle_encode(mask)
    assert rle_decode_string(s) == runs
    assert np.array_equal(rle_to_mask({"size": [13, 17], "counts": s}), mask)
    sq = segmentation_to_mask([[2, 2, 6, 2, 6, 6, 2, 6]], 10, 10)
    assert sq[3:6, 3:6].all() and not sq[0].any() and not sq[:, 8:].any() and 16 <= sq.sum() <= 25


def test_coco_object_from_instances_json(tmp_path):
    _jpg(tmp_path / "val2017" / "000000000785.jpg", 10, 8)
    _jpg(tmp_path / "val2017" / "000000000872.jpg", 4, 4)
    crowd = np.zeros((8, 10), bool)
    crowd[:, 8:] = True
    crowd_rle, _ = _rle_encode(crowd)
    cats = [{"id": i, "name": f"c{i}", "supercategory": "x"} for i in range(1, 91) if i not in
            (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    assert len(cats) == 80
    anns = [
        {"id": 1, "image_id": 785, "category_id": 1, "iscrowd": 0, "area": 36.0,
         "segmentation": [[0, 0, 5, 0, 5, 5, 0, 5]], "bbox": [0, 0, 5, 5]},  # person, big
        {"id": 2, "image_id": 785, "category_id": 90, "iscrowd": 0, "area": 4.0,
         "segmentation": [[1, 1, 2, 1, 2, 2, 1, 2]], "bbox": [1, 1, 1, 1]},  # toothbrush on top
        {"id": 3, "image_id": 785, "category_id": 3, "iscrowd": 1, "area": 16.0,
         "segmentation": {"size": [8, 10], "counts": crowd_rle}, "bbox": [8, 0, 2, 8]},
    ]
    data = {"info": {}, "licenses": [], "categories": cats, "annotations": anns,
            "images": [{"id": 872, "file_name": "000000000872.jpg", "height": 4, "width": 4},
                       {"id": 785, "file_name": "000000000785.jpg", "height": 8, "width": 10}]}
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    ds = build_dataset("coco-object", tmp_path)
    assert ds.num_classes == 81 and ds.class_names[:2] == ["background", "person"]
    assert ds.class_names[80] == "toothbrush" and ds.ids == ["000000000785", "000000000872"]
    m = ds[0]["mask"]
    assert m[4, 4] == 1 and m[1, 1] == 80 and m[7, 7] == 0  # largest first, small one on top
    assert (m[:, 8:] == 255).all()  # crowd -> ignore
    assert (ds[1]["mask"] == 0).all()  # no annotations -> all background


def test_registry_rejects_unknown_and_misplaced_options(tmp_path):
    assert "folder" in DATASETS and "coco-object" in DATASETS
    with pytest.raises(DatasetError, match="unknown dataset"):
        build_dataset("imagenet", tmp_path)
    with pytest.raises(DatasetError, match="folder only"):
        build_dataset("voc", tmp_path, masks="x")
    with pytest.raises(DatasetError, match="no VOC2012/JPEGImages"):
        build_dataset("voc", tmp_path)
