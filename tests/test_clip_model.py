"""CLIP towers: shapes, gradients, intermediates consistent with the forward pass, pos-emb
interpolation, attention pieces equal to the fused attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from textseg.models.clip import CLIP, CLIPConfig, TextConfig, TextTransformer, VisionConfig

torch.manual_seed(0)


def tiny_vit(patch: int = 8) -> CLIP:
    cfg = CLIPConfig(embed_dim=24, vision=VisionConfig(image_size=32, layers=3, width=32, patch_size=patch, heads=2),
                     text=TextConfig(context_length=16, width=32, heads=2, layers=2))
    return CLIP(cfg).eval()


def tiny_rn() -> CLIP:
    cfg = CLIPConfig(embed_dim=24, vision=VisionConfig(image_size=64, layers=(1, 2, 1, 1), width=8, heads=4),
                     text=TextConfig(context_length=16, width=32, heads=2, layers=1))
    return CLIP(cfg).eval()


def test_vit_shapes_and_grads():
    model = tiny_vit().train()
    pixels = torch.randn(2, 3, 32, 32, requires_grad=True)
    tokens = model.tokenize(["a cat", "a dog on a mat"])
    assert tokens.shape == (2, 16)
    logits, logits_t = model(pixels, tokens)
    assert logits.shape == (2, 2) and torch.equal(logits, logits_t.t())
    loss = F.cross_entropy(logits, torch.arange(2))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert pixels.grad.abs().sum() > 0


def test_vit_intermediates_match_forward():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    out = model.visual.forward_intermediates(x, return_last_qkv=True)
    assert len(out.intermediates) == 3 and out["grid"] == (4, 4)
    assert out.intermediates[0].shape == (2, 17, 32)
    final = model.visual.head(out.intermediates[-1][:, 0])
    torch.testing.assert_close(final, model.encode_image(x), rtol=0, atol=1e-6)
    last = model.visual.blocks[-1]
    torch.testing.assert_close(last(out["last_input"]), out.intermediates[-1])
    q, k, v = out["q"], out["k"], out["v"]
    assert q.shape == (2, 2, 17, 16)
    attn = torch.softmax(q @ k.transpose(-1, -2) * last.attn.scale, dim=-1) @ v
    x_in = out["last_input"]
    torch.testing.assert_close(last.attn.project(attn), last.attn(last.ln_1(x_in)), atol=1e-5, rtol=1e-5)
    # indices: int = last n, list of blocks, negative indices
    assert len(model.visual.forward_intermediates(x, indices=2).intermediates) == 2
    sel = model.visual.forward_intermediates(x, indices=[0, -1]).intermediates
    torch.testing.assert_close(sel[0], out.intermediates[0])
    torch.testing.assert_close(sel[1], out.intermediates[2])
    with pytest.raises(ValueError):
        model.visual.forward_intermediates(x, indices=[5])


def test_vit_other_input_sizes():
    model = tiny_vit()
    out = model.visual.forward_intermediates(torch.randn(1, 3, 48, 64), indices=1)
    assert out["grid"] == (6, 8) and out.intermediates[0].shape == (1, 49, 32)
    assert model.encode_image(torch.randn(1, 3, 48, 64)).shape == (1, 24)
    assert model.encode_dense(torch.randn(1, 3, 48, 64)).shape == (1, 24, 6, 8)
    assert model.dense_stride == 8


def test_text_causal_and_eot_pooling():
    model = tiny_vit()
    tokens = model.tokenize(["a cat sat", "a cat sat on a mat"])
    feats = model.text.forward_tokens(tokens)
    # causal: features up to "a cat sat" do not see later tokens
    torch.testing.assert_close(feats[0, :4], feats[1, :4])
    emb = model.encode_text(tokens)
    eot = tokens.argmax(-1)
    torch.testing.assert_close(emb, feats[torch.arange(2), eot] @ model.text.text_projection)
    # padding after EOT never changes the embedding
    torch.testing.assert_close(model.encode_text(tokens[:, :12]), emb)


def test_text_tower_standalone_without_projection():
    tower = TextTransformer(TextConfig(context_length=8, vocab_size=100, width=16, heads=2, layers=1, act="gelu"), None)
    out = tower(torch.tensor([[1, 5, 99, 0, 0, 0, 0, 0]]))
    assert out.shape == (1, 16)


def test_resnet_shapes_intermediates_and_other_sizes():
    model = tiny_rn()
    x = torch.randn(2, 3, 64, 64)
    emb = model.encode_image(x)
    assert emb.shape == (2, 24)
    out = model.visual.forward_intermediates(x)
    assert [s.shape[1:] for s in out.intermediates] == [(32, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2)]
    torch.testing.assert_close(model.visual.attnpool(out.final), emb)
    assert model.encode_image(torch.randn(1, 3, 96, 128)).shape == (1, 24)
    assert model.encode_dense(torch.randn(1, 3, 96, 128)).shape[2:] == (3, 4)
    assert model.dense_stride == 32


def test_logit_scale_learnable_and_config_roundtrip():
    model = tiny_rn()
    assert model.logit_scale.requires_grad
    torch.testing.assert_close(model.logit_scale_value, torch.tensor(1 / 0.07))
    d = model.cfg.to_dict()
    assert CLIPConfig.from_dict(d) == model.cfg
