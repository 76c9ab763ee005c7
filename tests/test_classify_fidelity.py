"""Zero-shot classification as the official code computes it, and preprocessing cards.

- Every cosine model scores an image ``softmax(logit_scale * cos(image, text))`` (GroupViT used to push
  its unnormalised embedding through ``dense_logits``: over-confident probabilities).
- Black box: ``textseg classify`` on a tiny random ``transformers.GroupViTModel`` saved as a Hugging Face
  folder (with a non-default ``preprocessor_config.json``) and as an NVlabs ``.pth`` equals the
  transformers model's probabilities on pixels prepared by transformers' own ``CLIPImageProcessor``
  (HF) or by NVlabs' evaluation transform transcribed here (PIL resize short side int(256/224*n)
  bilinear, torchvision-rounded centre crop n, ImageNet mean/std), within 1e-5.
- Every loader format that can carry a preprocessing card applies it (HF CLIP / GroupViT folders,
  OpenCLIP hub folders, native safetensors): a card that differs from the default changes the pixels
  and the result.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clip_layouts import hf_to_openai, random_hf_clip
from PIL import Image

from textseg.cli import main
from textseg.examples import example_path
from textseg.models.base import PreprocessCfg
from textseg.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from textseg.preprocess import preprocess
from textseg.weights.load import load_model, save_model
from textseg.zeroshot import classify, image_logits

transformers = pytest.importorskip("transformers")

IMAGES = [str(example_path("chelsea")), str(example_path("coffee"))]  # 451 x 300 and 600 x 400 photos
LABELS = ["a cat", "a cup of coffee", "green grass", "a red car"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Differs from every default in each field. Short side 69 then a 64 crop: the 451 x 300 photo leaves a
# 39-pixel horizontal margin, where HF's floor(39 / 2) = 19 and torchvision's round(19.5) = 20 differ.
HF_CARD = {"do_resize": True, "size": {"shortest_edge": 69}, "resample": 2, "do_center_crop": True,
           "crop_size": {"height": 64, "width": 64}, "do_rescale": True, "rescale_factor": 1 / 255,
           "do_normalize": True, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.3, 0.25],
           "image_processor_type": "CLIPImageProcessor"}


def hf_processor(card: dict):
    """transformers' PIL CLIP image processor (the fast one needs torchvision)."""
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(**{k: v for k, v in card.items() if k != "image_processor_type"})


def hf_pixels(card: dict, paths) -> torch.Tensor:
    images = [Image.open(p).convert("RGB") for p in paths]
    return torch.as_tensor(np.stack(hf_processor(card)(images=images, return_tensors="np")["pixel_values"]))


