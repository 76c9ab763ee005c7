"""Test helpers: random, non-trivial Hugging Face CLIP models and their weights rewritten in the
OpenAI / OpenCLIP / TorchScript layouts (written here independently of textseg's converters)."""

from __future__ import annotations

import math
import re

import torch
from torch import nn


def random_hf_clip(vision: dict, text: dict, projection_dim: int, seed: int = 0):
    """A transformers ``CLIPModel`` whose every tensor is random at a scale that keeps activations
    O(1); LayerNorm weights/biases and all biases perturbed away from 1/0 so a dropped tensor shows."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=dict(vocab_size=49408, max_position_embeddings=77, **text),
                     vision_config=dict(**vision), projection_dim=projection_dim)
    model = CLIPModel(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.fill_(math.log(20.0))
            elif "norm" in name or "layrnorm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2 and "embedding" not in name:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            else:  # token / position / class embeddings
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


def hf_to_openai(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``CLIPModel`` state dict -> OpenAI ``model.py`` state dict."""
    out: dict[str, torch.Tensor] = {}
    layer_names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}
    fixed = {
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
        "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
        "vision_model.post_layernorm.weight": "visual.ln_post.weight",
        "vision_model.post_layernorm.bias": "visual.ln_post.bias",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
        "logit_scale": "logit_scale",
    }
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        if k in fixed:
            out[fixed[k]] = v.clone()
        elif k == "visual_projection.weight":
            out["visual.proj"] = v.t().contiguous()
        elif k == "text_projection.weight":
            out["text_projection"] = v.t().contiguous()
        else:
            m = re.match(r"(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", k)
            assert m, k
            tower, i, part, leaf = m.groups()
            base = ("visual.transformer" if tower == "vision" else "transformer") + f".resblocks.{i}."
            if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault(f"{base}attn.in_proj_{leaf}", {})[part[10]] = v
            else:
                out[base + layer_names[part] + "." + leaf] = v.clone()
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


class _Root(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.logit_scale


def save_torchscript(sd: dict[str, torch.Tensor], path, extra_ints: dict[str, int] | None = None) -> None:
    """Write ``sd`` as a TorchScript archive whose module tree has exactly those parameter names
    (as OpenAI's released ``.pt`` files, including the integer buffers they carry)."""
    root = _Root()
    for key, value in sd.items():
        *parents, leaf = key.split(".")
        mod = root
        for p in parents:
            if not hasattr(mod, p):
                mod.add_module(p, nn.Module())
            mod = getattr(mod, p)
        mod.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
    for key, value in (extra_ints or {}).items():
        root.register_buffer(key, torch.tensor(value))
    torch.jit.trace(root, torch.ones(1)).save(str(path))
