"""Image preprocessing identical to OpenAI CLIP's (without torchvision), driven by the model's card.

OpenAI's transform is ``Resize(n, BICUBIC)`` (short side to ``n``, long side ``int(n * long / short)``,
PIL's bicubic resampling) -> ``CenterCrop(n)`` (offsets ``round((H - n) / 2)``) -> RGB -> ``[0, 1]``
-> ``(x - mean) / std``. The card (:class:`~textseg.models.base.PreprocessCfg`) sets ``n``, the
resampling filter, mean/std, a crop fraction (short side ``floor(n / crop_pct)`` before the crop, as
timm and NVlabs GroupViT's ``Resize(256) + CenterCrop(224)``) and the crop offset rule (``floor`` for
Hugging Face image processors). :func:`cfg_from_hf_processor` reads a ``preprocessor_config.json``.
PIL images and ``H x W x 3`` uint8 arrays take exactly that path. Tensors
(``3 x H x W`` or ``B x 3 x H x W``, uint8 or float in ``[0, 1]``) are resized with
``F.interpolate(bicubic, antialias=True)``, which matches PIL to within a few 1/255 levels.

>>> pixels = preprocess(Image.open("cat.jpg"), model.preprocess_cfg)       # 3 x 224 x 224
>>> batch = preprocess_batch([img1, img2], model.preprocess_cfg)            # 2 x 3 x 224 x 224

This module is the one image-to-tensor path: classification (:func:`preprocess`), the Segmenter's
dense input (:func:`canvas_size` or :func:`keep_ratio_size`, then :func:`resize_to_tensor` and
:func:`normalize`) and training datasets (:func:`pil_to_tensor`) share
its functions. Sizes: :func:`resized_size` takes and returns PIL's ``(width, height)``; the dense
sizes (:func:`canvas_size`, :func:`keep_ratio_size`) take and return torch's ``(height, width)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from textseg.errors import ImageError, TextsegError
from textseg.models.base import PreprocessCfg

_PIL_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
                "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}
# PIL's resampling codes, as Hugging Face image processors store them ("resample": 3 = bicubic).
_PIL_CODES = {int(code): name for name, code in _PIL_FILTERS.items()}


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """``(w, h)`` with the short side ``size`` and the long side ``int(size * long / short)`` (PIL's
    ``(width, height)`` order, torchvision's ``Resize(size)``)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def _round_to(x: float, cell: int) -> int:
    return max(cell, int(round(x / cell)) * cell)


def _dense_scale(height: int, width: int, short_side: int | None, max_side: int) -> float:
    if height < 1 or width < 1:
        raise TextsegError(f"empty image ({width}x{height})")
    scale = 1.0 if not short_side else short_side / min(height, width)
    return min(scale, max_side / max(height, width))


def canvas_size(height: int, width: int, short_side: int | None, max_side: int, cell: int) -> tuple[int, int]:
    """``(H', W')`` the Segmenter resizes an image to: short side ``short_side`` (None = keep the
    scale), long side at most ``max_side``, both rounded to multiples of ``cell`` (the model's
    dense stride)."""
    scale = _dense_scale(height, width, short_side, max_side)
    return _round_to(height * scale, cell), _round_to(width * scale, cell)


def keep_ratio_size(height: int, width: int, short_side: int | None, max_side: int) -> tuple[int, int]:
    """``(H', W')`` of mmcv's keep-ratio ``Resize`` (the official GroupViT / mmseg pipelines): the
    scale of :func:`canvas_size`, sides ``int(side * scale + 0.5)``, no rounding to a stride."""
    scale = _dense_scale(height, width, short_side, max_side)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def crop_box(width: int, height: int, size: int, offset: str = "round") -> tuple[int, int, int, int]:
    """Centre-crop box ``(left, top, right, bottom)``: offsets ``round(margin / 2)`` as torchvision's
    ``CenterCrop`` (``offset="round"``) or ``margin // 2`` as Hugging Face's ``center_crop``."""
    if offset == "floor":
        left, top = (width - size) // 2, (height - size) // 2
    else:
        left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    return left, top, left + size, top + size


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float], inplace: bool = False) -> torch.Tensor:
    """``(x - mean) / std`` per channel of a ``3 x H x W`` or ``B x 3 x H x W`` tensor (``inplace``: in
    ``x``'s own memory, the same values without two full-size temporaries)."""
    m, sd = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1), torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    if inplace:
        return x.sub_(m).div_(sd)
    return (x - m) / sd


def _normalize(x: torch.Tensor, cfg: PreprocessCfg) -> torch.Tensor:
    return normalize(x, cfg.mean, cfg.std)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> ``3 x H x W`` float tensor in ``[0, 1]`` (``uint8 / 255``, torchvision's
    ``ToTensor``)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def resize_to_tensor(img: Image.Image, size: tuple[int, int], interpolation: str = "bicubic") -> torch.Tensor:
    """An RGB PIL image resized to ``size = (H, W)`` with PIL (``reducing_gap=3``: PIL's fast
    pre-reduction for large downscales) -> ``1 x 3 x H x W`` float tensor in ``[0, 1]``."""
    if img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), _PIL_FILTERS.get(interpolation, Image.BICUBIC), reducing_gap=3.0)
    return pil_to_tensor(img)[None]


