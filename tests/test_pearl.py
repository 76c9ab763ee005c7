"""PEARL (PGSmall/PEARL): the ``pearl`` dense mode (Procrustes-aligned last-block attention) and its
text-aware Laplacian propagation (``textseg.segment.tlp``), each against an independent transcription of
the official code (``clip/model.py`` + ``pearl/attn.py``; ``pearl/prop.py`` ``TLP.forward``, batch 1)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from textseg.models.clip_dense import PEARLCfg, pearl_attention
from textseg.segment.tlp import laplacian_propagation

sys.path.insert(0, str(Path(__file__).parent))
from test_dense_clip import _pa_attn, _unit, official_dense  # noqa: E402


@pytest.mark.parametrize("patch", [8, 14])
@pytest.mark.parametrize("cells", [(6, 6), (6, 10)])  # the checkpoint's grid; a non-square resized grid
def test_pearl_matches_the_official_code_on_12_blocks(deep_vits, patch, cells):
    model = deep_vits[patch]
    pixels = torch.randn(2, 3, cells[0] * patch, cells[1] * patch, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = model.encode_dense(pixels, mode="pearl")  # a batch of 2 ...
        refs = torch.cat([official_dense(model, pixels[i : i + 1], "pearl") for i in range(2)])  # ... 1 by 1
        naclip = model.encode_dense(pixels, mode="naclip")
    assert ours.shape == refs.shape == (2, 24, *cells)
    torch.testing.assert_close(_unit(ours), _unit(refs), atol=1e-4, rtol=0)
    torch.testing.assert_close(ours, refs, atol=1e-4, rtol=1e-4)
    assert (_unit(ours) - _unit(naclip)).abs().max() > 1e-2  # a mode of its own


def test_pearl_attention_terms_and_solvers():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=g) for _ in range(3))
    ref = _pa_attn(q.reshape(6, 17, 8), k.reshape(6, 17, 8), v.reshape(6, 17, 8)).reshape(2, 3, 17, 8)
    torch.testing.assert_close(pearl_attention(q, k, v), ref, atol=1e-5, rtol=1e-5)
    no_kk = _pa_attn(q.reshape(6, 17, 8), k.reshape(6, 17, 8), v.reshape(6, 17, 8), use_kk=False).reshape(ref.shape)
    torch.testing.assert_close(pearl_attention(q, k, v, PEARLCfg(use_kk=False)), no_kk, atol=1e-5, rtol=1e-5)
    assert (no_kk - ref).abs().max() > 1e-3
    ade = _pa_attn(q.reshape(6, 17, 8), k.reshape(6, 17, 8), v.reshape(6, 17, 8), alpha_kk=0.3).reshape(ref.shape)
    torch.testing.assert_close(pearl_attention(q, k, v, PEARLCfg(alpha_kk=0.3)), ade, atol=1e-5, rtol=1e-5)
    # the exact polar factor (svd) is what the Newton-Schulz iterations approximate: close, not equal
    svd = pearl_attention(q, k, v, PEARLCfg(solver="svd"))
    assert (svd - ref).abs().max() < 0.5 and not torch.allclose(svd, ref, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# TLP, transcribed from pearl/prop.py (TLP.bind_text + forward, batch 1)
# ----------------------------------------------------------------------------------------------
def official_tlp(image, logits, text, grid=80, eps=1e-6):
    tn = F.normalize(text, dim=-1)
    S = torch.softmax(tn @ tn.t() / max(0.5, eps), dim=1)
    S = S + 10.0 * torch.eye(S.size(0))
    S = S / (S.sum(dim=1, keepdim=True) + eps)
    B, C, H, W = logits.shape
    sh, sw = int(max(1, round(H / float(grid)))), int(max(1, round(W / float(grid))))
    if sh > 1 or sw > 1:
        img_s = F.avg_pool2d(image, kernel_size=(sh, sw), stride=(sh, sw), ceil_mode=False, count_include_pad=False)
        log_s = F.avg_pool2d(logits, kernel_size=(sh, sw), stride=(sh, sw), ceil_mode=False, count_include_pad=False)
    else:
        img_s, log_s = image, logits
    probs = torch.softmax(log_s, dim=1)
    conf = probs.max(dim=1, keepdim=True)[0]
    Sp = torch.einsum("cc,bcij->bcij", S, probs)
    agree = (probs * Sp).sum(dim=1, keepdim=True).clamp(0.0, 1.0)
    Cw = (conf.clamp_min(0.05) ** 2) * (1.0 + agree)
    gray = 0.299 * img_s[:, 0:1] + 0.587 * img_s[:, 1:2] + 0.114 * img_s[:, 2:3]
    gx = torch.abs(gray[:, :, :, 1:] - gray[:, :, :, :-1])
    gy = torch.abs(gray[:, :, 1:, :] - gray[:, :, :-1, :])
    gx, gy = gx / (gx.mean() + eps), gy / (gy.mean() + eps)
    g_h = (probs[:, :, :, 1:] * torch.einsum("cc,bcij->bcij", S, probs[:, :, :, :-1])).sum(dim=1, keepdim=True)
    g_v = (probs[:, :, 1:, :] * torch.einsum("cc,bcij->bcij", S, probs[:, :, :-1, :])).sum(dim=1, keepdim=True)
    w_h = (torch.exp(-5.0 * gx) * (1.0 + g_h.clamp(0.0, 1.0))).clamp_(0.0, 1.0)
    w_v = (torch.exp(-5.0 * gy) * (1.0 + g_v.clamp(0.0, 1.0))).clamp_(0.0, 1.0)
    w_h = torch.cat([torch.ones_like(w_h[:, :, :, :1]), w_h], dim=3)
    w_v = torch.cat([torch.ones_like(w_v[:, :, :1, :]), w_v], dim=2)

    def lap(Fx):
        diff_h = Fx[:, :, :, 1:] - Fx[:, :, :, :-1]
        out = torch.zeros_like(Fx)
        out[:, :, :, 1:] += w_h[:, :, :, 1:] * diff_h
        out[:, :, :, :-1] -= w_h[:, :, :, 1:] * diff_h
        diff_v = Fx[:, :, 1:, :] - Fx[:, :, :-1, :]
        out[:, :, 1:, :] += w_v[:, :, 1:, :] * diff_v
        out[:, :, :-1, :] -= w_v[:, :, 1:, :] * diff_v
        return out

    def A(X):
        return Cw * X + 1 * lap(X)

    Bt = Cw * log_s
    X = log_s.clone()
    R = Bt - A(X)
    P = R.clone()
    rsold = (R * R).sum(dim=(1, 2, 3), keepdim=True)
    for _ in range(25):
        AP = A(P)
        alpha = rsold / ((P * AP).sum(dim=(1, 2, 3), keepdim=True) + 1e-12)
        X = X + alpha * P
        R = R - alpha * AP
        rsnew = (R * R).sum(dim=(1, 2, 3), keepdim=True)
        P = R + rsnew / (rsold + 1e-12) * P
        rsold = rsnew
    if sh > 1 or sw > 1:
        X = F.interpolate(X, size=(H, W), mode="bilinear", align_corners=False)
    return X


def _tlp_inputs(b, c, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 3, h, w, generator=g)
    image[..., : h // 2, :] += 1.5  # an edge the propagation must respect
    logits = 0.3 * torch.randn(b, c, h, w, generator=g)
    return image, logits, torch.randn(c, 16, generator=g)


@pytest.mark.parametrize("size,grid", [((24, 40), 80), ((48, 80), 12)])  # on the full grid; pooled 4 x 7
def test_tlp_matches_the_official_code(size, grid):
    image, logits, text = _tlp_inputs(2, 5, *size, seed=6)
    ours = laplacian_propagation(image, logits, text, grid=grid)  # a batch of 2 ...
    refs = torch.cat([official_tlp(image[i : i + 1], logits[i : i + 1], text, grid) for i in range(2)])  # 1 by 1
    assert ours.shape == logits.shape
    torch.testing.assert_close(ours, refs, atol=1e-4, rtol=1e-4)
    assert (ours - logits).abs().max() > 1e-2  # it refines


def test_tlp_uses_only_the_diagonal_of_the_text_affinity():
    """PEARL writes ``einsum('cc,bcij->bcij', S, p)``, which torch reads as ``diag(S) * p`` (not ``S p``):
    pinned, and the label-text affinity therefore enters only through ``S``'s diagonal."""
    S = torch.rand(4, 4)
    p = torch.rand(1, 4, 3, 3)
    torch.testing.assert_close(torch.einsum("cc,bcij->bcij", S, p), S.diagonal()[None, :, None, None] * p)


