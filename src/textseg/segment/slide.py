"""Geometry of dense inference: resizing, sliding-window crops, logit stitching, banded upsampling.

Everything lives on a *canvas*: the resized image divided into cells of ``cell`` pixels (the model's
``dense_stride``), so crops, strides and the resized size are multiples of ``cell`` and every crop's
dense map lands exactly on canvas cells. Logits of overlapping crops are averaged per cell (as in
mmseg's slide inference). The final per-pixel maps at the original size are produced by separable
bilinear interpolation (matrix products with blocks of the interpolation matrices, never the whole
``long side x cells`` one) in bands of rows and chunks of columns, so a 20,000 x 20,000 image, or
a 65,535 x 1 one, needs memory for one band only.
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


def interp_block(n_out: int, n_in: int, start: int = 0, stop: int | None = None, dtype=torch.float32,
                 device=None) -> torch.Tensor:
    """Rows ``start:stop`` of the ``n_out x n_in`` matrix of 1-D bilinear interpolation weights,
    identical to ``F.interpolate(..., mode="bilinear", align_corners=False)`` along one axis
    (``src = (dst + 0.5) * n_in / n_out - 0.5`` clamped at 0). Only the block is built: callers take
    the rows they need, so no ``long side x cells`` matrix is ever materialised."""
    stop = n_out if stop is None else stop
    src = ((torch.arange(start, stop, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w1 = (src - i0).to(dtype)
    m = torch.zeros(stop - start, n_in, dtype=dtype)
    rows = torch.arange(stop - start)
    m.index_put_((rows, i0), 1 - w1, accumulate=True)
    m.index_put_((rows, i1), w1, accumulate=True)
    return m.to(device=device)


def _column_blocks(width: int, w: int, xchunk: int, budget: int, dtype, device):
    """``(x0, x1, R^T)`` column blocks of the width interpolation, ``w x (x1 - x0)`` each: a list
    (built once) when the whole ``W x w`` matrix fits ``budget``, else a factory of a generator
    (rebuilt per band: memory for one block only)."""
    def blocks():
        for x0 in range(0, width, xchunk):
            x1 = min(width, x0 + xchunk)
            yield x0, x1, interp_block(width, w, x0, x1, dtype, device).t()

    return (lambda cached=list(blocks()): cached) if width * w <= budget else blocks


def upsample_bands(
    logits: torch.Tensor, size: tuple[int, int], budget: int = BAND_BUDGET, whole_channels: bool = False
) -> Iterator[tuple[int, int, int, torch.Tensor]]:
    """Bilinear upsampling of ``N x h x w`` logits to ``N x H x W`` in pieces.

    Yields ``(y0, y1, c0, block)`` with ``block`` = rows ``y0:y1`` of classes ``c0:c0+len(block)``,
    each piece at most ``budget`` elements (classes are split too when there are very many, unless
    ``whole_channels``: then every block holds all N channels of its rows, at least one row).
    Separable matrix products with blocks of the interpolation matrices (columns chunked too), so
    memory is bounded by ``budget`` whatever the aspect ratio.
    """
    n, h, w = logits.shape
    height, width = size
    cchunk = n if whole_channels else max(1, min(n, budget // max(1, h * width)))
    band = max(1, min(height, budget // (cchunk * max(width, w))))
    xchunk = max(1, min(width, budget // max(1, w)))  # a column block of R^T: w x xchunk
    cols = _column_blocks(width, w, xchunk, budget, logits.dtype, logits.device)
    for y0 in range(0, height, band):
        y1 = min(height, y0 + band)
        ry = interp_block(height, h, y0, y1, logits.dtype, logits.device)
        for c0 in range(0, n, cchunk):
            rows = torch.matmul(ry, logits[c0 : c0 + cchunk])  # c x band x w
            if xchunk >= width:
                yield y0, y1, c0, torch.matmul(rows, next(iter(cols()))[2])  # c x band x W
                continue
            block = rows.new_empty(rows.shape[0], y1 - y0, width)
            for x0, x1, rxt in cols():
                block[:, :, x0:x1] = torch.matmul(rows, rxt)
            yield y0, y1, c0, block


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
    (uint8 when N <= 255, else int32), computed band by band within about ``budget`` values per
    buffer (rows, classes and columns chunked; blocks of the interpolation matrices only).

    Works in a label-last layout (``h x W' x N``, then rows ``band x W' x N``) so the reduction over
    labels is contiguous. Ties go to the lowest class index."""
    n, h, w = logits.shape
    height, width = size
    out = np.empty(size, dtype=np.uint8 if n <= 255 else np.int32)
    cchunk = max(1, min(n, budget // max(1, h * width)))
    # h x xchunk x c label-last columns, and a w x xchunk block of R^T
    xchunk = max(1, min(width, budget // max(1, h * cchunk, w)))
    band = max(1, min(height, budget // (cchunk * xchunk)))
    cols = _column_blocks(width, w, xchunk, budget, logits.dtype, logits.device)
    for y0 in range(0, height, band):
        y1 = min(height, y0 + band)
        ry = interp_block(height, h, y0, y1, logits.dtype, logits.device)
        for x0, x1, rxt in cols():
            best = arg = None
            for c0 in range(0, n, cchunk):
                zc = logits[c0 : c0 + cchunk]
                c = zc.shape[0]
                lab = torch.einsum("chw,wX->hXc", zc, rxt).reshape(h, (x1 - x0) * c)  # h x (X*c)
                m, a = (ry @ lab).view(y1 - y0, x1 - x0, c).max(dim=-1)
                if best is None:
                    best, arg = m, a
                else:
                    upd = m > best
                    best = torch.where(upd, m, best)
                    arg = torch.where(upd, a + c0, arg)
            out[y0:y1, x0:x1] = arg.cpu().numpy()
    return out
