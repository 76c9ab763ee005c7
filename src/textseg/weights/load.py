"""One entry point for every model and checkpoint: ``load_model(name=None, weights=None)``.

Loading is four pure steps: **read** the file safely (:func:`textseg.weights.read.read_checkpoint`)
-> **convert** it with the first format of :data:`FORMATS` whose ``detect`` accepts it (each a
module of :mod:`textseg.weights.convert`: checkpoint -> architecture, config, state dict, optional
preprocessing card) -> **build** the architecture from :data:`textseg.models.registry.MODELS` ->
**strict load** (:func:`textseg.weights.read.check_state_dict`). The format is detected from the
tensors, never asked for.

>>> model = load_model()                                  # the offline default model
>>> model = load_model("ViT-B/16")                        # an OpenAI preset (cached / fetched)
>>> model = load_model(weights="ViT-B-16.pt")             # any supported checkpoint file or folder
>>> save_model(model, "clip.safetensors", {"source": "ViT-B-16.pt"})   # native safetensors + card
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import torch

from textseg.errors import CheckpointError
from textseg.models.base import DualEncoder
from textseg.models.registry import DEFAULT_MODEL, PACKAGED, build_model
from textseg.weights import presets
from textseg.weights.convert import (
    Converted,
    groupvit_hf,
    groupvit_nvlabs,
    hf_clip,
    lseg,
    native,
    open_clip,
    openai,
)
from textseg.weights.read import (
    CARD_KEY,
    RawCheckpoint,
    check_shapes,
    check_state_dict,
    read_checkpoint,
    sha256_file,
)

__all__ = ["FORMATS", "DEFAULT_MODEL", "RawCheckpoint", "available_names", "build_converted", "convert_checkpoint",
           "convert_file", "detect_format", "load_checkpoint", "load_model", "model_card", "read_checkpoint",
           "save_model"]

# Checkpoint formats, tried in this order.
FORMATS: tuple[ModuleType, ...] = (native, hf_clip, open_clip, openai, groupvit_hf, groupvit_nvlabs, lseg)


def detect_format(raw: RawCheckpoint) -> ModuleType:
    """The first format whose ``detect`` accepts ``raw``; a clear error when none does."""
    for module in FORMATS:
        try:
            if module.detect(raw):
                return module
        except CheckpointError:
            raise
        except Exception:  # detect must not raise; a buggy one is treated as "no"
            continue
    names = ", ".join(m.NAME for m in FORMATS)
    raise CheckpointError(f"{raw.path}: not a checkpoint of a supported model (formats: {names}); "
                          f"found {raw.describe()}")


def convert_checkpoint(raw: RawCheckpoint, act: str | None = None) -> tuple[ModuleType, Converted]:
    """Detect ``raw``'s format and convert it. ``act`` overrides the activation of OpenCLIP
    checkpoints (other formats record theirs)."""
    fmt = detect_format(raw)
    return fmt, (fmt.convert(raw, act=act) if fmt is open_clip and act else fmt.convert(raw))


# A model may hold this many values beyond its file's tensors (non-persistent buffers: masks, tables).
EXTRA_VALUES = 1 << 26


def dry_build(converted: Converted, who: str = "checkpoint") -> None:
    """Check an untrusted card before building for real: build its architecture on the meta device
    (shapes only, no memory), require the same keys and shapes as the file's tensors
    (:func:`check_shapes`, the strict load's messages) and the whole model (buffers too) to hold at
    most :data:`EXTRA_VALUES` values more than the file, so a card with huge dimensions is refused
    instead of allocating hundreds of GB. Packaged architectures are trusted (built from our files)."""
    if converted.architecture in PACKAGED:
        return
    meta = build_model(converted.architecture, converted.config, who, meta=True)
    check_shapes(meta.state_dict(), converted.state_dict, f"{who} ({converted.architecture})")
    in_file = sum(t.numel() for t in converted.state_dict.values())
    total = sum(t.numel() for t in meta.parameters()) + sum(t.numel() for t in meta.buffers())
    if total > in_file + EXTRA_VALUES:
        raise CheckpointError(f"{who}: its {converted.architecture} config would allocate {total:,} values for "
                              f"{in_file:,} in the file: refusing it")


def build_converted(converted: Converted, who: str = "checkpoint") -> DualEncoder:
    """Build ``converted.architecture`` from the registry, load its state dict strictly, apply its
    preprocessing and model cards; in eval mode."""
    dry_build(converted, who)  # the card, checked against the tensors before anything is allocated
    model = build_model(converted.architecture, converted.config, who)
    check_state_dict(model, converted.state_dict, f"{who} ({converted.architecture})")
    if converted.preprocess is not None:
        model.preprocess_cfg = converted.preprocess
    if converted.card is not None:
        model.card = converted.card
    return model.eval()


def load_checkpoint(path: str | Path, act: str | None = None, trust: bool = False) -> DualEncoder:
    """Read, convert, build and strictly load the checkpoint at ``path`` (``trust``: see
    :func:`~textseg.weights.read.read_checkpoint`)."""
    raw = read_checkpoint(path, trust=trust)
    fmt, converted = convert_checkpoint(raw, act)
    return build_converted(converted, f"{raw.path} [{fmt.NAME}]")


def available_names() -> list[str]:
    """Every name ``load_model`` accepts without weights: packaged models and OpenAI presets."""
    return [*PACKAGED, *presets.PRESETS]


def load_model(name: str | None = None, weights: str | Path | None = None, device: str | torch.device = "cpu",
               download: bool = True, precision: str | None = None, cast_weights: bool = False) -> DualEncoder:
    """Load any textseg model, in eval mode, on ``device``.

    - nothing given: the offline default model (``"offline"``);
    - ``name``: a packaged model (``"offline"``) or an OpenAI preset (``"ViT-B/16"``, ``"RN50"``,
      ``"ViT-L/14@336px"``; open_clip spellings like ``"ViT-B-16"`` too), read from the cache and, if
      absent and ``download``, fetched once (SHA-256 checked);
    - ``weights``: a checkpoint file or folder in any supported format (detected). With a ``name``
      too, the checkpoint must be of that model (``"clip"``, ``"lseg"``, ``"groupvit"``, ...).

    ``precision`` (``auto`` / ``fp32`` / ``bf16`` / ``fp16``, :mod:`textseg.precision`) is resolved
    for ``device`` and kept as ``model.inference_precision``: the precision the Segmenter and
    classification run the image tower at (weights stay float32; None = fp32). ``cast_weights``: with
    bf16 / fp16, convert the image tower's weights to it once (:func:`textseg.precision.cast_image_tower`;
    faster on CPU than autocast's per-forward casts)."""
    from textseg.precision import resolve_precision

    resolved = resolve_precision(precision, device)  # a bad value fails before any weights load
    if weights is not None:
        model = load_checkpoint(weights)
        if name is not None and name != model.name and presets.find(name) is None:
            raise CheckpointError(f"{weights}: is a {model.name!r} checkpoint, not {name!r}")
        if name is not None and presets.find(name) is not None and model.name != "clip":
            raise CheckpointError(f"{weights}: is a {model.name!r} checkpoint, not CLIP {name!r}")
    else:
        name = name or DEFAULT_MODEL
        if name in PACKAGED:
            model = build_model(name)
        elif (preset := presets.find(name)) is not None:
            model = load_checkpoint(presets.fetch(preset, download=download))
        elif name == "clip":
            raise CheckpointError("model 'clip' needs --weights (a CLIP checkpoint) or a preset name such as "
                                  "'ViT-B/16'; see `textseg models`")
        else:
            raise CheckpointError(f"unknown model {name!r}; known: {', '.join(available_names())} "
                                  "(or pass a checkpoint with --weights)")
    model = model.to(device).eval()
    model.inference_precision = resolved
    if cast_weights:
        from textseg.precision import cast_image_tower

        cast_image_tower(model, resolved)
    return model


# ----------------------------------------------------------------------------------------------
# Saving (native format)
# ----------------------------------------------------------------------------------------------


def model_card(model: DualEncoder, card: dict | None = None) -> dict:
    """The JSON card describing ``model``: architecture, its config, preprocessing, plus ``card``."""
    cfg = getattr(model, "cfg", None)
    if not hasattr(model, "config_dict") and not hasattr(cfg, "to_dict"):
        raise CheckpointError(f"cannot save a {type(model).__name__}: it has no config_dict() / cfg.to_dict()")
    out = {
        "format": "textseg",
        "architecture": model.name,
        "config": model.config_dict() if hasattr(model, "config_dict") else cfg.to_dict(),
        "preprocess": model.preprocess_cfg.to_dict(),
    }
    out.update(card or {})
    return out


def save_model(model: DualEncoder, path: str | Path, card: dict | None = None) -> dict:
    """Write ``model`` as native safetensors at ``path`` (card in the metadata) plus a sidecar
    ``<path>.json`` card with the file's ``sha256``. ``card`` adds fields (``source``,
    ``source_sha256``, ``license``, ...). Returns the full card."""
    from safetensors.torch import save

    from textseg.io import atomic_write, write_text

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: native checkpoints are .safetensors files")
    full = model_card(model, card)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_write(path) as fh:  # a killed convert leaves no truncated file; unwritable -> one line
        fh.write(save(state, metadata={CARD_KEY: json.dumps(full)}))
    full = {**full, "sha256": sha256_file(path)}
    write_text(str(path) + ".json", json.dumps(full, indent=2) + "\n")
    return full


def convert_file(source: str | Path, output: str | Path, model: str | None = None, act: str | None = None,
                 trust: bool = False) -> dict:
    """Any supported checkpoint -> native safetensors at ``output`` (``textseg convert``): the card
    records the source, its format and SHA-256. ``model``: fail unless the checkpoint is of that
    architecture; ``act``: OpenCLIP activation; ``trust``: allow the code-running readers for a file
    the safe ones refuse (see :func:`~textseg.weights.read.read_checkpoint`). Returns the card."""
    src = Path(source)
    raw = read_checkpoint(src, trust=trust)
    fmt, converted = convert_checkpoint(raw, act)
    built = build_converted(converted, f"{raw.path} [{fmt.NAME}]")
    if model and model != built.name:
        raise CheckpointError(f"{src}: is a {built.name!r} checkpoint, not {model!r}")
    card = {"source": str(src), "source_format": fmt.NAME}
    if src.is_file():
        card["source_sha256"] = sha256_file(src)
    return save_model(built, output, card)
