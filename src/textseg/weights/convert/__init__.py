"""Step 2 of loading: checkpoint formats, one module each, as pure functions (no model is built here).

Every format module exposes::

    NAME: str                                  # e.g. "openai", "open_clip", "hf_clip", "groupvit_nvlabs"
    def detect(raw: RawCheckpoint) -> bool     # cheap, by key names / config; never raises
    def convert(raw: RawCheckpoint) -> Converted   # architecture + config + textseg state dict

:class:`Converted` names the architecture (a key of :data:`textseg.models.registry.MODELS`), its
config as the plain JSON dict the native card stores, the state dict in textseg's key names (every
file key mapped or explicitly dropped; unknown keys raise), and optionally the checkpoint's
preprocessing card and a model card. ``RawCheckpoint`` (:mod:`textseg.weights.read`) holds what was
read from disk. :data:`textseg.weights.load.FORMATS` lists the modules in detection order; a new
format is one new module here plus its entry in that tuple.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from textseg.models.base import PreprocessCfg


class Converted(NamedTuple):
    """A checkpoint in textseg's terms, ready for :func:`textseg.weights.load.build_converted`."""

    architecture: str
    config: dict
    state_dict: dict[str, torch.Tensor]
    preprocess: PreprocessCfg | None = None  # the checkpoint's own preprocessing card, if it has one
    card: dict | None = None  # set as ``model.card`` (the native card, or where the weights came from)


def floats(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating-point tensors as float32 (fp16 releases), integer entries untouched."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