@pytest.mark.parametrize("grid", [80, 10])  # 40 x 56 on its own grid; pooled by (4, 6)
def test_segmenter_tlp_is_pearls_predict(grid):
    """pearl_ovss.py predict: cosine logits -> bilinear to the original size; the network input -> the same;
    TLP there with the prompt embeddings; then the logit scale. SegmentCfg(propagation="tlp") is that."""
    import numpy as np
    from seg_tiny import TinyColourModel

    from textseg.errors import TextsegError
    from textseg.segment import SegmentCfg, Segmenter

    rng = np.random.default_rng(0)
    img = np.repeat(np.repeat(rng.integers(0, 256, (5, 7, 3)), 8, 0), 8, 1).astype(np.uint8)  # 40 x 56
    img = (img.astype(np.int64) + rng.integers(-20, 20, img.shape)).clip(0, 255).astype(np.uint8)
    words = ["red", "green", "blue", "yellow"]
    base = dict(short_side=None, templates=("a {}.",), threshold=None, resolution="pixel")
    model = TinyColourModel()
    plain = Segmenter(model, SegmentCfg(**base)).segment(img, ", ".join(words))
    refined = Segmenter(model, SegmentCfg(**base, propagation="tlp", tlp_grid=grid)).segment(img, ", ".join(words))
    x = torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255
    x = (x - 0.5) / 0.5  # TinyColourModel's mean / std
    scale = float(model.logit_scale_value)
    with torch.no_grad():
        text = model.encode_text(model.tokenize([f"a {w}." for w in words]))
    cos = F.interpolate(plain.logits_lowres[None], size=(40, 56), mode="bilinear", align_corners=False) / scale
    want = official_tlp(x, cos, text, grid)[0] * scale
    torch.testing.assert_close(refined.logits_lowres, want, atol=1e-4, rtol=1e-4)
    assert np.array_equal(refined.label_map, want.argmax(0).numpy())
    assert (refined.logits_lowres - cos[0] * scale).abs().max() > 1e-2
    with pytest.raises(TextsegError, match="drop pamr or propagation"):
        Segmenter(model, SegmentCfg(**base, propagation="tlp", pamr=True))
    with pytest.raises(TextsegError, match="propagation must be"):
        Segmenter(model, SegmentCfg(**base, propagation="crf"))


