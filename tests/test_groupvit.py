"""GroupViT: parity with transformers' GroupViTModel (HF and NVlabs checkpoint layouts), Gumbel
assignment, the multi-label contrastive loss, noun extraction, checkpoint errors."""

from __future__ import annotations

import math

import pytest
import torch

from textseg.errors import CheckpointError
from textseg.models.groupvit import AssignAttention, GroupViT, GroupViTCfg, GroupViTVisionCfg, gumbel_assign
from textseg.train.groupvit import GroupViTCollate, multi_label_loss
from textseg.train.nouns import extract_nouns, noun_prompts
from textseg.weights.convert import groupvit_hf, groupvit_nvlabs
from textseg.weights.load import build_converted

transformers = pytest.importorskip("transformers")

LAYOUTS = {
    # three stages, the last without group tokens (the released layout, shrunk)
    "64-8-0": dict(depths=[2, 1, 1], num_group_tokens=[8, 4, 0], num_output_groups=[8, 4, 4]),
    # two grouping stages, no plain stage after them
    "6-3": dict(depths=[1, 2], num_group_tokens=[6, 3], num_output_groups=[6, 3]),
}


def make_hf(layout: str, seed: int = 0):
    from transformers import GroupViTConfig, GroupViTModel

    torch.manual_seed(seed)
    v = LAYOUTS[layout]
    cfg = GroupViTConfig(
        text_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77),
        vision_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=sum(v["depths"]),
                           num_attention_heads=2, image_size=64, patch_size=8, **v),
        projection_dim=64, projection_intermediate_dim=256)
    hf = GroupViTModel(cfg)
    with torch.no_grad():  # perturb everything, LayerNorms, zero-initialised group tokens and BN stats included
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in hf.named_buffers():
            if name.endswith("running_mean"):
                b.add_(torch.randn_like(b) * 0.1)
            elif name.endswith("running_var"):
                b.mul_(1 + torch.rand_like(b))
    return hf.eval(), cfg


