"""Image preprocessing identical to OpenAI CLIP's (without torchvision).

OpenAI's transform is ``Resize(n, BICUBIC)`` (short side to ``n``, long side ``int(n * long / short)``,
PIL's bicubic resampling) -> ``CenterCrop(n)`` (offsets ``round((H - n) / 2)``) -> RGB -> ``[0, 1]``
-> ``(x - mean) / std``. PIL images and ``H x W x 3`` uint8 arrays take exactly that path. Tensors
(``3 x H x W`` or ``B x 3 x H x W``, uint8 or float in ``[0, 1]``) are resized with
``F.interpolate(bicubic, antialias=True)``, which matches PIL to within a few 1/255 levels.

>>> pixels = preprocess(Image.open("cat.jpg"), model.preprocess_cfg)       # 3 x 224 x 224
>>> batch = preprocess_batch([img1, img2], model.preprocess_cfg)            # 2 x 3 x 224 x 224
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from textseg.errors import ImageError
from textseg.models.base import PreprocessCfg

_PIL_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
                "lanczos": Image.LANCZOS}


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """``(w, h)`` with the short side ``size`` and the long side ``int(size * long / short)``."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """Centre-crop box ``(left, top, right, bottom)`` as torchvision's ``CenterCrop``."""
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    return left, top, left + size, top + size


def _normalize(x: torch.Tensor, cfg: PreprocessCfg) -> torch.Tensor:
    mean = torch.tensor(cfg.mean, dtype=x.dtype).view(-1, 1, 1)
    std = torch.tensor(cfg.std, dtype=x.dtype).view(-1, 1, 1)
    return (x - mean) / std


def _pil(img: Image.Image, cfg: PreprocessCfg, crop: bool) -> torch.Tensor:
    from textseg.io import to_rgb

    img = to_rgb(img)
    size = cfg.image_size
    w, h = resized_size(img.width, img.height, size)
    img = img.resize((w, h), _PIL_FILTERS.get(cfg.interpolation, Image.BICUBIC))
    if crop:
        if w < size or h < size:  # only when a side rounds below size; pad like CenterCrop
            canvas = Image.new("RGB", (max(w, size), max(h, size)))
            canvas.paste(img, ((canvas.width - w) // 2, (canvas.height - h) // 2))
            img = canvas
        img = img.crop(crop_box(img.width, img.height, size))
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return _normalize(arr.float() / 255.0, cfg)


def _tensor(x: torch.Tensor, cfg: PreprocessCfg, crop: bool) -> torch.Tensor:
    single = x.ndim == 3
    if single:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise ImageError(f"image tensors must be 3 x H x W or B x 3 x H x W, got {tuple(x.shape)}")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    size = cfg.image_size
    w, h = resized_size(x.shape[-1], x.shape[-2], size)
    mode = cfg.interpolation if cfg.interpolation in ("bicubic", "bilinear") else "bicubic"
    x = F.interpolate(x, size=(h, w), mode=mode, align_corners=False, antialias=True).clamp(0, 1)
    if crop:
        left, top, right, bottom = crop_box(w, h, size)
        x = x[:, :, top:bottom, left:right]
    x = _normalize(x, cfg)
    return x[0] if single else x


def preprocess(image, cfg: PreprocessCfg | None = None, crop: bool = True) -> torch.Tensor:
    """One image (PIL, ``H x W x 3`` uint8 array, path/bytes, or a ``3 x H x W`` tensor) ->
    ``3 x S x S`` normalised float tensor (``3 x S x L`` with ``crop=False``: short side ``S``)."""
    cfg = cfg or PreprocessCfg()
    if isinstance(image, torch.Tensor):
        return _tensor(image, cfg, crop)
    if not isinstance(image, Image.Image):
        from textseg.io import load_image

        image = load_image(image)
    return _pil(image, cfg, crop)


def preprocess_batch(images: Sequence, cfg: PreprocessCfg | None = None) -> torch.Tensor:
    """Images (any mix :func:`preprocess` accepts) -> ``B x 3 x S x S``."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return _tensor(images, cfg or PreprocessCfg(), True)
    return torch.stack([preprocess(im, cfg) for im in images])


class Preprocess:
    """Callable OpenAI-style transform bound to a model's :class:`PreprocessCfg`."""

    def __init__(self, cfg: PreprocessCfg | None = None, crop: bool = True):
        self.cfg, self.crop = cfg or PreprocessCfg(), crop

    def __call__(self, image) -> torch.Tensor:
        return preprocess(image, self.cfg, self.crop)

    def __repr__(self) -> str:
        c = self.cfg
        return (f"Preprocess(size={c.image_size}, {c.interpolation}, crop={self.crop}, "
                f"mean={c.mean}, std={c.std})")
