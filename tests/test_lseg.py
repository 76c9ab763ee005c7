"""LSeg: shapes, gradients, the frozen text tower, label permutation, the official checkpoint layout,
training (loss falls, 2-process torchrun, kill + resume)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchrun_util import run_torchrun

from textseg.errors import CheckpointError
from textseg.models.lseg import LSegConfig, build_lseg

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _flush_denormals():
    """Randomly initialised EfficientNets shrink activations into float denormals, which are ~50x
    slower on CPU; flush them to zero for this module only."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)  # torch's default
TINY_TEXT = {"width": 32, "layers": 1, "heads": 2, "mlp": 64}


def tiny_lseg(**kw):
    cfg = LSegConfig(backbone="lite0", text_encoder="minilm", embed_dim=32, features=16, text_cfg=TINY_TEXT, **kw)
    torch.manual_seed(0)
    return build_lseg(cfg, pretrained=False)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("light", [False, True])
def test_shapes_gradients_and_frozen_text(light):
    model = tiny_lseg(separable=light, last_upsample=not light).train()
    x = torch.randn(2, 3, 64, 96)
    dense = model.encode_dense(x)
    s = model.dense_stride
    assert dense.shape == (2, 32, 64 // s, 96 // s)
    for n in (3, 5):  # N changes freely between calls
        text = model.embed_texts([f"label {i}" for i in range(n)])
        assert text.shape == (n, 32)
        assert model.dense_logits(dense, text).shape == (2, n, 64 // s, 96 // s)
    logits = model.forward_logits(x, text)
    assert logits.shape == (2, 5, 64, 96)
    # odd sizes are padded to /32 inside and cropped back
    with torch.no_grad():
        assert model.forward_logits(torch.randn(1, 3, 50, 70), text).shape == (1, 5, 50, 70)
    loss = F.cross_entropy(logits, torch.randint(0, 5, (2, 64, 96)))
    loss.backward()
    assert model.logit_scale.grad is None  # lang-seg's temperature is fixed (see the test below)
    assert model.decoder.head.weight.grad.abs().sum() > 0
    assert model.image_encoder.cnn.blocks[-1].project.conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.text_encoder.parameters())
    assert not model.text_encoder.training


def test_temperature_fixed_at_one_over_0_07_by_default_learnable_as_option():
    """lang-seg (modules/models/lseg_net.py): ``self.logit_scale = nn.Parameter(torch.ones([]) *
    np.log(1 / 0.07)).exp()``; ``.exp()`` of a Parameter is a plain tensor, so it is not a module
    parameter, never reaches the optimiser and stays 1/0.07; logits = that * cos(pixel, text)."""
    from textseg.train.lseg import LSegTrainConfig, param_groups

    official_t = float(np.exp(np.log(1 / 0.07)))  # 14.2857...
    model = tiny_lseg().train()
    assert "logit_scale" not in dict(model.named_parameters())
    assert "logit_scale" in dict(model.named_buffers()) and "logit_scale" in model.state_dict()
    assert model.logit_scale.exp().item() == pytest.approx(official_t, rel=1e-6)
    opt_params = [p for g in param_groups(model, LSegTrainConfig()) for p in g["params"]]
    assert all(p is not model.logit_scale for p in opt_params)
    dense, text = torch.randn(2, 32, 4, 4, requires_grad=True), torch.randn(3, 32)
    cos = torch.einsum("bchw,nc->bnhw", F.normalize(dense, dim=1), F.normalize(text, dim=-1))
    out = model.dense_logits(dense, text)
    torch.testing.assert_close(out, official_t * cos, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    assert model.logit_scale.grad is None and not model.logit_scale.requires_grad
    # textseg's option: a learnable temperature (same start), trained with the decoder
    learn = tiny_lseg(learn_logit_scale=True).train()
    assert "logit_scale" in dict(learn.named_parameters())
    assert any(p is learn.logit_scale for g in param_groups(learn, LSegTrainConfig()) for p in g["params"])
    learn.dense_logits(dense, text).square().sum().backward()
    assert learn.logit_scale.grad is not None and learn.logit_scale.grad.abs() > 0
    assert learn.logit_scale.exp().item() == pytest.approx(official_t, rel=1e-6)


@pytest.mark.parametrize("block", ["bottleneck", "depthwise"])
def test_spatial_regularisation_blocks(block):
    model = tiny_lseg(block=block, block_depth=2)
    dense = torch.randn(1, 32, 8, 8, requires_grad=True)
    text = torch.randn(4, 32)
    out = model.dense_logits(dense, text)
    assert out.shape == (1, 4, 8, 8)
    out.square().sum().backward()
    assert model.head_block.conv.weight.grad.abs().sum() > 0
    # hand-computed: depth 2 = conv, act, conv (no act); bottleneck adds the max over labels
    raw = model.logit_scale.exp() * torch.einsum("bchw,nc->bnhw", F.normalize(dense, dim=1), F.normalize(text, dim=-1))
    conv = model.head_block.conv

    def step(z, act):
        y = conv(z.reshape(-1, 1, 8, 8)).view_as(z)
        if block == "bottleneck":
            y = y + z.max(dim=1, keepdim=True).values
        return F.leaky_relu(y) if act else y

    torch.testing.assert_close(out, step(step(raw, True), False))


def test_permuting_labels_permutes_logits():
    model = tiny_lseg(block="bottleneck", block_depth=1).eval()
    x = torch.randn(1, 3, 64, 64)
    names = ["road", "sky", "car", "tree", "person"]
    text = model.embed_texts(names)
    perm = torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():
        a = model.forward_logits(x, text)
        b = model.forward_logits(x, model.embed_texts([names[i] for i in perm]))
    torch.testing.assert_close(b, a[:, perm], rtol=1e-5, atol=1e-5)


def test_native_save_load_roundtrip(tmp_path):
    from textseg.weights.load import load_model, save_model

    model = tiny_lseg(separable=True, last_upsample=False).eval()
    save_model(model, tmp_path / "m.safetensors", {"source": "test"})
    back = load_model("lseg", weights=tmp_path / "m.safetensors")
    assert back.name == "lseg" and back.dense_stride == 4
    x, text = torch.randn(1, 3, 64, 64), model.embed_texts(["a", "b"])
    with torch.no_grad():
        torch.testing.assert_close(back.forward_logits(x, back.embed_texts(["a", "b"])), model.forward_logits(x, text))
    # the same Segmenter every model goes through
    from textseg.segment.segmenter import SegmentCfg, Segmenter

    image = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    res = Segmenter(back, SegmentCfg(short_side=64, templates="none", threshold=None)).segment(image, "road, sky; heaven")
    assert res.label_map.shape == (50, 70) and res.labels == ["road", "sky"]


# ----------------------------------------------------------------------------------------------
# The official lang-seg checkpoint layout (synthetic, small dims)
# ----------------------------------------------------------------------------------------------

W, PATCH, GRID, FEAT, TW, OUT = 64, 16, 4, 16, 64, 32
REASSEMBLE = (8, 16, 32, 32)


def official_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """An LSegNet state dict exactly as lang-seg names it (ViT with 12 blocks, width 64)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.05):
        return torch.randn(*shape, generator=g) * s

    t = {"pretrained.model.cls_token": r(1, 1, W), "pretrained.model.pos_embed": r(1, 1 + GRID * GRID, W),
         "pretrained.model.patch_embed.proj.weight": r(W, 3, PATCH, PATCH),
         "pretrained.model.patch_embed.proj.bias": r(W),
         "pretrained.model.norm.weight": 1 + r(W), "pretrained.model.norm.bias": r(W),
         "pretrained.model.head.weight": r(1000, W), "pretrained.model.head.bias": r(1000)}
    for i in range(12):
        p = f"pretrained.model.blocks.{i}."
        t.update({p + "norm1.weight": 1 + r(W), p + "norm1.bias": r(W), p + "attn.qkv.weight": r(3 * W, W),
                  p + "attn.qkv.bias": r(3 * W), p + "attn.proj.weight": r(W, W), p + "attn.proj.bias": r(W),
                  p + "norm2.weight": 1 + r(W), p + "norm2.bias": r(W), p + "mlp.fc1.weight": r(4 * W, W),
                  p + "mlp.fc1.bias": r(4 * W), p + "mlp.fc2.weight": r(W, 4 * W), p + "mlp.fc2.bias": r(W)})
    for k, c in enumerate(REASSEMBLE, 1):
        p = f"pretrained.act_postprocess{k}."
        t.update({p + "0.project.0.weight": r(W, 2 * W), p + "0.project.0.bias": r(W),
                  p + "3.weight": r(c, W, 1, 1, s=0.2), p + "3.bias": r(c)})
        if k in (1, 2):
            f = 4 if k == 1 else 2
            t.update({p + "4.weight": r(c, c, f, f, s=0.2), p + "4.bias": r(c)})
        elif k == 4:
            t.update({p + "4.weight": r(c, c, 3, 3, s=0.1), p + "4.bias": r(c)})
        t[f"scratch.layer{k}_rn.weight"] = r(FEAT, c, 3, 3, s=0.1)
        p = f"scratch.refinenet{k}."
        t.update({p + "out_conv.weight": r(FEAT, FEAT, 1, 1, s=0.2), p + "out_conv.bias": r(FEAT)})
        for u in (1, 2):
            for j in (1, 2):
                q = f"{p}resConfUnit{u}."
                t.update({q + f"conv{j}.weight": r(FEAT, FEAT, 3, 3, s=0.1), q + f"bn{j}.weight": 1 + r(FEAT),
                          q + f"bn{j}.bias": r(FEAT), q + f"bn{j}.running_mean": r(FEAT),
                          q + f"bn{j}.running_var": 1 + r(FEAT).abs(),
                          q + f"bn{j}.num_batches_tracked": torch.tensor(7)})
    t.update({"scratch.head1.weight": r(OUT, FEAT, 1, 1, s=0.2), "scratch.head1.bias": r(OUT)})
    c = "clip_pretrained."
    t.update({c + "positional_embedding": r(77, TW), c + "text_projection": r(TW, OUT, s=0.1),
              c + "logit_scale": torch.tensor(4.6052), c + "token_embedding.weight": r(49408, TW),
              c + "ln_final.weight": 1 + r(TW), c + "ln_final.bias": r(TW),
              c + "visual.conv1.weight": r(W, 3, 32, 32), c + "visual.proj": r(W, OUT)})
    for i in range(2):
        p = f"{c}transformer.resblocks.{i}."
        t.update({p + "attn.in_proj_weight": r(3 * TW, TW), p + "attn.in_proj_bias": r(3 * TW),
                  p + "attn.out_proj.weight": r(TW, TW), p + "attn.out_proj.bias": r(TW),
                  p + "ln_1.weight": 1 + r(TW), p + "ln_1.bias": r(TW), p + "mlp.c_fc.weight": r(4 * TW, TW),
                  p + "mlp.c_fc.bias": r(4 * TW), p + "mlp.c_proj.weight": r(TW, 4 * TW),
                  p + "mlp.c_proj.bias": r(TW), p + "ln_2.weight": 1 + r(TW), p + "ln_2.bias": r(TW)})
    return {k: (v.half() if k.startswith(c) and v.is_floating_point() else v) for k, v in t.items()}


def reference_image_features(t: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """lang-seg's forward written directly on its own key names (timm ViT, hooks 2/5/8/11,
    act_postprocess, refinenets with BN in eval mode, head1) -> ``B x OUT x H/2 x W/2``."""
    m = "pretrained.model."
    b, _, h, w = x.shape
    gh, gw = h // PATCH, w // PATCH
    z = F.conv2d(x, t[m + "patch_embed.proj.weight"], t[m + "patch_embed.proj.bias"], stride=PATCH)
    z = z.flatten(2).transpose(1, 2)
    pos = t[m + "pos_embed"]
    grid = pos[0, 1:].reshape(1, GRID, GRID, W).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(gh, gw), mode="bilinear").permute(0, 2, 3, 1).reshape(1, gh * gw, W)
    z = torch.cat([t[m + "cls_token"].expand(b, -1, -1), z], 1) + torch.cat([pos[:, :1], grid], 1)
    acts = {}
    for i in range(12):
        p = f"{m}blocks.{i}."
        y = F.layer_norm(z, (W,), t[p + "norm1.weight"], t[p + "norm1.bias"], 1e-6)
        q, k, v = F.linear(y, t[p + "attn.qkv.weight"], t[p + "attn.qkv.bias"]).view(b, -1, 3, 1, W).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) * W**-0.5, -1) @ v
        z = z + F.linear(a.transpose(1, 2).reshape(b, -1, W), t[p + "attn.proj.weight"], t[p + "attn.proj.bias"])
        y = F.layer_norm(z, (W,), t[p + "norm2.weight"], t[p + "norm2.bias"], 1e-6)
        y = F.linear(F.gelu(F.linear(y, t[p + "mlp.fc1.weight"], t[p + "mlp.fc1.bias"])), t[p + "mlp.fc2.weight"],
                     t[p + "mlp.fc2.bias"])
        z = z + y
        acts[i] = z
    layers = []
    for k, hook in enumerate((2, 5, 8, 11), 1):
        p = f"pretrained.act_postprocess{k}."
        tok = acts[hook]
        y = torch.cat([tok[:, 1:], tok[:, :1].expand_as(tok[:, 1:])], -1)
        y = F.gelu(F.linear(y, t[p + "0.project.0.weight"], t[p + "0.project.0.bias"]))
        y = y.transpose(1, 2).reshape(b, W, gh, gw)
        y = F.conv2d(y, t[p + "3.weight"], t[p + "3.bias"])
        if k in (1, 2):
            y = F.conv_transpose2d(y, t[p + "4.weight"], t[p + "4.bias"], stride=4 if k == 1 else 2)
        elif k == 4:
            y = F.conv2d(y, t[p + "4.weight"], t[p + "4.bias"], stride=2, padding=1)
        layers.append(F.conv2d(y, t[f"scratch.layer{k}_rn.weight"], padding=1))

    def rcu(p, x):
        out = F.conv2d(F.relu(x), t[p + "conv1.weight"], padding=1)
        out = F.batch_norm(out, t[p + "bn1.running_mean"], t[p + "bn1.running_var"], t[p + "bn1.weight"],
                           t[p + "bn1.bias"], False, 0.0, 1e-5)
        out = F.conv2d(F.relu(out), t[p + "conv2.weight"], padding=1)
        out = F.batch_norm(out, t[p + "bn2.running_mean"], t[p + "bn2.running_var"], t[p + "bn2.weight"],
                           t[p + "bn2.bias"], False, 0.0, 1e-5)
        return out + x

    def refine(k, x, skip=None):
        p = f"scratch.refinenet{k}."
        if skip is not None:
            x = x + rcu(p + "resConfUnit1.", skip)
        x = F.interpolate(rcu(p + "resConfUnit2.", x), scale_factor=2, mode="bilinear", align_corners=True)
        return F.conv2d(x, t[p + "out_conv.weight"], t[p + "out_conv.bias"])

    path = refine(4, layers[3])
    path = refine(3, path, layers[2])
    path = refine(2, path, layers[1])
    path = refine(1, path, layers[0])
    return F.conv2d(path, t["scratch.head1.weight"], t["scratch.head1.bias"])


def test_official_checkpoint_layout_loads_exactly(tmp_path):
    from textseg.weights.load import load_model

    state = official_state()
    lightning = {"epoch": 199, "global_step": 12345, "pytorch-lightning_version": "1.3.5",
                 "state_dict": {"net." + k: v for k, v in state.items()},
                 "hyper_parameters": {"backbone": "clip_vitb32_384", "arch_option": 0, "num_features": FEAT}}
    path = tmp_path / "demo_e200.ckpt"
    torch.save(lightning, path)
    model = load_model("lseg", weights=path)
    cfg = model.cfg
    assert (cfg.backbone, cfg.text_encoder, cfg.vit_layers, cfg.vit_width, cfg.vit_hooks) == ("vit", "clip", 12, W,
                                                                                              (2, 5, 8, 11))
    assert cfg.vit_reassemble == REASSEMBLE and cfg.features == FEAT and cfg.embed_dim == OUT
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-6)

    x = torch.randn(1, 3, 96, 64)  # not the 64 x 64 training grid: position embeddings are resized
    t = {k: v.float() for k, v in state.items()}
    with torch.no_grad():
        ours = model.encode_dense(x)
        ref = reference_image_features(t, x)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
        # text tower = CLIP's text transformer (its visual part is dropped); logits = (1/0.07) * cos, x2 up
        from textseg.models.tokenizer import tokenize

        te = model.text_encoder
        assert torch.equal(te.token_embedding.weight, t["clip_pretrained.token_embedding.weight"])
        assert torch.equal(te.transformer.resblocks[1].attn.in_proj_weight,
                           t["clip_pretrained.transformer.resblocks.1.attn.in_proj_weight"])
        ours_txt = model.encode_text(tokenize(["dog", "grass"]))
        assert ours_txt.shape == (2, OUT)
        logits = model.forward_logits(x, ours_txt)
        expect = (1 / 0.07) * torch.einsum("bchw,nc->bnhw", F.normalize(ref, dim=1), F.normalize(ours_txt, dim=-1))
        expect = F.interpolate(expect, scale_factor=2, mode="bilinear", align_corners=True)
        torch.testing.assert_close(logits, expect, rtol=1e-4, atol=1e-3)

    # one key too many / too few is a clear error
    extra = dict(lightning["state_dict"], **{"net.scratch.surprise.weight": torch.zeros(1)})
    torch.save({"state_dict": extra}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match="surprise"):
        load_model(weights=tmp_path / "bad.ckpt")
    fewer = {k: v for k, v in lightning["state_dict"].items() if "refinenet2.out_conv.bias" not in k}
    torch.save({"state_dict": fewer}, tmp_path / "fewer.ckpt")
    with pytest.raises(CheckpointError, match="missing"):
        load_model(weights=tmp_path / "fewer.ckpt")


def test_lightning_checkpoint_with_objects_needs_explicit_trust(tmp_path):
    """A Lightning file whose hyper_parameters pickle a class is refused by the safe reader; the
    explicit ``convert --trust-checkpoint`` turns it into safetensors once, which then load safely."""
    import argparse

    from textseg.cli import main
    from textseg.weights.load import load_model

    state = official_state(seed=1)
    path = tmp_path / "fold0.ckpt"
    torch.save({"state_dict": {"net." + k: v for k, v in state.items()},
                "hyper_parameters": argparse.Namespace(backbone="clip_vitb32_384")}, path)
    with pytest.raises(CheckpointError, match="safe torch checkpoint"):
        load_model(weights=path)
    assert main(["convert", str(path), str(tmp_path / "fold0.safetensors")]) == 2  # not without the flag
    assert main(["convert", "--trust-checkpoint", str(path), str(tmp_path / "fold0.safetensors")]) == 0
    model = load_model("lseg", weights=tmp_path / "fold0.safetensors")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_dense(x),
                                   reference_image_features({k: v.float() for k, v in state.items()}, x),
                                   rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

CLASSES = ["road", "sky", "car"]
COLORS = np.array([[90, 90, 90], [120, 170, 240], [200, 30, 30]], np.float32)


def make_folder_dataset(root: Path, n: int = 12, size: int = 64, seed: int = 0) -> Path:
    """Tiny scenes: sky on top, road below, a red car box; colours + noise decide the class."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "splits").mkdir()
    ids = []
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        horizon = int(rng.integers(size // 4, size // 2))
        mask[:horizon] = 1
        y, x = int(rng.integers(horizon, size - 12)), int(rng.integers(0, size - 16))
        mask[y : y + 10, x : x + 16] = 2
        mask[0, :4] = 255
        img = COLORS[mask.clip(0, 2)] + rng.normal(0, 20, (size, size, 3))
        sid = f"s{i:03d}"
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / "images" / f"{sid}.png")
        Image.fromarray(mask).save(root / "masks" / f"{sid}.png")
        ids.append(sid)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "splits" / "train.txt").write_text("\n".join(ids) + "\n")
    (root / "splits" / "val.txt").write_text("\n".join(ids[:4]) + "\n")
    return root


def train_args(data: Path, out: Path, *sets: str, light: bool = True) -> list[str]:
    """``textseg train lseg`` on a tiny folder dataset; ``sets`` are extra ``key=value`` overrides."""
    base = [f"data.roots=[{data}]", "data.crop=[64,64]", "data.scale=[0.8,1.25]", "train.batch_size=2",
            f"model.light={str(light).lower()}", "model.features=16", "train.num_workers=0", "train.threads=1",
            "train.log_every=1", f"train.out_dir={out}", "train.progress=false", "train.tensorboard=false"]
    return ["train", "lseg", *(a for kv in (*base, *sets) for a in ("--set", kv))]


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_training_learns_and_keeps_the_text_encoder_bit_identical(tmp_path):
    from textseg.cli import main
    from textseg.models.minilm import minilm
    from textseg.weights.load import load_model

    data = make_folder_dataset(tmp_path / "scenes")
    out = tmp_path / "run"
    assert main(train_args(data, out, "train.steps=24", "train.lr=3e-3", "train.eval_every_epochs=1")) == 0
    log = read_log(out)
    losses = [e["loss"] for e in log if "loss" in e]
    assert len(losses) == 24
    assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:4]), losses
    val = [e for e in log if e["kind"] == "eval"]
    assert val and val[-1]["miou"] > 40  # 3 classes, learnt from 24 tiny steps
    model = load_model("lseg", weights=out / "model.safetensors")
    # the default recipe keeps lang-seg's fixed temperature through training, saving and loading
    assert not model.cfg.learn_logit_scale and "logit_scale" not in dict(model.named_parameters())
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-6)
    fresh = minilm().state_dict()
    trained = model.text_encoder.state_dict()
    assert trained.keys() == fresh.keys()
    assert all(torch.equal(trained[k], fresh[k]) for k in fresh)


