"""NVlabs GroupViT checkpoints (``group_vit_gcc_yfcc_30e-*.pth``, ``group_vit_gcc_redcap_30e-*.pth``).

The file is ``{"model": state_dict, ...}`` of NVlabs' ``MultiLabelContrastive``: ``img_encoder.*``
(the grouping ViT), ``text_encoder.*`` (CLIP's text transformer), ``img_projector.*`` /
``text_projector.*`` (1x1-conv MLPs with BatchNorm) and ``logit_scale`` (+ the training-only
``multi_label_logit_scale``). Names map almost one to one onto textseg's GroupViT; the architecture
(width, patch size, stage depths, group counts, text width/layers/context) is read from tensor
shapes, attention heads are ``width // 64`` as in NVlabs' configs. Loaded strictly.

The files carry no preprocessing card: the model gets NVlabs' own evaluation transform
(:func:`textseg.models.groupvit.nvlabs_preprocess`: short side 256 bilinear, centre crop 224,
ImageNet mean/std at the 224 input size).
"""

from __future__ import annotations

import re
from dataclasses import asdict

import torch

from textseg.errors import CheckpointError
from textseg.models.clip import TextConfig
from textseg.models.groupvit import GroupViTCfg, GroupViTVisionCfg
from textseg.weights.convert import Converted, floats

NAME = "groupvit_nvlabs"
TRAINING_ONLY = ("multi_label_logit_scale",)
_IGNORED = re.compile(r"(^|\.)attn_mask$")


def _strip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a DDP ``module.`` prefix."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def infer_cfg(sd: dict[str, torch.Tensor]) -> GroupViTCfg:
    """The architecture, from tensor shapes."""
    try:
        pos = sd["img_encoder.pos_embed"]
        patch = sd["img_encoder.patch_embed.proj.weight"]
        width, patch_size = pos.shape[-1], patch.shape[-1]
        grid = int(round(pos.shape[1] ** 0.5))
        n_stages = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("img_encoder.layers."))
        depths, groups, outs = [], [], []
        for i in range(n_stages):
            p = f"img_encoder.layers.{i}."
            depths.append(1 + max((int(k.split(".")[4]) for k in sd if k.startswith(p + "blocks.")), default=-1))
            g = sd.get(p + "group_token")
            groups.append(0 if g is None else g.shape[1])
            fc2 = sd.get(p + "downsample.mlp_inter.fc2.weight")
            outs.append(0 if fc2 is None else fc2.shape[0])
        mlp_hidden = sd["img_encoder.layers.0.blocks.0.mlp.fc1.weight"].shape[0]
        tokens_hidden = channels_hidden = None
        for i in range(n_stages):
            if groups[i]:
                tokens_hidden = sd[f"img_encoder.layers.{i}.downsample.mlp_inter.fc1.weight"].shape[0]
                channels_hidden = sd[f"img_encoder.layers.{i}.downsample.mlp_channels.fc1.weight"].shape[0]
                break
        vision = GroupViTVisionCfg(
            image_size=grid * patch_size, patch_size=patch_size, width=width, heads=max(1, width // 64),
            depths=tuple(depths), num_group_tokens=tuple(groups), num_output_groups=tuple(outs),
            mlp_ratio=mlp_hidden / width, assign_mlp_ratio=(tokens_hidden / width, channels_hidden / width))
        tw = sd["text_encoder.token_embedding.weight"].shape[1]
        layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("text_encoder.transformer.resblocks."))
        text = TextConfig(
            context_length=sd["text_encoder.positional_embedding"].shape[0],
            vocab_size=sd["text_encoder.token_embedding.weight"].shape[0], width=tw, heads=max(1, tw // 64),
            layers=layers, mlp_ratio=sd["text_encoder.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / tw)
        hidden = [k for k in sd if k.startswith("img_projector.linear_hidden.") and k.endswith(".weight")
                  and sd[k].ndim == 3]
        out_w = sd["img_projector.linear_out.weight"]
        return GroupViTCfg(vision=vision, text=text, embed_dim=out_w.shape[0],
                           proj_hidden=out_w.shape[1] if hidden else 0, proj_layers=1 + len(hidden))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"groupvit (NVlabs): cannot infer the architecture ({type(e).__name__}: {e})") from None


def convert_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NVlabs ``MultiLabelContrastive`` state dict -> textseg ``GroupViT`` state dict."""
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if key in TRAINING_ONLY or _IGNORED.search(key):
            continue
        new = None
        if key.startswith("img_encoder."):
            k = key[len("img_encoder."):]
            if k.startswith("patch_embed.proj."):
                new = "visual.patch_embed." + k[len("patch_embed.proj."):]
            elif k.startswith("patch_embed.norm."):
                new = "visual.patch_norm." + k[len("patch_embed.norm."):]
            elif k == "pos_embed":
                new = "visual.pos_embed"
            elif k.startswith("norm."):
                new = "visual." + k
            elif k.startswith("layers."):
                k = re.sub(r"^layers\.(\d+)\.downsample\.", r"layers.\1.grouping.", k)
                new = "visual.stages." + k[len("layers."):]
        elif key.startswith("text_encoder."):
            new = "text." + key[len("text_encoder."):]
        elif key.startswith(("img_projector.", "text_projector.")):
            head, rest = key.split(".", 1)
            dst = "image_proj." if head == "img_projector" else "text_proj."
            if rest.startswith("linear_hidden."):
                new = dst + "hidden." + rest[len("linear_hidden."):]
            elif rest.startswith("linear_out."):
                new = dst + "out." + rest[len("linear_out."):]
            if new is not None and new.endswith(".weight") and t.ndim == 3:
                t = t.squeeze(-1)  # Conv1d(kernel_size=1) -> Linear
        elif key == "logit_scale":
            new = "logit_scale"
        if new is None:
            raise CheckpointError(f"groupvit (NVlabs): unexpected tensor {key!r}")
        out[new] = t
    return out


def convert_state(sd: dict[str, torch.Tensor]) -> Converted:
    """An NVlabs ``MultiLabelContrastive`` state dict -> ``("groupvit", config, state)``."""
    sd = _strip(sd)
    return Converted("groupvit", asdict(infer_cfg(sd)), floats(convert_state_dict(sd)))


def _tensors(raw) -> dict:
    sd = getattr(raw, "tensors", None) or getattr(raw, "state_dict", None) or {}
    if isinstance(sd.get("model"), dict):  # the raw {'model': ...} wrapper
        sd = sd["model"]
    return _strip(sd)


def detect(raw) -> bool:
    sd = _tensors(raw)
    return "img_encoder.pos_embed" in sd and "text_encoder.token_embedding.weight" in sd


def convert(raw) -> Converted:
    return convert_state(_tensors(raw))
