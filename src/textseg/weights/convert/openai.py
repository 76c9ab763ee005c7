"""OpenAI CLIP layout: the state dict of openai/CLIP's ``model.py`` (``.pt``/``.bin`` state dicts,
``.safetensors``, and the official TorchScript archives read by :mod:`textseg.weights.torchscript`).

Keys: ``visual.*`` (ViT: ``conv1``, ``class_embedding``, ``positional_embedding``, ``ln_pre``,
``transformer.resblocks.N.*``, ``ln_post``, ``proj``; ResNet: ``conv1..3``, ``bn1..3``, ``layer1..4``,
``attnpool``), text tower at the top level (``token_embedding``, ``positional_embedding``,
``transformer.resblocks.N.*``, ``ln_final``, ``text_projection``) and ``logit_scale``; TorchScript
archives add ``input_resolution``, ``context_length``, ``vocab_size``.

The architecture is inferred from tensor shapes as OpenAI's ``build_model`` does. OpenAI models use
QuickGELU.
"""

from __future__ import annotations

import torch

from textseg.errors import CheckpointError
from textseg.models.clip import CLIPConfig, TextConfig, VisionConfig
from textseg.weights.convert import Converted, floats

NAME = "openai"
_DROP = ("input_resolution", "context_length", "vocab_size")
_TEXT_TOP = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def is_openai_layout(keys) -> bool:
    keys = set(keys)
    return ("visual.conv1.weight" in keys and "token_embedding.weight" in keys and "text_projection" in keys
            and "ln_final.weight" in keys)


def detect(raw) -> bool:
    return raw.card is None and is_openai_layout(raw.tensors)


def clean_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop TorchScript's integer entries and non-persistent masks."""
    return {k: v for k, v in sd.items() if k not in _DROP and not k.endswith("attn_mask")}


def _count(sd, prefix: str, suffix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix) and k.endswith(suffix)})


def config_from_state(sd: dict[str, torch.Tensor], act: str = "quick_gelu") -> CLIPConfig:
    """Infer the architecture from an OpenAI-layout state dict (shapes and key counts)."""
    try:
        embed_dim = sd["text_projection"].shape[1]
        if "visual.proj" in sd:  # ViT
            width = sd["visual.conv1.weight"].shape[0]
            patch = sd["visual.conv1.weight"].shape[-1]
            grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            layers = _count(sd, "visual.transformer.resblocks.", ".attn.in_proj_weight")
            mlp = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
            vision = VisionConfig(image_size=patch * grid, layers=layers, width=width, patch_size=patch,
                                  heads=width // 64 or 1, mlp_ratio=mlp / width, act=act)
        else:  # ModifiedResNet
            counts = tuple(_count(sd, f"visual.layer{i}.", ".conv1.weight") for i in (1, 2, 3, 4))
            width = sd["visual.layer1.0.conv1.weight"].shape[0]
            spatial = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = VisionConfig(image_size=spatial * 32, layers=counts, width=width,
                                  heads=width * 32 // 64, act=act)
        tw = sd["ln_final.weight"].shape[0]
        text = TextConfig(
            context_length=sd["positional_embedding"].shape[0], vocab_size=sd["token_embedding.weight"].shape[0],
            width=tw, heads=tw // 64 or 1, layers=_count(sd, "transformer.resblocks.", ".attn.in_proj_weight"),
            mlp_ratio=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / tw, act=act)
    except (KeyError, IndexError) as e:
        raise CheckpointError(f"CLIP (OpenAI layout): cannot infer the architecture, tensor {e} is missing") from None
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text)


def to_native(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI key names -> textseg :class:`CLIP` key names (text tower moves under ``text.``)."""
    out = {}
    for k, v in sd.items():
        out["text." + k if k.startswith(_TEXT_TOP) else k] = v
    return out


def convert_state(sd: dict[str, torch.Tensor], act: str = "quick_gelu") -> Converted:
    """An OpenAI-layout state dict -> ``("clip", config, textseg state dict)``."""
    sd = clean_state(sd)
    return Converted("clip", config_from_state(sd, act).to_dict(), floats(to_native(sd)))


def convert(raw) -> Converted:
    return convert_state(raw.tensors)