def test_training_from_a_clip_checkpoint_keeps_its_text_tower(tmp_path):
    """backbone + text encoder from a (tiny, random) CLIP checkpoint: the ViT is trained through the DPT
    head, CLIP's text tower is frozen and saved bit-identical."""
    from textseg.cli import main
    from textseg.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
    from textseg.weights.load import load_model, save_model

    torch.manual_seed(0)
    clip = CLIP(CLIPConfig(embed_dim=32, vision=VisionConfig(image_size=64, layers=4, width=64, patch_size=16),
                           text=TextConfig(width=64, heads=1, layers=1)))
    save_model(clip, tmp_path / "clip.safetensors")
    data = make_folder_dataset(tmp_path / "scenes", n=4)
    out = tmp_path / "run"
    args = train_args(data, out, "train.steps=2", "data.val_split=none", "model.backbone=clip",
                      "model.text_encoder=clip", f"model.init_from={tmp_path / 'clip.safetensors'}", light=False)
    assert main(args) == 0
    model = load_model("lseg", weights=out / "model.safetensors")
    assert model.cfg.backbone == "clip" and model.cfg.embed_dim == 32 and model.image_encoder.hooks == (0, 1, 2, 3)
    assert all(torch.equal(v, clip.text.state_dict()[k]) for k, v in model.text_encoder.state_dict().items())
    moved = model.image_encoder.vit.blocks[0].mlp.c_fc.weight
    assert not torch.equal(moved, clip.visual.blocks[0].mlp.c_fc.weight)  # the image side did train
    assert model.forward_logits(torch.randn(1, 3, 64, 96), model.embed_texts(["a", "b"])).shape == (1, 2, 64, 96)


