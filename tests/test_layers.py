"""Shared layers (textseg.models.layers) and the one forward_intermediates contract (models/base.py)."""

import pytest
import torch
import torch.nn.functional as F

from textseg.models.base import Intermediates, resolve_indices
from textseg.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from textseg.models.groupvit import GroupViT, GroupViTCfg, GroupViTVisionCfg
from textseg.models.layers import Attention, Block, DropPath, resample_pos_embed
from textseg.models.lseg import TimmViT


def _reference_attention(x, wq, wk, wv, bq, bk, bv, wo, bo, heads):
    """Multi-head attention written out: softmax(q k^T / sqrt(d)) v, heads concatenated, out proj."""
    b, t, c = x.shape
    d = c // heads
    q, k, v = (x @ w.t() + bias for w, bias in ((wq, bq), (wk, bk), (wv, bv)))
    q, k, v = (z.reshape(b, t, heads, d).permute(0, 2, 1, 3) for z in (q, k, v))
    a = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1) @ v
    return a.permute(0, 2, 1, 3).reshape(b, t, c) @ wo.t() + bo


def test_attention_layouts_compute_the_same_maths():
    torch.manual_seed(0)
    c, heads = 16, 4
    fused, in_proj, sep = Attention(c, heads, "fused"), Attention(c, heads, "in_proj"), Attention(c, heads, "separate")
    w, bias = torch.randn(3 * c, c) * 0.3, torch.randn(3 * c) * 0.3
    wo, bo = torch.randn(c, c) * 0.3, torch.randn(c) * 0.3
    with torch.no_grad():
        fused.qkv.weight.copy_(w), fused.qkv.bias.copy_(bias)
        in_proj.in_proj_weight.copy_(w), in_proj.in_proj_bias.copy_(bias)
        for i, lin in enumerate((sep.q_proj, sep.k_proj, sep.v_proj)):
            lin.weight.copy_(w[i * c:(i + 1) * c]), lin.bias.copy_(bias[i * c:(i + 1) * c])
        for out in (fused.proj, in_proj.out_proj, sep.proj):
            out.weight.copy_(wo), out.bias.copy_(bo)
    assert set(in_proj.state_dict()) == {"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"}
    assert set(fused.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    x = torch.randn(2, 5, c)
    ref = _reference_attention(x, *w.split(c), *bias.split(c), wo, bo, heads)
    for m in (fused, in_proj, sep):
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    # cross-attention: queries from x, keys/values from the context
    ctx = torch.randn(2, 7, c)
    q = x @ w[:c].t() + bias[:c]
    k, v = ctx @ w[c:2 * c].t() + bias[c:2 * c], ctx @ w[2 * c:].t() + bias[2 * c:]
    split = lambda z: z.reshape(2, -1, heads, c // heads).transpose(1, 2)  # noqa: E731
    a = torch.softmax(split(q) @ split(k).transpose(-1, -2) / (c // heads) ** 0.5, -1) @ split(v)
    torch.testing.assert_close(sep(x, ctx), a.transpose(1, 2).reshape(2, 5, c) @ wo.t() + bo, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        fused(x, ctx)


def test_block_layouts_and_drop_path():
    torch.manual_seed(0)
    timm, openai = Block(16, 2, eps=1e-6), Block(16, 2, layout="openai", act="quick_gelu")
    assert {k.split(".")[0] for k in timm.state_dict()} == {"norm1", "attn", "norm2", "mlp"}
    assert "mlp.fc1.weight" in timm.state_dict() and "attn.qkv.weight" in timm.state_dict()
    assert {"ln_1.weight", "attn.in_proj_weight", "mlp.c_fc.weight", "mlp.c_proj.bias"} <= set(openai.state_dict())
    x = torch.randn(3, 4, 16)
    ref = x + timm.attn(F.layer_norm(x, (16,), timm.norm1.weight, timm.norm1.bias, 1e-6))
    ref = ref + timm.mlp.fc2(F.gelu(timm.mlp.fc1(F.layer_norm(ref, (16,), timm.norm2.weight, timm.norm2.bias, 1e-6))))
    torch.testing.assert_close(timm(x), ref)
    dropped = Block(16, 2, eps=1e-6, drop_path=0.5)
    dropped.load_state_dict(timm.state_dict())  # same keys: the drop path has no parameters
    torch.testing.assert_close(dropped.eval()(x), timm(x))  # identity in evaluation
    mask = DropPath(0.25).train()(torch.ones(4000, 3, 2))
    torch.testing.assert_close(mask.unique(), torch.tensor([0.0, 1 / 0.75]))
    assert torch.equal(mask, mask[:, :1, :1].expand_as(mask))  # one draw per sample
    assert abs(mask.mean().item() - 1.0) < 0.05


def test_resample_pos_embed():
    torch.manual_seed(0)
    pos = torch.randn(1 + 3 * 3, 8)
    assert resample_pos_embed(pos, (3, 3), (3, 3)) is pos
    out = resample_pos_embed(pos, (3, 3), (5, 4), mode="bilinear")
    grid = pos[1:].reshape(1, 3, 3, 8).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(5, 4), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(20, 8)
    torch.testing.assert_close(out, torch.cat([pos[:1], ref]))
    batched = resample_pos_embed(pos[None, 1:], (3, 3), (5, 4), num_prefix=0, mode="bilinear")
    torch.testing.assert_close(batched[0], ref)
    assert not torch.allclose(resample_pos_embed(pos, (3, 3), (5, 4), method="sclip"), resample_pos_embed(pos, (3, 3),
                                                                                                          (5, 4)))


def test_resolve_indices():
    assert resolve_indices(None, 4) == [0, 1, 2, 3]
    assert resolve_indices(2, 4) == [2, 3]
    assert resolve_indices([-1, 0, 3], 4) == [0, 3]
    for bad in ([4], [-5], 5, 0):
        with pytest.raises(ValueError):
            resolve_indices(bad, 4)


def _towers():
    torch.manual_seed(0)
    tiny = dict(text=TextConfig(context_length=8, width=16, heads=2, layers=1), embed_dim=8)
    vit = CLIP(CLIPConfig(vision=VisionConfig(image_size=32, layers=3, width=16, patch_size=8, heads=2), **tiny)).visual
    rn = CLIP(CLIPConfig(vision=VisionConfig(image_size=64, layers=(1, 1, 1, 1), width=8, heads=2), **tiny)).visual
    gv = GroupViT(GroupViTCfg(vision=GroupViTVisionCfg(image_size=32, patch_size=8, width=16, heads=2, depths=(1, 1),
                                                       num_group_tokens=(4, 0), num_output_groups=(4, 0)),
                              text=tiny["text"], embed_dim=8, proj_hidden=16)).eval()
    return {"clip_vit": (vit, 3), "clip_resnet": (rn, 4), "groupvit": (gv, 2),
            "lseg_vit": (TimmViT(16, 3, 2, 8, 32), 3)}


@pytest.mark.parametrize("name", ["clip_vit", "clip_resnet", "groupvit", "lseg_vit"])
def test_one_forward_intermediates_contract(name):
    tower, n = _towers()[name]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = tower.forward_intermediates(x)
        last = tower.forward_intermediates(x, indices=1, intermediates_only=True)
    assert isinstance(full, Intermediates) and len(full.intermediates) == n and full.final is not None
    assert last.final is None and len(last.intermediates) == 1
    torch.testing.assert_close(last.intermediates[0], full.intermediates[-1])
    assert full["grid"] == full.grid and full.grid == ((8, 8) if name != "clip_resnet" else (2, 2))
    if name in ("clip_vit", "lseg_vit"):  # NCHW: the patch tokens on the grid
        assert full.num_prefix_tokens == 1
        nchw = tower.forward_intermediates(x, indices=[0], output_fmt="NCHW").intermediates[0]
        torch.testing.assert_close(nchw, full.intermediates[0][:, 1:].transpose(1, 2).reshape(2, 16, 8, 8))
    if name == "clip_vit":  # final = ln_post(last block); norm=True puts each intermediate through it
        torch.testing.assert_close(full.final, tower.ln_post(full.intermediates[-1]))
        normed = tower.forward_intermediates(x, indices=[0], norm=True).intermediates[0]
        torch.testing.assert_close(normed, tower.ln_post(full.intermediates[0]))
    if name == "groupvit":
        assert full.final.shape == (2, 4, 16) and len(full["assignments"]) == 1
        assert full["group_maps"][0].shape == (2, 4, 8, 8) and full["image_embed"].shape == (2, 8)
