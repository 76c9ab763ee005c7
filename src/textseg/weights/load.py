"""One entry point for every model and checkpoint: ``load_model(name=None, weights=None)``.

Reading is always safe: safetensors, ``torch.load(weights_only=True)``, Hugging Face folders
(``config.json`` + weights), and OpenAI's TorchScript ``.pt`` archives, whose tensors are read by a
restricted unpickler that rebuilds tensors and plain containers and nothing else (no code from the
file runs; see :mod:`textseg.weights.torchscript`). The format is detected from the tensors
(``FORMATS``: one converter module each, tried in order), never asked for.

>>> model = load_model()                                  # the offline default model
>>> model = load_model("ViT-B/16")                        # an OpenAI preset (cached / fetched)
>>> model = load_model(weights="ViT-B-16.pt")             # any supported checkpoint file or folder
>>> save_model(model, "clip.safetensors", {"source": "ViT-B-16.pt"})   # native safetensors + card
"""

from __future__ import annotations

import hashlib
import importlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from textseg.errors import CheckpointError
from textseg.models.base import DualEncoder

CARD_KEY = "textseg_card"  # safetensors metadata entry holding the native JSON card

# Checkpoint formats, tried in this order (modules under textseg.weights.convert with NAME/detect/build).
FORMATS: list[str] = [
    "textseg.weights.convert.native",
    "textseg.weights.convert.hf_clip",
    "textseg.weights.convert.open_clip",
    "textseg.weights.convert.openai",
    "textseg.weights.convert.groupvit_hf",
    "textseg.weights.convert.groupvit_nvlabs",
    "textseg.weights.convert.lseg",
]

# Models loadable by name without weights: name -> "module:function" returning a DualEncoder.
NAMED_MODELS: dict[str, str] = {
    "offline": "textseg.models.offline:load_offline_model",
}
DEFAULT_MODEL = "offline"


@dataclass
class RawCheckpoint:
    """What was read from disk, before any model is built.

    ``tensors``: flat name -> tensor dict (wrappers like ``{"state_dict": ...}`` removed; a leading
    ``module.`` from DistributedDataParallel is kept: converters decide). ``config``: the parsed
    ``config.json`` of a Hugging Face folder, else None. ``metadata``: safetensors metadata (str ->
    str). ``extra``: non-tensor entries found beside the weights (``epoch``, ``name``, ...).
    ``kind``: "safetensors", "torch", "torchscript" or "hf-folder". ``path``: the file read."""

    tensors: dict[str, torch.Tensor]
    config: dict | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    kind: str = "torch"
    path: Path | None = None

    @property
    def card(self) -> dict | None:
        """The native JSON card, if this is a textseg safetensors file."""
        text = self.metadata.get(CARD_KEY)
        if not text:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{self.path}: the model card in the metadata is not valid JSON ({e})") from None

    def describe(self) -> str:
        keys = sorted(self.tensors)
        head = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
        return f"{len(keys)} tensors ({head})"


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

_WRAPPERS = ("state_dict", "model", "module", "model_state_dict", "params", "weights")
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
               "open_clip_pytorch_model.bin")


