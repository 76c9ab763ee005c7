"""Segmenter, text side, slide geometry and PAMR on a tiny colour-seeing model (seg_tiny.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from seg_tiny import TinyColourModel

from textseg.errors import TextsegError
from textseg.preprocess import canvas_size
from textseg.segment import SegmentCfg, Segmenter
from textseg.segment.pamr import pamr
from textseg.segment.slide import argmax_bands, crop_boxes, upsample, upsample_bands
from textseg.text import LabelClass, TextEmbeddingCache, parse_labels, read_labels_file

TPL = ("a photo of a {}.", "a {}.")


def two_colour_image(h=48, w=64):
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (230, 20, 20)
    img[:, w // 2 :] = (20, 20, 230)
    img[h // 3 : h // 2, 8:24] = (20, 220, 20)
    return img


def make(cfg=None, **kw):
    cfg = cfg or SegmentCfg(short_side=None, templates=TPL, threshold=None, **kw)
    return Segmenter(TinyColourModel(), cfg)


# ----------------------------------------------------------------------------- text side
def test_parse_labels_synonyms_and_cleanup():
    classes = parse_labels(" cat , dog;puppy ;  , grass  field,;")
    assert classes == [
        LabelClass("cat", ("cat",)),
        LabelClass("dog", ("dog", "puppy")),
        LabelClass("grass field", ("grass field",)),
    ]
    assert parse_labels(["tv; television", ["sofa", "couch"]])[1].synonyms == ("sofa", "couch")
    for bad in ("", " , ;, ", [], ["  "]):
        with pytest.raises(TextsegError, match="no labels"):
            parse_labels(bad)
    with pytest.raises(TextsegError, match="twice"):
        parse_labels("cat,Cat")
    with pytest.raises(TextsegError, match="characters long"):
        parse_labels("x" * 1001)


def test_labels_file(tmp_path):
    p = tmp_path / "labels.txt"
    p.write_text("# classes\nbackground; sky; wall\n\nperson; man, woman\n猫\ntv: television; monitor\n",
                 encoding="utf-8")
    classes = read_labels_file(p)
    assert [c.name for c in classes] == ["background", "person", "猫", "tv"]
    assert classes[1].synonyms == ("person", "man", "woman")  # "," or ";" between synonyms in a file
    assert classes[3].synonyms == ("television", "monitor")
    with pytest.raises(TextsegError, match="cannot read"):
        read_labels_file(tmp_path / "missing.txt")


def test_cache_hit_costs_no_text_forward(tmp_path):
    model = TinyColourModel()
    cache = TextEmbeddingCache(model)
    a = cache.embed(["red", "blue"], TPL)
    assert model.text_calls == 1 and cache.text_forwards == 1
    b = cache.embed(["blue", "red"], TPL)
    assert model.text_calls == 1  # hit: no forward
    assert torch.equal(a[[1, 0]], b)
    model.prompts_seen.clear()
    cache.embed(["red", "green"], TPL)
    assert model.text_calls == 2 and model.prompts_seen == [t.format("green") for t in TPL]
    cache.embed(["red"], ("{}",))  # another template set is another key
    assert model.text_calls == 3
    # equals the model's own prompt ensemble
    assert torch.allclose(a, model.embed_texts(["red", "blue"], TPL), atol=1e-6)


def test_disk_cache_survives_a_new_process_and_keys_on_weights(tmp_path):
    model = TinyColourModel()
    first = TextEmbeddingCache(model, disk_dir=tmp_path).embed(["red", "sofa"], TPL)
    fresh = TinyColourModel()
    again = TextEmbeddingCache(fresh, disk_dir=tmp_path).embed(["sofa", "red"], TPL)
    assert fresh.text_calls == 0 and torch.equal(again, first[[1, 0]])
    other = TinyColourModel()
    with torch.no_grad():
        other.word_emb.mul_(2)
    TextEmbeddingCache(other, disk_dir=tmp_path).embed(["red"], TPL)
    assert other.text_calls == 1  # other weights -> other fingerprint -> miss


def test_segmenter_predict_reuses_image_features_and_text_cache():
    seg = make()
    seg.set_image(two_colour_image())
    calls = seg.model.dense_calls
    seg.predict("red, blue")
    t = seg.model.text_calls
    seg.predict("blue, red")
    seg.predict(["red", "blue; green"])
    assert seg.model.dense_calls == calls  # labels never recompute image features
    assert seg.model.text_calls == t + 1  # only "green" was new


# ----------------------------------------------------------------------------- Segmenter semantics
def test_segments_colours_at_original_size():
    img = two_colour_image()
    res = make().segment(img, "red, blue, green")
    assert res.labels == ["red", "blue", "green"]
    assert res.label_map.shape == img.shape[:2] and res.label_map.dtype == np.uint8
    assert res.logits.shape == (3, *img.shape[:2])
    assert (res.label_map[:, :8] == 0).all() and (res.label_map[:, -20:] == 1).all()
    assert res.label_map[18:22, 12:20].tolist() == [[2] * 8] * 4
    assert sum(res.fractions.values()) == pytest.approx(1.0)
    assert torch.equal(res.logits.argmax(0), torch.from_numpy(res.label_map).long())


def test_label_order_invariance():
    seg = make()
    seg.set_image(two_colour_image())
    labels = ["red", "blue; black", "green", "white", "yellow"]
    a = seg.predict(labels)
    perm = [3, 0, 4, 2, 1]
    b = seg.predict([labels[i] for i in perm])
    assert b.labels == [a.labels[i] for i in perm]
    assert torch.allclose(b.logits_lowres, a.logits_lowres[perm], atol=1e-6)
    assert np.array_equal(np.array(perm)[b.label_map], a.label_map)


def test_synonyms_are_max_pooled():
    seg = make()
    seg.set_image(two_colour_image())
    single = seg.predict("red, blue, green, white").logits_lowres
    pooled = seg.predict("red; blue; white, green").logits_lowres
    assert torch.allclose(pooled[0], torch.maximum(torch.maximum(single[0], single[1]), single[3]))
    assert torch.allclose(pooled[1], single[2])


def test_temperature_scales_logits():
    seg = make()
    seg.set_image(two_colour_image())
    base = seg.predict("red, blue").logits_lowres
    seg.cfg.temperature = 4.0
    assert torch.allclose(seg.predict("red, blue").logits_lowres, base / 4, atol=1e-5)


def test_threshold_background_rule():
    seg = make()
    seg.cfg.threshold = 0.8
    seg.cfg.temperature = 25.0  # logits become cosines: soft enough for a visible threshold
    seg.set_image(two_colour_image())
    res = seg.predict("red, blue")
    assert res.labels == ["red", "blue", "background"] and res.background_index == 2
    z = res.logits_lowres
    p = z[:2].softmax(0)
    expect_bg = p.max(0).values < 0.8
    assert expect_bg.any() and (~expect_bg).any()
    assert torch.equal(z.argmax(0) == 2, expect_bg)
    # the background channel is logsumexp + log t
    assert torch.allclose(z[2], torch.logsumexp(z[:2], 0) + math.log(0.8), atol=1e-5)


def test_background_words_and_user_background_class():
    seg = make()
    seg.cfg.background_words = ("green",)
    seg.set_image(two_colour_image())
    res = seg.predict("red, blue")
    assert res.labels == ["red", "blue", "background"]
    assert res.label_map[18:22, 12:20].tolist() == [[2] * 8] * 4
    # a user class named background gets the words as extra synonyms, no second background
    res2 = seg.predict("background; yellow, red, blue")
    assert res2.labels == ["background", "red", "blue"] and res2.background_index == 0
    assert res2.label_map[18:22, 12:20].tolist() == [[0] * 8] * 4


def test_min_area_drops_small_classes():
    seg = make()
    seg.set_image(two_colour_image())
    res = seg.predict("red, blue, green")
    assert 0 < res.fractions["green"] < 0.1
    seg.cfg.min_area = 0.1
    res = seg.predict("red, blue, green")
    assert res.dropped == ["green"] and res.fractions["green"] == 0.0
    assert res.fractions["red"] + res.fractions["blue"] == pytest.approx(1.0)


def test_slide_one_crop_equals_whole_image():
    img = two_colour_image(64, 64)
    whole = make(mode="blur")
    whole.set_image(img)
    slide = make(mode="blur", slide=(64, 32))
    slide.set_image(img)
    assert len(slide._views[0].boxes) == 1
    a, b = whole.predict("red, blue, green"), slide.predict("red, blue, green")
    assert torch.equal(a.logits_lowres, b.logits_lowres)
    assert np.array_equal(a.label_map, b.label_map)


def test_slide_averages_overlaps_of_local_features():
    # plain features are local (per cell), so any aligned crop tiling must reproduce whole-image logits
    # on the patch-cell canvas (resolution="canvas"; at pixel resolution each crop is upsampled on its own)
    img = two_colour_image(48, 80)
    whole = make(resolution="canvas")
    whole.set_image(img)
    slide = make(slide=(32, 16), resolution="canvas")
    slide.set_image(img)
    assert len(slide._views[0].boxes) == 2 * 4
    a, b = whole.predict("red, blue"), slide.predict("red, blue")
    assert torch.allclose(a.logits_lowres, b.logits_lowres, atol=1e-5)


def test_flip_and_scales_run_and_agree_on_easy_image():
    seg = make(flip=True, scales=(1.0, 0.5))
    res = seg.segment(two_colour_image(), "red, blue")
    assert len(seg._views) == 4
    assert (res.label_map[:, :16] == 0).all() and (res.label_map[:, -16:] == 1).all()


def test_odd_sizes_and_huge_image_bounded():
    for h, w in ((1, 1), (1, 300), (37, 5)):
        res = make().segment(np.full((h, w, 3), 200, np.uint8), "red, white")
        assert res.label_map.shape == (h, w)
    seg = Segmenter(TinyColourModel(), SegmentCfg(short_side=64, templates=TPL, threshold=None))
    big = np.zeros((3000, 4000, 3), np.uint8)
    big[:, 2000:] = (250, 0, 0)
    res = seg.segment(big, "red, black")
    assert res.label_map.shape == (3000, 4000)
    assert seg._views[0].canvas_hw == (64, 85)  # mmcv keep-ratio: int(4000 * 64 / 3000 + 0.5), no rounding
    assert (res.label_map[:, -100:] == 0).all() and (res.label_map[:, :100] == 1).all()
    with pytest.raises(TextsegError, match="full-resolution logits"):
        upsample(torch.zeros(30, 4, 4), (3000, 4000))


def test_many_labels_use_int32_map():
    labels = ["red", "blue"] + [f"thing{i}" for i in range(298)]
    res = make().segment(two_colour_image(), labels)
    assert res.label_map.dtype == np.int32 and len(res.labels) == 300
    assert res.label_map.max() < 300 and res.fractions["red"] > 0.2


def test_errors():
    seg = make()
    with pytest.raises(TextsegError, match="no image set"):
        seg.predict("red")
    seg.set_image(two_colour_image())
    with pytest.raises(TextsegError, match="no labels"):
        seg.predict(" ,")
    with pytest.raises(TextsegError, match="no dense mode"):
        Segmenter(TinyColourModel(), SegmentCfg(mode="nope"))
    with pytest.raises(TextsegError, match="threshold"):
        Segmenter(TinyColourModel(), SegmentCfg(threshold=2.0, templates=TPL)).segment(two_colour_image(), "red")


def test_short_side_auto_is_the_models_own():
    img = np.zeros((96, 128, 3), np.uint8)
    plain = Segmenter(TinyColourModel(), SegmentCfg(templates=TPL, threshold=None))
    assert plain.short_side == 448 and plain.prepare(img).views[0][2] == (448, 597)

    class OwnSide(TinyColourModel):
        segment_short_side = 64

    own = Segmenter(OwnSide(), SegmentCfg(templates=TPL, threshold=None))
    assert own.short_side == 64 and own.prepare(img).views[0][2][0] == 64
    assert Segmenter(OwnSide(), SegmentCfg(short_side=96, templates=TPL)).prepare(img).views[0][2][0] == 96
    assert Segmenter(OwnSide(), SegmentCfg(short_side=None, templates=TPL)).prepare(img).views[0][2] == (96, 128)
    for bad in ("big", 0, -5, 12.5, True):
        with pytest.raises(TextsegError, match="short_side"):
            Segmenter(TinyColourModel(), SegmentCfg(short_side=bad, templates=TPL))


def test_flip_auto_is_the_models_own():
    img = np.zeros((96, 128, 3), np.uint8)
    plain = Segmenter(TinyColourModel(), SegmentCfg(templates=TPL, threshold=None))
    assert plain.flip is False and [v[3] for v in plain.prepare(img).views] == [False]

    class OwnFlip(TinyColourModel):
        segment_flip = True

    own = Segmenter(OwnFlip(), SegmentCfg(templates=TPL, threshold=None))
    assert own.flip is True and [v[3] for v in own.prepare(img).views] == [False, True]
    assert Segmenter(OwnFlip(), SegmentCfg(flip=False, templates=TPL)).flip is False
    assert Segmenter(TinyColourModel(), SegmentCfg(flip=True, templates=TPL)).flip is True
    for bad in ("yes", 1, None):
        with pytest.raises(TextsegError, match="flip"):
            Segmenter(TinyColourModel(), SegmentCfg(flip=bad, templates=TPL))


# ----------------------------------------------------------------------------- geometry
def test_resized_size_and_crops():
    assert canvas_size(480, 640, 448, 1792, 16) == (448, 592)  # 597.3 -> 592
    assert canvas_size(1, 1, 448, 1792, 16) == (448, 448)
    assert canvas_size(10, 10000, 448, 1792, 16) == (16, 1792)
    boxes = crop_boxes(448, 592, 224, 112)
    assert boxes[0] == (0, 0, 224, 224) and boxes[-1] == (224, 368, 448, 592)
    assert all(y1 - y0 == 224 and x1 - x0 == 224 for y0, x0, y1, x1 in boxes)
    assert crop_boxes(100, 100, 224, 112) == [(0, 0, 100, 100)]


def test_banded_upsampling_matches_f_interpolate():
    z = torch.randn(5, 7, 9)
    ref = F.interpolate(z[None], size=(50, 33), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(upsample(z, (50, 33)), ref, atol=1e-5)
    # tiny budgets: row bands, class chunks and column chunks stitch back to the same map
    out = torch.empty_like(ref)
    for y0, y1, c0, block in upsample_bands(z, (50, 33), budget=40):
        out[c0 : c0 + block.shape[0], y0:y1] = block
    assert torch.allclose(out, ref, atol=1e-5)
    # tiny budgets force many row bands and class chunks: same argmax
    assert np.array_equal(argmax_bands(z, (50, 33), budget=200), ref.argmax(0).numpy())


# ----------------------------------------------------------------------------- PAMR
def pamr_reference(image, mask, iterations, dilations):
    """The original formulation with 3x3 dilated shift kernels (conv2d), written independently."""
    b, k, h, w = image.shape
    aff_k = torch.zeros(8, 1, 3, 3)
    copy_k = torch.zeros(8, 1, 3, 3)
    std_k = torch.zeros(9, 1, 3, 3)
    pos = [(i, j) for i in range(3) for j in range(3) if (i, j) != (1, 1)]
    for n, (i, j) in enumerate(pos):
        aff_k[n, 0, 1, 1], aff_k[n, 0, i, j] = 1, -1
        copy_k[n, 0, i, j] = 1
    std_k[0, 0, 1, 1] = 1
    for n, (i, j) in enumerate(pos):
        std_k[n + 1, 0, i, j] = 1

    def local(x, kernel):
        bb, cc = x.shape[:2]
        x = x.reshape(bb * cc, 1, h, w)
        outs = [F.conv2d(F.pad(x, [d] * 4, mode="replicate"), kernel, dilation=d) for d in dilations]
        return torch.cat(outs, 1).view(bb, cc, -1, h, w)

    std = local(image, std_k).std(2, keepdim=True)
    aff = -local(image, aff_k).abs() / (1e-8 + 0.1 * std)
    aff = F.softmax(aff.mean(1, keepdim=True), 2)
    for _ in range(iterations):
        mask = (local(mask, copy_k) * aff).sum(2)
    return mask


def test_pamr_matches_reference_formulation():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 20, 26, generator=g)
    image[..., 10:, :] += 1
    scores = torch.randn(1, 4, 20, 26, generator=g)
    ours = pamr(image, scores, iterations=3, dilations=(1, 2, 4))
    ref = pamr_reference(image, scores, 3, (1, 2, 4))
    assert torch.allclose(ours, ref, atol=1e-5)


def test_pamr_leaves_constant_image_and_constant_logits_unchanged():
    image = torch.full((1, 3, 24, 30), 0.4)
    logits = torch.tensor([3.0, -1.0, 0.5]).view(1, 3, 1, 1).expand(1, 3, 24, 30).contiguous()
    out = pamr(image, logits, iterations=10)
    assert torch.allclose(out, logits, atol=1e-5)


def test_pamr_respects_image_edges():
    image = torch.zeros(1, 3, 16, 16)
    image[..., :, 8:] = 1
    clean = torch.zeros(1, 2, 16, 16)
    clean[:, 0, :, :8] = 1
    clean[:, 1, :, 8:] = 1
    noisy = clean + 0.8 * torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(1))
    out = pamr(image, noisy, iterations=10, dilations=(1, 2))
    assert (out.argmax(1) == clean.argmax(1)).float().mean() > (noisy.argmax(1) == clean.argmax(1)).float().mean()
    assert (out.argmax(1) == clean.argmax(1)).all()


def test_segmenter_pamr_option_runs():
    seg = make(pamr=True, pamr_stride=1)
    res = seg.segment(two_colour_image(), "red, blue")
    assert "pamr" in res.timings and (res.label_map[:, :16] == 0).all()
