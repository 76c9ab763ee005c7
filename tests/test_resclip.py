"""ResCLIP (yvhangyang/ResCLIP, CVPR 2025) against a transcription of its official forward.

The transcription follows ``clip/model.py`` ``VisionTransformer.forward`` (arch ``wo_resi``, attention
``resclip``, ``use_rcs`` / ``use_sfr``), ``create_logit_temp``, ``create_patch_matrix``,
``check_path``, ``generate_attention_sfr`` and ``custom_attn``, batch 1 as the official code (it
squeezes the batch), computed from the tiny model's state dict in the official L x N x D layout.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from textseg.errors import TextsegError
from textseg.models.base import DenseText
from textseg.segment import SegmentCfg, Segmenter

sys.path.insert(0, str(Path(__file__).parent))
from test_dense_clip import (  # noqa: E402
    _ln,
    _merge,
    _mlp,
    _naclip_addition,
    _official_embed,
    _qkv,
    _unit,
    _visual_sd,
    tiny_vit,
)
from test_protocols import naclip_pamr  # noqa: E402


def _check_path(start, end, cat):  # check_path, verbatim maths
    steps = torch.max(torch.abs(end - start), dim=1)[0]
    max_steps = steps.max().item()
    t = torch.linspace(0, 1, steps=max_steps + 1).unsqueeze(1).unsqueeze(0)
    cur = (start.unsqueeze(1) * (1 - t) + end.unsqueeze(1) * t).round().long()
    valid_steps = torch.arange(max_steps + 1).unsqueeze(0) <= steps.unsqueeze(1)
    start_values = cat[start[:, 0], start[:, 1]].unsqueeze(1)
    return ((cat[cur[:, :, 0], cur[:, :, 1]] == start_values) | ~valid_steps).all(dim=1)


def _attention_sfr(cat, n_patches, std=5.0, delete_same_entity=True):  # generate_attention_sfr
    h, w = n_patches
    total = h * w
    sfr = torch.zeros((total + 1, total + 1))
    idx = torch.arange(total)
    i, j = torch.meshgrid(idx, idx, indexing="ij")
    i_w, i_h = torch.div(i, w, rounding_mode="floor"), i % w
    j_w, j_h = torch.div(j, w, rounding_mode="floor"), j % w
    sfr[1:, 1:] = (cat[i_w, i_h] == cat[j_w, j_h]).float()
    sfr.diagonal().fill_(1)
    sfr[0, :] = 0
    sfr[:, 0] = 0
    non_cls = sfr[1:, 1:]
    if delete_same_entity:
        start = torch.stack((i_w, i_h), dim=-1).view(-1, 2)
        end = torch.stack((j_w, j_h), dim=-1).view(-1, 2)
        valid = _check_path(start, end, cat).view(total, total)
        steps = torch.max(torch.abs(end - start), dim=1)[0]
        decay = torch.exp(-steps.view(total, total) / steps.max().item())
        non_cls = torch.where(valid, non_cls, non_cls * decay)
    ks = min(total, int(6 * std + 1))
    ks = ks if ks % 2 == 1 else ks + 1
    x = torch.arange(ks) - ks // 2
    g = torch.exp(-(x**2) / (2 * std**2))
    blurred = F.relu(F.conv1d(non_cls.unsqueeze(1), (g / g.sum()).view(1, 1, -1), padding=ks // 2).squeeze(1))
    sfr[1:, 1:] = blurred / (blurred.sum(dim=1, keepdim=True) + 1e-8)
    return sfr.unsqueeze(0)


def _resclip_attn(x, sd, p, heads, n_patches, rcs, rcs_w, sfr=None, sfr_w=None):  # custom_attn('resclip')
    length, bsz, dim = x.shape
    _, k, v = _qkv(x, sd, p, heads)
    attn = torch.bmm(k, k.transpose(1, 2)) * (dim // heads) ** -0.5
    if sfr is not None:
        sfr = (sfr / torch.max(sfr)).to(torch.float16)
        attn = sfr_w[0] * ((1 - sfr_w[1]) * attn + sfr_w[1] * sfr)
    attn = F.softmax(attn + _naclip_addition(n_patches, 5.0)[None], dim=-1)
    attn = rcs_w[0] * ((1 - rcs_w[1]) * attn + rcs_w[1] * rcs)
    return _merge(torch.bmm(attn, v), sd, p, length, bsz, dim)


def official_resclip(model, pixels, query, logit_scale=40.0, temp_thd=0.25, rcs_w=(2.0, 0.3), sfr_w=(2.1, 0.7),
                     delete_same_entity=True, use_sfr=True, rcs_layers=range(5, 9)):
    """VisionTransformer.forward(return_all=True)[:, 1:] -> 1 x D x h x w (batch 1, as the official)."""
    sd = _visual_sd(model)
    vcfg = model.cfg.vision
    ps, heads, eps = vcfg.patch_size, vcfg.num_heads, vcfg.ln_eps
    assert pixels.shape[0] == 1
    n_patches = (pixels.shape[-2] // ps, pixels.shape[-1] // ps)
    x = _official_embed(sd, ps, eps, pixels, "naclip")
    length, bsz, dim = x.shape
    attn_map = []
    for i in range(vcfg.layers - 1):  # blocks with their attention (C^2SA branch of custom_attn)
        p = f"transformer.resblocks.{i}"
        q, k, v = _qkv(_ln(x, sd, f"{p}.ln_1", eps), sd, p, heads)
        a = F.softmax(torch.bmm(q * (dim // heads) ** -0.5, k.transpose(1, 2)), dim=-1)
        x = x + _merge(torch.bmm(a, v), sd, p, length, bsz, dim)
        x = x + _mlp(_ln(x, sd, f"{p}.ln_2", eps), sd, p)
        attn_map.append(a)
    rcs = torch.stack([attn_map[i] for i in rcs_layers]).mean(dim=0)
    last = f"transformer.resblocks.{vcfg.layers - 1}"
    sfr = None
    if use_sfr:  # create_logit_temp -> create_patch_matrix -> generate_attention_sfr
        t = _resclip_attn(_ln(x, sd, f"{last}.ln_1", eps), sd, last, heads, n_patches, rcs, rcs_w)
        f = _ln(t.permute(1, 0, 2), sd, "ln_post", eps) @ sd["proj"]
        f = f[:, 1:] / f[:, 1:].norm(dim=-1, keepdim=True)
        logits = (f @ query.T).permute(0, 2, 1).reshape(-1, query.shape[0], *n_patches)
        logits = F.interpolate(logits, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
        logits = naclip_pamr(pixels, logits, 10, (8, 16))
        probs = torch.softmax(logits[0] * logit_scale, dim=0)
        pred = probs.argmax(0, keepdim=True)
        pred[probs.max(0, keepdim=True)[0] < temp_thd] = 0
        patches = pred[0].unfold(0, ps, ps).unfold(1, ps, ps).reshape(*n_patches, -1)
        sfr = _attention_sfr(torch.mode(patches, dim=-1)[0], n_patches, 5.0, delete_same_entity)
    x = _resclip_attn(_ln(x, sd, f"{last}.ln_1", eps), sd, last, heads, n_patches, rcs, rcs_w, sfr, sfr_w)
    feats = _ln(x.permute(1, 0, 2), sd, "ln_post", eps) @ sd["proj"]
    return feats[:, 1:].transpose(1, 2).reshape(1, -1, *n_patches)


def _query(n=5, seed=11):
    return F.normalize(torch.randn(n, 24, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _pixels(b, h, w, seed):
    """Images with structure (two regions), so the first-pass segmentation has several categories."""
    g = torch.Generator().manual_seed(seed)
    x = 0.5 * torch.randn(b, 3, h, w, generator=g)
    x[..., : h // 2, :] += 1.0
    x[..., :, w // 2 :] -= 1.0
    return x


@pytest.mark.parametrize("patch", [8, 14])
@pytest.mark.parametrize("cells", [(6, 6), (7, 7)])  # the checkpoint's grid; another (resized positions)
def test_resclip_matches_the_official_code(deep_vits, patch, cells):
    model = deep_vits[patch]
    pixels = _pixels(1, cells[0] * patch, cells[1] * patch, seed=patch + cells[0])
    query = _query()
    text = DenseText(query, 40.0, {"temp_thd": 0.25})
    with torch.no_grad():
        ours = model.encode_dense(pixels, mode="resclip", text=text)
        ref = official_resclip(model, pixels, query)
    assert ours.shape == ref.shape == (1, 24, *cells)
    torch.testing.assert_close(_unit(ours), _unit(ref), atol=1e-4, rtol=0)
    if (patch, cells) == (8, (6, 6)):  # SFR matters here (the test would not see a dropped refinement otherwise)
        with torch.no_grad():
            no_sfr = official_resclip(model, pixels, query, use_sfr=False)
        assert (_unit(no_sfr) - _unit(ref)).abs().max() > 1e-3


def test_resclip_options_and_per_benchmark_settings(deep_vits):
    """The protocol's options reach the forward: VOC-21's weights / temp_thd give the official result
    with those settings, which differs from the defaults'."""
    model = deep_vits[8]
    pixels = _pixels(1, 48, 48, seed=3)
    query = _query(4, seed=5)
    voc = {"temp_thd": 0.5, "rcs_weights": [2.0, 0.3], "sfr_weights": [2.2, 0.7]}
    with torch.no_grad():
        ours = model.encode_dense(pixels, mode="resclip", text=DenseText(query, 40.0, voc))
        ref = official_resclip(model, pixels, query, temp_thd=0.5, sfr_w=(2.2, 0.7))
        default = model.encode_dense(pixels, mode="resclip", text=DenseText(query, 40.0))
        no_del = official_resclip(model, pixels, query, delete_same_entity=False)
        ours_no_del = model.encode_dense(pixels, mode="resclip",
                                         text=DenseText(query, 40.0, {"delete_same_entity": False}))
    torch.testing.assert_close(_unit(ours), _unit(ref), atol=1e-4, rtol=0)
    torch.testing.assert_close(_unit(ours_no_del), _unit(no_del), atol=1e-4, rtol=0)
    assert (_unit(default) - _unit(ours)).abs().max() > 1e-3  # the settings change the result
    with pytest.raises(TextsegError, match="unknown resclip option"):
        model.encode_dense(pixels, mode="resclip", text=DenseText(query, 40.0, {"temp": 0.5}))
    with pytest.raises(TextsegError, match="needs the labels"):
        model.encode_dense(pixels, mode="resclip")