def nvlabs_pixels(paths, n: int) -> torch.Tensor:
    """NVlabs GroupViT ``build_img_transform(is_train=False)`` (deit_aug): Resize(int(256/224*n),
    bilinear) -> CenterCrop(n) -> ToTensor -> Normalize(ImageNet), written out with PIL."""
    out = []
    for p in paths:
        img = Image.open(p).convert("RGB")
        short = int((256 / 224) * n)
        w, h = img.size
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        img = img.resize(size, Image.BILINEAR)
        left, top = int(round((size[0] - n) / 2.0)), int(round((size[1] - n) / 2.0))
        arr = np.asarray(img.crop((left, top, left + n, top + n)), dtype=np.float32) / 255.0
        arr = (arr - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    return torch.stack(out)


def tiny_groupvit():
    """A random transformers GroupViTModel (widths multiple of 64: NVlabs files imply heads = width/64),
    everything perturbed so LayerNorms, BatchNorm statistics and group tokens are non-trivial."""
    from transformers import GroupViTConfig, GroupViTModel

    torch.manual_seed(3)
    cfg = GroupViTConfig(
        text_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2),
        vision_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
                           image_size=64, patch_size=8, depths=[2, 1, 1], num_group_tokens=[8, 4, 0],
                           num_output_groups=[8, 4, 4]),
        projection_dim=64, projection_intermediate_dim=256)
    hf = GroupViTModel(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in hf.named_buffers():
            if name.endswith("running_mean"):
                b.add_(torch.randn_like(b) * 0.1)
            elif name.endswith("running_var"):
                b.mul_(1 + torch.rand_like(b))
        hf.logit_scale.fill_(np.log(30.0))  # a sharp temperature: scaling errors show in the probabilities
    return hf.eval()


def hf_probs(hf, pixels: torch.Tensor) -> torch.Tensor:
    from textseg.models.tokenizer import tokenize

    with torch.no_grad():
        return hf(input_ids=tokenize(LABELS), pixel_values=pixels.float()).logits_per_image.softmax(-1)


def cli_probs(weights, capsys) -> torch.Tensor:
    capsys.readouterr()
    assert main(["classify", *IMAGES, "--labels", ",".join(LABELS), "--weights", str(weights), "--json",
                 "--templates", "{}"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [r["labels"] for r in rows] == [LABELS, LABELS]
    return torch.tensor([r["probs"] for r in rows])


def to_nvlabs(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A textseg GroupViT state dict in NVlabs' MultiLabelContrastive layout (1x1-conv projectors)."""
    out = {}
    for k, t in sd.items():
        if k.startswith("visual."):
            k = k[len("visual."):]
            if k.startswith("patch_embed."):
                k = "patch_embed.proj." + k[len("patch_embed."):]
            elif k.startswith("patch_norm."):
                k = "patch_embed.norm." + k[len("patch_norm."):]
            elif k.startswith("stages."):
                k = "layers." + k[len("stages."):].replace(".grouping.", ".downsample.")
            k = "img_encoder." + k
        elif k.startswith("text."):
            k = "text_encoder." + k[len("text."):]
        elif k.startswith(("image_proj.", "text_proj.")):
            head, rest = k.split(".", 1)
            rest = rest.replace("hidden.", "linear_hidden.").replace("out.", "linear_out.")
            if rest.endswith("weight") and t.ndim == 2:
                t = t.unsqueeze(-1)
            k = ("img_projector." if head == "image_proj" else "text_projector.") + rest
        out[k] = t.clone()
    out["multi_label_logit_scale"] = torch.tensor(2.0)
    return out


@pytest.fixture(scope="module")
def groupvit_hf(tmp_path_factory):
    hf = tiny_groupvit()
    folder = tmp_path_factory.mktemp("gv") / "groupvit-hf"
    hf.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(HF_CARD))
    return hf, folder


# ------------------------------------------------------------------------------------------------
# black box: textseg classify == transformers GroupViTModel


def test_classify_groupvit_hf_folder_equals_transformers(groupvit_hf, capsys):
    hf, folder = groupvit_hf
    pixels = hf_pixels(HF_CARD, IMAGES)
    assert pixels.shape == (2, 3, 64, 64)
    expect = hf_probs(hf, pixels)
    got = cli_probs(folder, capsys)
    assert expect.max() > 0.5  # a non-flat reference: temperature errors move it
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=0)
    # the card's pixels exactly, HF's floor crop offsets included
    model = load_model(weights=folder)
    ours = torch.stack([preprocess(p, model.preprocess_cfg) for p in IMAGES])
    torch.testing.assert_close(ours, pixels, atol=1e-5, rtol=0)


def test_classify_groupvit_nvlabs_pth_equals_transformers(groupvit_hf, capsys, tmp_path):
    hf, folder = groupvit_hf
    textseg_sd = load_model(weights=folder).state_dict()
    path = tmp_path / "group_vit_gcc_yfcc_30e-tiny.pth"
    torch.save({"model": to_nvlabs(textseg_sd), "epoch": 30}, path)
    expect = hf_probs(hf, nvlabs_pixels(IMAGES, 64))  # int(256/224*64) = 73, crop 64
    got = cli_probs(path, capsys)
    assert expect.max() > 0.5
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=0)
    # ... and the API / web app path (textseg.classify) gives the same
    torch.testing.assert_close(classify(load_model(weights=path), IMAGES, LABELS, templates="{}"), expect,
                               atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# image-level scoring of every cosine model


def _tiny_clip():
    torch.manual_seed(0)
    return CLIP(CLIPConfig(embed_dim=16, vision=VisionConfig(image_size=32, layers=1, width=32, patch_size=16,
                                                             heads=2), text=TextConfig(width=32, heads=2, layers=1)))


def _tiny_groupvit():
    from textseg.weights.convert.groupvit_hf import convert_hf
    from textseg.weights.load import build_converted

    hf = tiny_groupvit()
    return build_converted(convert_hf(hf.config.to_dict(), hf.state_dict()))


def _tiny_lseg():
    from textseg.models.lseg import LSegConfig, build_lseg

    torch.manual_seed(0)
    cfg = LSegConfig(backbone="lite0", text_encoder="minilm", embed_dim=32, features=16,
                     text_cfg={"width": 32, "layers": 1, "heads": 2, "mlp": 64}, block="depthwise", block_depth=2)
    return build_lseg(cfg, pretrained=False)


def _tiny_lit():
    from textseg.models.lit import LiTConfig, LiTModel

    torch.manual_seed(0)
    return LiTModel(LiTConfig(pretrained=False))


@pytest.mark.parametrize("family", ["clip", "groupvit", "lseg", "lit"])
def test_image_logits_are_scaled_cosine(family):
    model = {"clip": _tiny_clip, "groupvit": _tiny_groupvit, "lseg": _tiny_lseg, "lit": _tiny_lit}[family]().eval()
    size = model.preprocess_cfg.image_size
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        img = model.encode_image(pixels)
        text = torch.randn(5, img.shape[-1]) * 3  # unnormalised on purpose
        got = image_logits(model, pixels, text).softmax(-1)
        scale = float(model.logit_scale.exp().clamp(max=100)) if family == "groupvit" else float(
            model.logit_scale.exp())
    cos = (img / img.norm(dim=-1, keepdim=True)) @ (text / text.norm(dim=-1, keepdim=True)).t()
    expect = (scale * cos).softmax(-1)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=0)
    if family == "groupvit":  # the unnormalised embedding is far from unit length: the old bug was visible
        assert not torch.allclose(img.norm(dim=-1), torch.ones(2), atol=0.1)


def test_offline_model_keeps_its_conse_scoring():
    """The documented exception: no joint space, labels are scored through ImageNet classes (the
    bridge-only model; the v2 default's learned head is pinned in tests/test_offline_heads.py)."""
    from textseg.models.offline import OfflineCfg, OfflineModel

    model = OfflineModel(OfflineCfg(heads=False)).eval()
    pixels = preprocess(IMAGES[0], model.preprocess_cfg)[None]
    text = model.embed_texts(["cat", "coffee mug", "car"])
    with torch.no_grad():
        got = image_logits(model, pixels, text)
        probs = model.encode_image(pixels)
        w = text[:, :1000]
        s = (probs @ w.t()) / w.sum(dim=1).clamp_min(1.0) ** model.cfg.size_power
        expect = model.cfg.score_power * torch.log(s + model.cfg.eps)
        fwd, _ = model(pixels, model.tokenize(["cat", "coffee mug", "car"]))
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=0)
    torch.testing.assert_close(fwd, got, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# preprocessing cards, one test per format that can carry one


def test_crop_fraction_card():
    cfg = PreprocessCfg(image_size=224, crop_pct=224 / 256)
    assert cfg.resize_size == 256 and PreprocessCfg(image_size=64, crop_pct=64 / 69).resize_size == 69
    assert PreprocessCfg.from_dict(cfg.to_dict()) == cfg
    assert PreprocessCfg.from_dict({"image_size": 32, "mean": [0, 0, 0], "std": [1, 1, 1]}).crop_pct == 1.0
    with pytest.raises(ValueError):
        PreprocessCfg(crop_pct=1.5)


def _photo_probs(model) -> torch.Tensor:
    return classify(model, IMAGES, LABELS, templates="{}")


def test_hf_groupvit_folder_card_changes_the_result(groupvit_hf, tmp_path):
    hf, folder = groupvit_hf
    with_card = load_model(weights=folder)
    assert with_card.preprocess_cfg == PreprocessCfg(64, (0.5, 0.4, 0.3), (0.2, 0.3, 0.25), "bilinear",
                                                     crop_pct=64 / 69, crop_offset="floor")
    bare = tmp_path / "bare"
    hf.save_pretrained(bare)  # no preprocessor_config.json: NVlabs' transform
    without = load_model(weights=bare)
    assert without.preprocess_cfg.resize_size == 73 and without.preprocess_cfg.mean == IMAGENET_MEAN
    assert (_photo_probs(with_card) - _photo_probs(without)).abs().max() > 1e-3


def test_hf_clip_folder_card(tmp_path):
    spec = dict(hidden_size=128, intermediate_size=200, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                patch_size=16)
    hf = random_hf_clip(spec, dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=1), 40, seed=3)
    hf.save_pretrained(tmp_path / "with")
    hf.save_pretrained(tmp_path / "without")
    (tmp_path / "with" / "preprocessor_config.json").write_text(json.dumps(HF_CARD))
    with_card, without = load_model(weights=tmp_path / "with"), load_model(weights=tmp_path / "without")
    pixels = hf_pixels(HF_CARD, IMAGES)
    ours = torch.stack([preprocess(p, with_card.preprocess_cfg) for p in IMAGES])
    torch.testing.assert_close(ours, pixels, atol=1e-5, rtol=0)
    from textseg.models.tokenizer import tokenize

    with torch.no_grad():
        expect = hf(input_ids=tokenize(LABELS), pixel_values=pixels).logits_per_image.softmax(-1)
    torch.testing.assert_close(_photo_probs(with_card), expect, atol=1e-5, rtol=0)
    assert without.preprocess_cfg == PreprocessCfg(image_size=64)  # OpenAI's transform at the input size
    assert (_photo_probs(with_card) - _photo_probs(without)).abs().max() > 1e-3
    # a broken card is one clear error, not a silent fallback
    (tmp_path / "with" / "preprocessor_config.json").write_text("{not json")
    from textseg.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(weights=tmp_path / "with")
    (tmp_path / "with" / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 64, "width": 64}}))
    with pytest.raises(CheckpointError, match="not supported"):
        load_model(weights=tmp_path / "with")


