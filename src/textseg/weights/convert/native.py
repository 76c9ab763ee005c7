"""textseg's native format: a ``.safetensors`` file of the model's own state dict whose metadata
``textseg_card`` holds a JSON card: ``{"format": "textseg", "architecture": "clip", "config": {...},
"preprocess": {...}, "source": ..., ...}`` (written by :func:`textseg.weights.load.save_model`; a
sidecar ``<file>.json`` repeats it with the file's sha256). ``architecture`` is a key of
:data:`textseg.models.registry.MODELS`, ``config`` what its builder takes. ``preprocess`` is
:meth:`PreprocessCfg.to_dict` (``image_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``,
``crop_offset``; older cards without the last two read as a plain resize + round crop).
"""

from __future__ import annotations

from textseg.errors import CheckpointError
from textseg.models.base import PreprocessCfg
from textseg.weights.convert import Converted

NAME = "native"


def detect(raw) -> bool:
    try:
        card = raw.card
    except CheckpointError:
        return True  # ours, but broken: convert() reports it
    return isinstance(card, dict) and card.get("format") == "textseg"


def convert(raw) -> Converted:
    card = raw.card
    arch, config = card.get("architecture"), card.get("config")
    if not isinstance(arch, str) or not isinstance(config, dict):
        raise CheckpointError(f"{raw.path}: the textseg card lacks its architecture name or config object")
    pp = card.get("preprocess")
    try:
        preprocess = PreprocessCfg.from_dict(pp) if pp else None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{raw.path}: the card's preprocess entry is invalid ({type(e).__name__}: {e})") from None
    return Converted(arch, config, raw.tensors, preprocess=preprocess, card=card)