def test_resclip_non_square_and_batch(deep_vits):
    """A batch of 2 equals image-by-image runs (each image refined by its own segmentation); a
    non-square grid runs and matches the official maths (its row-major patch indices are right there)."""
    model = deep_vits[8]
    pixels = _pixels(2, 48, 80, seed=9)  # 6 x 10 grid
    query = _query()
    text = DenseText(query, 40.0)
    with torch.no_grad():
        ours = model.encode_dense(pixels, mode="resclip", text=text)
        singles = torch.cat([model.encode_dense(pixels[i : i + 1], mode="resclip", text=text) for i in range(2)])
        refs = torch.cat([official_resclip(model, pixels[i : i + 1], query) for i in range(2)])
    assert ours.shape == (2, 24, 6, 10) and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, singles, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_unit(ours), _unit(refs), atol=1e-4, rtol=0)


def test_resclip_needs_ten_blocks_and_a_vit():
    shallow = tiny_vit(layers=3)
    assert "resclip" not in shallow.dense_modes and "resclip" not in shallow.text_modes
    with pytest.raises(TextsegError, match="at least 10 blocks, this one has 3"):
        shallow.encode_dense(torch.randn(1, 3, 32, 32), mode="resclip", text=DenseText(_query()))
    deep = tiny_vit(layers=10)
    assert deep.dense_modes[:2] == ("naclip", "resclip")  # the default needs no labels
    assert deep.text_modes == ("resclip",)