def _openclip_pixels(paths, n, mean, std, resample):
    """OpenCLIP's inference transform (resize_mode 'shortest'): Resize(n) -> CenterCrop(n) (torchvision
    rounding) -> Normalize."""
    out = []
    for p in paths:
        img = Image.open(p).convert("RGB")
        w, h = img.size
        size = (n, int(n * h / w)) if w <= h else (int(n * w / h), n)
        img = img.resize(size, resample)
        left, top = int(round((size[0] - n) / 2.0)), int(round((size[1] - n) / 2.0))
        arr = np.asarray(img.crop((left, top, left + n, top + n)), dtype=np.float32) / 255.0
        out.append(torch.from_numpy((arr - np.float32(mean)) / np.float32(std)).permute(2, 0, 1))
    return torch.stack(out)


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_open_clip_hub_folder_card(tmp_path, quick_gelu):
    act = "quick_gelu" if quick_gelu else "gelu"
    spec = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                patch_size=16, hidden_act=act)
    hf = random_hf_clip(spec, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                                   hidden_act=act), 24, seed=5)
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in hf_to_openai(hf.state_dict()).items()}
    mean, std = [0.45, 0.5, 0.55], [0.3, 0.2, 0.25]
    for name, pp in (("with", {"mean": mean, "std": std, "interpolation": "bilinear"}), ("without", None)):
        (tmp_path / name).mkdir()
        save_file(sd, str(tmp_path / name / "open_clip_model.safetensors"))
        cfg = {"model_cfg": {"embed_dim": 24, "quick_gelu": quick_gelu}}
        if pp:
            cfg["preprocess_cfg"] = pp
        (tmp_path / name / "open_clip_config.json").write_text(json.dumps(cfg))
    with_card, without = load_model(weights=tmp_path / "with"), load_model(weights=tmp_path / "without")
    assert with_card.cfg.vision.act == act  # model_cfg.quick_gelu decides the activation
    pixels = _openclip_pixels(IMAGES, 32, mean, std, Image.BILINEAR)
    ours = torch.stack([preprocess(p, with_card.preprocess_cfg) for p in IMAGES])
    torch.testing.assert_close(ours, pixels, atol=1e-5, rtol=0)
    from textseg.models.tokenizer import tokenize

    with torch.no_grad():
        expect = hf(input_ids=tokenize(LABELS), pixel_values=pixels).logits_per_image.softmax(-1)
    torch.testing.assert_close(_photo_probs(with_card), expect, atol=1e-5, rtol=0)
    assert without.preprocess_cfg == PreprocessCfg(image_size=32)  # OpenCLIP's defaults: OpenAI's transform
    assert (_photo_probs(with_card) - _photo_probs(without)).abs().max() > 1e-4


