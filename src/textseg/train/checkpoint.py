"""Training checkpoints: atomic writes, RNG capture, ``weights_only``-safe content.

A training checkpoint is a dict of tensors and plain Python values only, so it loads with
``torch.load(path, weights_only=True)`` (no arbitrary unpickling)::

    {"format": "textseg-train", "version": 1, "step": int, "epoch": int, "batch_in_epoch": int,
     "model": state_dict, "optimizer": ..., "scheduler": ..., "scaler": ..., "ema": state_dict | None,
     "rng": [per-rank rng dicts], "config": resolved config dict, "world_size": int,
     "total_steps": int, "elapsed": float}

written by :meth:`textseg.train.engine.Trainer.save_checkpoint` for every recipe, as
``<out_dir>/checkpoints/step_XXXXXXXX.pt`` (``model`` / ``ema`` leave out the keys under the
training module's ``checkpoint_skip`` prefixes: packaged frozen towers rebuilt at construction).

Files are written to a temporary name in the same folder, fsynced, then renamed, so a crash while
saving never leaves a truncated ``step_*.pt`` behind.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from textseg.errors import CheckpointError
from textseg.io import atomic_write
from textseg.weights.read import check_zip_bounds

CKPT_RE = re.compile(r"^step_(\d+)\.pt$")


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` via :func:`textseg.io.atomic_write` (temporary file + fsync + rename)."""
    with atomic_write(path) as fh:
        torch.save(obj, fh)
    return Path(path)


def file_stamp(path: str | Path) -> tuple[int, int]:
    """``(size, mtime_ns)`` of ``path`` (``(-1, -1)`` when it cannot be read): part of a cache key."""
    try:
        st = Path(path).stat()
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def cached(cache_dir: str | Path, prefix: str, key: Any, compute: Callable[[], Any]) -> Any:
    """``compute()`` (tensors, or dicts / lists of them), kept in ``<cache_dir>/<prefix>-<hash>.pt``
    where the hash is of ``json.dumps(key)`` (what the result depends on: towers, preprocessing, files
    with their :func:`file_stamp`); a later call with the same key loads it (``weights_only``). No
    ``cache_dir``: computed every time. Only the main process writes (atomically)."""
    from textseg.distributed import is_main

    path = Path(cache_dir) / f"{prefix}-{hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]}.pt" if cache_dir else None
    if path is not None and path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    out = compute()
    if path is not None and is_main():
        atomic_save(out, path)
    return out


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a training checkpoint with ``weights_only=True``; bad files raise CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    check_zip_bounds(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated / not a torch file / unsafe content
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "textseg-train":
        raise CheckpointError(f"{path}: not a textseg training checkpoint")
    return ckpt


def checkpoint_path(ckpt_dir: str | Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:08d}.pt"


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """``step_*.pt`` files in ``ckpt_dir`` sorted by step (temporaries are ignored)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def prune_checkpoints(ckpt_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (``keep_last <= 0`` keeps all)."""
    if keep_last <= 0:
        return
    for p in list_checkpoints(ckpt_dir)[:-keep_last]:
        p.unlink(missing_ok=True)


def capture_rng_state() -> dict:
    """This process's python / numpy / torch / cuda RNG states as tensors and plain values."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python_version": py_version,
        "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": py_gauss,
        "numpy_name": np_name,
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(
        (state["python_version"], tuple(int(x) for x in state["python_state"].tolist()), state["python_gauss"])
    )
    np.random.set_state(
        (
            state["numpy_name"],
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_gauss"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
