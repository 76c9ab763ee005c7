"""Every architecture of the model registry (``textseg.models.registry.MODELS``), as timm's
``test_models.py``: build from a tiny config, forward, dense output shape in every dense mode, and a
native save -> ``load_model`` round trip giving equal outputs.

A new registry entry needs its tiny config in :data:`TINY` (``test_every_architecture_has_a_tiny_config``
fails until it has one)."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch

from textseg.models.base import DualEncoder
from textseg.models.clip import CLIPConfig, TextConfig, VisionConfig
from textseg.models.groupvit import GroupViTCfg, GroupViTVisionCfg
from textseg.models.lseg import LSegConfig
from textseg.models.registry import MODELS, build_model
from textseg.weights.load import load_model, save_model

TINY_TEXT = TextConfig(width=32, heads=2, layers=1)
TINY: dict[str, dict] = {
    "clip": CLIPConfig(embed_dim=16, vision=VisionConfig(image_size=32, layers=2, width=32, patch_size=16, heads=2),
                       text=TINY_TEXT).to_dict(),
    "groupvit": asdict(GroupViTCfg(
        vision=GroupViTVisionCfg(image_size=32, patch_size=8, width=32, heads=2, depths=(1, 1),
                                 num_group_tokens=(4, 0), num_output_groups=(4, 0)),
        text=TINY_TEXT, embed_dim=16, proj_hidden=32)),
    "lseg": LSegConfig(backbone="vit", text_encoder="clip", embed_dim=16, features=8, vit_patch=16, vit_width=32,
                       vit_layers=4, vit_heads=2, vit_image_size=64, vit_hooks=(0, 1, 2, 3),
                       vit_reassemble=(8, 16, 32, 32), text_cfg=asdict(TINY_TEXT), image_size=64).to_dict(),
    "offline": {},  # the real packaged EfficientNet-Lite0 + MiniLM + bridge + dense head
    "offline-bridge": {},  # the same without the dense head (the v1 default)
    "lit": {"image_variant": "lite0", "embed_dim": 16},  # heads on the packaged towers
    "cam": {"class_names": ["a cat", "grass", "a red car"], "backbone": "tiny", "image_size": 32},  # = LABELS
}
# extra configs of a registered architecture worth covering (id -> (architecture, config))
VARIANTS = {
    "clip-resnet": ("clip", CLIPConfig(embed_dim=16, vision=VisionConfig(image_size=64, layers=(1, 1, 1, 1), width=8,
                                                                          heads=2), text=TINY_TEXT).to_dict()),
}
CASES = {**{a: (a, c) for a, c in TINY.items()}, **VARIANTS}
LABELS = ["a cat", "grass", "a red car"]


@pytest.fixture(scope="module")
def built():
    cache: dict[str, DualEncoder] = {}

    def get(case: str) -> DualEncoder:
        if case not in cache:
            arch, cfg = CASES[case]
            torch.manual_seed(0)
            cache[case] = build_model(arch, cfg).eval()
        return cache[case]

    return get


def _pixels(model: DualEncoder, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 3, 64, 64)


def test_every_architecture_has_a_tiny_config():
    assert set(TINY) == set(MODELS)


@pytest.mark.parametrize("case", list(CASES))
def test_build_and_forward(case, built):
    model = built(case)
    assert isinstance(model, DualEncoder) and model.name == CASES[case][0]
    pixels = _pixels(model)
    tokens = model.tokenize(LABELS)
    with torch.no_grad():
        per_image, per_text = model(pixels, tokens)
    assert per_image.shape == (2, len(LABELS)) and per_text.shape == (len(LABELS), 2)
    assert torch.isfinite(per_image).all()
    torch.testing.assert_close(per_text, per_image.t())


@pytest.mark.parametrize("case", list(CASES))
def test_dense_output_shape_per_mode(case, built):
    model = built(case)
    pixels = _pixels(model)
    text = model.embed_texts(LABELS)
    h = w = math.ceil(64 / model.dense_stride)
    assert model.dense_modes
    for mode in model.dense_modes:
        with torch.no_grad():
            dense = model.encode_dense(pixels, mode)
            logits = model.dense_logits(dense, text)
        assert dense.shape[0] == 2 and dense.shape[-2:] == (h, w), (mode, dense.shape)
        assert logits.shape == (2, len(LABELS), h, w), mode
        assert torch.isfinite(logits).all(), mode


@pytest.mark.parametrize("case", list(CASES))
def test_save_load_round_trip(case, built, tmp_path):
    model = built(case)
    save_model(model, tmp_path / "m.safetensors", {"source": "test_models"})
    back = load_model(weights=tmp_path / "m.safetensors")
    assert type(back) is type(model) and back.config_dict() == model.config_dict()
    assert back.preprocess_cfg == model.preprocess_cfg and back.card["source"] == "test_models"
    pixels = _pixels(model)
    with torch.no_grad():
        a, b = model(pixels, model.tokenize(LABELS))[0], back(pixels, back.tokenize(LABELS))[0]
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        mode = model.dense_modes[0]
        torch.testing.assert_close(back.encode_dense(pixels, mode), model.encode_dense(pixels, mode), rtol=0, atol=0)
