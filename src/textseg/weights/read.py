"""Step 1 of loading: read a checkpoint from disk, safely, into a :class:`RawCheckpoint`; hash files;
and the one strict state-dict check every loader uses (:func:`check_state_dict`).

Reading never runs code from the file: safetensors, ``torch.load(weights_only=True)``, Hugging Face
folders (``config.json`` + weights, sharded or not), and OpenAI's TorchScript ``.pt`` archives, whose
tensors are rebuilt by a restricted unpickler (:mod:`textseg.weights.torchscript`). Only
``read_checkpoint(path, trust=True)`` (``textseg convert --trust-checkpoint``) falls back to
``torch.jit.load`` / full unpickling, once, for a file the user vouches for.

This module is a leaf: it imports no model and no converter.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from textseg.errors import CheckpointError
from textseg.weights import torchscript

CARD_KEY = "textseg_card"  # safetensors metadata entry holding the native JSON card


@dataclass
class RawCheckpoint:
    """What was read from disk, before any conversion.

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


_WRAPPERS = ("state_dict", "model", "module", "model_state_dict", "params", "weights")
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
               "open_clip_pytorch_model.bin")


def read_checkpoint(path: str | Path, trust: bool = False) -> RawCheckpoint:
    """Read a checkpoint file or Hugging Face folder into a :class:`RawCheckpoint`, safely.

    Raises :class:`CheckpointError` (one line) for missing, truncated or unreadable files. With
    ``trust`` (only for files the user vouches for), a file the safe readers refuse is opened with
    ``torch.jit.load`` (TorchScript) or full unpickling (e.g. a Lightning ``.ckpt`` whose
    ``hyper_parameters`` hold classes): both run code from the file."""
    path = Path(path).expanduser()
    try:
        return _read_safe(path)
    except CheckpointError:
        if not (trust and path.is_file()):
            raise
    try:
        return _read_trusted_torchscript(path)
    except CheckpointError:  # not TorchScript: a pickled checkpoint
        return _read_trusted_pickle(path)


# Zip-bomb bound: the entries of a zip checkpoint (torch.save and TorchScript store them
# uncompressed) may declare at most this many times the archive's size, plus a slack, when decompressed.
MAX_ZIP_RATIO = 4
ZIP_SLACK_BYTES = 64 << 20


def check_zip_bounds(path: str | Path) -> None:
    """Refuse a zip checkpoint whose entries declare more decompressed bytes than
    ``MAX_ZIP_RATIO x`` its size ``+ ZIP_SLACK_BYTES`` (a few-MB file must not cost GBs). Readers
    (Python's zipfile, torch's miniz) never decompress past what an entry declares, so this bounds
    the memory of reading it. Not a zip: nothing to check; a damaged zip directory is refused (its
    sizes cannot be checked)."""
    path = Path(path)
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as z:
            declared = sum(max(0, info.file_size) for info in z.infolist())
    except Exception as e:  # BadZipFile, NotImplementedError (version), UnicodeDecodeError (names), ...
        raise CheckpointError(f"{path}: damaged zip archive ({_first_line(e)})") from None
    limit = MAX_ZIP_RATIO * path.stat().st_size + ZIP_SLACK_BYTES
    if declared > limit:
        raise CheckpointError(f"{path}: zip entries declare {declared / 2**20:.0f} MiB decompressed from a "
                              f"{path.stat().st_size / 2**20:.1f} MiB file (limit {limit / 2**20:.0f} MiB): "
                              "refusing a possible zip bomb")


def check_tensor_storage(tensors: dict[str, Any], path: Path | None) -> None:
    """Refuse tensors larger than the storage they view (stride-0 tricks: a tiny file whose tensors
    would expand to gigabytes once copied)."""
    for key, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > t.untyped_storage().nbytes():
            raise CheckpointError(f"{path}: tensor {key} of shape {tuple(t.shape)} is larger than its storage "
                                  "(overlapping strides): not a weights file")


def _read_safe(path: Path) -> RawCheckpoint:
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
    check_zip_bounds(path)
    if zipfile.is_zipfile(path) and _is_torchscript(path):
        return RawCheckpoint(tensors=torchscript.read_torchscript_tensors(path), kind="torchscript", path=path)
    return _read_torch(path)


def _read_folder(path: Path) -> RawCheckpoint:
    for name in _HF_WEIGHTS:
        if (path / name).is_file():
            raw = _read_safe(path / name)
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


def _first_line(e: Exception, limit: int = 200) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:limit]}"


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
                              f"({_first_line(e)})") from None
    return RawCheckpoint(tensors=tensors, metadata=metadata, kind="safetensors", path=path)


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except Exception:  # a damaged directory: not readable as TorchScript (check_zip_bounds says why)
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _read_torch(path: Path) -> RawCheckpoint:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read as a safe torch checkpoint, truncated or not a weights file "
                              f"({_first_line(e)})") from None
    raw = RawCheckpoint(kind="torch", path=path, **_unwrap(obj, path))
    check_tensor_storage(raw.tensors, path)
    return raw


def _read_trusted_torchscript(path: Path) -> RawCheckpoint:
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise CheckpointError(f"{path}: torch.jit.load failed too ({_first_line(e)})") from None
    return RawCheckpoint(tensors=dict(module.state_dict()), kind="torchscript", path=path)


def _read_trusted_pickle(path: Path) -> RawCheckpoint:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path}: torch.load failed too ({_first_line(e)})") from None
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


def _listed(keys: list[str], what: str, n: int = 5) -> str:
    return f"{len(keys)} {what} ({', '.join(keys[:n])}{', ...' if len(keys) > n else ''})"


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], who: str) -> None:
    """The one strict load: the key sets must match exactly and every shape agree, else one
    :class:`CheckpointError` line ``"{who}: keys do not match the model: N missing (a, b, ...);
    M unexpected (...)"`` or ``"{who}: K shape mismatches (key: file (...) vs model (...), ...)"``;
    then ``load_state_dict(strict=True)`` (values cast to the model's dtypes)."""
    check_shapes(model.state_dict(), state, who)
    model.load_state_dict(state, strict=True)


def check_shapes(own: dict[str, Any], state: dict[str, Any], who: str) -> None:
    """The key and shape comparison of :func:`check_state_dict` (values: tensors, or anything with
    a ``shape``, e.g. meta tensors of a model built only to check a card)."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = [_listed(keys, what) for keys, what in ((missing, "missing"), (unexpected, "unexpected")) if keys]
        raise CheckpointError(f"{who}: keys do not match the model: " + "; ".join(parts))
    bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
           if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(f"{who}: {len(bad)} shape mismatch{'es' if len(bad) > 1 else ''} "
                              f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