def test_two_datasets_each_scored_against_its_own_labels(tmp_path):
    from textseg.models.lseg import LSegConfig, build_lseg
    from textseg.train.lseg import LabelledSegData, LSegLoss, open_dataset

    a = make_folder_dataset(tmp_path / "a", n=4)
    b = make_folder_dataset(tmp_path / "b", n=4, seed=1)
    (b / "classes.txt").write_text("street\nheaven\nautomobile\n")
    sets = [open_dataset(str(a), "train"), open_dataset(str(b), "train")]
    data = LabelledSegData(sets, (0.5,) * 3, (0.5,) * 3, train=True, crop=(64, 64), scale=(1, 1))
    assert len(data) == 8 and data[5][2] == 1
    model = build_lseg(LSegConfig(embed_dim=32, features=16, text_cfg=TINY_TEXT), pretrained=False).eval()
    texts = [model.embed_texts(s.class_names) for s in sets]
    imgs, masks, ds = zip(*(data[i] for i in (0, 5)))
    imgs, masks, ds = torch.stack(imgs), torch.stack(masks), torch.tensor(ds)
    loss, count = LSegLoss(model)(imgs, masks, ds, texts)
    with torch.no_grad():  # by hand: image 0 against dataset a's labels, image 1 against b's
        l0 = F.cross_entropy(model.forward_logits(imgs[:1], texts[0]), masks[:1], ignore_index=255, reduction="sum")
        l1 = F.cross_entropy(model.forward_logits(imgs[1:], texts[1]), masks[1:], ignore_index=255, reduction="sum")
    torch.testing.assert_close(loss.detach(), (l0 + l1) / count, rtol=1e-4, atol=1e-5)


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_torchrun_two_processes_gloo_loss_falls(tmp_path):
    data = make_folder_dataset(tmp_path / "scenes", n=16)
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000),
           "-m", "textseg.cli", *train_args(data, out, "train.steps=16", "train.lr=3e-3", "data.val_split=none",
                                            "train.device=cpu")]
    code, log_text = run_torchrun(cmd, env=_env(), timeout=240, cwd=tmp_path, outputs=[out])
    assert code == 0, log_text[-5000:]
    log = read_log(out)
    losses = [e["loss"] for e in log if "loss" in e]
    assert len(losses) == 16  # rank 0 logs the mean over both ranks
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
    ckpt = torch.load(sorted((out / "checkpoints").glob("step_*.pt"))[-1], weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 16


def test_killed_run_resumes_at_the_same_step_with_the_same_state(tmp_path):
    from textseg.cli import main
    from textseg.train.checkpoint import checkpoint_path, load_checkpoint

    data = make_folder_dataset(tmp_path / "scenes", n=8)
    common = ("train.steps=16", "train.ckpt_every=1", "data.val_split=none", "train.lr=3e-3")
    ref = tmp_path / "ref"
    assert main(train_args(data, ref, *common)) == 0  # uninterrupted reference (keeps the last 2 steps)

    out = tmp_path / "killed"
    ckpts = out / "checkpoints"
    cmd = [sys.executable, "-m", "textseg.cli", *train_args(data, out, *common, "train.resume=auto")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env())
    deadline = time.time() + 120
    while time.time() < deadline and not list(ckpts.glob("step_*.pt")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: a real crash
    proc.wait()
    assert list(ckpts.glob("step_*.pt")), "the run was killed before its first checkpoint"
    done = max(int(p.stem.split("_")[1]) for p in ckpts.glob("step_*.pt"))
    assert done < 16, "the run finished before it could be killed"
    state_at_kill = load_checkpoint(checkpoint_path(ckpts, done))

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=_env())
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"resumed from {checkpoint_path(ckpts, done)} at step {done}" in resumed.stdout
    steps = [e["step"] for e in read_log(out) if "loss" in e]
    assert steps[-(16 - done):] == list(range(done + 1, 17))  # continues at the next step, none repeated
    first_after = load_checkpoint(checkpoint_path(ckpts, 16))
    want = load_checkpoint(checkpoint_path(ref / "checkpoints", 16))
    # the frozen text tower is rebuilt from its packaged weights, not stored in the checkpoints
    assert not any(k.startswith("loss.model.text_encoder.") for k in want["model"])
    assert first_after["step"] == want["step"] == 16
    for k, v in want["model"].items():
        torch.testing.assert_close(first_after["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    for sid, s in want["optimizer"]["state"].items():
        got = first_after["optimizer"]["state"][sid]
        assert int(got["step"]) == int(s["step"]) == 16
        torch.testing.assert_close(got["exp_avg_sq"], s["exp_avg_sq"], rtol=1e-3, atol=1e-9)
    assert state_at_kill["optimizer"]["param_groups"][0]["lr"] > want["optimizer"]["param_groups"][0]["lr"]
    assert not math.isnan(first_after["model"]["loss.model.logit_scale"].item())
    # the run's model file segments through the CLI
    from textseg.cli import main as cli

    image = tmp_path / "scene.png"
    Image.open(data / "images" / "s000.png").save(image)
    assert cli(["segment", str(image), "--weights", str(out / "model.safetensors"), "--labels", "road, sky, car",
                "--out", str(tmp_path / "seg")]) == 0
    assert list((tmp_path / "seg").iterdir())


def test_cli_learn_logit_scale_setting_reaches_the_recipe(monkeypatch, tmp_path):
    import textseg.train.lseg as recipe
    from textseg.cli import main

    seen = []
    monkeypatch.setattr(recipe, "train", lambda cfg: seen.append(cfg) or {"step": 0, "loss": 0.0})
    base = ["train", "lseg", "--set", f"data.roots=[{tmp_path}]"]
    assert main([*base, "--set", f"train.out_dir={tmp_path / 'a'}"]) == 0
    assert main([*base, "--set", f"train.out_dir={tmp_path / 'b'}", "--set", "model.learn_logit_scale=true"]) == 0
    assert [c.model.learn_logit_scale for c in seen] == [False, True]