def read_checkpoint(path: str | Path) -> RawCheckpoint:
    """Read a checkpoint file or Hugging Face folder into a :class:`RawCheckpoint`, safely.

    Raises :class:`CheckpointError` (one line) for missing, truncated or unreadable files."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        return _read_folder(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    with open(path, "rb") as f:
        magic = f.read(8)
    if path.suffix == ".safetensors" or (not magic.startswith(b"PK") and not magic.startswith(b"\x80")):
        return _read_safetensors(path)
    if zipfile.is_zipfile(path) and _is_torchscript(path):
        from textseg.weights.torchscript import read_torchscript_tensors

        tensors = read_torchscript_tensors(path)
        return RawCheckpoint(tensors=tensors, kind="torchscript", path=path)
    return _read_torch(path)


def _read_folder(path: Path) -> RawCheckpoint:
    for name in _HF_WEIGHTS:
        if (path / name).is_file():
            raw = read_checkpoint(path / name)
            break
    else:
        shards = sorted(path.glob("model-*.safetensors"))
        if not shards:
            raise CheckpointError(f"{path}: folder has no {' / '.join(_HF_WEIGHTS[:2])}")
        raw = RawCheckpoint(tensors={}, kind="safetensors", path=path)
        for shard in shards:
            raw.tensors.update(_read_safetensors(shard).tensors)
    cfg_file = path / "config.json"
    if cfg_file.is_file():
        try:
            raw.config = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
        raw.kind = "hf-folder"
    raw.path = path
    return raw


def _read_safetensors(path: Path) -> RawCheckpoint:
    from safetensors import safe_open

    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as e:  # SafetensorError, OSError, ...: truncated or not safetensors
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return RawCheckpoint(tensors=tensors, metadata=metadata, kind="safetensors", path=path)


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _read_torch(path: Path) -> RawCheckpoint:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{path}: cannot read as a safe torch checkpoint, truncated or not a weights file "
                              f"({type(e).__name__}: {msg[:200]})") from None
    return RawCheckpoint(kind="torch", path=path, **_unwrap(obj, path))


def _unwrap(obj: Any, path: Path) -> dict:
    """Find the flat tensor dict inside common wrappers ({"state_dict": ...}, {"model": ...})."""
    extra: dict[str, Any] = {}
    for _ in range(3):
        if not isinstance(obj, dict):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {"tensors": dict(obj), "extra": extra}
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        extra.update({k: v for k, v in obj.items() if not isinstance(v, (dict, torch.Tensor))})
        obj = inner
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            extra.update({k: v for k, v in obj.items() if not isinstance(v, torch.Tensor)})
            return {"tensors": tensors, "extra": extra}
    raise CheckpointError(f"{path}: holds no tensors (a {type(obj).__name__}); expected a state dict")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Detecting and building
# ----------------------------------------------------------------------------------------------


def format_modules() -> list[ModuleType]:
    """The converter modules of ``FORMATS`` that exist in this install, in detection order."""
    out = []
    for name in FORMATS:
        try:
            out.append(importlib.import_module(name))
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
    return out


def detect_format(raw: RawCheckpoint) -> ModuleType:
    """The first converter whose ``detect`` accepts ``raw``; a clear error when none does."""
    for module in format_modules():
        try:
            if module.detect(raw):
                return module
        except CheckpointError:
            raise
        except Exception:  # detect must not raise; a buggy one is treated as "no"
            continue
    names = ", ".join(m.NAME for m in format_modules())
    raise CheckpointError(f"{raw.path}: not a checkpoint of a supported model (formats: {names}); "
                          f"found {raw.describe()}")


def build_from_raw(raw: RawCheckpoint) -> DualEncoder:
    return detect_format(raw).build(raw)


def _named(name: str) -> DualEncoder:
    target = NAMED_MODELS[name]
    module_name, func = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise CheckpointError(f"model {name!r} is not available in this install ({module_name} missing)") from None
        raise
    return getattr(module, func)()


def available_names() -> list[str]:
    """Every name ``load_model`` accepts: named models and OpenAI presets."""
    from textseg.weights.presets import PRESETS

    return [*NAMED_MODELS, *PRESETS]


def load_model(name: str | None = None, weights: str | Path | None = None, device: str | torch.device = "cpu",
               download: bool = True) -> DualEncoder:
    """Load any textseg model, in eval mode, on ``device``.

    - nothing given: the offline default model (``"offline"``);
    - ``name``: a named model (``"offline"``, ...) or an OpenAI preset (``"ViT-B/16"``, ``"RN50"``,
      ``"ViT-L/14@336px"``; open_clip spellings like ``"ViT-B-16"`` too), read from the cache and, if
      absent and ``download``, fetched once (SHA-256 checked);
    - ``weights``: a checkpoint file or folder in any supported format (detected). With a ``name``
      too, the checkpoint must be of that model (``"clip"``, ``"lseg"``, ``"groupvit"``, ...)."""
    from textseg.weights import presets

    if weights is not None:
        model = build_from_raw(read_checkpoint(weights))
        if name is not None and name != model.name and presets.find(name) is None:
            raise CheckpointError(f"{weights}: is a {model.name!r} checkpoint, not {name!r}")
        if name is not None and presets.find(name) is not None and model.name != "clip":
            raise CheckpointError(f"{weights}: is a {model.name!r} checkpoint, not CLIP {name!r}")
    else:
        name = name or DEFAULT_MODEL
        if name in NAMED_MODELS:
            model = _named(name)
        elif (preset := presets.find(name)) is not None:
            model = build_from_raw(read_checkpoint(presets.fetch(preset, download=download)))
        elif name == "clip":
            raise CheckpointError("model 'clip' needs --weights (a CLIP checkpoint) or a preset name such as "
                                  "'ViT-B/16'; see `textseg models`")
        else:
            raise CheckpointError(f"unknown model {name!r}; known: {', '.join(available_names())} "
                                  "(or pass a checkpoint with --weights)")
    return model.to(device).eval()


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
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: native checkpoints are .safetensors files")
    path.parent.mkdir(parents=True, exist_ok=True)
    full = model_card(model, card)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={CARD_KEY: json.dumps(full)})
    full = {**full, "sha256": sha256_file(path)}
    Path(str(path) + ".json").write_text(json.dumps(full, indent=2) + "\n")
    return full


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], who: str) -> None:
    """Strict key-set and shape check with a one-line :class:`CheckpointError` naming the
    missing / unexpected keys; then ``load_state_dict(strict=True)`` (dtype cast to the model's)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected "
                         f"({', '.join(unexpected[:5])}{', ...' if len(unexpected) > 5 else ''})")
        raise CheckpointError(f"{who}: keys do not match the model: " + "; ".join(parts))
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{who}: {k} has shape {tuple(state[k].shape)}, the model expects {tuple(v.shape)}")
    model.load_state_dict(state, strict=True)
