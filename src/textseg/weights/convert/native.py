"""textseg's native format: a ``.safetensors`` file of the model's own state dict whose metadata
``textseg_card`` holds a JSON card: ``{"format": "textseg", "architecture": "clip", "config": {...},
"preprocess": {"image_size", "mean", "std", "interpolation"}, "source": ..., ...}`` (written by
:func:`textseg.weights.load.save_model`; a sidecar ``<file>.json`` repeats it with the file's sha256).

``ARCHITECTURES`` maps the card's architecture to ``"module:Class"``; the class provides
``from_config_dict(dict)`` (a model with random weights of that shape). Other models add one line.
"""

from __future__ import annotations

import importlib

from textseg.errors import CheckpointError
from textseg.models.base import PreprocessCfg

NAME = "native"

ARCHITECTURES: dict[str, str] = {
    "clip": "textseg.models.clip:CLIP",
    "groupvit": "textseg.models.groupvit:GroupViT",
    "lseg": "textseg.models.lseg:LSeg",
    "lit": "textseg.models.lit:LiTModel",
}


def detect(raw) -> bool:
    try:
        card = raw.card
    except CheckpointError:
        return True  # ours, but broken: build() reports it
    return isinstance(card, dict) and card.get("format") == "textseg"


def build(raw):
    from textseg.weights.load import check_state_dict

    card = raw.card
    arch = card.get("architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{raw.path}: textseg checkpoint of unknown architecture {arch!r} "
                              f"(known: {', '.join(ARCHITECTURES)})")
    module_name, cls_name = ARCHITECTURES[arch].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    try:
        model = cls.from_config_dict(card["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{raw.path}: the card's {arch} config is invalid ({type(e).__name__}: {e})") from None
    pp = card.get("preprocess")
    if pp:
        model.preprocess_cfg = PreprocessCfg(image_size=int(pp["image_size"]), mean=tuple(pp["mean"]),
                                             std=tuple(pp["std"]), interpolation=pp.get("interpolation", "bicubic"))
    check_state_dict(model, raw.tensors, f"{raw.path}: textseg {arch}")
    model.card = card
    return model.eval()