def test_native_card_round_trips_and_changes_the_result(tmp_path):
    model = _tiny_clip().eval()
    default = _photo_probs(model)
    card = PreprocessCfg(image_size=32, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), interpolation="bilinear",
                         crop_pct=0.8, crop_offset="floor")
    model.preprocess_cfg = card
    save_model(model, tmp_path / "m.safetensors")
    again = load_model(weights=tmp_path / "m.safetensors")
    assert again.preprocess_cfg == card
    # the card's transform, transcribed: short side floor(32 / 0.8) = 40 (bilinear), floor-offset crop 32
    out = []
    for p in IMAGES:
        img = Image.open(p).convert("RGB")
        w, h = img.size
        img = img.resize((int(40 * w / h), 40), Image.BILINEAR)
        left, top = (img.width - 32) // 2, (img.height - 32) // 2
        arr = np.asarray(img.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 255.0
        out.append(torch.from_numpy((arr - np.float32(card.mean)) / np.float32(card.std)).permute(2, 0, 1))
    with torch.no_grad():
        expect = F.softmax(again(torch.stack(out), again.tokenize(LABELS))[0], dim=-1)
    torch.testing.assert_close(_photo_probs(again), expect, atol=1e-5, rtol=0)
    assert (_photo_probs(again) - default).abs().max() > 1e-4
