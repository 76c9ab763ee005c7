"""OpenCLIP checkpoints: training checkpoints (``{"epoch", "name", "state_dict": {"module.visual..."}}``)
and released ``open_clip_pytorch_model.bin`` / ``.safetensors`` files of the built-in CLIP architecture.

The key layout is OpenAI's (see :mod:`textseg.weights.convert.openai`) after removing DDP's
``module.`` prefix. OpenCLIP's own models use ``nn.GELU`` while the ``*-quickgelu`` models and OpenAI
weights use QuickGELU; checkpoints do not record it, so a file whose name or ``name`` entry mentions
"quickgelu" or "openai" gets QuickGELU, anything else GELU (``textseg convert --act`` overrides).
"""

from __future__ import annotations

from textseg.weights.convert import openai

NAME = "open_clip"


def strip_module(sd: dict) -> dict:
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def _is_wrapped(raw) -> bool:
    return any(k.startswith("module.") for k in raw.tensors) or bool(raw.extra) or (
        raw.path is not None and "open_clip" in raw.path.name)


def detect(raw) -> bool:
    return raw.card is None and _is_wrapped(raw) and openai.is_openai_layout(strip_module(raw.tensors))


def guess_act(raw) -> str:
    hints = " ".join(str(x) for x in (raw.path.name if raw.path else "", raw.extra.get("name", ""),
                                      raw.extra.get("model", ""))).lower()
    return "quick_gelu" if ("quickgelu" in hints or "openai" in hints) else "gelu"


def build(raw, act: str | None = None):
    return openai.from_state(strip_module(raw.tensors), f"{raw.path}: CLIP (OpenCLIP)", act or guess_act(raw))
