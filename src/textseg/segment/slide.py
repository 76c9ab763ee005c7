"""Geometry of dense inference: resizing, sliding-window crops, logit stitching, banded upsampling.

Everything lives on a *canvas*: the resized image divided into cells of ``cell`` pixels (the model's
``dense_stride``), so crops, strides and the resized size are multiples of ``cell`` and every crop's
dense map lands exactly on canvas cells. Logits of overlapping crops are averaged per cell (as in
mmseg's slide inference). The final per-pixel maps at the original size are produced by separable
bilinear interpolation (index gathers, never an interpolation matrix) in bands of rows and chunks of
columns, so a 20,000 x 20,000 image, or a 65,535 x 1 one, needs memory for one band only.
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


def _lerp_index(n_out: int, n_in: int, start: int, stop: int, device=None):
    """Source indices ``i0, i1`` and weight ``w1`` of output positions ``start:stop`` of 1-D bilinear
    interpolation ``n_in -> n_out``, as ``F.interpolate(..., align_corners=False)`` computes them:
    ``src = (dst + 0.5) * n_in / n_out - 0.5`` clamped at 0. O(stop - start) memory."""
    src = ((torch.arange(start, stop, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w1 = (src - i0).to(torch.float32)
    return i0.to(device), i1.to(device), w1.to(device)


def lerp_axis(x: torch.Tensor, dim: int, n_out: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Output positions ``start:stop`` of ``x`` bilinearly resized to ``n_out`` along ``dim`` (two
    gathers and a weighted sum: no ``n_out x n_in`` matrix is ever built)."""
    stop = n_out if stop is None else stop
    i0, i1, w1 = _lerp_index(n_out, x.shape[dim], start, stop, x.device)
    shape = [1] * x.dim()
    shape[dim] = stop - start
    w1 = w1.to(x.dtype).view(shape)
    a, b = x.index_select(dim, i0), x.index_select(dim, i1)
    return torch.lerp(a, b, w1)


def _bands(n: int, h: int, w: int, height: int, width: int, budget: int, whole_channels: bool):
    """Row band, class chunk and column chunk so every working buffer holds about ``budget`` values."""
    band = max(1, min(height, budget // max(1, width)))
    cchunk = n if whole_channels else max(1, min(n, budget // max(1, band * max(w, 1))))
    xchunk = max(1, min(width, budget // max(1, cchunk * band)))
    return band, cchunk, xchunk


def upsample_bands(
    logits: torch.Tensor, size: tuple[int, int], budget: int = BAND_BUDGET, whole_channels: bool = False
) -> Iterator[tuple[int, int, int, torch.Tensor]]:
    """Bilinear upsampling of ``N x h x w`` logits to ``N x H x W`` in pieces.

    Yields ``(y0, y1, c0, block)`` with ``block`` = rows ``y0:y1`` of classes ``c0:c0+len(block)``,
    each piece at most ``budget`` elements (classes are split too when there are very many, unless
    ``whole_channels``: then every block holds all N channels of its rows, at least one row).
    Identical to ``F.interpolate(..., mode="bilinear", align_corners=False)``; memory is bounded by
    the blocks, whatever the aspect ratio.
    """
    n, h, w = logits.shape
    height, width = size
    band, cchunk, xchunk = _bands(n, h, w, height, width, budget, whole_channels)
    for y0 in range(0, height, band):
        y1 = min(height, y0 + band)
        for c0 in range(0, n, cchunk):
            rows = lerp_axis(logits[c0 : c0 + cchunk], 1, height, y0, y1)  # c x band x w
            if xchunk >= width:
                yield y0, y1, c0, lerp_axis(rows, 2, width)
                continue
            block = rows.new_empty(rows.shape[0], y1 - y0, width)
            for x0 in range(0, width, xchunk):
                x1 = min(width, x0 + xchunk)
                block[:, :, x0:x1] = lerp_axis(rows, 2, width, x0, x1)
            yield y0, y1, c0, block  # c x band x W


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
    (uint8 when N <= 255, else int32), computed band by band (rows, classes and columns chunked)
    within about ``budget`` values per buffer. Ties go to the lowest class index."""
    n, h, w = logits.shape
    height, width = size
    out = np.empty(size, dtype=np.uint8 if n <= 255 else np.int32)
    band, cchunk, xchunk = _bands(n, h, w, height, width, budget, False)
    for y0 in range(0, height, band):
        y1 = min(height, y0 + band)
        best = torch.full((y1 - y0, width), -torch.inf, dtype=logits.dtype, device=logits.device)
        arg = torch.zeros((y1 - y0, width), dtype=torch.int32, device=logits.device)
        for c0 in range(0, n, cchunk):
            rows = lerp_axis(logits[c0 : c0 + cchunk], 1, height, y0, y1)  # c x band x w
            for x0 in range(0, width, xchunk):
                x1 = min(width, x0 + xchunk)
                m, a = lerp_axis(rows, 2, width, x0, x1).max(dim=0)  # band x (x1 - x0)
                if c0 == 0:
                    best[:, x0:x1], arg[:, x0:x1] = m, a.to(torch.int32)
                else:
                    upd = m > best[:, x0:x1]
                    best[:, x0:x1] = torch.where(upd, m, best[:, x0:x1])
                    arg[:, x0:x1] = torch.where(upd, (a + c0).to(torch.int32), arg[:, x0:x1])
        out[y0:y1] = arg.cpu().numpy()
    return out
