"""Geometry of dense inference: resizing, sliding-window crops, logit stitching, banded upsampling.

Everything lives on a *canvas*: the resized image divided into cells of ``cell`` pixels (the model's
``dense_stride``), so crops, strides and the resized size are multiples of ``cell`` and every crop's
dense map lands exactly on canvas cells. Logits of overlapping crops are averaged per cell (as in
mmseg's slide inference). The final per-pixel maps at the original size are produced by separable
bilinear interpolation (two small matrix products) in bands of rows, so a 20,000 x 20,000 image
needs memory for one band only.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from textseg.errors import TextsegError

# Elements of one float32 working buffer during banded upsampling (64 MiB).
BAND_BUDGET = 1 << 24


def crop_boxes(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Sliding-window crops ``(y0, x0, y1, x1)`` covering a ``height x width`` image.

    Crops are ``min(crop, side)`` large; the last crop of a row/column is shifted back inside the
    image (mmseg's convention), so every crop has the same size.
    """
    if crop < 1 or stride < 1:
        raise TextsegError(f"slide crop and stride must be positive, got {crop} and {stride}")
    ch, cw = min(crop, height), min(crop, width)
    ny = max(height - ch + stride - 1, 0) // stride + 1
    nx = max(width - cw + stride - 1, 0) // stride + 1
    boxes = []
    for iy in range(ny):
        for ix in range(nx):
            y1 = min(iy * stride + ch, height)
            x1 = min(ix * stride + cw, width)
            boxes.append((y1 - ch, x1 - cw, y1, x1))
    return boxes


def stitch(
    crop_logits: torch.Tensor, boxes: list[tuple[int, int, int, int]], canvas_hw: tuple[int, int], cell: int
) -> torch.Tensor:
    """Average ``K x N x h' x w'`` crop logits over their overlaps on a ``N x H/cell x W/cell`` canvas.

    A crop whose dense map is not ``crop/cell`` large is bilinearly resized to it first.
    """
    n = crop_logits.shape[1]
    hc, wc = canvas_hw[0] // cell, canvas_hw[1] // cell
    if len(boxes) == 1 and tuple(crop_logits.shape[-2:]) == (hc, wc):
        return crop_logits[0]
    total = crop_logits.new_zeros(n, hc, wc)
    count = crop_logits.new_zeros(1, hc, wc)
    for logit, (y0, x0, y1, x1) in zip(crop_logits, boxes):
        size = ((y1 - y0) // cell, (x1 - x0) // cell)
        if tuple(logit.shape[-2:]) != size:
            logit = F.interpolate(logit[None], size=size, mode="bilinear", align_corners=False)[0]
        total[:, y0 // cell : y1 // cell, x0 // cell : x1 // cell] += logit
        count[:, y0 // cell : y1 // cell, x0 // cell : x1 // cell] += 1
    return total / count


def interp_matrix(n_out: int, n_in: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """``n_out x n_in`` matrix of 1-D bilinear interpolation weights, identical to
    ``F.interpolate(..., mode="bilinear", align_corners=False)`` along one axis."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w1 = src - i0
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, i0), 1 - w1, accumulate=True)
    m.index_put_((rows, i1), w1, accumulate=True)
    return m.to(dtype=dtype, device=device)


def upsample_bands(
    logits: torch.Tensor, size: tuple[int, int], budget: int = BAND_BUDGET, whole_channels: bool = False
) -> Iterator[tuple[int, int, int, torch.Tensor]]:
    """Bilinear upsampling of ``N x h x w`` logits to ``N x H x W`` in pieces.

    Yields ``(y0, y1, c0, block)`` with ``block`` = rows ``y0:y1`` of classes ``c0:c0+len(block)``,
    each piece at most ``budget`` elements (classes are split too when there are very many, unless
    ``whole_channels``: then every block holds all N channels of its rows, at least one row).
    """
    n, h, w = logits.shape
    height, width = size
    ry = interp_matrix(height, h, logits.dtype, logits.device)
    rxt = interp_matrix(width, w, logits.dtype, logits.device).t().contiguous()
    cchunk = n if whole_channels else max(1, min(n, budget // max(1, h * width)))
    band = max(1, min(height, budget // (cchunk * max(width, w))))
    for y0 in range(0, height, band):
        y1 = min(height, y0 + band)
        for c0 in range(0, n, cchunk):
            block = torch.matmul(ry[y0:y1], logits[c0 : c0 + cchunk])  # c x band x w
            yield y0, y1, c0, torch.matmul(block, rxt)  # c x band x W


def upsample(logits: torch.Tensor, size: tuple[int, int], max_elements: int = 1 << 28) -> torch.Tensor:
    """``N x h x w`` -> ``N x H x W`` bilinear (refused beyond ``max_elements``, 1 GiB of float32)."""
    n = logits.shape[0]
    if n * size[0] * size[1] > max_elements:
        raise TextsegError(
            f"full-resolution logits would hold {n} x {size[0]} x {size[1]} values (limit {max_elements}); "
            "use the label map, SegmentResult.logits_lowres or fewer labels"
        )
    out = logits.new_empty(n, *size)
    for y0, y1, c0, block in upsample_bands(logits, size):
        out[c0 : c0 + block.shape[0], y0:y1] = block
    return out


def argmax_bands(logits: torch.Tensor, size: tuple[int, int], budget: int = BAND_BUDGET) -> np.ndarray:
    """Per-pixel argmax of the bilinearly upsampled ``N x h x w`` logits at ``size`` -> ``H x W``
    (uint8 when N <= 255, else int32), computed band by band within ``budget``.

    Works in a label-last layout (``h x W x N``, then rows ``band x W x N``) so the reduction over
    labels is contiguous; classes are chunked only when there are very many."""
    n, h, w = logits.shape
    height, width = size
    out = np.empty(size, dtype=np.uint8 if n <= 255 else np.int32)
    ry = interp_matrix(height, h, logits.dtype, logits.device)
    rx = interp_matrix(width, w, logits.dtype, logits.device)
    cchunk = max(1, min(n, budget // max(1, h * width)))
    band = max(1, min(height, budget // (cchunk * width)))
    for y0 in range(0, height, band):
        y1 = min(height, y0 + band)
        best = arg = None
        for c0 in range(0, n, cchunk):
            zc = logits[c0 : c0 + cchunk]
            c = zc.shape[0]
            cols = torch.einsum("chw,Ww->hWc", zc, rx).reshape(h, width * c)  # h x (W*c)
            block = (ry[y0:y1] @ cols).view(y1 - y0, width, c)
            m, a = block.max(dim=-1)
            if best is None:
                best, arg = m, a
            else:
                upd = m > best
                best = torch.where(upd, m, best)
                arg = torch.where(upd, a + c0, arg)
        out[y0:y1] = arg.cpu().numpy()
    return out