def test_segmenter_passes_the_labels_to_resclip(deep_vits):
    """The Segmenter encodes a text mode's crops once the labels are known (the official query_features:
    one embedding per prompt, in order; logit scale = model scale / temperature), and again for other labels."""
    model = deep_vits[8]
    img = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    tpl = ("a photo of a {}.",)
    seg = Segmenter(model, SegmentCfg(mode="resclip", short_side=None, templates=tpl, threshold=None,
                                      temperature=float(model.logit_scale_value.detach()) / 40.0,
                                      mode_options={"temp_thd": 0.1}))
    res = seg.segment(img, "cat, dog; puppy, grass")
    assert res.label_map.shape == (48, 64)
    emb = model.embed_texts(["cat", "dog", "puppy", "grass"], tpl)
    pixels = seg._image_input
    with torch.no_grad():
        feats = model.encode_dense(pixels, mode="resclip", text=DenseText(emb, 40.0, {"temp_thd": 0.1}))
        ref = official_resclip(model, pixels, emb, temp_thd=0.1)
    torch.testing.assert_close(_unit(feats), _unit(ref), atol=1e-4, rtol=0)
    torch.testing.assert_close(seg._views[0].feats, feats, atol=1e-5, rtol=1e-5)
    other = seg.predict("cat, grass")  # other labels: the features are recomputed for them
    with torch.no_grad():
        feats2 = model.encode_dense(pixels, mode="resclip", text=DenseText(emb[[0, 3]], 40.0, {"temp_thd": 0.1}))
    torch.testing.assert_close(seg._views[0].feats, feats2, atol=1e-5, rtol=1e-5)
    assert other.label_map.shape == (48, 64)


