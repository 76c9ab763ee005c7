"""CLIMS / CAM: losses against hand-computed values, masking sides, frozen evaluator, absent classes,
CAM networks, label readers, the train cam / cam make/eval/labels pipeline, a 2-process torchrun run,
exact resume and segmenting with the run's model."""

from __future__ import annotations

import json
import math
import os
import random
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchrun_util import json_records, run_torchrun

from textseg.cli import main as cli_main
from textseg.data.image_labels import (
    canonical,
    load_image_labels,
    multi_hot,
    read_class_list,
    read_coco_json,
    read_voc_cls,
    read_voc_xml,
)
from textseg.errors import TextsegError
from textseg.models.base import DualEncoder, PreprocessCfg
from textseg.wsss.cam import CAMConfig, CAMNet, ResNet50, load_cam, save_cam
from textseg.wsss.cam_maps import ThresholdSweep, cam_to_mask, load_cam_file, multiscale_cam, save_cam_file
from textseg.wsss.clims import (
    CLIMSLoss,
    CLIMSWeights,
    baseline_loss,
    btm_loss,
    cbs_loss,
    load_background,
    otm_loss,
)

RED, BLUE = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)


class ColourEvaluator(DualEncoder):
    """A hand-computable image-text model: the image embedding is ``W @ mean colour`` (``W`` a
    parameter, identity at start), texts map to fixed vectors. Preprocessing is the identity."""

    name = "colour"
    preprocess_cfg = PreprocessCfg(image_size=4, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 3, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(3))
        self.vocab = {"red": RED, "blue": BLUE, "sea": BLUE, "tree": (0.0, 1.0, 0.0)}

    def encode_image(self, pixels, normalize=False):
        return self.proj(pixels.mean(dim=(2, 3)))

    def embed_texts(self, texts: Sequence[str], templates=("{}",)):
        return torch.tensor([self.vocab[t] for t in texts])


def _half_image() -> torch.Tensor:
    """1 x 3 x 4 x 4: left half red, right half blue."""
    x = torch.zeros(1, 3, 4, 4)
    x[0, 0, :, :2] = 1.0
    x[0, 2, :, 2:] = 1.0
    return x


def _maps() -> torch.Tensor:
    """1 x 2 x 4 x 4: class 0 ("red") 0.8 on the left, 0.2 on the right; class 1 anything."""
    m = torch.full((1, 2, 4, 4), 0.2)
    m[0, 0, :, :2] = 0.8
    m[0, 1] = torch.rand(4, 4) * 0.9 + 0.05
    return m


@pytest.fixture()
def bg_file(tmp_path) -> Path:
    f = tmp_path / "bg.txt"
    f.write_text("# comment\nsea\nred: tree\n")
    return f


def _loss(bg_file, **kw) -> CLIMSLoss:
    """The colour evaluator's hand values assume pixels in [0, 1]: its own identity normalisation
    (``input_norm="evaluator"``) instead of the official ImageNet one, which
    test_official_clims_terms_transcribed covers."""
    kw.setdefault("weights", CLIMSWeights(alpha=10, beta=24, gamma=1, delta=0.2))
    kw.setdefault("input_norm", "evaluator")
    return CLIMSLoss(ColourEvaluator(), ["red", "blue"], bg_file, template="{}", **kw)


# --------------------------------------------------------------------------------- loss values
def test_loss_functions_hand_values():
    s = torch.tensor([0.5, 0.25, 2.0, -1.0])
    assert otm_loss(s).item() == pytest.approx(-(math.log(0.5) + math.log(0.25) + math.log(0.9999)
                                                 + math.log(1e-4)) / 4, rel=1e-5)
    assert btm_loss(s).item() == pytest.approx(-(math.log(0.5) + math.log(0.75) + math.log(1e-4)
                                                 + math.log(1 - 1e-4)) / 4, rel=1e-4)
    sim = torch.tensor([[0.3, 0.1], [0.5, 0.27]])
    applies = torch.tensor([[True, True], [True, False]])
    # threshold 0.26: (0,0) 0.3 and (1,0) 0.5 count; (1,1) 0.27 exceeds but does not apply; sum, not mean
    assert cbs_loss(sim, applies, 0.26).item() == pytest.approx(-(math.log(0.7) + math.log(0.5)), rel=1e-5)
    assert cbs_loss(sim, applies, None).item() == pytest.approx(
        -(math.log(0.7) + math.log(0.9) + math.log(0.5)), rel=1e-5)
    logits, labels = torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 0.0]])
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert baseline_loss(logits, labels).item() == pytest.approx(
        -(math.log(sig(2.0)) + math.log(1 - sig(-1.0))) / 2, rel=1e-5)


def test_clims_loss_hand_computed_and_mask_sides(bg_file):
    loss, maps = _loss(bg_file, cbs_threshold=None), _maps()
    out = loss(maps, _half_image(), torch.tensor([[1.0, 0.0]]))
    # fg = x * P: left (0.8, 0, 0), right (0, 0, 0.2) -> mean (0.4, 0, 0.1); bg = x * (1 - P) -> (0.1, 0, 0.4)
    fg, bg = np.array([0.4, 0, 0.1]), np.array([0.1, 0, 0.4])
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    s_fg, s_bg = cos(fg, np.array(RED)), cos(bg, np.array(RED))
    assert s_fg == pytest.approx(0.4 / math.sqrt(0.17)) and s_bg == pytest.approx(0.1 / math.sqrt(0.17))
    otm, btm = -math.log(s_fg), -math.log(1 - s_bg)
    # "red" has two background prompts: "sea" (blue, for every class) and "tree" (green, red only)
    cbs = -math.log(1 - cos(fg, np.array(BLUE))) - math.log(1 - 0.0)  # tree: cos 0, no clamp (official CBS)
    reg = (0.5 * 16 + maps[0, 1].sum().item()) / 32  # official: mean of every map (red: half 0.8, half 0.2)
    assert out["otm"].item() == pytest.approx(otm, rel=1e-5)
    assert out["btm"].item() == pytest.approx(btm, rel=1e-5)
    assert out["cbs"].item() == pytest.approx(cbs, rel=1e-4)
    assert out["reg"].item() == pytest.approx(reg, rel=1e-6)
    assert out["loss"].item() == pytest.approx(10 * otm + 24 * btm + cbs + 0.2 * reg, rel=1e-5)
    assert out["pairs"] == 1
    assert out["s_fg"].tolist() == pytest.approx([s_fg]) and out["s_bg"].tolist() == pytest.approx([s_bg])
    # the masked inputs themselves: fg keeps the map's side, bg the other
    fg_px, bg_px, _, _ = loss.masked_inputs(_maps(), _half_image(), torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(fg_px[0, 0, :, :2], torch.full((4, 2), 0.8))
    assert torch.allclose(bg_px[0, 2, :, 2:], torch.full((4, 2), 0.8))
    # with the threshold, the sea prompt (cos 0.243 < 0.26) no longer counts
    assert _loss(bg_file, cbs_threshold=0.26)(_maps(), _half_image(), torch.tensor([[1.0, 0.0]]))[
        "cbs"].item() == pytest.approx(0.0, abs=1e-6)


def test_loss_falls_when_map_moves_to_the_object(bg_file):
    """Swapping the map onto the wrong half must raise OTM and BTM (sides are not mixed up)."""
    loss, labels = _loss(bg_file), torch.tensor([[1.0, 0.0]])
    good = loss(_maps(), _half_image(), labels)
    bad = loss(_maps().flip(-1), _half_image(), labels)
    assert bad["otm"] > good["otm"] and bad["btm"] > good["btm"]


def test_no_gradient_reaches_the_evaluator(bg_file):
    loss = _loss(bg_file)
    loss.train()
    assert not loss.evaluator.training
    net = CAMNet(CAMConfig(["red", "blue"], "tiny"))
    x = torch.rand(2, 3, 32, 32)
    maps = net.maps(net.normalize(x))
    before = loss.evaluator.proj.weight.clone()
    out = loss(maps, x, torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in loss.evaluator.parameters())
    assert net.classifier.weight.grad is not None and net.classifier.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.backbone.parameters())
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    assert torch.equal(before, loss.evaluator.proj.weight)


