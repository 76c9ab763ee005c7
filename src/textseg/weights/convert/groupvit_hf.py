"""Hugging Face GroupViT: a ``GroupViTModel.save_pretrained`` folder (``config.json`` +
``model.safetensors`` or ``pytorch_model.bin``), e.g. ``nvidia/groupvit-gcc-yfcc``.

The architecture comes from ``config.json``; every tensor is mapped to textseg's
:class:`~textseg.models.groupvit.GroupViT` (``q``/``k``/``v`` of the self-attention layers fused into
one projection; a tensor of no known name raises :class:`CheckpointError`), then loaded strictly.

The folder's ``preprocessor_config.json`` is the preprocessing card (mean, std, resample, size, crop;
read as the CLIP loader does, :func:`textseg.weights.convert.hf_clip.folder_preprocess_cfg`); a
folder without one gets NVlabs' evaluation transform (:func:`textseg.models.groupvit.nvlabs_preprocess`).
"""

from __future__ import annotations

import re
from dataclasses import asdict

import torch

from textseg.errors import CheckpointError
from textseg.models.clip import TextConfig
from textseg.models.groupvit import GroupViTCfg, GroupViTVisionCfg
from textseg.weights.convert import Converted, floats
from textseg.weights.convert.hf_clip import folder_preprocess_cfg

NAME = "groupvit_hf"
IGNORED = re.compile(r"^text_model\.embeddings\.position_ids$")