def to_nvlabs(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A textseg GroupViT state dict written in NVlabs' MultiLabelContrastive layout."""
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
                t = t.unsqueeze(-1)  # Linear -> Conv1d(kernel_size=1)
            k = ("img_projector." if head == "image_proj" else "text_projector.") + rest
        out[k] = t.clone()
    out["multi_label_logit_scale"] = torch.tensor(2.0)
    return out


def outputs(model: GroupViT, pixels, tokens):
    with torch.no_grad():
        img = model.encode_image(pixels, normalize=True)
        txt = model.encode_text(tokens, normalize=True)
        logits, _ = model(pixels, tokens)
        seg = model.segmentation_logits(pixels, txt)
    return img, txt, logits, seg


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parity_with_transformers_hf_and_nvlabs_layouts(layout, tmp_path):
    hf, cfg = make_hf(layout)
    model = build_converted(groupvit_hf.convert_hf(cfg.to_dict(), hf.state_dict()))
    pixels = torch.randn(2, 3, 64, 64)
    tokens = model.tokenize(["a photo of a cat.", "a red star above a striped circle", "grass"])
    with torch.no_grad():
        ref = hf(input_ids=tokens, pixel_values=pixels, output_segmentation=True)
    img, txt, logits, seg = outputs(model, pixels, tokens)
    torch.testing.assert_close(img, ref.image_embeds, atol=1e-4, rtol=0)
    torch.testing.assert_close(txt, ref.text_embeds, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, ref.logits_per_image, atol=1e-4, rtol=0)
    # transformers multiplies the segmentation logits by logit_scale a second time
    torch.testing.assert_close(seg * hf.logit_scale.exp(), ref.segmentation_logits, atol=1e-4, rtol=0)
    assert seg.shape == (2, 3, 64, 64)
    stage_groups = [a.shape[1] for a in model.forward_intermediates(pixels)["assignments"]]
    assert stage_groups == [g for g in LAYOUTS[layout]["num_output_groups"][: len(stage_groups)]]

    # the same weights in NVlabs' layout, through a {'model': ...} .pth file read weights_only
    path = tmp_path / "group_vit_gcc_yfcc_30e-test.pth"
    torch.save({"model": to_nvlabs(model.state_dict())}, path)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert groupvit_nvlabs.detect(type("Raw", (), {"tensors": raw})())
    nv = build_converted(groupvit_nvlabs.convert_state(raw["model"]))
    assert (nv.cfg.vision, nv.cfg.text, nv.cfg.embed_dim) == (model.cfg.vision, model.cfg.text, model.cfg.embed_dim)
    for a, b in zip(outputs(nv, pixels, tokens), (img, txt, logits, seg)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_checkpoint_errors_are_one_line():
    hf, cfg = make_hf("6-3")
    sd = hf.state_dict()
    missing = {k: v for k, v in sd.items() if "group_token" not in k}
    with pytest.raises(CheckpointError, match="missing"):
        build_converted(groupvit_hf.convert_hf(cfg.to_dict(), missing))
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        groupvit_hf.convert_hf(cfg.to_dict(), {**sd, "vision_model.extra.weight": torch.zeros(1)})
    nv = to_nvlabs(groupvit_hf.convert_state_dict(sd))
    nv["img_encoder.pos_embed"] = nv["img_encoder.pos_embed"][:, :-1]  # a corrupt shape
    with pytest.raises(CheckpointError):
        build_converted(groupvit_nvlabs.convert_state(nv))


def test_gumbel_assignment_hard_forward_soft_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)  # B x groups x segments
    hard = gumbel_assign(logits, dim=1, hard=True, gumbel=True)
    assert set(hard.detach().unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(hard.detach().sum(1), torch.ones(2, 7))  # one group per segment
    (hard * torch.randn_like(hard)).sum().backward()
    assert logits.grad.abs().sum() > 0  # straight-through: gradient of the soft probabilities
    # without noise the hard assignment is the argmax of the softmax
    plain = gumbel_assign(logits.detach(), dim=1, hard=True, gumbel=False)
    assert torch.equal(plain.argmax(1), logits.detach().argmax(1))


def test_assign_attention_train_vs_eval_and_model_gradients():
    torch.manual_seed(0)
    att = AssignAttention(16, eps=1.0, tau=1.0, hard=True)
    groups, segments = torch.randn(2, 4, 16), torch.randn(2, 9, 16)
    att.train()
    _, soft = att(groups, segments)
    torch.testing.assert_close(soft.sum(1), torch.ones(2, 9))  # columns of the assignment sum to 1
    att.eval()
    a1, s1 = att(groups, segments)
    a2, s2 = att(groups, segments)
    assert torch.equal(a1, a2) and torch.equal(s1, s2)  # no Gumbel noise at inference

    vcfg = GroupViTVisionCfg(image_size=32, patch_size=8, width=64, heads=2, depths=(1, 1, 1),
                             num_group_tokens=(4, 2, 0), num_output_groups=(4, 2, 0))
    from textseg.models.clip import TextConfig

    model = GroupViT(GroupViTCfg(vision=vcfg, text=TextConfig(context_length=16, width=32, heads=2, layers=1),
                                 embed_dim=16, proj_hidden=32)).train()
    out = model.forward_intermediates(torch.randn(3, 3, 32, 32))
    for a in out["assignments"]:
        torch.testing.assert_close(a.sum(1), torch.ones(a.shape[0], a.shape[2]))
    for m in out["group_maps"]:
        torch.testing.assert_close(m.sum(1), torch.ones(3, 4, 4))
    out["image_embed"].pow(2).sum().backward()
    g0 = model.visual.stages[0].grouping.assign.k_proj.weight.grad
    assert g0 is not None and g0.abs().sum() > 0  # the assignment logits learn through the soft path
    assert model.visual.stages[0].group_token.grad.abs().sum() > 0


def test_multi_label_loss_hand_computed_2x2():
    # 2 images, 2 positive texts each, unit vectors in 2-D; scale 2
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s = 1 / math.sqrt(2)
    txt = torch.tensor([[[1.0, 0.0], [s, s]], [[0.0, 1.0], [-s, s]]])
    scale = 2.0
    # image -> texts: soft CE with target 1/2 on its own two texts among the 4
    flat = [[1.0, 0.0], [s, s], [0.0, 1.0], [-s, s]]
    dots = [[sum(a * b for a, b in zip(i, t)) for t in flat] for i in img.tolist()]
    loss_img = 0.0
    for i, row in enumerate(dots):
        lse = math.log(sum(math.exp(scale * d) for d in row))
        loss_img += -0.5 * ((scale * row[2 * i] - lse) + (scale * row[2 * i + 1] - lse))
    loss_img /= 2
    # each text -> its image among the 2
    loss_txt = 0.0
    for j, t in enumerate(flat):
        row = [scale * sum(a * b for a, b in zip(t, i)) for i in img.tolist()]
        loss_txt += -(row[j // 2] - math.log(sum(math.exp(r) for r in row)))
    loss_txt /= 4
    expected = 0.5 * (loss_img + loss_txt)
    got = multi_label_loss(img, txt, scale)
    assert abs(got.item() - expected) < 1e-6
    assert abs(expected - 0.6109) < 1e-3  # worked out by hand: (0.9706 + 0.2511) / 2


def test_noun_extraction_and_prompts():
    # NVlabs keeps NN/NNS/NNP/VB* tokens as written (datasets/builder.py); see tests/test_groupvit_data.py
    assert extract_nouns("Two dogs playing with a frisbee in the park") == ["dogs", "playing", "frisbee", "park"]
    assert extract_nouns("a cat sitting next to a laptop computer") == ["cat", "sitting", "laptop", "computer"]
    assert noun_prompts("a green square", 3) == ["a photo of a square.", "a green square", "a green square"]
    collate = GroupViTCollate(lambda texts: torch.arange(len(texts) * 4).reshape(len(texts), 4), k=2,
                              template="a photo of a {}.")
    batch = collate([(torch.zeros(3, 8, 8), "a red star above a circle"), (torch.ones(3, 8, 8), "grass")])
    assert batch["image"].shape == (2, 3, 8, 8) and batch["text"].shape == (2, 3, 4)
    assert collate.texts("a red star above a circle")[1:] in (
        ["a photo of a star.", "a photo of a circle."], ["a photo of a circle.", "a photo of a star."])