def test_absent_classes_contribute_nothing(bg_file):
    """Under reg_over="present" (textseg's option; the official REG includes absent maps, see
    test_reg_default_is_the_mean_over_all_maps)."""
    loss, labels = _loss(bg_file, reg_over="present"), torch.tensor([[1.0, 0.0]])
    maps = _maps().requires_grad_(True)
    out = loss(maps, _half_image(), labels)
    out["loss"].backward()
    assert maps.grad[0, 1].abs().max() == 0  # the blue map (absent) gets no gradient
    assert maps.grad[0, 0].abs().max() > 0
    other = _maps()
    other[0, 1] = torch.rand(4, 4)
    assert loss(other, _half_image(), labels)["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-6)
    # no class present at all: zero loss, still differentiable
    empty = loss(maps, _half_image(), torch.zeros(1, 2))
    assert empty["loss"].item() == 0 and empty["pairs"] == 0 and empty["loss"].requires_grad
    # the official REG (the default) averages every map, absent ones included
    all_reg = _loss(bg_file)(_maps(), _half_image(), labels)["reg"].item()
    assert all_reg != pytest.approx(0.5)


def test_background_lists(bg_file):
    words, applies = load_background(bg_file, ["red", "blue"])
    assert words == ["sea", "tree"] and applies.tolist() == [[True, True], [True, False]]  # red: sea, tree; blue: sea
    voc, a = load_background("voc", ["aeroplane", "train"])
    assert voc[:2] == ["tree", "river"] and len(voc) == 10 and bool(a.all())
    coco, _ = load_background("coco", ["person"])
    assert len(coco) == 88 and "railroad" not in coco and "street sign" in coco


# ------------------------------------------------------------------- official CLIMS, transcribed
class PromptEvaluator(DualEncoder):
    """A CLIP stand-in: image embedding = ``W @ mean colour`` (fixed random ``W``), each prompt a
    fixed random vector; its own normalisation is deliberately not ImageNet's."""

    name = "prompt"
    preprocess_cfg = PreprocessCfg(image_size=6, mean=(0.3, 0.3, 0.3), std=(0.5, 0.5, 0.5))
    PROMPTS = ("a photo of player.", "a photo of person.", "a photo of dog.", "a photo of car.",
               "a photo of tree.", "a photo of sea.")

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.proj = nn.Linear(3, 5, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(5, 3, generator=g))
        self.vocab = {t: torch.randn(5, generator=g) for t in self.PROMPTS}

    def encode_image(self, pixels, normalize=False):
        return self.proj(pixels.mean(dim=(2, 3)))

    def embed_texts(self, texts: Sequence[str], templates=("{}",)):
        return torch.stack([self.vocab[t] for t in texts])


def _official_clims(ev, x, images, label, names, bg_prompts, hyper, threshold, size):
    """CVI-SZU/CLIMS step/train_clims.py + clip_loss.py + clip_utils.clip_forward, transcribed:
    x = the sigmoid maps (N x 20 x h x w), img = TorchvisionNormalize'd image, CLIP at size x size."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    img = (images - mean) / std
    n, k = label.shape
    fg_indices = torch.nonzero(label.reshape(-1) == 1, as_tuple=False).squeeze()
    cam_224 = F.interpolate(x, (size, size), mode="bilinear", align_corners=True).reshape(n * k, 1, size, size)
    img_224 = F.interpolate(img, (size, size), mode="bilinear", align_corners=True)
    temp_idx = torch.nonzero(label == 1, as_tuple=False)
    fg = torch.stack([cam_224[fg_indices[j]] * img_224[temp_idx[j, 0]] for j in range(temp_idx.shape[0])])
    bg = torch.stack([(1 - cam_224[fg_indices[j]]) * img_224[temp_idx[j, 0]] for j in range(temp_idx.shape[0])])

    def clip_forward(images, texts):  # one prompt per image: "a photo of {}."
        i = ev.encode_image(images)
        t = ev.embed_texts(texts)
        i, t = i / i.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
        return torch.matmul(i.reshape(len(i), 1, -1), t.reshape(len(t), -1, 1))

    texts = [f"a photo of {names[c]}." for c in temp_idx[:, 1].tolist()]
    otm = -(torch.log(clip_forward(fg, texts).clamp(0.0001, 0.9999)) * 1).mean()  # SimMaxLoss
    btm = -(torch.log(1 - clip_forward(bg, texts).clamp(0.0001, 0.9999)) * 1).mean()  # SimMinLoss
    i, t = ev.encode_image(fg), ev.embed_texts(bg_prompts)  # BackgroundSuppressionLoss
    logits = (i / i.norm(dim=-1, keepdim=True)) @ (t / t.norm(dim=-1, keepdim=True)).t()
    mask = torch.where(logits > threshold, torch.ones_like(logits), torch.zeros_like(logits))
    cbs = -(torch.log(1 - logits) * mask).sum()
    reg = torch.mean(x)
    loss = hyper[0] * otm + hyper[1] * btm + hyper[2] * cbs + hyper[3] * reg
    return {"otm": otm, "btm": btm, "cbs": cbs, "reg": reg, "loss": loss, "cbs_mask": mask}


def test_official_clims_terms_transcribed(tmp_path):
    """Every term and the total on a batch with absent classes, against the official code written
    out above: ImageNet normalisation, align_corners=True resizes, unclamped CBS sum, REG over all maps,
    "player" for person."""
    bg = tmp_path / "bg.txt"
    bg.write_text("tree\nsea\n")
    names, official_names = ["person", "dog", "car"], ["player", "dog", "car"]
    torch.manual_seed(0)
    x = torch.sigmoid(torch.randn(2, 3, 4, 4) * 2)
    images = torch.rand(2, 3, 8, 8)
    label = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # absent classes in both images
    ev = PromptEvaluator()
    hyper, threshold = (10.0, 24.0, 1.0, 0.2), 0.1
    want = _official_clims(ev, x, images, label, official_names, ["a photo of tree.", "a photo of sea."],
                           hyper, threshold, 6)
    assert 0 < want["cbs_mask"].sum() < want["cbs_mask"].numel()  # the threshold bites both ways
    loss = CLIMSLoss(ev, names, bg, CLIMSWeights(*hyper), cbs_threshold=threshold, prompt_names="person=player")
    assert loss.prompts[0] == "a photo of player."
    got = loss(x, images, label)
    for term in ("otm", "btm", "cbs", "reg", "loss"):
        assert got[term].item() == pytest.approx(want[term].item(), rel=1e-5, abs=1e-7), term
    assert got["pairs"] == 3


def test_reg_default_is_the_mean_over_all_maps(bg_file):
    """Official ``L_REG = torch.mean(x)`` over all B x K maps; present-only is the named option."""
    torch.manual_seed(1)
    maps = torch.rand(2, 2, 4, 4).requires_grad_(True)
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # "blue" absent in both images
    official = maps.detach().numpy().mean()
    present = maps.detach().numpy()[:, 0].mean()
    assert abs(official - present) > 1e-3
    default = CLIMSLoss(ColourEvaluator(), ["red", "blue"], bg_file, template="{}")
    assert default.reg_over == "all"
    out = default(maps, _half_image().repeat(2, 1, 1, 1), labels)
    assert out["reg"].item() == pytest.approx(float(official), rel=1e-6)
    (0.2 * out["reg"]).backward()  # the absent maps get REG's gradient, delta / (B K h w)
    torch.testing.assert_close(maps.grad[:, 1], torch.full((2, 4, 4), 0.2 / maps.numel()))
    opt = _loss(bg_file, reg_over="present")(maps, _half_image().repeat(2, 1, 1, 1), labels)
    assert opt["reg"].item() == pytest.approx(float(present), rel=1e-6)
    with pytest.raises(TextsegError, match="reg_over"):
        _loss(bg_file, reg_over="some")


def test_presets_set_the_official_optimiser_schedule_and_prompts(bg_file):
    """run_sample.py / the README's COCO command / step/train_cam.py and misc/torchutils.PolyOptimizer:
    SGD with the classifier at 10 x lr, weight decay 1e-4, momentum 1e-4 (PolyOptimizer passes
    weight_decay as SGD's third positional argument, momentum), lr * (1 - t / max_step) ** 0.9 with
    max_step = (images // batch) * epochs."""
    from textseg.train.cam import CAMTrainCfg, apply_preset, build_optimizer, total_steps
    from textseg.train.engine import LRSchedule

    for preset, mode, lr, batch, epochs, hyper, thr in (
            ("voc", "clims", 0.00025, 16, 15, (10, 24, 1, 0.2), 0.26),
            ("coco", "clims", 0.0005, 32, 8, (2, 14, 1.25, 0.2), 0.285),
            ("voc", "baseline", 0.1, 16, 5, (10, 24, 1, 0.2), 0.26)):
        cfg = apply_preset(CAMTrainCfg(mode=mode), preset)
        assert (cfg.train.lr, cfg.train.batch_size, cfg.epochs) == (lr, batch, epochs)
        assert (cfg.clims.alpha, cfg.clims.beta, cfg.clims.gamma, cfg.clims.delta) == hyper
        assert cfg.clims.cbs_threshold == thr and cfg.clims.background == preset
        assert cfg.data.crop_size == 512 and cfg.data.scale == pytest.approx((320 / 512, 640 / 512))
        assert not cfg.freeze_bn and cfg.clims.reg_over == "all"
        net = CAMNet(CAMConfig(["person", "dog"], "tiny"))
        opt = build_optimizer(net, cfg)
        assert type(opt) is torch.optim.SGD and len(opt.param_groups) == 2
        back, clf = opt.param_groups
        assert back["lr"] == pytest.approx(lr) and clf["lr"] == pytest.approx(10 * lr)
        assert clf["params"] == [net.classifier.weight]
        assert {id(p) for p in back["params"]} == {id(p) for p in net.backbone.parameters()}
        for g in (back, clf):
            assert g["weight_decay"] == 1e-4 and g["momentum"] == 1e-4 and not g["nesterov"]
        max_step = (1464 // batch) * epochs
        assert total_steps(cfg, 1464) == max_step
        assert (cfg.train.schedule, cfg.train.warmup_steps, cfg.train.min_lr_ratio) == ("poly", 0, 0.0)
        poly = LRSchedule(max_step, cfg.train.warmup_steps, cfg.train.schedule, cfg.train.min_lr_ratio,
                          cfg.train.poly_power)  # what the engine multiplies each group's initial lr by
        for t in (0, 1, max_step // 2, max_step - 1):
            assert clf["initial_lr"] * poly(t) == pytest.approx(10 * lr * (1 - t / max_step) ** 0.9)
    # without a preset the prompt keeps the class name; under one, person is "player" (clip_utils.py)
    ev = PromptEvaluator()
    bg_file.write_text("tree\n")
    plain = CLIMSLoss(ev, ["person"], bg_file, template="a photo of {}.")
    assert plain.prompts == ["a photo of person."]
    cfg = apply_preset(CAMTrainCfg(mode="clims"), "coco")
    assert CLIMSLoss(ev, ["person"], bg_file, prompt_names=cfg.clims.prompt_names).prompts == ["a photo of player."]


def test_cli_preset_sets_the_recipe_and_set_wins(tmp_path, monkeypatch):
    import textseg.train.cam as cam_mod

    seen = []

    def fake(cfg):
        seen.append(cfg)
        return {"step": 0}

    monkeypatch.setattr(cam_mod, "train_cam", fake)
    base = ["train", "cam", "--set", f"data.root={tmp_path}", "--set", "data.classes=person,dog",
            "--set", f"train.out_dir={tmp_path / 'r'}"]
    assert cli_main([*base, "--set", "mode=clims", "--preset", "voc"]) == 0
    assert cli_main([*base, "--set", "train.lr=0.003", "--preset", "voc", "--set", "mode=clims", "--set", "epochs=0",
                     "--set", "train.steps=7", "--set", "train.batch_size=4"]) == 0  # --set wins wherever it is
    assert cli_main([*base, "--preset", "voc"]) == 0  # baseline mode: the CAM stage's lr
    assert cli_main([*base, "--set", "mode=clims", "--preset", "coco", "--set", "clims.reg_over=present",
                     "--set", "momentum=0.9"]) == 0
    a, b, c, e = seen
    assert (a.train.lr, a.epochs, a.train.batch_size, a.momentum, a.clims.prompt_names) == (
        2.5e-4, 15, 16, 1e-4, "person=player")
    assert (b.train.lr, b.epochs, b.train.steps, b.train.batch_size, b.clims.gamma) == (0.003, 0, 7, 4, 1.0)
    assert (c.mode, c.train.lr, c.epochs) == ("baseline", 0.1, 5)
    assert (e.clims.reg_over, e.momentum, e.clims.gamma, e.train.lr) == ("present", 0.9, 1.25, 5e-4)
    assert e.data.scale == pytest.approx((0.625, 1.25)) and e.data.crop_size == 512


def test_train_cam_help_shows_config_and_set_only(capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", "cam", "--help"])
    text = capsys.readouterr().out
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text))
    assert flags == {"--help", "--config", "--set", "--print-config", "--json", "--preset"}, flags
    with pytest.raises(SystemExit):  # the old mirrored flags are gone
        cli_main(["train", "cam", "--steps", "3"])
    with pytest.raises(SystemExit):
        cli_main(["cam", "train", "--help"])


# ------------------------------------------------------------------------------------- networks
def test_resnet50_layout_and_cam_views():
    with torch.device("meta"):
        r = ResNet50()
    assert sum(p.numel() for p in r.parameters()) == 23_508_032  # torchvision resnet50 minus fc
    assert "layer4.2.conv3.weight" in r.state_dict() and "layer1.0.downsample.0.weight" in r.state_dict()
    torch.manual_seed(0)
    net = CAMNet(CAMConfig(["a", "b", "c"], "resnet50")).eval()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        maps, scores, logits = net.maps(x), net.scores(x), net.classify(x)
    assert maps.shape == (1, 3, 2, 3) and net.stride == 16
    assert bool(((maps > 0) & (maps < 1)).all())
    assert torch.allclose(logits, scores.mean(dim=(2, 3)), atol=1e-5)  # pooled logits = pooled maps
    assert torch.equal(net.cam(x), scores.clamp_min(0))


def test_efficientnet_cam_is_pretrained_and_stride16(tmp_path):
    net = CAMNet(CAMConfig(["cat"], "efficientnet_lite0")).eval()
    with torch.no_grad():
        assert net.maps(torch.rand(1, 3, 64, 64)).shape == (1, 1, 4, 4)
    from textseg.models.efficientnet import efficientnet_lite

    ref = efficientnet_lite("lite0").state_dict()
    assert torch.equal(net.backbone.net.state_dict()["stem.conv.weight"], ref["stem.conv.weight"])
    path = save_cam(net, tmp_path / "cam.safetensors")
    back = load_cam(path).eval()
    x = torch.rand(1, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(back.maps(x), net.maps(x)) and back.class_names == ["cat"]


def test_tiny_output_stride_option_map_size_and_strict_checkpoints(tmp_path):
    import dataclasses

    from textseg.weights.load import load_model, save_model

    x = torch.rand(1, 3, 96, 96)
    torch.manual_seed(0)
    base = CAMNet(CAMConfig(["a", "b"], "tiny")).eval()
    assert base.config.output_stride == 16 and base.scores(x).shape == (1, 2, 6, 6)
    for stride, side in ((8, 12), (4, 24)):
        torch.manual_seed(0)
        net = CAMNet(CAMConfig(["a", "b"], "tiny", output_stride=stride)).eval()
        with torch.no_grad():
            assert net.scores(x).shape == (1, 2, side, side) and net.stride == net.dense_stride == stride
        # same weights and shapes as stride 16: only strides / dilations differ
        assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}
        assert all(torch.equal(v, base.state_dict()[k]) for k, v in net.state_dict().items())
        with torch.no_grad():
            ref = net.maps(x)
            assert not torch.allclose(F.interpolate(base.maps(x), size=(side, side)), ref)
        back = load_cam(save_cam(net, tmp_path / f"s{stride}.safetensors")).eval()
        save_model(net, tmp_path / f"n{stride}.safetensors")
        native = load_model(weights=str(tmp_path / f"n{stride}.safetensors")).eval()
        for m in (back, native):
            assert isinstance(m, CAMNet) and m.config.output_stride == stride
            with torch.no_grad():
                assert torch.equal(m.maps(x), ref)
    # a checkpoint written before the option (no output_stride in its config) loads at stride 16
    from safetensors.torch import save_file

    cfg = {k: v for k, v in dataclasses.asdict(base.config).items() if k != "output_stride"}
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "old.safetensors"),
              metadata={"format": "textseg-cam", "config": json.dumps(cfg)})
    assert load_cam(tmp_path / "old.safetensors").stride == 16
    # strict: an extra key is an error
    save_file({**{k: v.contiguous() for k, v in base.state_dict().items()}, "extra": torch.zeros(1)},
              str(tmp_path / "bad.safetensors"), metadata={"format": "textseg-cam", "config": json.dumps(cfg)})
    with pytest.raises(Exception, match="extra"):
        load_cam(tmp_path / "bad.safetensors")
    eff = CAMNet(CAMConfig(["a"], "efficientnet_lite0", pretrained=False, output_stride=8)).eval()
    with torch.no_grad():
        assert eff.maps(torch.rand(1, 3, 64, 64)).shape == (1, 1, 8, 8) and eff.stride == 8
    for backbone, stride in (("tiny", 2), ("tiny", 32), ("resnet50", 8)):
        with pytest.raises(TextsegError, match="output_stride"):
            CAMNet(CAMConfig(["a"], backbone, output_stride=stride))


def test_load_cam_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    from textseg.errors import CheckpointError

    save_file({"w": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match="not a textseg CAM"):
        load_cam(tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="no such"):
        load_cam(tmp_path / "missing.safetensors")


def test_multiscale_cam_flip_and_files(tmp_path):
    torch.manual_seed(0)
    net = CAMNet(CAMConfig(["a", "b"], "tiny")).eval()
    net.classifier.weight.data.mul_(100)  # maps well above the 1e-5 normalisation epsilon
    img = torch.rand(3, 40, 56)
    keys, maps = multiscale_cam(net, img, [1], scales=(1.0, 0.5), flip=True)
    assert keys.tolist() == [1] and maps.shape == (1, 40, 56)
    assert maps.max().item() == pytest.approx(1.0, abs=1e-3) and maps.min() >= 0
    # flip equivariance: CAMs of the mirrored image are the mirrored CAMs
    _, mirrored = multiscale_cam(net, img.flip(-1), [1], scales=(1.0, 0.5), flip=True)
    assert torch.allclose(mirrored, maps.flip(-1), atol=1e-4)
    save_cam_file(tmp_path / "x.npz", keys, maps.half(), (80, 112), ["a", "b"])
    k2, m2, names = load_cam_file(tmp_path / "x.npz")
    assert k2.tolist() == [1] and m2.shape == (1, 80, 112) and names == ["a", "b"]
    maps2 = torch.tensor([[[0.9, 0.1, 0.28, 0.3]], [[0.2, 0.05, 0.27, 0.6]]])
    assert cam_to_mask(np.array([0, 1]), maps2, 0.25).tolist() == [[1, 0, 1, 2]]
    # 0.28 lies within 0.06 of the threshold: ignored; CAM class k -> id k + 1 unless class_ids given
    assert cam_to_mask(np.array([0, 1]), maps2, 0.25, ignore_band=0.06).tolist() == [[1, 0, 255, 2]]
    assert cam_to_mask(np.array([0, 1]), maps2, 0.25, np.array([7, 3])).tolist() == [[7, 0, 7, 3]]
    sweep = ThresholdSweep([0.1, 0.5], 3)
    sweep.update(np.array([0]), torch.tensor([[[0.9, 0.3]]]), torch.tensor([[1, 0]]), np.array([1, 2]))
    (t1, m1), (t2, m2_) = sweep.results()
    # t=0.1: both pixels class 1 -> IoU(bg)=0, IoU(1)=1/2 -> 0.25; t=0.5: exact -> 1
    assert m1.miou == pytest.approx(0.25) and m2_.miou == pytest.approx(1.0)


# ----------------------------------------------------------------------------------- labels
def _jpg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (10, 20, 30)).save(path)


def test_label_readers(tmp_path):
    voc = tmp_path / "voc"
    (voc / "Annotations").mkdir(parents=True)
    for i, objs in (("a", ["dog", "person", "dog"]), ("b", ["tvmonitor"])):
        _jpg(voc / "JPEGImages" / f"{i}.jpg")
        body = "".join(f"<object><name>{o}</name></object>" for o in objs)
        (voc / "Annotations" / f"{i}.xml").write_text(f"<annotation>{body}</annotation>")
    assert [(it.id, it.names) for it in read_voc_xml(voc)] == [("a", ["dog", "person"]), ("b", ["tvmonitor"])]
    main = voc / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (main / "dog_train.txt").write_text("a  1\nb -1\n")
    (main / "person_train.txt").write_text("a  0\nb -1\n")  # 0 = difficult: present
    assert [(it.id, it.names) for it in read_voc_cls(voc, "train")] == [("a", ["dog", "person"]), ("b", [])]
    assert [it.id for it in load_image_labels(voc)] == ["a", "b"]  # cls files win over XML
    coco = tmp_path / "coco"
    _jpg(coco / "img" / "000001.jpg")
    inst = {"images": [{"id": 1, "file_name": "000001.jpg"}],
            "categories": [{"id": 5, "name": "airplane"}, {"id": 62, "name": "couch"}],
            "annotations": [{"image_id": 1, "category_id": 5}, {"image_id": 1, "category_id": 62}]}
    (coco / "instances.json").write_text(json.dumps(inst))
    items = read_coco_json(coco / "instances.json", coco / "img")
    assert items[0].names == ["airplane", "couch"]
    assert load_image_labels(coco, labels=coco / "instances.json", images=coco / "img")[0].id == "000001"
    # COCO names train VOC names: airplane -> aeroplane, couch -> sofa, tv -> tvmonitor
    voc_classes = read_class_list(["background", "aeroplane", "sofa", "tvmonitor", "diningtable"])
    assert voc_classes == ["aeroplane", "sofa", "tvmonitor", "diningtable"]
    assert multi_hot(["airplane", "couch", "tv", "dining table", "giraffe"], voc_classes).tolist() == [1, 1, 1, 1]
    assert canonical("Potted_Plant") == canonical("pottedplant")


def test_coco_mini_labels_map_to_voc(coco_mini):
    items = load_image_labels(coco_mini)
    classes = read_class_list(coco_mini / "classes_voc21.txt")
    assert len(items) == 159 and len(classes) == 20
    targets = torch.stack([multi_hot(it.names, classes) for it in items])
    assert int((targets.sum(1) > 0).sum()) == 127 and int(targets.sum()) == 239
    assert int(targets[:, classes.index("tvmonitor")].sum()) == 9


# --------------------------------------------------------------------------------- pipeline
def make_synthetic(root: Path, n: int = 24, size: int = 64, seed: int = 0) -> Path:
    """Gray images with a red and/or a blue square; masks, labels.json, classes.txt."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    labels = {}
    for i in range(n):
        img = np.full((size, size, 3), 128, np.uint8)
        mask = np.zeros((size, size), np.uint8)
        names = []
        for cls, color in ((1, (220, 30, 30)), (2, (30, 30, 220))):
            if rng.random() < 0.6:
                s = rng.randint(size // 4, size // 2)
                y, x = rng.randint(0, size - s), rng.randint(0, size - s)
                img[y : y + s, x : x + s] = color
                mask[y : y + s, x : x + s] = cls
                names.append(("red", "blue")[cls - 1])
        Image.fromarray(img).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i:03d}.png")
        labels[f"{i:03d}"] = names
    (root / "labels.json").write_text(json.dumps(labels))
    (root / "classes.txt").write_text("background\nred\nblue\n")
    return root


def _eval_json(capsys, data: Path, cams: Path) -> dict:
    capsys.readouterr()
    assert cli_main(["cam", "eval", str(data), "--cams", str(cams), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def tiny_run(data: Path, run: Path, *sets: str) -> list[str]:
    """``textseg train cam`` arguments of a tiny CPU run (tiny backbone, 64-pixel crops)."""
    args = ["train", "cam", "--set", f"data.root={data}", "--set", "backbone=tiny", "--set", "data.crop_size=64",
            "--set", "train.batch_size=8", "--set", "train.lr=0.05", "--set", f"train.out_dir={run}",
            "--set", "train.progress=false", "--set", "train.tensorboard=false"]
    for item in sets:
        args += ["--set", item]
    return args


def train_log(run: Path) -> list[dict]:
    """The engine's training records of a run."""
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def test_cam_pipeline_train_make_eval_labels(tmp_path, capsys):
    data = make_synthetic(tmp_path / "synth", n=16)
    torch.manual_seed(0)
    save_cam(CAMNet(CAMConfig(["red", "blue"], "tiny", image_size=64)), tmp_path / "init.safetensors")
    run = tmp_path / "run"
    assert cli_main([*tiny_run(data, run, "train.steps=30", "threads=2", f"init={tmp_path / 'init.safetensors'}",
                               "freeze_bn=false"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 30 and result["model"] == str(run / "model.safetensors")
    log = train_log(run)
    assert log[-1]["loss"] < 0.6 * log[0]["loss"]
    assert cli_main(["cam", "make", str(data), "--checkpoint", str(tmp_path / "init.safetensors"),
                     "--out", str(tmp_path / "cams_init"), "--checkpoint", str(run / "model.safetensors"),
                     "--out", str(tmp_path / "cams_trained"), "--scales", "1.0,0.5", "--no-progress"]) == 0
    scores = {name: _eval_json(capsys, data, tmp_path / f"cams_{name}") for name in ("init", "trained")}
    assert len(list((tmp_path / "cams_trained").glob("*.npz"))) == 16
    trained, init = scores["trained"], scores["init"]
    assert trained["images"] == 16 and len(trained["sweep"]) == 19
    assert trained["best"]["miou"] > init["best"]["miou"] + 10, (init["best"]["miou"], trained["best"]["miou"])
    assert trained["best"]["miou"] == max(s["miou"] for s in trained["sweep"])
    # pseudo labels: a folder dataset any segmenter training reads
    out = tmp_path / "pseudo"
    t = trained["best_threshold"]
    assert cli_main(["cam", "labels", str(data), "--cams", str(tmp_path / "cams_trained"), "--out", str(out),
                     "--bg-threshold", str(t), "--ignore-band", "0.05", "--pamr", "--no-progress"]) == 0
    from textseg.data.folder import FolderDataset

    ds = FolderDataset(out)
    assert len(ds) == 16 and (out / "classes.txt").read_text().split() == ["background", "red", "blue"]
    masks = np.stack([np.asarray(Image.open(p)) for p in sorted((out / "masks").glob("*.png"))])
    gt = np.stack([np.asarray(Image.open(p)) for p in sorted((data / "masks").glob("*.png"))])
    assert set(np.unique(masks)) <= {0, 1, 2, 255} and (masks == 255).any()
    valid = masks != 255
    assert (masks[valid] == gt[valid]).mean() > 0.8  # pseudo masks mostly right where not ignored


def test_train_cam_output_stride_reaches_the_saved_model(tmp_path):
    from textseg.wsss.pseudo_labels import load_cam_model

    data = make_synthetic(tmp_path / "synth", n=8)
    assert cli_main(tiny_run(data, tmp_path / "run", "train.steps=2", "output_stride=8", "threads=1")) == 0
    net = load_cam_model(tmp_path / "run" / "model.safetensors").eval()
    with torch.no_grad():
        assert net.stride == 8 and net.cam(torch.rand(1, 3, 64, 64)).shape[-2:] == (8, 8)


def test_cam_eval_errors(tmp_path):
    from textseg.errors import TextsegError

    data = make_synthetic(tmp_path / "synth", n=2)
    assert cli_main(["cam", "eval", str(data), "--cams", str(tmp_path / "none")]) == 2
    with pytest.raises(TextsegError, match="mode must be"):
        from textseg.train.cam import CAMTrainCfg, train_cam

        train_cam(CAMTrainCfg(mode="nope"))


def test_clims_training_loss_falls(tmp_path):
    """CLIMS alone (no classification loss) moves the maps onto the objects the evaluator sees."""
    from textseg.train.cam import CAMTrainDataset

    data = make_synthetic(tmp_path / "synth", n=16)
    torch.manual_seed(0)
    net = CAMNet(CAMConfig(["red", "blue"], "tiny")).train()
    bg = tmp_path / "bg.txt"
    bg.write_text("tree\n")
    ev = ColourEvaluator()
    ev.preprocess_cfg = PreprocessCfg(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    # the colour evaluator's vocabulary lives in its own normalisation, not ImageNet's
    loss_fn = CLIMSLoss(ev, ["red", "blue"], bg, template="{}", input_norm="evaluator")
    ds = CAMTrainDataset(load_image_labels(data), ["red", "blue"], crop_size=64)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        for x, y in loader:
            out = loss_fn(net.maps(net.normalize(x)), x, y)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            losses.append(out["loss"].item())
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses


def test_torchrun_two_processes_loss_falls(tmp_path):
    data = make_synthetic(tmp_path / "synth", n=16)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "textseg.cli", *tiny_run(data, run, "train.steps=30", "train.batch_size=4", "threads=1",
                                          "freeze_bn=false", "train.log_every=5"), "--json"]
    code, out = run_torchrun(cmd, env=env, timeout=120, outputs=[run])
    assert code == 0, out[-3000:]
    records = json_records(out, "step")
    assert len(records) == 1, out[-3000:]  # rank 0 alone prints the result
    result = records[0]
    assert result["world_size"] == 2 and result["step"] == 30
    log = train_log(run)
    assert log[-1]["loss"] < 0.6 * log[0]["loss"], log
    from textseg.wsss.pseudo_labels import load_cam_model

    assert load_cam_model(run / "model.safetensors").class_names == ["red", "blue"]


def test_feature_cache_reuse_and_frozen_backbone_training(tmp_path):
    from textseg.train.cam import CAMTrainCfg, CAMTrainDataset, FeatureCache, train_cam
    from textseg.wsss.pseudo_labels import load_cam_model

    data = make_synthetic(tmp_path / "synth", n=6)
    net = CAMNet(CAMConfig(["red", "blue"], "tiny")).eval()
    ds = CAMTrainDataset(load_image_labels(data), ["red", "blue"], crop_size=32)
    cache = FeatureCache(ds, net, cache_file=tmp_path / "c.pt")
    assert len(cache) == 12 and cache.feats.shape == (12, 64, 2, 2)
    img, feat, target = cache[3]  # the mirror of image 1
    assert torch.equal(img, cache.images[2].flip(-1)) and torch.equal(target, ds.targets[1])
    again = FeatureCache(ds, net, cache_file=tmp_path / "c.pt")
    assert torch.equal(again.feats, cache.feats)
    cfg = CAMTrainCfg(backbone="tiny", freeze_backbone=True, cache_features=True, cache_file=str(tmp_path / "c2.pt"))
    cfg.train.out_dir, cfg.train.steps, cfg.train.batch_size, cfg.train.log_every = str(tmp_path / "run"), 4, 4, 2
    cfg.train.progress = cfg.train.tensorboard = False
    cfg.data.root, cfg.data.crop_size = str(data), 32
    train_cam(cfg)
    trained = load_cam_model(tmp_path / "run" / "model.safetensors")
    torch.manual_seed(0)  # train_cam seeds 0 before building the net: same random backbone
    fresh = CAMNet(CAMConfig(["red", "blue"], "tiny"))
    assert torch.equal(trained.backbone.layers[0][0].weight, fresh.backbone.layers[0][0].weight)
    assert not torch.equal(trained.classifier.weight, fresh.classifier.weight)


def test_backbone_weights_loading(tmp_path):
    from safetensors.torch import save_file

    from textseg.errors import CheckpointError
    from textseg.wsss.cam import load_backbone_weights

    torch.manual_seed(1)
    src = CAMNet(CAMConfig(["a"], "tiny"))
    state = {f"module.{k}": v for k, v in src.backbone.state_dict().items()}
    state["fc.weight"] = torch.zeros(2, 2)  # dropped only for ResNet-50; tiny must match exactly
    save_file({k: v for k, v in state.items() if k != "fc.weight"}, str(tmp_path / "w.safetensors"))
    torch.manual_seed(2)
    dst = load_backbone_weights(CAMNet(CAMConfig(["a"], "tiny")), tmp_path / "w.safetensors")
    assert torch.equal(dst.backbone.layers[0][0].weight, src.backbone.layers[0][0].weight)
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"tiny backbone: keys do not match the model: 1 unexpected \(fc.weight\)"):
        load_backbone_weights(CAMNet(CAMConfig(["a"], "tiny")), tmp_path / "w.pth")


def test_train_cam_clims_mode_logs_every_term(tmp_path, monkeypatch):
    import textseg.train.cam as cam_mod

    data = make_synthetic(tmp_path / "synth", n=8)
    (tmp_path / "bg.txt").write_text("tree\nsea\n")
    monkeypatch.setattr(cam_mod, "load_evaluator", lambda name, weights="": ColourEvaluator())
    cfg = cam_mod.CAMTrainCfg(mode="baseline+clims", backbone="tiny", freeze_bn=False)
    cfg.train.out_dir, cfg.train.steps, cfg.train.batch_size, cfg.train.log_every = str(tmp_path / "run"), 4, 4, 2
    cfg.train.progress = cfg.train.tensorboard = False
    cfg.data.root, cfg.data.crop_size = str(data), 32
    cfg.clims.background, cfg.clims.template = str(tmp_path / "bg.txt"), "{}"
    result = cam_mod.train_cam(cfg)
    assert set(result) >= {"loss", "cls", "otm", "btm", "cbs", "reg"}
    first = train_log(tmp_path / "run")[0]
    w = cam_mod.CLIMSCfg()
    parts = first["cls"] + w.alpha * first["otm"] + w.beta * first["btm"] + w.gamma * first["cbs"] + w.delta * first["reg"]
    assert first["loss"] == pytest.approx(parts, rel=1e-4)


# ------------------------------------------------------------------------ resume and --weights
def test_train_cam_resumes_exactly_after_a_stop(tmp_path):
    """A run stopped after 3 of 6 steps and restarted (train.resume=auto, the default) ends with the
    weights, optimiser state and log of an uninterrupted 6-step run (augmentation, BN statistics and
    momentum included)."""
    from safetensors.torch import load_file

    from textseg.train.cam import CAMTrainCfg, build_trainer, train_cam
    from textseg.train.config import load_config

    data = make_synthetic(tmp_path / "synth", n=8)

    def cfg(run):
        return load_config(CAMTrainCfg, None, tiny_run(data, run, "train.steps=6", "train.batch_size=4",
                                                      "train.log_every=1", "freeze_bn=false")[3::2])

    train_cam(cfg(tmp_path / "full"))

    def stop_at_3(trainer):
        if trainer.step == 3:
            trainer.stop()

    stopped = train_cam(cfg(tmp_path / "resumed"), callbacks=[stop_at_3])
    assert stopped["step"] == 3
    assert (tmp_path / "resumed" / "checkpoints").is_dir()
    resumed = build_trainer(cfg(tmp_path / "resumed"))
    assert resumed.step == 3
    train_cam(cfg(tmp_path / "resumed"))
    full, again = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("full", "resumed"))
    assert full.keys() == again.keys()
    for k in full:
        assert torch.equal(full[k], again[k]), k
    assert [r["loss"] for r in train_log(tmp_path / "full")] == [r["loss"] for r in train_log(tmp_path / "resumed")]


def _expected_cam_mask(net: CAMNet, image: Image.Image, threshold: float) -> np.ndarray:
    """``textseg cam eval``'s rule written out: relu(1x1 classifier of the backbone features), each
    class divided by (its maximum + 1e-5), bilinear to the image, background (last label) where every
    map is below the threshold, else the largest map's class."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    mean = torch.tensor(net.mean).view(1, 3, 1, 1)
    std = torch.tensor(net.std).view(1, 3, 1, 1)
    with torch.no_grad():
        cam = F.relu(net.classifier(net.backbone((x - mean) / std)))[0]
    cam = cam / (cam.flatten(1).max(dim=1).values.view(-1, 1, 1) + 1e-5)
    up = F.interpolate(cam[None], size=(image.height, image.width), mode="bilinear", align_corners=False)[0]
    best, arg = up.max(dim=0)
    return torch.where(best > threshold, arg, torch.full_like(arg, cam.shape[0])).numpy()


def test_trained_cam_model_segments_with_weights(tmp_path, capsys):
    """The run's model.safetensors is a native checkpoint: `textseg segment --weights` loads it as a
    fixed-vocabulary model (its classes; background by the CAM threshold rule) and an unknown label
    is a clear error naming the known classes."""
    from textseg.weights.load import load_model

    data = make_synthetic(tmp_path / "synth", n=16)
    run = tmp_path / "run"
    assert cli_main(tiny_run(data, run, "train.steps=30", "freeze_bn=false", "background_threshold=0.3")) == 0
    weights = run / "model.safetensors"
    card = json.loads((tmp_path / "run" / "model.safetensors.json").read_text())
    assert card["architecture"] == "cam" and card["config"]["background_threshold"] == 0.3
    net = load_model(weights=str(weights))
    assert isinstance(net, CAMNet) and net.class_names == ["red", "blue"]
    image_path = data / "images" / "001.png"  # a red and a blue square
    out = tmp_path / "seg"
    capsys.readouterr()
    assert cli_main(["segment", str(image_path), "--weights", str(weights), "--labels", "red,blue",
                     "--short-side", "64", "--out", str(out), "--json", "--no-progress"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["labels"] == ["red", "blue", "background"]
    got = np.asarray(Image.open(record["mask"]))
    want = _expected_cam_mask(net, Image.open(image_path).convert("RGB"), 0.3)
    assert (got == want).mean() > 0.99, (got == want).mean()
    assert set(np.unique(want)) == {0, 1, 2}  # both classes and background: the threshold rule is exercised
    # a label the network was not trained on: one clear error naming its classes
    assert cli_main(["segment", str(image_path), "--weights", str(weights), "--labels", "red,giraffe",
                     "--short-side", "64", "--out", str(out), "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "giraffe" in err and "red, blue, background" in err


def test_softmax_score_option_hand_computed(bg_file):
    """``score="softmax"`` (textseg's option): every similarity is the evaluator's probability of the prompt
    among all class and background prompts at its logit scale, hand-computed here; the official cosine
    stays the default; the offline model (no logit scale) and unknown values are clear errors."""
    class Scaled(ColourEvaluator):
        logit_scale_value = torch.tensor(10.0)

    ev = Scaled()
    loss = CLIMSLoss(ev, ["red", "blue"], bg_file, template="{}", input_norm="evaluator", score="softmax",
                     cbs_threshold=None, weights=CLIMSWeights(alpha=10, beta=24, gamma=1, delta=0.2))
    assert CLIMSLoss(ColourEvaluator(), ["red"], bg_file, template="{}").score == "cosine"
    out = loss(_maps(), _half_image(), torch.tensor([[1.0, 0.0]]))
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    prompts = [np.array(RED), np.array(BLUE), np.array(BLUE), np.array((0.0, 1.0, 0.0))]  # red, blue | sea, tree
    def probs(v):
        e = np.exp([10 * cos(v, t) for t in prompts])
        return e / e.sum()
    p_fg, p_bg = probs(np.array([0.4, 0, 0.1])), probs(np.array([0.1, 0, 0.4]))
    assert out["otm"].item() == pytest.approx(-math.log(p_fg[0]), rel=1e-4)
    assert out["btm"].item() == pytest.approx(-math.log(1 - p_bg[0]), rel=1e-4)
    assert out["cbs"].item() == pytest.approx(-math.log(1 - p_fg[2]) - math.log(1 - p_fg[3]), rel=1e-4)
    with pytest.raises(TextsegError, match="score"):
        CLIMSLoss(ev, ["red"], bg_file, template="{}", score="probability")


def test_cbs_reference_blank_and_class_thresholds_hand_computed(bg_file):
    """``cbs_reference="blank"`` (textseg's option; the official absolute threshold is the default): each
    background prompt's CBS threshold is the blank image's similarity to it plus ``cbs_threshold``;
    ``"class"``: the pair's similarity to its own class prompt plus ``cbs_threshold``. An
    evaluator whose blank image is not at cosine 0 (an offset in the embedding) gives hand values."""
    offset = np.array([0.1, 0.1, 0.1])

    class Offset(ColourEvaluator):
        def encode_image(self, pixels, normalize=False):
            return super().encode_image(pixels) + torch.tensor(offset, dtype=pixels.dtype)

    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    sea, tree = np.array(BLUE), np.array((0.0, 1.0, 0.0))
    fg = np.array([0.4, 0, 0.1]) + offset  # the map's foreground mean colour (see the test above) + offset
    blank_sea, blank_tree = cos(offset, sea), cos(offset, tree)  # both 1 / sqrt(3)
    fg_sea, fg_tree = cos(fg, sea), cos(fg, tree)  # 0.365, 0.183

    def cbs(**kw):
        loss = CLIMSLoss(Offset(), ["red", "blue"], bg_file, template="{}", input_norm="evaluator", **kw)
        return loss, loss(_maps(), _half_image(), torch.tensor([[1.0, 0.0]]))["cbs"].item()

    loss, value = cbs(cbs_threshold=0.26)  # official: absolute; sea (0.365) counts, tree (0.183) does not
    assert loss.cbs_reference == "none" and value == pytest.approx(-math.log(1 - fg_sea), rel=1e-4)
    loss, value = cbs(cbs_threshold=0.0, cbs_reference="blank")  # neither looks more like it than blank
    assert loss.blank_bg.tolist() == pytest.approx([blank_sea, blank_tree], rel=1e-5)
    assert value == pytest.approx(0.0, abs=1e-6)
    assert fg_tree < blank_tree - 0.3 < fg_sea < blank_sea
    _, value = cbs(cbs_threshold=-0.3, cbs_reference="blank")  # tau 0.277: sea only
    assert value == pytest.approx(-math.log(1 - fg_sea), rel=1e-4)
    _, value = cbs(cbs_threshold=-0.45, cbs_reference="blank")  # tau 0.127: both
    assert value == pytest.approx(-math.log(1 - fg_sea) - math.log(1 - fg_tree), rel=1e-4)
    # "class": the threshold is the pair's own class similarity s(fg, red) (0.913) plus the margin
    fg_red = cos(fg, np.array(RED))
    _, value = cbs(cbs_threshold=0.0, cbs_reference="class")  # looks far more like red than sea or tree
    assert fg_red > 0.9 and value == pytest.approx(0.0, abs=1e-6)
    assert fg_tree < fg_red - 0.6 < fg_sea
    _, value = cbs(cbs_threshold=-0.6, cbs_reference="class")  # tau 0.313: sea only
    assert value == pytest.approx(-math.log(1 - fg_sea), rel=1e-4)
    _, value = cbs(cbs_threshold=-0.8, cbs_reference="class")  # tau 0.113: both
    assert value == pytest.approx(-math.log(1 - fg_sea) - math.log(1 - fg_tree), rel=1e-4)
    with pytest.raises(TextsegError, match="cbs_reference"):
        cbs(cbs_reference="mean")
    for ref in ("blank", "class"):
        with pytest.raises(TextsegError, match="margin"):
            cbs(cbs_threshold=None, cbs_reference=ref)