_VISION_RULES = [  # HF suffix (after vision_model.) -> textseg suffix (after visual.)
    (r"embeddings\.patch_embeddings\.projection\.", "patch_embed."),
    (r"embeddings\.layernorm\.", "patch_norm."),
    (r"embeddings\.position_embeddings$", "pos_embed"),
    (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.self_attn\.out_proj\.", r"stages.\1.blocks.\2.attn.proj."),
    (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_norm1\.", r"stages.\1.blocks.\2.norm1."),
    (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_norm2\.", r"stages.\1.blocks.\2.norm2."),
    (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.mlp\.", r"stages.\1.blocks.\2.mlp."),
    (r"encoder\.stages\.(\d+)\.group_token$", r"stages.\1.group_token"),
    (r"encoder\.stages\.(\d+)\.group_projector\.", r"stages.\1.group_projector."),
    (r"encoder\.stages\.(\d+)\.downsample\.pre_assign_attn\.attn\.out_proj\.",
     r"stages.\1.grouping.pre_assign_attn.attn.proj."),
    (r"encoder\.stages\.(\d+)\.downsample\.", r"stages.\1.grouping."),
    (r"layernorm\.", "norm."),
]
_TEXT_RULES = [  # HF suffix (after text_model.) -> textseg suffix (after text.)
    (r"embeddings\.token_embedding\.", "token_embedding."),
    (r"embeddings\.position_embedding\.weight$", "positional_embedding"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"transformer.resblocks.\1.attn.out_proj."),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.", r"transformer.resblocks.\1.ln_1."),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.", r"transformer.resblocks.\1.ln_2."),
    (r"encoder\.layers\.(\d+)\.mlp\.fc1\.", r"transformer.resblocks.\1.mlp.c_fc."),
    (r"encoder\.layers\.(\d+)\.mlp\.fc2\.", r"transformer.resblocks.\1.mlp.c_proj."),
    (r"final_layer_norm\.", "ln_final."),
]
_PROJ_RULES = [(r"0\.", "hidden.0."), (r"1\.", "hidden.1."), (r"3\.", "out.")]
_QKV = re.compile(r"^(vision_model\.encoder\.stages\.\d+\.layers\.\d+|text_model\.encoder\.layers\.\d+)"
                  r"\.self_attn\.([qkv])_proj\.(weight|bias)$")


def _apply(rules, suffix: str) -> str | None:
    for pat, rep in rules:
        new, n = re.subn("^" + pat, rep, suffix)
        if n:
            return new
    return None


def convert_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``GroupViTModel`` state dict -> textseg ``GroupViT`` state dict (unknown keys raise)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        if IGNORED.match(key):
            continue
        m = _QKV.match(key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = t
            continue
        new = None
        if key.startswith("vision_model."):
            new = _apply(_VISION_RULES, key[len("vision_model."):])
            new = new and "visual." + new
        elif key.startswith("text_model."):
            new = _apply(_TEXT_RULES, key[len("text_model."):])
            new = new and "text." + new
        elif key.startswith(("visual_projection.", "text_projection.")):
            head, rest = key.split(".", 1)
            new = _apply(_PROJ_RULES, rest)
            new = new and ("image_proj." if head == "visual_projection" else "text_proj.") + new
        elif key == "logit_scale":
            new = "logit_scale"
        if new is None:
            raise CheckpointError(f"groupvit (HF): unexpected tensor {key!r}")
        out[new] = t
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"groupvit (HF): {prefix} lacks some of q/k/v_proj.{kind}")
        fused = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        if prefix.startswith("vision_model."):
            _, _, _, s, _, j = prefix.split(".")
            out[f"visual.stages.{s}.blocks.{j}.attn.qkv.{kind}"] = fused
        else:
            j = prefix.split(".")[-1]
            out[f"text.transformer.resblocks.{j}.attn.in_proj_{kind}"] = fused
    return out


def config_from_hf(config: dict) -> GroupViTCfg:
    """``GroupViTConfig.to_dict()`` (config.json) -> :class:`GroupViTCfg`."""
    try:
        v, t = config.get("vision_config") or {}, config.get("text_config") or {}
        depths = tuple(v.get("depths", (6, 3, 3)))
        groups = tuple(v.get("num_group_tokens", (64, 8, 0)))
        outs = tuple(v.get("num_output_groups", (64, 8, 8)))
        ratio = v.get("assign_mlp_ratio", (0.5, 4))
        ratio = tuple(ratio) if isinstance(ratio, (list, tuple)) else (ratio, ratio)
        for key, want in (("hidden_act", "gelu"),):
            if v.get(key, want) != want:
                raise CheckpointError(f"groupvit (HF): vision {key}={v[key]!r} is not supported (only {want!r})")
        if t.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
            raise CheckpointError(f"groupvit (HF): text hidden_act={t['hidden_act']!r} is not supported")
        width = v.get("hidden_size", 384)
        image_size, patch = v.get("image_size", 224), v.get("patch_size", 16)
        if isinstance(image_size, (list, tuple)):
            image_size = image_size[0]
        if isinstance(patch, (list, tuple)):
            patch = patch[0]
        vision = GroupViTVisionCfg(
            image_size=image_size, patch_size=patch, width=width, heads=v.get("num_attention_heads", 6),
            depths=depths, num_group_tokens=groups,
            num_output_groups=tuple(o if g else 0 for g, o in zip(groups, outs)),
            mlp_ratio=v.get("intermediate_size", 4 * width) / width, assign_mlp_ratio=ratio,
            assign_eps=v.get("assign_eps", 1.0), layer_norm_eps=v.get("layer_norm_eps", 1e-5))
        tw = t.get("hidden_size", 256)
        text = TextConfig(
            context_length=t.get("max_position_embeddings", 77), vocab_size=t.get("vocab_size", 49408),
            width=tw, heads=t.get("num_attention_heads", 4), layers=t.get("num_hidden_layers", 12),
            mlp_ratio=t.get("intermediate_size", 4 * tw) / tw, act=t.get("hidden_act", "quick_gelu"),
            ln_eps=t.get("layer_norm_eps", 1e-5))
        return GroupViTCfg(vision=vision, text=text, embed_dim=config.get("projection_dim", 256),
                           proj_hidden=config.get("projection_intermediate_dim", 4096), proj_layers=2,
                           logit_scale_init=config.get("logit_scale_init_value", 2.6592))
    except CheckpointError:
        raise
    except Exception as e:  # malformed config.json values
        raise CheckpointError(f"groupvit (HF): cannot read config.json ({type(e).__name__}: {e})") from None


def convert_hf(config: dict, sd: dict[str, torch.Tensor]) -> Converted:
    """An HF ``config.json`` dict and ``GroupViTModel`` state dict -> ``("groupvit", config, state)``."""
    return Converted("groupvit", asdict(config_from_hf(config)), floats(convert_state_dict(sd)))


def _tensors(raw) -> dict:
    return getattr(raw, "tensors", None) or getattr(raw, "state_dict", None) or {}


def detect(raw) -> bool:
    cfg = getattr(raw, "config", None) or {}
    if isinstance(cfg, dict) and cfg.get("model_type") == "groupvit":
        return True
    keys = _tensors(raw)
    return "vision_model.encoder.stages.0.layers.0.layer_norm1.weight" in keys and "logit_scale" in keys


def convert(raw) -> Converted:
    cfg = getattr(raw, "config", None)
    if not isinstance(cfg, dict) or not cfg.get("vision_config"):
        raise CheckpointError("groupvit (HF): needs the config.json written by save_pretrained beside the weights")
    return convert_hf(cfg, _tensors(raw))._replace(preprocess=folder_preprocess_cfg(raw))
