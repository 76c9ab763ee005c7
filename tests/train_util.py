"""Shared check for the training recipes: a run stopped part-way and resumed from its checkpoint
ends in the same state as an uninterrupted run, and leaves a native model file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from textseg.train.checkpoint import checkpoint_path, load_checkpoint


def assert_same(a, b, where: str = "") -> None:
    """Nested dicts / lists of tensors and plain values are bit-identical."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def stop_resume_matches(build_trainer: Callable, train: Callable, make_cfg: Callable[[Path], object],
                        tmp_path: Path, steps: int, stop_at: int) -> Path:
    """Train ``steps`` uninterrupted; train again, stop after ``stop_at`` (checkpointed), rerun the
    recipe (it resumes, ``train.resume=auto``): model, optimizer and scheduler state at ``steps``
    equal the uninterrupted run's. ``make_cfg(out_dir)`` must set ``train.log_every=1``. Returns
    the resumed run's model file."""
    full = Path(train(make_cfg(tmp_path / "full"))["weights"])
    part = build_trainer(make_cfg(tmp_path / "part"))
    part.callbacks.append(lambda t: t.stop() if t.step == stop_at else None)
    part.fit()
    assert part.step == stop_at
    result = train(make_cfg(tmp_path / "part"))
    assert result["step"] == steps
    logged = [e["step"] for e in map(json.loads, (tmp_path / "part" / "log.jsonl").read_text().splitlines())
              if e["kind"] == "train"]
    assert logged == list(range(1, steps + 1))  # the resumed run continued at stop_at + 1
    want = load_checkpoint(checkpoint_path(tmp_path / "full" / "checkpoints", steps))
    got = load_checkpoint(checkpoint_path(tmp_path / "part" / "checkpoints", steps))
    for key in ("model", "optimizer", "scheduler", "ema"):
        assert_same(want[key], got[key], key)
    weights = Path(result["weights"])
    assert weights == tmp_path / "part" / "model.safetensors" and weights.is_file() and full.is_file()
    return weights