def _official_slide(model, x, q, crop, stride, scale, temp_thd, out_hw):
    """forward_slide with ResCLIP's forward_feature (every prompt in the first pass), official maths."""
    _, _, h_img, w_img = x.shape
    preds = torch.zeros(1, q.shape[0], h_img, w_img)
    count = torch.zeros(1, 1, h_img, w_img)
    with torch.no_grad():
        for hi in range(max(h_img - crop + stride - 1, 0) // stride + 1):
            for wi in range(max(w_img - crop + stride - 1, 0) // stride + 1):
                y1, x1 = hi * stride, wi * stride
                y2, x2 = min(y1 + crop, h_img), min(x1 + crop, w_img)
                y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
                c = x[:, :, y1:y2, x1:x2]
                f = _unit(official_resclip(model, c, q, logit_scale=scale, temp_thd=temp_thd))
                lg = F.interpolate(torch.einsum("bdhw,qd->bqhw", f, q), size=c.shape[-2:], mode="bilinear")
                preds += F.pad(lg, (x1, w_img - x2, y1, h_img - y2))
                count[:, :, y1:y2, x1:x2] += 1
    return F.interpolate(preds / count, size=out_hw, mode="bilinear")


def test_resclip_slide_inference_is_the_official(deep_vits):
    """resclip_segmentor.py forward_slide / postprocess_result (SCLIP's) on crops with a remainder; with
    synonyms the first pass scores every prompt (``query_idx`` maps them to classes afterwards)."""
    from test_slide_official import CLASSES, image, postprocess, query_features, segmenter

    model = deep_vits[8]
    img = image(48, 70, seed=3)  # two 48-pixel crops, the second aligned to the border (x1 = 22)
    crop, stride, scale = 48, 24, 40.0
    seg = segmenter(model, scale, mode="resclip", short_side=None, slide=(crop, stride),
                    mode_options={"temp_thd": 0.1})
    seg.set_image(img)
    x = seg._image_input
    q, idx = query_features(model, [c[:1] for c in CLASSES])  # one query per class: compare probabilities
    probs, _ = postprocess(_official_slide(model, x, q, crop, stride, scale, 0.1, (48, 70)), idx, scale)
    res = seg.predict([c[0] for c in CLASSES])
    torch.testing.assert_close(res.probs, probs, atol=1e-4, rtol=0)
    assert probs.std(dim=(1, 2)).max() > 1e-3  # not flat
    q, idx = query_features(model, CLASSES)  # synonyms and prob_thd, as the VOC-21 config
    _, want = postprocess(_official_slide(model, x, q, crop, stride, scale, 0.1, (48, 70)), idx, scale,
                      prob_thd=0.1)
    seg.cfg.threshold = 0.1
    res = seg.predict(["; ".join(c) for c in CLASSES])
    assert np.array_equal(res.label_map, want.numpy())


@pytest.mark.parametrize("shape", [(5, 7), (6, 6), (1, 4)])
def test_sfr_prior_equals_the_official(shape):
    """generate_attention_sfr on category grids where lines of sight are blocked (a U-shaped object
    around another), non-square and degenerate grids included."""
    from textseg.models.clip_dense import ResCLIPCfg, sfr_attention

    g = torch.Generator().manual_seed(sum(shape))
    cat = torch.randint(0, 3, shape, generator=g)
    if shape[0] >= 5:
        cat[:] = 0
        cat[1:, 1] = cat[1:, -2] = cat[-1, 1:-1] = 1  # a U of label 1 around label-0 cells
        cat[2, 3] = 2
    ours = sfr_attention(cat)
    ref = _attention_sfr(cat, shape)[0, 1:, 1:]
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    if shape[0] >= 5:  # the line-of-sight decay bites here
        loose = _attention_sfr(cat, shape, delete_same_entity=False)[0, 1:, 1:]
        assert (loose - ref).abs().max() > 1e-3
        torch.testing.assert_close(sfr_attention(cat, ResCLIPCfg(delete_same_entity=False)), loose, atol=1e-6, rtol=0)


def test_segment_batch_with_a_text_mode_equals_one_image_at_a_time(deep_vits):
    """The batched pipeline (Segmenter.segment_batch / encode_prepared) defers a text mode's crops until
    the labels are known, so each image gets the features its own labels condition."""
    model = deep_vits[8]
    rng = np.random.default_rng(1)
    imgs = [(rng.random((48, 64, 3)) * 255).astype(np.uint8) for _ in range(2)]
    cfg = SegmentCfg(mode="resclip", short_side=None, templates=("a photo of a {}.",), threshold=None,
                     mode_options={"temp_thd": 0.1})
    batched = Segmenter(model, cfg).segment_batch(imgs, "cat, dog, grass")
    for img, got in zip(imgs, batched):
        one = Segmenter(model, cfg).segment(img, "cat, dog, grass")
        torch.testing.assert_close(got.logits, one.logits, atol=1e-5, rtol=1e-5)
        assert (got.label_map == one.label_map).all()
