"""The offline model's resolution / edge-refinement options (issue 20): stride-16 trunk and PAMR of the
label logits run by the Segmenter (``OfflineCfg.pamr_*``, ``SegmentCfg.pamr="auto"``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from textseg.errors import TextsegError
from textseg.examples import example_path
from textseg.models.offline import V1_SETTINGS, OfflineCfg, OfflineModel
from textseg.segment import SegmentCfg, Segmenter
from textseg.segment.pamr import pamr
from textseg.weights.load import load_model

LABELS = "cat, sofa, background"  # the README demo's labels


@pytest.fixture(scope="module")
def refined() -> OfflineModel:
    return OfflineModel(OfflineCfg())  # the v2 default: stride 16 + PAMR 10 x (1, 2, 4, 8) at / 4


def test_v1_keeps_stride_32_and_no_refinement(refined):
    assert refined.dense_stride == 16 and refined.cfg.pamr_iterations == 10  # v2's defaults (issue 20)
    v1 = load_model("offline-bridge")
    assert v1.cfg.output_stride == 32 and v1.dense_stride == 32
    assert v1.cfg.pamr_iterations == 0 and v1.default_pamr is None
    assert {k: getattr(v1.cfg, k) for k in V1_SETTINGS} == V1_SETTINGS
    assert refined.segment_flip is True and v1.segment_flip is False  # v2 also scores the mirrored photo
    assert Segmenter(refined).flip is True and Segmenter(v1).flip is False
    assert refined.default_background_threshold == 0.45 and v1.default_background_threshold == 0.5
    # a saved config reloads to the same settings (JSON turns the dilations into a list)
    d = json.loads(json.dumps(OfflineModel(OfflineCfg(pamr_iterations=3, pamr_dilations=(1, 2)), ).config_dict()))
    cfg = OfflineCfg(**d)
    assert cfg.pamr_dilations == (1, 2) and cfg == OfflineCfg(pamr_iterations=3, pamr_dilations=(1, 2))
    with pytest.raises(TypeError):
        OfflineCfg(**{**d, "pamr_steps": 1})  # unknown settings are refused, not ignored


def test_default_pamr_is_the_segmenters_canvas_pamr(refined):
    """pamr="auto" runs exactly PAMR(iterations, dilations) of the canvas logits on the resized image
    downsampled by pamr_stride; pamr=False turns it off; the output changes."""
    assert refined.default_pamr == {"iterations": 10, "dilations": (1, 2, 4, 8), "resolution": "canvas", "stride": 4}
    img = Image.open(example_path("chelsea")).convert("RGB")
    auto = Segmenter(refined, SegmentCfg(short_side=448))
    off = Segmenter(refined, SegmentCfg(short_side=448, pamr=False))
    explicit = Segmenter(refined, SegmentCfg(short_side=448, pamr=True, pamr_resolution="canvas",
                                             pamr_dilations=(1, 2, 4, 8), pamr_stride=4, pamr_iterations=10))
    a, o, e = (s.segment(img, LABELS) for s in (auto, off, explicit))
    assert "pamr" in a.timings and "pamr" not in o.timings
    torch.testing.assert_close(a.logits_lowres, e.logits_lowres, rtol=0, atol=0)
    assert np.array_equal(a.label_map, e.label_map)
    cells = off._views[0].canvas_hw
    assert off.predict(LABELS).logits_lowres.shape[-2:] == (cells[0] // 16, cells[1] // 16)
    assert a.logits_lowres.shape[-2:] == (cells[0] // 4, cells[1] // 4)  # refined on the image / 4, not the cells
    moved = float((a.label_map != o.label_map).mean())
    # measured 0.047 before the photo-prior lift (OfflineCfg.prior_lift), 0.0075 with it (the lifted "cat" holds
    # the photo more firmly): it moves the boundary, it does not repaint the map
    assert 0.003 < moved < 0.1, moved
    assert a.labels[int(np.bincount(a.label_map.ravel()).argmax())] == "cat"
    # by hand: the unrefined canvas logits (no threshold floor) refined with the image / 4
    raw = Segmenter(refined, SegmentCfg(short_side=448, pamr=False, threshold=None)).segment(img, LABELS).logits_lowres
    ref = pamr(auto._pamr_image(), raw[None], 10, (1, 2, 4, 8))[0]
    keep = [i for i, n in enumerate(a.labels) if n != "background"]  # background also takes the threshold floor
    torch.testing.assert_close(a.logits_lowres[keep], ref[keep], rtol=1e-5, atol=1e-5)


def test_pamr_setting_is_checked(refined):
    with pytest.raises(TextsegError, match="pamr must be"):
        Segmenter(refined, SegmentCfg(pamr="yes"))
    # other models have no default_pamr: "auto" is off for them
    assert Segmenter(load_model("offline-bridge"), SegmentCfg()).pamr_in_force() is None
    assert Segmenter(refined, SegmentCfg(pamr=False)).pamr_in_force() is None


def test_refinement_helps_on_tuning_photos(refined, coco_mini):
    """COCO-MINI train2017 (the tuning half, never val2017), VOC-21 view, first 12 photos: the refined map
    beats the unrefined one (both at stride 16, the v2 default). Measured: 24.00 -> 26.82 mIoU, pixel
    accuracy 86.93 -> 89.50 % (stride 32: 26.39 -> 27.46, 87.15 -> 88.09 %)."""
    from textseg.metrics import ConfusionMatrix

    meta = json.loads((coco_mini / "images_meta.json").read_text())
    ids = sorted(m["image"] for m in meta if m["split"] == "train2017")[:12]
    names = [n.strip() for n in (coco_mini / "classes_voc21.txt").read_text().split("\n") if n.strip()]
    segs = {k: Segmenter(refined, SegmentCfg(pamr="auto" if k else False)) for k in (True, False)}
    cms = {k: ConfusionMatrix(len(names)) for k in segs}
    for i in ids:
        img = Image.open(coco_mini / "images" / f"{i}.jpg").convert("RGB")
        mask = torch.from_numpy(np.array(Image.open(coco_mini / "masks_voc21" / f"{i}.png")).astype(np.int64))
        for k, s in segs.items():
            res = s.segment(img, names)
            cms[k].update(torch.from_numpy(res.label_map.astype(np.int64)), mask)
    on, off = cms[True].compute(), cms[False].compute()
    assert on.miou > off.miou + 0.01, (on.miou, off.miou)
    assert on.pixel_accuracy > off.pixel_accuracy + 0.01, (on.pixel_accuracy, off.pixel_accuracy)
