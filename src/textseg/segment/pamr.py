"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, "Single-Stage Semantic Segmentation from
Image Labels", CVPR 2020), as used by SCLIP / NACLIP as a post-step.

Each pixel's scores are replaced, ``iterations`` times, by an affinity-weighted average of its 8
neighbours at every dilation. Affinities come from the image: ``softmax_p(-mean_c |x - x_p| /
(1e-8 + 0.1 * std))`` where the standard deviation is taken over the centre and its neighbours
(once per dilation). Padding replicates the border, so a constant image with constant scores is
left exactly unchanged. Scores at another resolution are first resized to the image bilinearly with
``align_corners=True``, as the reference ``PAMR.forward`` does (NACLIP / SCLIP ``pamr.py``, from
visinf/1-stage-wseg).

Dilations: :data:`DEFAULT_DILATIONS` (1, 2, 4, 8, 12, 24) are the PAMR paper's;
:data:`NACLIP_DILATIONS` (8, 16) are SCLIP's and NACLIP's ``pamr_stride`` (10 iterations).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

DEFAULT_DILATIONS = (1, 2, 4, 8, 12, 24)
NACLIP_DILATIONS = (8, 16)
_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _neighbours(x: torch.Tensor, dilations: Sequence[int], with_centre: bool = False) -> torch.Tensor:
    """``B x C x H x W`` -> ``B x C x P x H x W``: the 8 neighbours at each dilation (replicate-padded),
    optionally preceded by the centre once per dilation."""
    h, w = x.shape[-2:]
    pad = max(dilations)
    xp = F.pad(x, [pad] * 4, mode="replicate")
    out = []
    for d in dilations:
        if with_centre:
            out.append(x)
        for dy, dx in _OFFSETS:
            y0, x0 = pad + dy * d, pad + dx * d
            out.append(xp[..., y0 : y0 + h, x0 : x0 + w])
    return torch.stack(out, dim=2)


def pamr_affinity(image: torch.Tensor, dilations: Sequence[int] = DEFAULT_DILATIONS) -> torch.Tensor:
    """``B x 3 x H x W`` image -> ``B x P x H x W`` neighbour weights (each pixel's sum to 1)."""
    image = image.float()
    std = _neighbours(image, dilations, with_centre=True).std(dim=2, keepdim=True)  # B x 3 x 1 x H x W
    diff = (image.unsqueeze(2) - _neighbours(image, dilations)).abs() / (1e-8 + 0.1 * std)
    return F.softmax(-diff.mean(dim=1), dim=1)


@torch.no_grad()
def pamr(
    image: torch.Tensor,
    scores: torch.Tensor,
    iterations: int = 10,
    dilations: Sequence[int] = DEFAULT_DILATIONS,
) -> torch.Tensor:
    """Refine ``B x N x H x W`` scores (logits or probabilities) with the ``B x 3 x H x W`` image.

    ``scores`` at another resolution are bilinearly resized to the image first (``align_corners=True``,
    the reference's). Memory: one ``B x N x H x W`` buffer per neighbour step (no ``N x P x H x W``
    tensor is built).
    """
    if scores.shape[-2:] != image.shape[-2:]:
        scores = F.interpolate(scores, size=image.shape[-2:], mode="bilinear", align_corners=True)
    aff = pamr_affinity(image, dilations).to(scores.dtype)  # B x P x H x W
    h, w = scores.shape[-2:]
    pad = max(dilations)
    for _ in range(iterations):
        sp = F.pad(scores, [pad] * 4, mode="replicate")
        out = torch.zeros_like(scores)
        p = 0
        for d in dilations:
            for dy, dx in _OFFSETS:
                y0, x0 = pad + dy * d, pad + dx * d
                out.addcmul_(aff[:, p : p + 1], sp[..., y0 : y0 + h, x0 : x0 + w])
                p += 1
        scores = out
    return scores
