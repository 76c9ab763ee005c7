"""The Segmenter's default (pixel-resolution) CLIP inference against the official slide / whole-image
inference and postprocessing, transcribed here from the repositories (not read from textseg):

- SCLIP ``clip_segmentor.py`` (wangf3014/SCLIP @ b56bd30): ``forward_feature`` (cosine logits of the
  patch tokens, bilinear to the crop's pixels), ``forward_slide`` (h_grids / w_grids, last crop aligned to
  the border, pixel canvas + count matrix, bilinear to ``ori_shape``), ``postprocess_result``
  (x logit_scale, softmax over all queries, max over each class's queries, area_thd on the arg-max map,
  argmax, max probability < prob_thd -> 0).
- NACLIP ``naclip.py`` (sinahmr/NACLIP @ 0cac3a6): ``predict`` with ``slide_crop=0`` (the whole image,
  bilinear to the input size, then to ``ori_shape``), PAMR on the query logits at ``ori_shape`` with the
  network input resized there, ``postprocess_result``.
- SC-CLIP ``scclip_segmentor.py`` (SuleBai/SC-CLIP @ 0417ba9): the same three methods as SCLIP's.
- mmseg's test ``Resize(scale=(2048, S), keep_ratio=True)``: mmcv ``rescale_size`` ``int(side * s + 0.5)``.

The dense features come from ``official_dense`` (tests/test_dense_clip.py: the official last block on
the tiny model's state dict); the network input is the Segmenter's own (its resampling is not under test).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from textseg.segment import SegmentCfg, Segmenter

sys.path.insert(0, str(Path(__file__).parent))
from test_dense_clip import official_dense, tiny_vit  # noqa: E402
from test_protocols import naclip_pamr  # noqa: E402

CLASSES = [["background", "sky"], ["red"], ["green"], ["blue", "navy"], ["yellow"]]  # class 0 = background


def query_features(model, classes):
    words = [w for c in classes for w in c]
    idx = torch.tensor([i for i, c in enumerate(classes) for _ in c])
    with torch.no_grad():
        q = model.encode_text(model.tokenize(words))  # one template "{}": normalise, mean of one, normalise
    q = q / q.norm(dim=-1, keepdim=True)
    return q / q.norm(dim=-1, keepdim=True), idx


def forward_feature(model, img, query, mode, logit_size=None):
    feats = official_dense(model, img, mode)  # B x D x (H // p) x (W // p): the conv drops the remainder
    feats = feats / feats.norm(dim=1, keepdim=True)
    logits = torch.einsum("bdhw,qd->bqhw", feats, query)
    return F.interpolate(logits, size=logit_size or img.shape[-2:], mode="bilinear")


def forward_slide(model, img, query, mode, stride, crop, ori_shape):
    _, _, h_img, w_img = img.shape
    h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
    preds = img.new_zeros((1, query.shape[0], h_img, w_img))
    count_mat = img.new_zeros((1, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + crop, h_img), min(x1 + crop, w_img)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            crop_seg_logit = forward_feature(model, img[:, :, y1:y2, x1:x2], query, mode)
            preds += F.pad(crop_seg_logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
            count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    return F.interpolate(preds / count_mat, size=ori_shape, mode="bilinear"), h_grids * w_grids


def postprocess(seg_logits, query_idx, logit_scale, prob_thd=0.0, area_thd=None):
    seg_logits = (seg_logits[0] * logit_scale).softmax(0)
    num_cls, num_queries = int(max(query_idx)) + 1, len(query_idx)
    if num_cls != num_queries:
        cls_index = F.one_hot(query_idx).T.view(num_cls, num_queries, 1, 1)
        seg_logits = (seg_logits.unsqueeze(0) * cls_index).max(1)[0]
    if area_thd is not None:
        predictions = F.one_hot(seg_logits.argmax(0), num_cls).to(seg_logits.dtype)
        area_pred = predictions[:, :, 1:].sum((0, 1), keepdim=True)
        area_pred = (area_pred > area_thd * area_pred.sum()).to(seg_logits.dtype)
        seg_logits[1:] *= area_pred.transpose(0, -1)
    seg_pred = seg_logits.argmax(0, keepdim=True)
    seg_pred[seg_logits.max(0, keepdim=True)[0] < prob_thd] = 0
    return seg_logits, seg_pred[0]


def image(h=45, w=61, seed=0):
    rng = np.random.default_rng(seed)
    img = np.repeat(np.repeat(rng.integers(0, 256, (h // 9 + 1, w // 9 + 1, 3)), 9, 0), 9, 1)[:h, :w]
    return (img + rng.integers(-30, 30, img.shape)).clip(0, 255).astype(np.uint8)


def segmenter(model, scale, **kw):
    cfg = SegmentCfg(templates=("{}",), temperature=float(model.logit_scale_value.detach()) / scale, **kw)
    return Segmenter(model, cfg)


def test_sclip_slide_inference_and_postprocess_are_the_official():
    model = tiny_vit()
    img = image()  # 45 x 61: not a multiple of the 8-pixel patch
    crop, stride, scale = 28, 12, 65.0  # a crop that is not a multiple of the patch either
    seg = segmenter(model, scale, mode="sclip", short_side=None, slide=(crop, stride))
    seg.set_image(img)
    x = seg._image_input  # the network input (normalised), at the exact image size
    assert x.shape[-2:] == (45, 61)
    q, idx = query_features(model, [c[:1] for c in CLASSES])  # one query per class: compare probabilities
    with torch.no_grad():
        logits, n_crops = forward_slide(model, x, q, "sclip", stride, crop, (45, 61))
    assert n_crops == 3 * 4 and len(seg._views[0].boxes) == n_crops
    probs, pred = postprocess(logits, idx, scale)
    res = seg.predict([c[0] for c in CLASSES])
    torch.testing.assert_close(res.probs, probs, atol=1e-5, rtol=0)
    assert np.array_equal(res.label_map, pred.numpy())
    assert len(np.unique(res.label_map)) >= 3

    # synonyms (softmax over all queries, max per class), area_thd and prob_thd, as the SCLIP VOC config
    q, idx = query_features(model, CLASSES)
    with torch.no_grad():
        logits, _ = forward_slide(model, x, q, "sclip", stride, crop, (45, 61))
    _, plain = postprocess(logits.clone(), idx, scale)
    _, want = postprocess(logits, idx, scale, prob_thd=0.3, area_thd=0.15)
    seg.cfg.threshold, seg.cfg.area_threshold = 0.3, 0.15
    res = seg.predict(["; ".join(c) for c in CLASSES])  # "background; sky", ..., "blue; navy"
    assert res.labels == ["background", "red", "green", "blue", "yellow"]
    assert np.array_equal(res.label_map, want.numpy())
    assert res.dropped and not np.array_equal(plain.numpy(), want.numpy())  # both rules bit here


def test_sc_clip_slide_inference_and_postprocess_are_the_official():
    """SC-CLIP scclip_segmentor.py (SuleBai/SC-CLIP @ 0417ba9): forward_feature / forward_slide /
    postprocess_result are SCLIP's (transcribed above); its features are official_scclip's (12 blocks)."""
    model = tiny_vit(layers=12, image_size=48)
    img = image(56, 83, seed=3)
    crop, stride, scale = 48, 20, 50.0  # crops of 6 x 6 patches: enough for LOF's 30 neighbours
    seg = segmenter(model, scale, mode="sc-clip", short_side=None, slide=(crop, stride))
    assert segmenter(model, scale, short_side=None).mode == "sc-clip"  # the default on a 12-block ViT
    seg.set_image(img)
    x = seg._image_input
    q, idx = query_features(model, [c[:1] for c in CLASSES])  # one query per class: compare probabilities
    with torch.no_grad():
        logits, n_crops = forward_slide(model, x, q, "sc-clip", stride, crop, (56, 83))
    assert n_crops == 2 * 3 and len(seg._views[0].boxes) == n_crops
    probs, pred = postprocess(logits, idx, scale)
    res = seg.predict([c[0] for c in CLASSES])
    torch.testing.assert_close(res.probs, probs, atol=1e-5, rtol=0)
    assert np.array_equal(res.label_map, pred.numpy()) and probs.std(dim=(1, 2)).max() > 1e-2  # not flat
    # synonyms, area_thd and prob_thd as the SC-CLIP VOC-21 config
    q, idx = query_features(model, CLASSES)
    with torch.no_grad():
        logits, _ = forward_slide(model, x, q, "sc-clip", stride, crop, (56, 83))
    _, want = postprocess(logits, idx, scale, prob_thd=0.15, area_thd=0.1)
    seg.cfg.threshold, seg.cfg.area_threshold = 0.15, 0.1
    res = seg.predict(["; ".join(c) for c in CLASSES])
    assert np.array_equal(res.label_map, want.numpy())


def test_naclip_whole_image_with_pamr_is_the_official():
    model = tiny_vit()
    img = image(37, 50, seed=1)
    scale = 40.0
    seg = segmenter(model, scale, mode="naclip", short_side=44, slide=None, pamr=True)
    seg.set_image(img)
    x = seg._image_input
    assert x.shape[-2:] == (44, int(50 * 44 / 37 + 0.5))  # mmcv keep-ratio: 44 x 59, no patch rounding
    q, idx = query_features(model, [c[:1] for c in CLASSES])
    with torch.no_grad():
        logits = forward_feature(model, x, q, "naclip")  # bilinear to the network input's size
        logits = F.interpolate(logits, size=(37, 50), mode="bilinear", align_corners=False)
        big = F.interpolate(x, size=(37, 50), mode="bilinear", align_corners=False)
        logits = naclip_pamr(big, logits)
    probs, pred = postprocess(logits, idx, scale)
    res = seg.predict([c[0] for c in CLASSES])
    torch.testing.assert_close(res.probs, probs / probs.sum(0, keepdim=True), atol=1e-5, rtol=0)
    assert np.array_equal(res.label_map, pred.numpy())
    # the patch-cell canvas stays available by name and computes something else
    canvas = segmenter(model, scale, mode="naclip", short_side=44, pamr=True, resolution="canvas").segment(
        img, [c[0] for c in CLASSES])
    assert canvas.probs.shape == res.probs.shape and not torch.allclose(canvas.probs, res.probs, atol=1e-3)


def test_pixel_path_is_chunked_and_banded(monkeypatch):
    """Class chunks of the pixel canvas and bands at the original size give the same answer."""
    import textseg.segment.segmenter as segmod
    import textseg.segment.slide as slide

    model = tiny_vit()
    img = image(45, 61, seed=2)
    seg = segmenter(model, 50.0, mode="clearclip", short_side=None, slide=(24, 16), threshold=0.3)
    labels = ["background; sky", "red", "green", "blue; navy", "yellow"]
    ref = seg.segment(img, labels)
    monkeypatch.setattr(segmod, "PIXEL_BUDGET", 45 * 61)  # one prompt per chunk
    monkeypatch.setattr(segmod, "BAND_BUDGET", 200)
    monkeypatch.setattr(slide, "BAND_BUDGET", 200)
    small = seg.predict(labels)
    assert np.array_equal(small.label_map, ref.label_map)
    torch.testing.assert_close(small.logits_lowres, ref.logits_lowres, atol=1e-5, rtol=0)


def test_eval_protocol_runs_the_pixel_path(tmp_path):
    from eval_worker import make_folder
    from seg_tiny import save_tiny_clip

    from textseg.cli import main as cli

    save_tiny_clip(tmp_path / "tiny.safetensors")
    root = make_folder(tmp_path / "set", n=2)
    out = tmp_path / "r.json"
    assert cli(["eval", "--dataset", "folder", "--root", str(root), "--weights", str(tmp_path / "tiny.safetensors"),
                "--protocol", "naclip:voc20", "--short-side", "44", "--templates", "none", "--no-progress",
                "--out", str(out)]) == 0
    seg = json.loads(out.read_text())["config"]["segment"]
    assert seg["resolution"] == "pixel" and seg["slide"] is None and seg["pamr"] is True


@pytest.mark.parametrize("bad", ["patch", "cells"])
def test_bad_resolution_is_one_clear_error(bad):
    from textseg.errors import TextsegError

    with pytest.raises(TextsegError, match="resolution must be one of"):
        Segmenter(tiny_vit(), SegmentCfg(resolution=bad))
