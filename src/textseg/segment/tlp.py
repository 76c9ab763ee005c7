"""PEARL's text-aware Laplacian propagation (TLP): a logit refinement after the dense features.

``PGSmall/PEARL pearl/prop.py`` (``TLP``), applied by ``pearl_ovss.py`` to the per-prompt cosine logits at
the original image size, before the logit scale. With ``T`` the normalised prompt embeddings:

* text affinity ``S = rownorm(softmax_row(T T^T / 0.5) + 10 I)`` (``C x C``);
* the image and logits are average-pooled by ``(round(H / grid), round(W / grid))`` (``grid`` 80;
  Cityscapes 224), ``p = softmax_c(logits)``;
* data weight ``c = max(max_c p, 0.05)^2 (1 + clamp(sum_c S_cc p_c^2, 0, 1))``;
* edge weights between horizontal / vertical neighbours: ``exp(-5 g / mean(g))`` with ``g`` the absolute
  grey-level difference (grey ``0.299 r + 0.587 g + 0.114 b`` of the network input), times
  ``1 + clamp(sum_c S_cc p_jc p_ic, 0, 1)``, clamped to ``[0, 1]``;
* solve ``(diag(c) + L) F = c * logits`` with ``L`` the weighted graph operator of PEARL's
  ``_apply_laplacian`` by 25 conjugate-gradient steps from ``F = logits``; bilinear upsampling back.

``S`` enters through its diagonal only: PEARL writes ``einsum('cc,bcij->bcij', S, p)``, which torch
evaluates as ``diag(S) * p``; textseg computes the same. The official code takes batch 1 (its gradient means are over the whole batch); textseg takes them per
image, so a batch equals image-by-image runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TLP_GRID = 80
TLP_ITERS = 25
_EPS = 1e-6


def text_affinity(text: torch.Tensor, tau: float = 0.5, diag: float = 10.0) -> torch.Tensor:
    """``C x D`` prompt embeddings -> PEARL's row-stochastic ``C x C`` text affinity ``S``."""
    t = F.normalize(text.float(), dim=-1)
    s = torch.softmax(t @ t.T / max(tau, _EPS), dim=1)
    s = s + diag * torch.eye(s.shape[0], device=s.device, dtype=s.dtype)
    return s / (s.sum(dim=1, keepdim=True) + _EPS)


def _graph(f: torch.Tensor, wh: torch.Tensor, wv: torch.Tensor) -> torch.Tensor:
    """PEARL's ``_apply_laplacian``, the weighted graph Laplacian ``(L f)_i = sum_j w_ij (f_i - f_j)`` over
    horizontal / vertical neighbours."""
    out = torch.zeros_like(f)
    dh = wh * (f[..., :, 1:] - f[..., :, :-1])
    out[..., :, 1:] += dh
    out[..., :, :-1] -= dh
    dv = wv * (f[..., 1:, :] - f[..., :-1, :])
    out[..., 1:, :] += dv
    out[..., :-1, :] -= dv
    return out


def laplacian_propagation(image: torch.Tensor, logits: torch.Tensor, text: torch.Tensor,
                          grid: int = TLP_GRID, iterations: int = TLP_ITERS) -> torch.Tensor:
    """Refine ``B x C x H x W`` cosine ``logits`` of the ``C x D`` prompt embeddings ``text`` with the
    ``B x 3 x H x W`` normalised RGB network input ``image`` (same size) by PEARL's TLP (module
    docstring); returns ``B x C x H x W`` in ``logits``' dtype."""
    b, c, h, w = logits.shape
    s = text_affinity(text).to(logits.device)
    sh, sw = max(1, round(h / float(grid))), max(1, round(w / float(grid)))
    img, z = image.float(), logits.float()
    if sh > 1 or sw > 1:
        img = F.avg_pool2d(img, (sh, sw), (sh, sw))
        z = F.avg_pool2d(z, (sh, sw), (sh, sw))
    p = z.softmax(dim=1)

    diag = s.diagonal()[None, :, None, None]

    def mix(x):  # the official einsum('cc,bcij->bcij', S, x): torch reads it as diag(S) * x
        return diag * x

    agree = (p * mix(p)).sum(dim=1, keepdim=True).clamp(0.0, 1.0)
    conf = p.amax(dim=1, keepdim=True).clamp_min(0.05) ** 2 * (1.0 + agree)
    grey = 0.299 * img[:, 0:1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:3]
    gx = (grey[..., :, 1:] - grey[..., :, :-1]).abs()
    gy = (grey[..., 1:, :] - grey[..., :-1, :]).abs()
    gain_h = 1.0 + (p[..., :, 1:] * mix(p[..., :, :-1])).sum(dim=1, keepdim=True).clamp(0.0, 1.0)
    gain_v = 1.0 + (p[..., 1:, :] * mix(p[..., :-1, :])).sum(dim=1, keepdim=True).clamp(0.0, 1.0)
    mean = (1, 2, 3)  # per image (the official: over the batch, which it runs one image at a time)
    wh = (torch.exp(-5.0 * gx / (gx.mean(dim=mean, keepdim=True) + _EPS)) * gain_h).clamp(0.0, 1.0)
    wv = (torch.exp(-5.0 * gy / (gy.mean(dim=mean, keepdim=True) + _EPS)) * gain_v).clamp(0.0, 1.0)

    def op(x):
        return conf * x + _graph(x, wh, wv)

    dims = (1, 2, 3)
    x = z.clone()
    r = conf * z - op(x)
    d = r.clone()
    rs = (r * r).sum(dim=dims, keepdim=True)
    for _ in range(iterations):
        ad = op(d)
        alpha = rs / ((d * ad).sum(dim=dims, keepdim=True) + 1e-12)
        x = x + alpha * d
        r = r - alpha * ad
        rs_new = (r * r).sum(dim=dims, keepdim=True)
        d = r + rs_new / (rs + 1e-12) * d
        rs = rs_new
    if sh > 1 or sw > 1:
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x.to(logits.dtype)
