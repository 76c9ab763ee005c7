"""Read the tensors of a TorchScript archive (OpenAI's official CLIP ``.pt`` files) without running it.

A TorchScript ``.pt`` is a zip: ``<root>/data.pkl`` pickles the module tree (objects of classes named
``__torch__.<...>`` whose state is a dict of attributes), tensors point into ``<root>/data/<key>``
blobs, and ``<root>/code/`` holds TorchScript source. ``torch.jit.load`` would compile and run that
code; instead a restricted unpickler rebuilds only tensors (from the raw blobs), plain containers and
inert placeholder objects. Any other global in the pickle (a function, a class outside the allow
list) is refused, so a malicious archive cannot execute anything here.

The module tree is then flattened into a state dict ``{"visual.conv1.weight": tensor, ...}``.
"""

from __future__ import annotations

import pickle
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from textseg.errors import CheckpointError

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _ScriptObject:
    """Inert stand-in for a ``__torch__.*`` object: keeps its attribute dict, nothing else."""

    qualname = ""
    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _StorageType:
    def __init__(self, name: str):
        self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, *_ignored) -> torch.Tensor:
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    numel = 1
    for s in size:
        numel *= s
    if not isinstance(storage, torch.Tensor) or numel > storage.numel() or min(size + stride, default=0) < 0:
        # a view larger than its storage (stride 0) would expand to gigabytes when copied
        raise pickle.UnpicklingError(f"tensor of shape {size} does not fit its storage")
    return storage.as_strided(size, stride, int(offset))


def _identity_list(x: Any) -> Any:  # torch.jit._pickle.build_*list / restore_type_tag helpers
    return x


def _restore_type_tag(value: Any, _tag: Any = None) -> Any:
    return value


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str):
        import io

        super().__init__(io.BytesIO(data))
        self._archive, self._root = archive, root
        self._storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            cls = type(name, (_ScriptObject,), {})
            cls.qualname = f"{module}.{name}"
            return cls
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch.jit._pickle" and name.startswith("build_"):
            return _identity_list
        if module == "torch.jit._pickle" and name == "restore_type_tag":
            return _restore_type_tag
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a TorchScript archive")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid[:5]
        if key not in self._storages:
            dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else None
            if dtype is None:
                raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
            itemsize = torch.empty(0, dtype=dtype).element_size()
            with self._archive.open(f"{self._root}/data/{key}") as fh:  # never more than the entry declares
                blob = fh.read(max(0, int(numel)) * itemsize)  # ... nor than the storage needs
            t = torch.frombuffer(bytearray(blob), dtype=dtype) if blob else torch.empty(0, dtype=dtype)
            if t.numel() < numel:
                raise pickle.UnpicklingError(f"storage {key} holds {t.numel()} values, expected {numel}")
            self._storages[key] = t
        return self._storages[key]


def _flatten(obj: Any, prefix: str, out: dict[str, torch.Tensor], depth: int = 0) -> None:
    if depth > 64:
        raise CheckpointError("TorchScript module tree is nested too deeply")
    state = obj.state if isinstance(obj, _ScriptObject) else obj
    if isinstance(state, dict):
        for key, value in state.items():
            if not isinstance(key, str):
                continue
            name = f"{prefix}{key}"
            if isinstance(value, torch.Tensor):
                out[name] = value.clone()
            elif isinstance(value, (_ScriptObject, dict)):
                _flatten(value, name + ".", out, depth + 1)


def read_torchscript_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a TorchScript archive's module tree, as a flat state dict (no code executed)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if not pkl:
                raise CheckpointError(f"{path}: TorchScript archive without data.pkl")
            root = pkl[0].split("/")[0]
            tree = _RestrictedUnpickler(archive.read(pkl[0]), archive, root).load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, KeyError, EOFError, OSError, ValueError,
            TypeError, AttributeError, IndexError, RuntimeError, NotImplementedError, OverflowError,
            MemoryError, RecursionError, zlib.error) as e:
        raise CheckpointError(f"{path}: cannot read the TorchScript archive's tensors safely "
                              f"({type(e).__name__}: {e}); if you trust the file, run "
                              f"`textseg convert --trust-checkpoint {path} OUT.safetensors`") from None
    out: dict[str, torch.Tensor] = {}
    _flatten(tree, "", out)
    if not out:
        raise CheckpointError(f"{path}: the TorchScript archive holds no tensors")
    return out