# ----------------------------------------------------------------------------------------------
# alpha_kk through SegmentCfg.mode_options (configs/cfg_ade20k.py, cfg_city_scapes.py: alpha_kk=0.3)
# ----------------------------------------------------------------------------------------------
def test_segmenter_mode_options_reach_pearl(deep_vits):
    import numpy as np

    from textseg.errors import TextsegError
    from textseg.segment import SegmentCfg, Segmenter

    model = deep_vits[8]
    img = (np.random.default_rng(3).random((48, 64, 3)) * 255).astype(np.uint8)
    base = dict(mode="pearl", short_side=None, templates=("a photo of a {}.",), threshold=None)
    seg = Segmenter(model, SegmentCfg(**base, mode_options={"alpha_kk": 0.3}))
    seg.set_image(img)
    pixels = seg._image_input
    with torch.no_grad():
        ref = official_dense(model, pixels, "pearl", alpha_kk=0.3)
        default = official_dense(model, pixels, "pearl")
    feats = seg._views[0].feats
    torch.testing.assert_close(_unit(feats), _unit(ref), atol=1e-4, rtol=0)
    torch.testing.assert_close(feats, ref, atol=1e-4, rtol=1e-4)
    assert (_unit(ref) - _unit(default)).abs().max() > 1e-2  # 0.3 is not the default 0.08
    plain = Segmenter(model, SegmentCfg(**base))
    plain.set_image(img)
    torch.testing.assert_close(plain._views[0].feats, default, atol=1e-4, rtol=1e-4)
    # label-free: the features are cached per image, the labels do not re-encode them
    seg.predict("cat, dog")
    assert seg._views[0].feats is feats
    with pytest.raises(TextsegError, match="unknown pearl option.*alpha_k\\b"):
        Segmenter(model, SegmentCfg(**base, mode_options={"alpha_k": 0.3})).set_image(img)
    with pytest.raises(TextsegError, match="'naclip' takes no options"):
        Segmenter(model, SegmentCfg(**base | {"mode": "naclip"}, mode_options={"alpha_kk": 0.3})).set_image(img)
    with pytest.raises(TextsegError, match="unknown pearl option"):
        model.encode_dense(pixels, mode="pearl", options={"beta": 1.0})
