"""Seeing results: a label palette, label-map PNGs and overlays with a legend of colours and names.

- :func:`palette` gives label ``i`` a fixed colour (PASCAL VOC's bit-interleaved palette, so the
  first labels look like VOC's; ``background`` is black; beyond 254 labels golden-ratio hues).
- :func:`save_label_map` writes the label map as a palette PNG whose pixel value is the label index
  (255 = unlabelled), or a 16-bit grayscale PNG when there are more than 255 labels.
- :func:`overlay` tints the image with label colours (background left untinted), outlines region
  borders and draws a legend (colour, name, share of pixels) — always at the input image's size.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

UNLABELLED = 255
UNLABELLED_COLOUR = (224, 224, 192)
BACKGROUND_COLOUR = (0, 0, 0)
_FONT_NAMES = ("DejaVuSans.ttf", "LiberationSans-Regular.ttf", "Arial.ttf")


def _voc_colour(i: int) -> tuple[int, int, int]:
    r = g = b = 0
    c = i
    for j in range(8):
        r |= ((c >> 0) & 1) << (7 - j)
        g |= ((c >> 1) & 1) << (7 - j)
        b |= ((c >> 2) & 1) << (7 - j)
        c >>= 3
    return r, g, b


def palette(labels: Sequence[str] | int, background_index: int | None = None) -> np.ndarray:
    """``N x 3`` uint8 colours for ``N`` labels (or a count); ``background`` (by name or index) is black."""
    n = labels if isinstance(labels, int) else len(labels)
    out = np.zeros((n, 3), np.uint8)
    for i in range(n):
        if i < 254:
            out[i] = _voc_colour(i + 1)
        else:
            h = (i * 0.6180339887) % 1.0
            out[i] = [round(255 * c) for c in colorsys.hsv_to_rgb(h, 0.75, 0.95)]
    if not isinstance(labels, int):
        for i, name in enumerate(labels):
            if name.lower() == "background":
                out[i] = BACKGROUND_COLOUR
    if background_index is not None and 0 <= background_index < n:
        out[background_index] = BACKGROUND_COLOUR
    return out


def label_map_image(label_map: np.ndarray, labels: Sequence[str], background_index: int | None = None) -> Image.Image:
    """``label_map`` (``H x W`` label indices, 255 = unlabelled when <= 255 labels) as a palette image
    whose pixel value is the label index, or a 16-bit grayscale image beyond 255 labels."""
    if len(labels) > 255:
        return Image.fromarray(label_map.astype(np.uint16, copy=False))
    img = Image.fromarray(label_map.astype(np.uint8, copy=False), mode="P")
    pal = np.zeros((256, 3), np.uint8)
    pal[: len(labels)] = palette(labels, background_index)
    pal[UNLABELLED] = UNLABELLED_COLOUR
    img.putpalette(pal.reshape(-1).tolist())
    return img


def save_label_map(path: str | Path, label_map: np.ndarray, labels: Sequence[str],
                   background_index: int | None = None) -> Path:
    """Write :func:`label_map_image` as a PNG."""
    from textseg.io import save_image

    return save_image(label_map_image(label_map, labels, background_index), path, optimize=False)


@lru_cache(maxsize=16)
def _font(size: int):
    for name in _FONT_NAMES:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _borders(lm: np.ndarray) -> np.ndarray:
    edge = np.zeros(lm.shape, bool)
    edge[:, 1:] |= lm[:, 1:] != lm[:, :-1]
    edge[1:, :] |= lm[1:, :] != lm[:-1, :]
    return edge


def overlay(image: Image.Image, label_map: np.ndarray, labels: Sequence[str], *, alpha: float = 0.55,
            background_index: int | None = None, fractions: dict[str, float] | None = None,
            legend: bool = True, max_legend: int = 12, band_rows: int = 1024) -> Image.Image:
    """RGB image of ``image``'s size: label colours blended in, region borders darkened, legend
    (colour swatch, name, pixel share) in the top-left corner, largest labels first."""
    image = image.convert("RGB")
    w, h = image.size
    if label_map.shape != (h, w):
        raise ValueError(f"label map {label_map.shape} does not match the image ({h}, {w})")
    n = len(labels)
    colours = np.zeros((max(n, 256), 3), np.float32)
    colours[:n] = palette(labels, background_index)
    weight = np.zeros(max(n, 256), np.float32)
    weight[:n] = alpha
    if background_index is not None and background_index < n:
        weight[background_index] = 0.0
    for i, name in enumerate(labels):
        if name.lower() == "background":
            weight[i] = 0.0
    if n <= UNLABELLED:
        weight[UNLABELLED] = 0.0
    out = np.empty((h, w, 3), np.uint8)
    src = np.asarray(image)
    for y0 in range(0, h, band_rows):  # bands keep memory small on huge images
        y1 = min(h, y0 + band_rows)
        lm = label_map[max(0, y0 - 1) : y1].astype(np.int64)
        edge = _borders(lm)[(1 if y0 > 0 else 0) :]
        lm = lm[(1 if y0 > 0 else 0) :]
        a = weight[lm][..., None]
        blended = src[y0:y1].astype(np.float32) * (1 - a) + colours[lm] * a
        blended[edge] *= 0.35
        out[y0:y1] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
    result = Image.fromarray(out)
    if legend and n:
        _draw_legend(result, labels, label_map, background_index, fractions, max_legend)
    return result


def _draw_legend(img: Image.Image, labels, label_map, background_index, fractions, max_legend) -> None:
    w, h = img.size
    if fractions is None:
        counts = np.bincount(label_map.reshape(-1).astype(np.int64), minlength=len(labels))[: len(labels)]
        fractions = {name: c / label_map.size for name, c in zip(labels, counts)}
    present = sorted((i for i, name in enumerate(labels) if fractions.get(name, 0) > 0),
                     key=lambda i: -fractions[labels[i]])
    if not present or min(w, h) < 24:
        return
    size = int(np.clip(min(w, h) / 22, 11, 48))
    font = _font(size)
    pal = palette(labels, background_index)
    rows = [(tuple(int(c) for c in pal[i]), f"{labels[i][:40]}  {100 * fractions[labels[i]]:.1f}%") for i in present]
    if len(rows) > max_legend:
        rest = len(rows) - (max_legend - 1)
        rows = rows[: max_legend - 1] + [(None, f"+ {rest} more")]
    pad, line = max(2, size // 4), int(size * 1.35)
    draw = ImageDraw.Draw(img, "RGBA")
    text_w = max(draw.textlength(t, font=font) for _, t in rows)
    box_w = min(w, int(pad * 3 + size + text_w))
    box_h = min(h, pad * 2 + line * len(rows))
    draw.rectangle([0, 0, box_w, box_h], fill=(0, 0, 0, 150))
    for r, (colour, text) in enumerate(rows):
        y = pad + r * line
        if y + size > h:
            break
        x = pad
        if colour is not None:
            draw.rectangle([x, y, x + size, y + size], fill=colour + (255,), outline=(255, 255, 255, 255))
        draw.text((x + size + pad, y), text, fill=(255, 255, 255, 255), font=font)