def _pil(img: Image.Image, cfg: PreprocessCfg, crop: bool) -> torch.Tensor:
    from textseg.io import to_rgb

    img = to_rgb(img)
    size = cfg.image_size
    w, h = resized_size(img.width, img.height, cfg.resize_size if crop else size)
    img = img.resize((w, h), _PIL_FILTERS.get(cfg.interpolation, Image.BICUBIC))
    if crop:
        if w < size or h < size:  # only when a side rounds below size; pad like CenterCrop
            canvas = Image.new("RGB", (max(w, size), max(h, size)))
            canvas.paste(img, ((canvas.width - w) // 2, (canvas.height - h) // 2))
            img = canvas
        img = img.crop(crop_box(img.width, img.height, size, cfg.crop_offset))
    return _normalize(pil_to_tensor(img), cfg)


def _tensor(x: torch.Tensor, cfg: PreprocessCfg, crop: bool) -> torch.Tensor:
    single = x.ndim == 3
    if single:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise ImageError(f"image tensors must be 3 x H x W or B x 3 x H x W, got {tuple(x.shape)}")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    size = cfg.image_size
    w, h = resized_size(x.shape[-1], x.shape[-2], cfg.resize_size if crop else size)
    mode = cfg.interpolation if cfg.interpolation in ("bicubic", "bilinear") else "bicubic"
    x = F.interpolate(x, size=(h, w), mode=mode, align_corners=False, antialias=True).clamp(0, 1)
    if crop:
        left, top, right, bottom = crop_box(w, h, size, cfg.crop_offset)
        x = x[:, :, top:bottom, left:right]
    x = _normalize(x, cfg)
    return x[0] if single else x


def preprocess(image, cfg: PreprocessCfg | None = None, crop: bool = True) -> torch.Tensor:
    """One image (PIL, ``H x W x 3`` uint8 array, path/bytes, or a ``3 x H x W`` tensor) ->
    ``3 x S x S`` normalised float tensor (``3 x S x L`` with ``crop=False``: short side ``S``,
    no crop fraction)."""
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
        return (f"Preprocess(size={c.image_size}, {c.interpolation}, crop={self.crop}, crop_pct={c.crop_pct}, "
                f"mean={c.mean}, std={c.std})")


def cfg_from_hf_processor(c: dict, who: str = "preprocessor_config.json") -> PreprocessCfg:
    """A Hugging Face ``preprocessor_config.json`` (``CLIPImageProcessor`` / the older
    ``CLIPFeatureExtractor``) -> :class:`PreprocessCfg`. Missing keys take ``CLIPImageProcessor``'s
    defaults (short side 224, crop 224, bicubic, OpenAI mean/std), as transformers does. Its
    pipeline: resize the short side to ``size`` (PIL), centre-crop ``crop_size`` (``floor``
    offsets), rescale by 1/255, normalise. Forms it cannot express raise :class:`CheckpointError`."""
    from textseg.constants import OPENAI_MEAN, OPENAI_STD
    from textseg.errors import CheckpointError

    def side(v, keys):
        if isinstance(v, dict):
            found = [v[k] for k in keys if k in v]
            if not found or len(set(found)) != 1:
                raise CheckpointError(f"{who}: size {v} is not supported (need a square crop / a shortest_edge)")
            return int(found[0])
        return int(v)

    try:
        if not c.get("do_resize", True) or not c.get("do_center_crop", True):
            raise CheckpointError(f"{who}: do_resize / do_center_crop false is not supported")
        if not c.get("do_rescale", True) or abs(float(c.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
            raise CheckpointError(f"{who}: only rescale_factor 1/255 is supported")
        size = c.get("size", {"shortest_edge": 224})
        if isinstance(size, dict) and "shortest_edge" not in size:
            raise CheckpointError(f"{who}: size {size} (a fixed height x width resize) is not supported")
        short = side(size, ("shortest_edge",))
        crop = side(c.get("crop_size", {"height": 224, "width": 224}), ("height", "width"))
        if crop > short:
            raise CheckpointError(f"{who}: crop_size {crop} is larger than the resized short side {short}")
        resample = int(c.get("resample", 3))
        if resample not in _PIL_CODES:
            raise CheckpointError(f"{who}: resample {resample} is not a PIL filter")
        normalize = c.get("do_normalize", True)
        mean = tuple(float(x) for x in c.get("image_mean", OPENAI_MEAN)) if normalize else (0.0, 0.0, 0.0)
        std = tuple(float(x) for x in c.get("image_std", OPENAI_STD)) if normalize else (1.0, 1.0, 1.0)
        if len(mean) != 3 or len(std) != 3:
            raise CheckpointError(f"{who}: image_mean / image_std need 3 values")
        return PreprocessCfg(image_size=crop, mean=mean, std=std, interpolation=_PIL_CODES[resample],
                             crop_pct=crop / short, crop_offset="floor")
    except CheckpointError:
        raise
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{who}: unreadable preprocessing values ({type(e).__name__}: {e})") from None
