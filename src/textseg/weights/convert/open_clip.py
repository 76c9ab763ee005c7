"""OpenCLIP checkpoints: training checkpoints (``{"epoch", "name", "state_dict": {"module.visual..."}}``)
and released ``open_clip_pytorch_model.bin`` / ``.safetensors`` files of the built-in CLIP architecture,
alone or in their Hugging Face hub folder beside ``open_clip_config.json``.

The key layout is OpenAI's (see :mod:`textseg.weights.convert.openai`) after removing DDP's
``module.`` prefix. OpenCLIP's own models use ``nn.GELU`` while the ``*-quickgelu`` models and OpenAI
weights use QuickGELU. ``open_clip_config.json`` records it (``model_cfg.quick_gelu``); files without
it get QuickGELU when their name or ``name`` entry mentions "quickgelu" or "openai", anything else GELU
(``textseg convert --act`` overrides).

``open_clip_config.json``'s ``preprocess_cfg`` is the preprocessing card, applied as OpenCLIP's
inference transform (``open_clip.transform.image_transform``, ``is_train=False``): short side to the
model's input size (bicubic, or bilinear when the card says so), ``CenterCrop``, its mean/std. Only
``resize_mode`` "shortest" (OpenCLIP's default) is supported.
"""

from __future__ import annotations

import json

from textseg.errors import CheckpointError
from textseg.models.base import PreprocessCfg
from textseg.weights.convert import Converted, openai

NAME = "open_clip"
CONFIG_NAME = "open_clip_config.json"
_HUB_WEIGHTS = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")


def strip_module(sd: dict) -> dict:
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def hub_config(raw) -> dict | None:
    """The ``open_clip_config.json`` of a hub folder (or beside a hub weights file), if any."""
    if raw.path is None:
        return None
    if raw.path.is_dir():
        path = raw.path / CONFIG_NAME
    elif raw.path.name in _HUB_WEIGHTS:
        path = raw.path.parent / CONFIG_NAME
    else:
        return None
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return cfg


def _is_wrapped(raw) -> bool:
    return any(k.startswith("module.") for k in raw.tensors) or bool(raw.extra) or (
        raw.path is not None and "open_clip" in raw.path.name)


def detect(raw) -> bool:
    if raw.card is not None or not openai.is_openai_layout(strip_module(raw.tensors)):
        return False
    return _is_wrapped(raw) or hub_config(raw) is not None


def guess_act(raw) -> str:
    hints = " ".join(str(x) for x in (raw.path.name if raw.path else "", raw.extra.get("name", ""),
                                      raw.extra.get("model", ""))).lower()
    return "quick_gelu" if ("quickgelu" in hints or "openai" in hints) else "gelu"


def preprocess_from_config(cfg: dict, image_size: int, who: str) -> PreprocessCfg:
    """``open_clip_config.json``'s ``preprocess_cfg`` -> :class:`PreprocessCfg` (OpenCLIP's defaults
    for missing keys: OpenAI mean/std, bicubic, shortest-side resize; size = the model's input)."""
    pp = cfg.get("preprocess_cfg") or {}
    if not isinstance(pp, dict):
        raise CheckpointError(f"{who}: preprocess_cfg must be an object")
    mode = pp.get("resize_mode", "shortest")
    if mode != "shortest":
        raise CheckpointError(f"{who}: resize_mode {mode!r} is not supported (only 'shortest')")
    size = pp.get("size", image_size)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise CheckpointError(f"{who}: a non-square input size {size} is not supported")
        size = size[0]
    base = PreprocessCfg()
    try:
        mean, std = tuple(float(x) for x in pp.get("mean", base.mean)), tuple(float(x) for x in pp.get("std", base.std))
        size = int(size)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{who}: unreadable preprocess_cfg ({e})") from None
    if len(mean) != 3 or len(std) != 3:
        raise CheckpointError(f"{who}: preprocess_cfg mean / std need 3 values")
    interp = "bilinear" if pp.get("interpolation") == "bilinear" else "bicubic"  # 'random' is bicubic at inference
    return PreprocessCfg(image_size=size, mean=mean, std=std, interpolation=interp)


def convert(raw, act: str | None = None) -> Converted:
    """``act`` overrides the activation (``textseg convert --act``); by default it comes from
    ``open_clip_config.json``, else from the file's name (:func:`guess_act`)."""
    cfg = hub_config(raw)
    if act is None:
        model_cfg = (cfg or {}).get("model_cfg") or {}
        act = ("quick_gelu" if model_cfg.get("quick_gelu") else "gelu") if cfg is not None else guess_act(raw)
    out = openai.convert_state(strip_module(raw.tensors), act)
    if cfg is None:
        return out
    image_size = out.config["vision"]["image_size"]
    return out._replace(preprocess=preprocess_from_config(cfg, image_size, f"{raw.path}: {CONFIG_NAME}"))
