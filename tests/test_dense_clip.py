"""Training-free dense CLIP modes, each against a hand-written reference on a tiny perturbed CLIP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from textseg.errors import TextsegError
from textseg.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from textseg.segment import SegmentCfg, Segmenter
from textseg.segment.dense_clip import CLIP_DENSE_MODES, clip_dense_features, neighbourhood_bias


def perturbed(model: CLIP, seed: int = 0) -> CLIP:
    """Move every LayerNorm / bias away from 1 / 0 so a dropped or misplaced tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or "bn" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_vit(layers: int = 3) -> CLIP:
    cfg = CLIPConfig(embed_dim=24, vision=VisionConfig(image_size=32, layers=layers, width=32, patch_size=8, heads=2),
                     text=TextConfig(context_length=16, width=32, heads=2, layers=1))
    torch.manual_seed(0)
    return perturbed(CLIP(cfg))


def tiny_rn() -> CLIP:
    cfg = CLIPConfig(embed_dim=24, vision=VisionConfig(image_size=64, layers=(1, 1, 1, 1), width=8, heads=4),
                     text=TextConfig(context_length=16, width=32, heads=2, layers=1))
    torch.manual_seed(0)
    return perturbed(CLIP(cfg))


def heads_softmax(a, b, scale):
    """softmax over the last axis of a @ b^T * scale, per head, written out with exp/sum."""
    s = torch.einsum("bhid,bhjd->bhij", a, b) * scale
    s = s - s.amax(-1, keepdim=True)
    e = s.exp()
    return e / e.sum(-1, keepdim=True)


def reference(model: CLIP, pixels: torch.Tensor, mode: str) -> torch.Tensor:
    """Each paper's last block, from the CLIP core's own intermediates (q/k/v of the last block)."""
    vis = model.visual
    out = vis.forward_intermediates(pixels, return_last_qkv=True)
    x, (h, w) = out["last_input"], out["grid"]
    q, k, v = out["q"], out["k"], out["v"]
    blk = vis.blocks[-1]
    s = blk.attn.scale
    merge = lambda o: blk.attn.out_proj(o.transpose(1, 2).flatten(2))  # noqa: E731
    if mode == "plain":
        y = out["tokens"][-1]
    elif mode == "maskclip":  # value embedding path: attention replaced by identity; residual + FFN kept
        y = x + merge(v)
        y = y + blk.mlp(blk.ln_2(y))
    elif mode == "sclip":  # correlative self-attention, residual kept, FFN dropped
        y = x + merge((heads_softmax(q, q, s) + heads_softmax(k, k, s)) @ v)
    elif mode == "clearclip":  # q-q attention, no residual, no FFN
        y = merge(heads_softmax(q, q, s) @ v)
    elif mode == "naclip":  # k-k attention + Gaussian neighbourhood (sigma 5), no residual, no FFN
        t = x.shape[1]
        bias = torch.zeros(t, t)
        for i in range(h * w):
            for j in range(h * w):
                yi, xi, yj, xj = i // w, i % w, j // w, j % w
                bias[1 + i, 1 + j] = math.exp(-((yi - yj) ** 2 + (xi - xj) ** 2) / (2 * 5.0**2))
        logits = torch.einsum("bhid,bhjd->bhij", k, k) * s + bias
        y = merge(torch.softmax(logits, -1) @ v)
    else:
        raise AssertionError(mode)
    feats = vis.ln_post(y[:, 1:]) @ vis.proj
    return feats.transpose(1, 2).reshape(pixels.shape[0], -1, h, w)


@pytest.mark.parametrize("mode", CLIP_DENSE_MODES)
def test_each_mode_matches_its_reference(mode):
    model = tiny_vit()
    pixels = torch.randn(2, 3, 32, 48)  # non-square: 4 x 6 patches, interpolated positions
    with torch.no_grad():
        ours = clip_dense_features(model, pixels, mode)
        ref = reference(model, pixels, mode)
    assert ours.shape == (2, 24, 4, 6)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(model.encode_dense(pixels, mode=mode), ours)  # CLIP delegates here


def test_modes_differ_and_default_is_naclip():
    model = tiny_vit()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        feats = {m: clip_dense_features(model, pixels, m) for m in CLIP_DENSE_MODES}
        assert torch.equal(clip_dense_features(model, pixels), feats["naclip"])
    for a in CLIP_DENSE_MODES:
        for b in CLIP_DENSE_MODES:
            if a < b:
                assert not torch.allclose(feats[a], feats[b], atol=1e-3), (a, b)
    assert CLIP_DENSE_MODES[0] == "naclip" and model.dense_modes[0] == "naclip"
    with pytest.raises(TextsegError, match="unknown CLIP dense mode"):
        clip_dense_features(model, pixels, "bogus")


def test_single_block_vit():
    model = tiny_vit(layers=1)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for mode in CLIP_DENSE_MODES:
            torch.testing.assert_close(clip_dense_features(model, pixels, mode), reference(model, pixels, mode),
                                       atol=2e-5, rtol=1e-4)


def test_neighbourhood_bias_values():
    b = neighbourhood_bias((3, 4), sigma=5.0)
    assert b.shape == (13, 13) and (b[0] == 0).all() and (b[:, 0] == 0).all()
    assert b[1, 1] == 1.0  # same position
    assert b[1, 1 + 4 + 1].item() == pytest.approx(math.exp(-2 / 50))  # one step down-right
    assert torch.equal(b, b.t())


def test_resnet_value_path():
    model = tiny_rn()
    pixels = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ours = clip_dense_features(model, pixels, "maskclip")
        x = model.visual.forward_intermediates(pixels, indices=[])["attnpool_input"]
        pool = model.visual.attnpool
        ref = torch.einsum("oc,bchw->bohw", pool.v_proj.weight, x) + pool.v_proj.bias.view(1, -1, 1, 1)
        ref = torch.einsum("oc,bchw->bohw", pool.c_proj.weight, ref) + pool.c_proj.bias.view(1, -1, 1, 1)
    assert ours.shape == (1, 24, 2, 3)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(clip_dense_features(model, pixels, "naclip"), ours)


@pytest.mark.parametrize("mode", ["naclip", "sclip"])
def test_segmenter_on_clip_one_crop_equals_whole(mode):
    model = tiny_vit()
    img = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    tpl = ("a photo of a {}.",)
    whole = Segmenter(model, SegmentCfg(mode=mode, short_side=None, templates=tpl, threshold=None))
    slide = Segmenter(model, SegmentCfg(mode=mode, short_side=None, templates=tpl, threshold=None, slide=(64, 32)))
    a = whole.segment(img, "cat, dog; puppy, grass")
    b = slide.segment(img, "cat, dog; puppy, grass")
    torch.testing.assert_close(a.logits_lowres, b.logits_lowres, atol=1e-5, rtol=1e-5)
    assert np.array_equal(a.label_map, b.label_map)
    # a real two-crop slide differs from whole-image attention (global context is cut)
    c = Segmenter(model, SegmentCfg(mode=mode, short_side=None, templates=tpl, threshold=None, slide=(32, 16)))
    assert not torch.allclose(c.segment(img, "cat, dog; puppy, grass").logits_lowres, a.logits_lowres, atol=1e-4)
