"""Hugging Face CLIP: ``CLIPModel.save_pretrained`` folders (``config.json`` + ``model.safetensors`` /
``pytorch_model.bin``), or a bare HF-layout weights file (architecture then inferred from shapes,
heads = width / 64, QuickGELU). A folder's ``preprocessor_config.json`` is the preprocessing card
(:func:`folder_preprocess_cfg`); without one, OpenAI's transform at the model's input size.

Mapping to textseg's :class:`~textseg.models.clip.CLIP`: ``q_proj``/``k_proj``/``v_proj`` are fused
into ``attn.in_proj_weight``/``in_proj_bias`` (q, k, v order), ``layer_norm1/2`` -> ``ln_1/2``,
``mlp.fc1/fc2`` -> ``mlp.c_fc/c_proj``, the projection Linear weights are transposed into
``visual.proj`` / ``text.text_projection``. ``position_ids`` buffers are dropped.
"""

from __future__ import annotations

import re

import torch

from textseg.errors import CheckpointError
from textseg.models.clip import CLIPConfig, TextConfig, VisionConfig
from textseg.weights.convert import Converted, floats

NAME = "hf_clip"

_LAYER = re.compile(r"^(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)$")
_LAYER_PARTS = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                "self_attn.out_proj": "attn.out_proj"}
_FIXED = {
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "text.token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "text.positional_embedding",
    "text_model.final_layer_norm.weight": "text.ln_final.weight",
    "text_model.final_layer_norm.bias": "text.ln_final.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text.text_projection"}


def _strip(sd: dict) -> dict:
    """Accept ``CLIPModel`` keys with an optional ``clip.`` / ``model.`` prefix."""
    for prefix in ("clip.", "model."):
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def detect(raw) -> bool:
    cfg = raw.config if isinstance(raw.config, dict) else {}
    if cfg.get("model_type") not in (None, "clip"):
        return False
    sd = _strip(raw.tensors)
    return "vision_model.embeddings.patch_embedding.weight" in sd and "text_model.final_layer_norm.weight" in sd


def to_native(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``CLIPModel`` state dict -> textseg CLIP state dict; unknown keys raise."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        if key.endswith("position_ids"):
            continue
        if key in _FIXED:
            out[_FIXED[key]] = t
            continue
        if key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = t.t().contiguous()
            continue
        m = _LAYER.match(key)
        if m:
            tower, idx, rest = m.groups()
            base = f"{'visual' if tower == 'vision' else 'text'}.transformer.resblocks.{idx}."
            qm = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", rest)
            if qm:
                qkv.setdefault((base, qm.group(2), tower), {})[qm.group(1)] = t
                continue
            part, _, leaf = rest.rpartition(".")
            if part in _LAYER_PARTS:
                out[base + _LAYER_PARTS[part] + "." + leaf] = t
                continue
        raise CheckpointError(f"CLIP (Hugging Face): unexpected tensor {key!r}")
    for (base, kind, _), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"CLIP (Hugging Face): {base} lacks some of q/k/v_proj.{kind}")
        out[f"{base}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _n_layers(sd: dict, tower: str) -> int:
    return len({m.group(2) for k in sd if (m := _LAYER.match(k)) and m.group(1) == tower})


def config_from_hf(config: dict | None, sd: dict[str, torch.Tensor]) -> CLIPConfig:
    """``CLIPConfig.to_dict()`` (config.json) -> textseg :class:`CLIPConfig`; shapes fill the gaps."""
    config = config or {}
    v, t = config.get("vision_config") or {}, config.get("text_config") or {}
    try:
        vw = sd["vision_model.embeddings.patch_embedding.weight"].shape[0]
        patch = sd["vision_model.embeddings.patch_embedding.weight"].shape[-1]
        grid = round((sd["vision_model.embeddings.position_embedding.weight"].shape[0] - 1) ** 0.5)
        tw = sd["text_model.final_layer_norm.weight"].shape[0]
        embed = sd["visual_projection.weight"].shape[0]
        vmlp = sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
        tmlp = sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
        ctx = sd["text_model.embeddings.position_embedding.weight"].shape[0]
        vocab = sd["text_model.embeddings.token_embedding.weight"].shape[0]
    except (KeyError, IndexError) as e:
        raise CheckpointError(f"CLIP (Hugging Face): tensor {e} is missing") from None
    for tower, c in (("vision", v), ("text", t)):
        if c.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
            raise CheckpointError(f"CLIP (Hugging Face): {tower} hidden_act={c['hidden_act']!r} is not supported")
    vision = VisionConfig(
        image_size=patch * grid, layers=_n_layers(sd, "vision"), width=vw, patch_size=patch,
        heads=v.get("num_attention_heads", vw // 64 or 1), mlp_ratio=vmlp / vw,
        act=v.get("hidden_act", "quick_gelu"), ln_eps=v.get("layer_norm_eps", 1e-5))
    text = TextConfig(
        context_length=ctx, vocab_size=vocab, width=tw, heads=t.get("num_attention_heads", tw // 64 or 1),
        layers=_n_layers(sd, "text"), mlp_ratio=tmlp / tw, act=t.get("hidden_act", "quick_gelu"),
        ln_eps=t.get("layer_norm_eps", 1e-5))
    return CLIPConfig(embed_dim=embed, vision=vision, text=text)


def convert(raw) -> Converted:
    sd = _strip(raw.tensors)
    return Converted("clip", config_from_hf(raw.config, sd).to_dict(), floats(to_native(sd)),
                     preprocess=folder_preprocess_cfg(raw))


def folder_preprocess_cfg(raw):
    """The preprocessing card of a Hugging Face folder: its ``preprocessor_config.json`` read by
    :func:`textseg.preprocess.cfg_from_hf_processor` (mean, std, resample, size, crop), or None when
    the folder has none. Shared by every Hugging Face format (CLIP, GroupViT)."""
    import json

    from textseg.preprocess import cfg_from_hf_processor

    path = raw.path / "preprocessor_config.json" if raw.path is not None and raw.path.is_dir() else None
    if path is None or not path.is_file():
        return None
    try:
        c = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(c, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return cfg_from_hf_processor(c, str(path))
