"""Shared test fixtures: the real data in ../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TEXTSEG_SHARED_DATA", ROOT.parent / "shared" / "data"))

torch.set_num_threads(min(2, os.cpu_count() or 1))


def _data_dir(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent (real data lives in ../shared/data; CI has it)")
    return path


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    return _data_dir("coco-mini")


@pytest.fixture(scope="session")
def camvid() -> Path:
    return _data_dir("camvid")


@pytest.fixture(scope="session")
def flickr8k() -> Path:
    return _data_dir("flickr8k-1k")


@pytest.fixture(scope="module")
def deep_vits():
    """12-block tiny CLIP ViTs at patches 8 and 14 (SC-CLIP's / ResCLIP's / PEARL's block indices need 12)."""
    from test_dense_clip import tiny_vit

    return {8: tiny_vit(layers=12, patch=8, image_size=48), 14: tiny_vit(layers=12, patch=14, image_size=84)}
