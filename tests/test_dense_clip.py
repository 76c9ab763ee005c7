"""Training-free dense CLIP modes, each against a transcription of its official code on a tiny perturbed CLIP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from textseg.errors import TextsegError
from textseg.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from textseg.models.clip_dense import (
    CLIP_DENSE_MODES,
    clip_dense_features,
    lof_anomalies,
    neighbourhood_bias,
    resolve_anomalies,
)
from textseg.segment import SegmentCfg, Segmenter


def perturbed(model: CLIP, seed: int = 0) -> CLIP:
    """Move every LayerNorm / bias away from 1 / 0 so a dropped or misplaced tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or "bn" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_vit(layers: int = 3, patch: int = 8, image_size: int | None = None) -> CLIP:
    """A tiny CLIP ViT; the checkpoint grid is 4 x 4 unless ``image_size`` says otherwise."""
    cfg = CLIPConfig(embed_dim=24, vision=VisionConfig(image_size=image_size or 4 * patch, layers=layers, width=32,
                                                       patch_size=patch, heads=2),
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


def _pa_attn(q, k, v, use_kk=True, alpha_kk=0.08, polar_iters=5, eps=1e-6):
    """PEARL ``pearl/attn.py`` ``pa_attn`` (detach_cls, solver polar) + ``_polar_unitary_newton_schulz``,
    on (B*H) x T x d as the official code."""
    bh, t, d = q.shape
    scale = d ** -0.5
    wt = q.norm(dim=2, keepdim=True)
    wt[:, 0:1, :] = 0.0
    wt = wt / (wt.sum(dim=1, keepdim=True) + 1e-6)
    q_c, k_c = q - (wt * q).sum(dim=1, keepdim=True), k - (wt * k).sum(dim=1, keepdim=True)
    mm = torch.bmm(k_c.transpose(1, 2), q_c)
    eye = torch.eye(d).unsqueeze(0).expand(bh, -1, -1)
    a = mm.transpose(1, 2) @ mm
    anorm = a.reshape(bh, -1).norm(dim=1).clamp_min(eps).view(bh, 1, 1)
    y, z = a / anorm + eps * eye, eye.clone()
    for _ in range(polar_iters):
        tt = 0.5 * (3.0 * eye - z @ y)
        y = y @ tt
        z = tt @ z
    rot = mm @ (z / torch.sqrt(anorm))
    logits = torch.bmm(q * scale, torch.bmm(k, rot).transpose(1, 2))
    if use_kk:
        logits = logits + alpha_kk * torch.bmm(k_c, k_c.transpose(1, 2)) * scale
    return torch.bmm(F.softmax(logits, dim=-1), v)


def _official_embed(sd, ps: int, eps: float, pixels: torch.Tensor, mode: str) -> torch.Tensor:
    """Patchify, class token, position embeddings (resized as the repository of ``mode``), ln_pre -> LND."""
    b, _, w, h = pixels.shape  # the official naming: w = rows, h = columns
    x = F.conv2d(pixels, sd["conv1.weight"], stride=ps)
    x = x.reshape(b, x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([sd["class_embedding"] + torch.zeros(b, 1, x.shape[-1]), x], dim=1)
    pos = sd["positional_embedding"]
    if x.shape[1] != pos.shape[0]:
        n, dim = pos.shape[0] - 1, pos.shape[1]
        side = int(math.sqrt(n))
        grid = pos[1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        if mode in ("sclip", "clearclip", "naclip", "sc-clip", "pearl"):  # those repos' interpolate_pos_encoding
            w0, h0 = w // ps + 0.1, h // ps + 0.1
            grid = F.interpolate(grid, scale_factor=(w0 / side, h0 / side), mode="bicubic", align_corners=False,
                                 recompute_scale_factor=False)
            assert grid.shape[-2:] == (int(w0), int(h0))
        else:  # mmseg resize_pos_embed (MaskCLIP); plain CLIP defines none, textseg resizes the same way
            grid = F.interpolate(grid, size=(w // ps, h // ps), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(-1, dim)])
    return _ln(x + pos, sd, "ln_pre", eps).permute(1, 0, 2)  # NLD -> LND


def _visual_sd(model: CLIP) -> dict:
    return {k[len("visual."):]: v for k, v in model.state_dict().items() if k.startswith("visual.")}


def _official_block(x, sd, p, heads, eps):  # openai/CLIP ResidualAttentionBlock
    length, bsz, dim = x.shape
    scale = (dim // heads) ** -0.5
    q, k, v = _qkv(_ln(x, sd, f"{p}.ln_1", eps), sd, p, heads)
    x = x + _merge(torch.bmm(F.softmax(torch.bmm(q * scale, k.transpose(1, 2)), -1), v), sd, p, length, bsz, dim)
    return x + _mlp(_ln(x, sd, f"{p}.ln_2", eps), sd, p)


def official_dense(model: CLIP, pixels: torch.Tensor, mode: str, alpha_kk: float = 0.08) -> torch.Tensor:
    """Dense patch features (B x D x h x w) of the official repository of ``mode`` (``alpha_kk``: PEARL's
    k-k weight, its configs' ``alpha_kk``)."""
    if mode == "sc-clip":
        return official_scclip(model, pixels)
    sd = _visual_sd(model)
    vcfg = model.cfg.vision
    ps, heads, eps = vcfg.patch_size, vcfg.num_heads, vcfg.ln_eps
    layers = vcfg.layers
    b, _, w, h = pixels.shape  # the official naming: w = rows, h = columns
    x = _official_embed(sd, ps, eps, pixels, mode)
    length, bsz, dim = x.shape
    scale = (dim // heads) ** -0.5
    for i in range(layers - 1):
        x = _official_block(x, sd, f"transformer.resblocks.{i}", heads, eps)
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
    elif mode == "pearl":  # PEARL arch 'reduced', attn 'pearl': x = custom_attn(...) only
        x = _merge(_pa_attn(q, k, v, alpha_kk=alpha_kk), sd, p, length, bsz, dim)
    else:
        raise AssertionError(mode)
    x = x.permute(1, 0, 2)
    feats = _ln(x, sd, "ln_post", eps) @ sd["proj"]  # return_all: ln_post(x) @ proj, then [:, 1:]
    return feats[:, 1:].transpose(1, 2).reshape(b, -1, w // ps, h // ps)


# SC-CLIP (SuleBai/SC-CLIP @ 0417ba9 clip/model.py): lof_pytorch, mean_interpolation, custom_attn,
# adaptively_aggregate and VisionTransformer.forward(return_all=True), batch 1 as the official code.
def _lof(x, n_neighbors=30, contamination=0.05):
    distances = torch.norm(x[:, None] - x[None, :], dim=2, p=2) ** 2
    knn_d, knn_i = torch.topk(distances, k=n_neighbors + 1, largest=False)
    knn_d, knn_i = knn_d[:, 1:], knn_i[:, 1:]
    reach = torch.max(knn_d, knn_d[:, -1].unsqueeze(1).expand_as(knn_d))
    lrd = n_neighbors / torch.nan_to_num(reach.mean(dim=1), nan=1e-6)
    scores = (lrd[knn_i] / lrd.unsqueeze(1)).mean(dim=1)
    threshold = torch.quantile(scores.to(torch.float32), 1 - contamination)
    return torch.where(scores > threshold)[0]


def _mean_interpolation(fmap, top_indices):
    _, c, hh, ww = fmap.shape
    kernel = torch.ones(c, 1, 3, 3)
    kernel[:, 0, 1, 1] = 0
    mask = torch.ones((hh, ww))
    idx = torch.tensor(top_indices, dtype=torch.long)
    mask[idx[:, 0], idx[:, 1]] = 0
    mask = mask[None, None]
    neighbour_sum = F.conv2d(F.pad(fmap * mask, (1, 1, 1, 1)), kernel, groups=c)
    valid = F.conv2d(F.pad(mask, (1, 1, 1, 1)), kernel[:, :1], groups=1)
    safe = valid.clone()
    safe[safe == 0] = 1
    top = torch.zeros((hh, ww))
    top[idx[:, 0], idx[:, 1]] = 1
    update = top[None, None] * (valid > 0).float()
    return fmap * (1 - update) + neighbour_sum / safe * update


def _sc_attn(x, sd, p, heads, mid_simi):
    length, bsz, dim = x.shape
    _, k, v = _qkv(x, sd, p, heads)
    mid_simi = (mid_simi - torch.mean(mid_simi)) * 3.0
    mid_simi[mid_simi < 0.0] = float("-inf")
    attn = F.softmax(mid_simi.repeat(heads, 1, 1), dim=-1)
    attn = (attn + F.softmax(torch.bmm(k, k.transpose(1, 2)) * (dim // heads) ** -0.5, dim=-1)) / 2
    return _merge(torch.bmm(attn, v), sd, p, length, bsz, dim)


def _aggregate(feats, corrs):
    return torch.matmul(corrs / (corrs.sum(dim=-1, keepdim=True) + 1e-6), feats.permute(1, 0, 2)).permute(1, 0, 2)


def official_scclip(model: CLIP, pixels: torch.Tensor, beta=0.4, pre=8, post=3, start=3, end=10, res_cls=0.3):
    """SC-CLIP VisionTransformer.forward(return_all=True) -> B x D x h x w (B must be 1, as there)."""
    sd = _visual_sd(model)
    vcfg = model.cfg.vision
    ps, heads, eps, width = vcfg.patch_size, vcfg.num_heads, vcfg.ln_eps, vcfg.width
    b = pixels.shape[0]
    assert b == 1, "the official code squeezes the batch"
    feat_w, feat_h = pixels.shape[-2] // ps, pixels.shape[-1] // ps
    x = _official_embed(sd, ps, eps, pixels, "sc-clip")
    feats_list = []
    for i in range(vcfg.layers - 1):
        x = _official_block(x, sd, f"transformer.resblocks.{i}", heads, eps)
        feats_list.append(x)
    cls_token = x[:1]
    outliers = _lof(x[1:].squeeze(1))
    top = [(torch.div(i, feat_w, rounding_mode="trunc"), i % feat_w) for i in outliers]  # grid height for both
    fmap = _mean_interpolation(x[1:].permute(1, 2, 0).reshape(b, width, feat_w, feat_h), top)
    x = fmap.reshape(b, width, feat_w * feat_h).permute(2, 0, 1)
    f = feats_list[pre][1:].clone().permute(1, 2, 0).reshape(b, width, feat_w, feat_h)
    f = _mean_interpolation(f, top).reshape(b, width, feat_w * feat_h).permute(2, 0, 1)
    f = f / f.norm(dim=2, keepdim=True)
    before = torch.matmul(f.permute(1, 0, 2), f.permute(1, 2, 0))
    mid = before.clone()
    before[before < beta] = 0.0
    x = _aggregate(x, before)
    last = f"transformer.resblocks.{vcfg.layers - 1}"
    x = _sc_attn(_ln(x, sd, f"{last}.ln_1", eps), sd, last, heads, mid) + res_cls * cls_token
    f = feats_list[post][1:].clone()
    f = f / f.norm(dim=2, keepdim=True)
    after = torch.matmul(f.permute(1, 0, 2), f.permute(1, 2, 0))
    after[after < beta] = 0.0
    x = _aggregate(x, after)
    re = torch.zeros_like(feats_list[0])
    for i in range(start, end):
        re += feats_list[i]
    cls_token = re[:1]
    re = _sc_attn(_ln(re[1:], sd, f"{last}.ln_1", eps), sd, last, heads, mid) + res_cls * cls_token
    x = x + _aggregate(re, after)
    feats = _ln(x.permute(1, 0, 2), sd, "ln_post", eps) @ sd["proj"]  # patches only: no class token left
    return feats.transpose(1, 2).reshape(b, -1, feat_w, feat_h)


def reference(model: CLIP, pixels: torch.Tensor, mode: str) -> torch.Tensor:
    with torch.no_grad():
        return official_dense(model, pixels, mode)


LAST_BLOCK_MODES = tuple(m for m in CLIP_DENSE_MODES if m not in ("sc-clip", "resclip"))


@pytest.mark.parametrize("patch", [8, 14])  # ViT-B/16-like and ViT-L/14-like patching
@pytest.mark.parametrize("cells", [(4, 4), (5, 7)])  # the checkpoint's 4 x 4 grid; 5 x 7 (resized positions)
@pytest.mark.parametrize("mode", LAST_BLOCK_MODES)
def test_each_mode_matches_the_official_code(mode, cells, patch):
    model = tiny_vit(patch=patch)
    size = (cells[0] * patch, cells[1] * patch)
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.encode_dense(pixels, mode=mode)
        ref = official_dense(model, pixels, mode)
    assert ours.shape == ref.shape == (2, 24, *cells)
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


def test_modes_differ_and_default_is_the_best_supported():
    """Default: sc-clip (best published average) on towers deep enough for it, else naclip."""
    model = tiny_vit()
    pixels = torch.randn(1, 3, 32, 32)
    assert model.dense_modes == LAST_BLOCK_MODES and model.dense_modes[0] == "naclip"
    with torch.no_grad():
        feats = {m: clip_dense_features(model, pixels, m) for m in model.dense_modes}
        assert torch.equal(clip_dense_features(model, pixels), feats["naclip"])
    for a in model.dense_modes:
        for b in model.dense_modes:
            if a < b:
                assert not torch.allclose(feats[a], feats[b], atol=1e-3), (a, b)
    with pytest.raises(TextsegError, match="unknown CLIP dense mode"):
        clip_dense_features(model, pixels, "bogus")
    with pytest.raises(TextsegError, match="at least 11 blocks, this one has 3"):
        model.encode_dense(pixels, mode="sc-clip")
    deep = tiny_vit(layers=12, image_size=48)
    assert CLIP_DENSE_MODES[0] == "sc-clip" and deep.dense_modes == CLIP_DENSE_MODES
    pixels = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(deep.encode_dense(pixels), official_scclip(deep, pixels), atol=1e-4, rtol=1e-4)
        for m in LAST_BLOCK_MODES:  # sc-clip differs from every last-block mode
            assert not torch.allclose(F.normalize(deep.encode_dense(pixels, m), dim=1),
                                      F.normalize(deep.encode_dense(pixels), dim=1), atol=1e-2), m


# ----------------------------------------------------------------------------------------------
# SC-CLIP on a 12-layer tiny CLIP (its block indices 3, 8, 10 need 12 blocks)
# ----------------------------------------------------------------------------------------------
def _unit(x):
    return F.normalize(x, dim=1)


@pytest.mark.parametrize("patch", [8, 14])
@pytest.mark.parametrize("cells", [6, 8])  # the checkpoint's 6 x 6 grid; 8 x 8 (resized positions)
def test_sc_clip_matches_the_official_code(deep_vits, patch, cells):
    model = deep_vits[patch]
    pixels = torch.randn(2, 3, cells * patch, cells * patch, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model.encode_dense(pixels, mode="sc-clip")  # a batch of 2 ...
        refs = torch.cat([official_scclip(model, pixels[i : i + 1]) for i in range(2)])  # ... the official: 1 by 1
    assert ours.shape == refs.shape == (2, 24, cells, cells)
    torch.testing.assert_close(_unit(ours), _unit(refs), atol=1e-4, rtol=0)
    torch.testing.assert_close(ours, refs, atol=1e-4, rtol=1e-4)


def test_sc_clip_steps_each_matter(deep_vits):
    """Each official step changes the output: anomaly resolution, the fused levels, the class-token term."""
    model = deep_vits[8]
    pixels = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = official_scclip(model, pixels)
        variants = {"no class-token term": official_scclip(model, pixels, res_cls=0.0),
                    "other fused levels": official_scclip(model, pixels, start=4, end=9),
                    "other similarity block": official_scclip(model, pixels, pre=7)}
        torch.testing.assert_close(model.encode_dense(pixels, mode="sc-clip"), full, atol=1e-4, rtol=1e-4)
    for name, v in variants.items():
        assert (_unit(v) - _unit(full)).abs().max() > 1e-3, name
    x = torch.randn(1, 36, 32, generator=torch.Generator().manual_seed(5))
    x[0, 7] += 6.0  # one token far from the rest
    anomalies = lof_anomalies(x)
    assert anomalies.shape == (1, 36) and anomalies[0, 7]
    assert torch.equal(torch.where(anomalies[0])[0], _lof(x[0]))  # the official outlier indices


def test_sc_clip_non_square_and_batch(deep_vits):
    """Non-square grids: anomaly indices map to the row-major grid (``index // w``, ``index % w``); the
    official code's ``index // h`` mapping is the same on square grids only. Batches equal per-image runs."""
    model = deep_vits[8]
    pixels = torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(6))  # 6 x 10 grid
    with torch.no_grad():
        ours = model.encode_dense(pixels, mode="sc-clip")
        singles = torch.cat([model.encode_dense(pixels[i : i + 1], mode="sc-clip") for i in range(2)])
    assert ours.shape == (2, 24, 6, 10)
    torch.testing.assert_close(ours, singles, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(ours).all()
    # row-major resolution: the official maths with the anomaly (row, column) = (i // 10, i % 10)
    x = torch.randn(1, 60, 32, generator=torch.Generator().manual_seed(7))
    fmap = x.transpose(1, 2).reshape(1, 32, 6, 10)
    idx = _lof(x[0])
    want = _mean_interpolation(fmap, [(int(i) // 10, int(i) % 10) for i in idx])
    torch.testing.assert_close(resolve_anomalies(fmap, lof_anomalies(x).view(1, 6, 10)), want, atol=1e-6, rtol=0)


def test_sc_clip_small_grids_run(deep_vits):
    """Fewer than 31 patches (the official LOF cannot run there): N - 1 neighbours; finite output."""
    model = deep_vits[8]
    with torch.no_grad():
        out = model.encode_dense(torch.randn(1, 3, 32, 40), mode="sc-clip")
    assert out.shape == (1, 24, 4, 5) and torch.isfinite(out).all()


def test_single_block_vit():
    model = tiny_vit(layers=1)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for mode in LAST_BLOCK_MODES:
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


def test_sc_clip_on_a_vit_l_like_tower():
    """ViT-L/14(@336px)-like: 24 blocks, patch 14, an input of another grid than the checkpoint's;
    SC-CLIP keeps its block indices (8, 3, 3..9) at every depth, as its configs do."""
    model = tiny_vit(layers=24, patch=14, image_size=84)
    pixels = torch.randn(1, 3, 98, 98, generator=torch.Generator().manual_seed(8))  # 7 x 7 cells
    with torch.no_grad():
        ours = model.encode_dense(pixels)  # the default on a deep tower: sc-clip
        ref = official_scclip(model, pixels)
    assert model.dense_modes[0] == "sc-clip" and ours.shape == (1, 24, 7, 7)
    torch.testing.assert_close(_unit(ours), _unit(ref), atol=1e-4, rtol=0)
