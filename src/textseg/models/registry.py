"""Every model architecture textseg builds, by name: ``architecture -> builder(config) -> model``
(as segment-anything's ``sam_model_registry``).

A builder takes the architecture's config as the plain JSON dict a native checkpoint card stores
(:meth:`config_dict` of the model) and returns the model with random weights of that shape, except
where the model ships with packaged pretrained weights (:data:`PACKAGED`): those builders load them.
Checkpoint converters (:mod:`textseg.weights.convert`) name one of these architectures;
:func:`textseg.weights.load.load_model` builds it here and loads the converted weights strictly.

Adding an architecture is one import and one entry in :data:`MODELS` (plus its tiny config in
``tests/test_models.py``, which builds, runs and round-trips every entry).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from textseg.errors import CheckpointError
from textseg.models.base import DualEncoder
from textseg.models.clip import CLIP
from textseg.models.groupvit import GroupViT
from textseg.models.lit import LiTModel
from textseg.models.lseg import LSeg
from textseg.models.offline import OfflineModel
from textseg.wsss.cam import CAMNet

Builder = Callable[[dict], DualEncoder]

MODELS: dict[str, Builder] = {
    "cam": CAMNet.from_config_dict,
    "clip": CLIP.from_config_dict,
    "groupvit": GroupViT.from_config_dict,
    "lit": LiTModel.from_config_dict,
    "lseg": LSeg.from_config_dict,
    "offline": OfflineModel.from_config_dict,  # v2: ConSE bridge + learned dense head (assets/offline_heads.*)
    "offline-bridge": OfflineModel.bridge_only,  # the v1 default: the ConSE bridge alone
}

# Architectures whose builder loads packaged weights: ``load_model(name)`` needs no checkpoint.
PACKAGED: tuple[str, ...] = ("offline", "offline-bridge")
DEFAULT_MODEL = "offline"


# What a malformed config can raise inside a builder (wrong types, zeros, negatives, missing keys).
_CONFIG_ERRORS = (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError, IndexError, AssertionError,
                  RuntimeError, OverflowError, RecursionError)


def build_model(architecture: str, config: dict | None = None, who: str = "", meta: bool = False) -> DualEncoder:
    """``MODELS[architecture](config)``; an unknown name or an invalid config is one
    :class:`CheckpointError` line (prefixed by ``who``, e.g. the checkpoint's path).

    ``meta``: build on PyTorch's ``meta`` device (shapes only, no memory), to check an untrusted
    card against the tensors of its file before anything is allocated (:func:`dry_build`)."""
    where = f"{who}: " if who else ""
    if not isinstance(architecture, str) or architecture not in MODELS:
        raise CheckpointError(f"{where}unknown model architecture {architecture!r} (known: {', '.join(MODELS)})")
    if config is not None and not isinstance(config, dict):
        raise CheckpointError(f"{where}invalid {architecture} config: not an object ({type(config).__name__})")
    try:
        if meta and architecture not in PACKAGED:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # packaged sub-towers "load" into meta tensors: a no-op
                return MODELS[architecture](dict(config or {}))
        return MODELS[architecture](dict(config or {}))
    except CheckpointError:
        raise
    except _CONFIG_ERRORS as e:
        raise CheckpointError(f"{where}invalid {architecture} config ({type(e).__name__}: {str(e)[:200]})") from None
