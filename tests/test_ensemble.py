"""EnsembleEvaluator: a CLIP-like judge whose cosine is the mean of its members' cosines (CLIMS' evaluator option)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from textseg.errors import TextsegError
from textseg.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from textseg.models.ensemble import EnsembleEvaluator


def _clip(seed: int, image_size: int = 32) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(CLIPConfig(embed_dim=16, vision=VisionConfig(image_size=image_size, layers=1, width=32, patch_size=8,
                                                             heads=2),
                           text=TextConfig(context_length=16, width=32, heads=2, layers=1))).eval()


def test_ensemble_cosine_is_the_mean_of_the_members_cosines():
    members = [_clip(0), _clip(1), _clip(2)]
    ens = EnsembleEvaluator(members)
    x = torch.randn(4, 3, 32, 32)
    words = ["a photo of boat.", "a photo of water.", "sky"]
    with torch.no_grad():
        got = F.normalize(ens.encode_image(x), dim=-1) @ F.normalize(ens.embed_texts(words), dim=-1).t()
        want = torch.stack([F.normalize(m.encode_image(x), dim=-1) @ m.embed_texts(words).t() for m in members]).mean(0)
    assert got.shape == (4, 3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.allclose(ens.encode_image(x).norm(dim=-1), torch.ones(4), atol=1e-5)  # unit norm as it comes
    want_scale = torch.stack([m.logit_scale_value.detach() for m in members]).mean()
    assert float(ens.logit_scale_value) == pytest.approx(float(want_scale))


def test_clims_through_an_ensemble_scores_the_mean_similarity():
    """CLIMS' s(fg, t_k) and s(bg, t_k) with the ensemble are the means of each member's own, and the loss is
    differentiable through every member to the maps."""
    from textseg.wsss.clims import CLIMSLoss

    members = [_clip(3), _clip(4)]
    classes = ["boat", "cow"]
    maps = torch.rand(2, 2, 6, 6, requires_grad=True)
    images, labels = torch.rand(2, 3, 48, 48), torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    out = CLIMSLoss(EnsembleEvaluator(members), classes, "voc")(maps, images, labels)
    each = [CLIMSLoss(m, classes, "voc")(maps, images, labels) for m in members]
    for key in ("s_fg", "s_bg"):
        torch.testing.assert_close(out[key], (each[0][key] + each[1][key]) / 2, atol=1e-5, rtol=0)
    out["loss"].backward()
    assert maps.grad is not None and maps.grad.abs().sum() > 0


def test_ensemble_errors_and_loading(tmp_path):
    from textseg.train.cam import load_evaluator
    from textseg.weights.load import save_model

    with pytest.raises(TextsegError, match="at least 2"):
        EnsembleEvaluator([_clip(0)])
    with pytest.raises(TextsegError, match="disagree on their input"):
        EnsembleEvaluator([_clip(0), _clip(1, image_size=64)])
    ens = EnsembleEvaluator([_clip(0), _clip(1)])
    with pytest.raises(TextsegError, match="embed_texts"):
        ens.tokenize(["boat"])
    with pytest.raises(TextsegError, match="dense"):
        ens.encode_dense(torch.zeros(1, 3, 32, 32))
    for i in (0, 1):
        save_model(_clip(i), tmp_path / f"m{i}.safetensors", {"source": "test"})
    a, b = tmp_path / "m0.safetensors", tmp_path / "m1.safetensors"
    loaded = load_evaluator("", f"{a},{b}")
    assert isinstance(loaded, EnsembleEvaluator) and len(loaded.members) == 2
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(x), ens.encode_image(x), atol=1e-5, rtol=0)
    assert not isinstance(load_evaluator("", str(a)), EnsembleEvaluator)  # one path: the model itself
    with pytest.raises(TextsegError, match="empty path"):
        load_evaluator("", f"{a},")
