"""OpenAI-identical preprocessing: sizes/offsets as torchvision's Resize + CenterCrop, PIL bicubic,
mean/std; numpy and tensor inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from textseg.models.base import OPENAI_MEAN, OPENAI_STD, PreprocessCfg
from textseg.preprocess import Preprocess, crop_box, preprocess, preprocess_batch, resized_size


def _photo(w=64, h=48, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    return Image.fromarray((0.7 * base + 0.3 * rng.integers(0, 256, (h, w, 3))).astype(np.uint8))


def test_sizes_match_torchvision_rules():
    assert resized_size(640, 480, 224) == (298, 224)  # int(224 * 640 / 480) = 298
    assert resized_size(480, 640, 224) == (224, 298)
    assert resized_size(500, 333, 224) == (336, 224)  # int(336.336...)
    assert crop_box(298, 224, 224) == (37, 0, 261, 224)  # round(37.0)
    assert crop_box(299, 225, 224) == (38, 0, 262, 224)  # round(37.5) -> 38 (banker's: 38)


def test_pil_path_equals_hand_computation():
    img = _photo(64, 48)
    cfg = PreprocessCfg(image_size=32)
    out = preprocess(img, cfg)
    assert out.shape == (3, 32, 32)
    ref = img.resize((42, 32), Image.BICUBIC).crop((5, 0, 37, 32))  # int(32*64/48)=42; round(5.0)
    arr = torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(OPENAI_MEAN)[:, None, None], torch.tensor(OPENAI_STD)[:, None, None]
    torch.testing.assert_close(out, (arr - mean) / std, atol=0, rtol=0)


def test_numpy_and_modes_and_tensors():
    img = _photo(50, 70, seed=1)
    cfg = PreprocessCfg(image_size=24, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    pil = preprocess(img, cfg)
    torch.testing.assert_close(preprocess(np.asarray(img), cfg), pil, atol=0, rtol=0)
    torch.testing.assert_close(preprocess(img.convert("RGBA"), cfg), pil, atol=0, rtol=0)
    gray = preprocess(img.convert("L"), cfg)
    assert gray.shape == (3, 24, 24) and torch.equal(gray[0], gray[1])
    t = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    approx = preprocess(t, cfg)
    assert approx.shape == pil.shape
    assert (approx - pil).abs().mean() < 0.03  # antialiased bicubic vs PIL: a few 1/255 levels
    torch.testing.assert_close(preprocess(t.float() / 255, cfg), approx, atol=1e-5, rtol=0)
    batch = preprocess_batch([img, np.asarray(img)], cfg)
    assert batch.shape == (2, 3, 24, 24)
    assert preprocess(img, cfg, crop=False).shape == (3, 33, 24)  # int(24 * 70 / 50) = 33
    assert "size=24" in repr(Preprocess(cfg))
    with pytest.raises(Exception, match="3 x H x W"):
        preprocess(torch.zeros(4, 8, 8), cfg)
