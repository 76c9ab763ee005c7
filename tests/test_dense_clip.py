"""Training-free dense CLIP modes, each against a transcription of its official code on a tiny perturbed CLIP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from textseg.errors import TextsegError
from textseg.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from textseg.models.clip_dense import CLIP_DENSE_MODES, clip_dense_features, neighbourhood_bias
from textseg.segment import SegmentCfg, Segmenter


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


# ----------------------------------------------------------------------------------------------
# The official code, transcribed: every tower computed from the tiny model's weights (state dict) in
# the official layout (L x N x D, nn.MultiheadAttention's packed in_proj), not through textseg's CLIP
# forward or its dense code.
# ----------------------------------------------------------------------------------------------
def _ln(x, sd, name, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def _mlp(x, sd, p):  # c_fc -> QuickGELU -> c_proj (the tiny model's activation, OpenAI's)
    h = F.linear(x, sd[f"{p}.mlp.c_fc.weight"], sd[f"{p}.mlp.c_fc.bias"])
    h = h * torch.sigmoid(1.702 * h)
    return F.linear(h, sd[f"{p}.mlp.c_proj.weight"], sd[f"{p}.mlp.c_proj.bias"])


def _qkv(x, sd, p, heads):
    """SCLIP / NACLIP / ClearCLIP ``custom_attn``: L x N x D -> q, k, v as (N*heads) x L x head_dim."""
    length, bsz, dim = x.shape
    q, k, v = F.linear(x, sd[f"{p}.attn.in_proj_weight"], sd[f"{p}.attn.in_proj_bias"]).chunk(3, dim=-1)
    return [t.contiguous().view(length, bsz * heads, dim // heads).transpose(0, 1) for t in (q, k, v)]


def _merge(o, sd, p, length, bsz, dim):
    o = o.transpose(0, 1).contiguous().view(length, bsz, dim)
    return F.linear(o, sd[f"{p}.attn.out_proj.weight"], sd[f"{p}.attn.out_proj.bias"])


def _naclip_addition(n_patches, std):
    """NACLIP ``gaussian_window`` + ``get_attention_addition`` (conv2d of one-hot maps with the window)."""
    constant = 1 / (std * math.sqrt(2))
    ks = []
    for dim in [side * 2 - 1 for side in n_patches]:
        start = -(dim - 1) / 2.0
        ks.append(torch.linspace(start * constant, (start + (dim - 1)) * constant, steps=dim))
    window = torch.exp(-(torch.stack(torch.meshgrid(*ks, indexing="ij")) ** 2).sum(0))
    d1, d2 = n_patches
    m = torch.einsum("ij,kl->ijkl", torch.eye(d1), torch.eye(d2)).permute((0, 3, 1, 2)).contiguous()
    out = F.conv2d(m.view(-1, d1, d2).unsqueeze(1), window[None, None], padding="same").squeeze(1)
    out = out.view(d1 * d2, d1 * d2)
    out = torch.vstack([torch.zeros((1, d1 * d2)), out])
    return torch.hstack([torch.zeros((d1 * d2 + 1, 1)), out])


def official_dense(model: CLIP, pixels: torch.Tensor, mode: str) -> torch.Tensor:
    """Dense patch features (B x D x h x w) of the official repository of ``mode``."""
    sd = {k[len("visual."):]: v for k, v in model.state_dict().items() if k.startswith("visual.")}
    vcfg = model.cfg.vision
    ps, heads, eps = vcfg.patch_size, vcfg.num_heads, vcfg.ln_eps
    layers = vcfg.layers
    b, _, w, h = pixels.shape  # the official naming: w = rows, h = columns
    x = F.conv2d(pixels, sd["conv1.weight"], stride=ps)
    x = x.reshape(b, x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([sd["class_embedding"] + torch.zeros(b, 1, x.shape[-1]), x], dim=1)
    pos = sd["positional_embedding"]
    if x.shape[1] != pos.shape[0]:
        n, dim = pos.shape[0] - 1, pos.shape[1]
        side = int(math.sqrt(n))
        grid = pos[1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        if mode in ("sclip", "clearclip", "naclip"):  # interpolate_pos_encoding of the three repos
            w0, h0 = w // ps + 0.1, h // ps + 0.1
            grid = F.interpolate(grid, scale_factor=(w0 / side, h0 / side), mode="bicubic", align_corners=False,
                                 recompute_scale_factor=False)
            assert grid.shape[-2:] == (int(w0), int(h0))
        else:  # mmseg resize_pos_embed (MaskCLIP); plain CLIP defines none, textseg resizes the same way
            grid = F.interpolate(grid, size=(w // ps, h // ps), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(-1, dim)])
    x = _ln(x + pos, sd, "ln_pre", eps)
    x = x.permute(1, 0, 2)  # NLD -> LND
    length, bsz, dim = x.shape
    scale = (dim // heads) ** -0.5
    for i in range(layers - 1):  # openai/CLIP ResidualAttentionBlock
        p = f"transformer.resblocks.{i}"
        q, k, v = _qkv(_ln(x, sd, f"{p}.ln_1", eps), sd, p, heads)
        x = x + _merge(torch.bmm(F.softmax(torch.bmm(q * scale, k.transpose(1, 2)), -1), v), sd, p, length, bsz, dim)
        x = x + _mlp(_ln(x, sd, f"{p}.ln_2", eps), sd, p)
    p = f"transformer.resblocks.{layers - 1}"
    a = _ln(x, sd, f"{p}.ln_1", eps)
    q, k, v = _qkv(a, sd, p, heads)
    if mode == "plain":  # openai/CLIP: x + attn(ln_1(x)); x + mlp(ln_2(x))
        x = x + _merge(torch.bmm(F.softmax(torch.bmm(q * scale, k.transpose(1, 2)), -1), v), sd, p, length, bsz, dim)
        x = x + _mlp(_ln(x, sd, f"{p}.ln_2", eps), sd, p)
    elif mode == "maskclip":  # MaskCLIP vit.py return_qkv: v = out_proj(v_proj(ln1 x)) + x; v = ffn(norm2 v) + v
        vv = F.linear(a, sd[f"{p}.attn.in_proj_weight"][2 * dim:], sd[f"{p}.attn.in_proj_bias"][2 * dim:])
        x = F.linear(vv, sd[f"{p}.attn.out_proj.weight"], sd[f"{p}.attn.out_proj.bias"]) + x
        x = x + _mlp(_ln(x, sd, f"{p}.ln_2", eps), sd, p)
    elif mode == "sclip":  # SCLIP forward: x = x + custom_attn(csa=True); x = x + mlp(ln_2(x))
        attn = F.softmax(torch.bmm(q, q.transpose(1, 2)) * scale, -1) + F.softmax(
            torch.bmm(k, k.transpose(1, 2)) * scale, -1)
        x = x + _merge(torch.bmm(attn, v), sd, p, length, bsz, dim)
        x = x + _mlp(_ln(x, sd, f"{p}.ln_2", eps), sd, p)
    elif mode == "clearclip":  # ClearCLIP ignore_residual: output = custom_attn(ClearCLIP) only
        x = _merge(torch.bmm(F.softmax(torch.bmm(q, q.transpose(1, 2)) * scale, -1), v), sd, p, length, bsz, dim)
    elif mode == "naclip":  # NACLIP arch 'reduced', attn 'naclip': x = custom_attn(...) only
        attn = torch.bmm(k, k.transpose(1, 2)) * scale + _naclip_addition((w // ps, h // ps), 5.0)[None]
        x = _merge(torch.bmm(F.softmax(attn, -1), v), sd, p, length, bsz, dim)
    else:
        raise AssertionError(mode)
    x = x.permute(1, 0, 2)
    feats = _ln(x, sd, "ln_post", eps) @ sd["proj"]  # return_all: ln_post(x) @ proj, then [:, 1:]
    return feats[:, 1:].transpose(1, 2).reshape(b, -1, w // ps, h // ps)


def reference(model: CLIP, pixels: torch.Tensor, mode: str) -> torch.Tensor:
    with torch.no_grad():
        return official_dense(model, pixels, mode)


@pytest.mark.parametrize("size", [(32, 32), (40, 56)])  # the checkpoint's 4 x 4 grid; 5 x 7 (resized positions)
@pytest.mark.parametrize("mode", CLIP_DENSE_MODES)
def test_each_mode_matches_the_official_code(mode, size):
    model = tiny_vit()
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.encode_dense(pixels, mode=mode)
        ref = official_dense(model, pixels, mode)
    assert ours.shape == ref.shape == (2, 24, size[0] // 8, size[1] // 8)
    torch.testing.assert_close(F.normalize(ours, dim=1), F.normalize(ref, dim=1), atol=1e-4, rtol=0)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)  # not only the direction
    with torch.no_grad():
        torch.testing.assert_close(clip_dense_features(model, pixels, mode), ours)  # CLIP delegates here


def test_sclip_keeps_the_ffn():
    """SCLIP's last block keeps the FFN: dropping it (textseg before) is far from the official output."""
    model = tiny_vit()
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    vis = model.visual
    blk = vis.blocks[-1]
    with torch.no_grad():
        x = vis.forward_intermediates(pixels, indices=[len(vis.blocks) - 2]).intermediates[-1]
        q, k, v = blk.attn.qkv(blk.ln_1(x))
        no_ffn = x + blk.attn.project(F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v))
        no_ffn = vis.head(no_ffn[:, 1:]).transpose(1, 2).reshape(1, -1, 4, 4)
        ref = official_dense(model, pixels, "sclip")
    torch.testing.assert_close(clip_dense_features(model, pixels, "sclip"), ref, atol=1e-4, rtol=1e-4)
    assert (F.normalize(no_ffn, dim=1) - F.normalize(ref, dim=1)).abs().max() > 1e-2


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
        x = model.visual.forward_intermediates(pixels, indices=[]).final
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
