"""DeiT-style training augmentation (PIL + torch, no torchvision), as GroupViT trains with it.

NVlabs/GroupViT ``datasets/builder.py`` ``build_img_transform(is_train=True)`` calls timm 0.4.12's
``create_transform`` with ``configs/default.yml``'s ``img_aug``; timm's ``transforms_imagenet_train``
then runs, in this order:

1. ``RandomResizedCropAndInterpolation(224, scale=(0.08, 1), ratio=(3/4, 4/3))``, bilinear
   (``interpolation: bilinear``; ``img_scale`` is not passed on, so timm's default scale holds);
2. horizontal flip with probability 0.5;
3. RandAugment ``'rand-m9-mstd0.5-inc1'``: 2 ops drawn with replacement from the 15 "increasing"
   ops, each applied with probability 0.5 at magnitude ``N(9, 0.5)`` clipped to [0, 10]
   (translate constant ``int(0.45 * 224)``, fill = the ImageNet mean in 0..255, bilinear);
   with RandAugment on, timm does *not* add colour jitter (``color_jitter: 0.4`` is then unused);
4. to tensor, ImageNet mean/std normalisation;
5. ``RandomErasing(0.25, mode='pixel', max_count=1)``: area 2 %..1/3, log-uniform aspect 0.3..3.33,
   filled with per-pixel N(0, 1) noise (in normalised units).

Every random draw comes from the ``rng`` (``random.Random``) passed to the call, so a dataset can
seed it by ``(seed, epoch, index)`` and a resumed run sees the same pixels
(:class:`DeiTTrainTransform` sets ``seeded = True``; :mod:`textseg.data.imagetext` honours it).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from textseg.errors import TextsegError

_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
_MAX_LEVEL = 10.0


def _filter(name: str) -> int:
    if name not in _FILTERS:
        raise TextsegError(f"interpolation must be one of {sorted(_FILTERS)}, got {name!r}")
    return _FILTERS[name]


class RandomResizedCrop:
    """Crop a random area fraction in ``scale`` with a log-uniform aspect ratio in ``ratio`` (10 tries,
    then the largest centred crop within ``ratio``), resize to ``size x size``."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), interpolation: str = "bilinear"):
        if scale[0] > scale[1] or ratio[0] > ratio[1]:
            raise TextsegError(f"RandomResizedCrop: bad scale {scale} or ratio {ratio}")
        self.size, self.scale, self.ratio, self.resample = size, scale, ratio, _filter(interpolation)

    def params(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` of the crop."""
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = rng.uniform(*self.scale) * area
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        top, left, h, w = self.params(img.width, img.height, rng)
        return img.crop((left, top, left + w, top + h)).resize((self.size, self.size), self.resample)


# ----------------------------------------------------------------------------------- RandAugment
def _negate(v: float, rng: random.Random) -> float:
    return -v if rng.random() > 0.5 else v


def _affine(img, matrix, fill, resample):
    return img.transform(img.size, Image.AFFINE, matrix, resample=resample, fillcolor=fill)


def _solarize_add(img, add, thresh=128):
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


# name -> (magnitude in [0, 10], rng, hparams) -> op(img, fill, resample)
_OPS: dict[str, Callable] = {
    "AutoContrast": lambda m, r, hp: lambda img, f, s: ImageOps.autocontrast(img),
    "Equalize": lambda m, r, hp: lambda img, f, s: ImageOps.equalize(img),
    "Invert": lambda m, r, hp: lambda img, f, s: ImageOps.invert(img),
    "Rotate": lambda m, r, hp: (lambda deg: lambda img, f, s: img.rotate(deg, resample=s, fillcolor=f))(
        _negate(m / _MAX_LEVEL * 30.0, r)),
    "PosterizeIncreasing": lambda m, r, hp: (lambda bits: lambda img, f, s: img if bits >= 8 else
                                             ImageOps.posterize(img, bits))(4 - int(m / _MAX_LEVEL * 4)),
    "SolarizeIncreasing": lambda m, r, hp: (lambda th: lambda img, f, s: ImageOps.solarize(img, th))(
        256 - int(m / _MAX_LEVEL * 256)),
    "SolarizeAdd": lambda m, r, hp: (lambda add: lambda img, f, s: _solarize_add(img, add))(
        int(m / _MAX_LEVEL * 110)),
    "ColorIncreasing": lambda m, r, hp: (lambda k: lambda img, f, s: ImageEnhance.Color(img).enhance(k))(
        1.0 + _negate(m / _MAX_LEVEL * 0.9, r)),
    "ContrastIncreasing": lambda m, r, hp: (lambda k: lambda img, f, s: ImageEnhance.Contrast(img).enhance(k))(
        1.0 + _negate(m / _MAX_LEVEL * 0.9, r)),
    "BrightnessIncreasing": lambda m, r, hp: (lambda k: lambda img, f, s: ImageEnhance.Brightness(img).enhance(k))(
        1.0 + _negate(m / _MAX_LEVEL * 0.9, r)),
    "SharpnessIncreasing": lambda m, r, hp: (lambda k: lambda img, f, s: ImageEnhance.Sharpness(img).enhance(k))(
        1.0 + _negate(m / _MAX_LEVEL * 0.9, r)),
    "ShearX": lambda m, r, hp: (lambda k: lambda img, f, s: _affine(img, (1, k, 0, 0, 1, 0), f, s))(
        _negate(m / _MAX_LEVEL * 0.3, r)),
    "ShearY": lambda m, r, hp: (lambda k: lambda img, f, s: _affine(img, (1, 0, 0, k, 1, 0), f, s))(
        _negate(m / _MAX_LEVEL * 0.3, r)),
    "TranslateXRel": lambda m, r, hp: (lambda p: lambda img, f, s: _affine(img, (1, 0, p * img.width, 0, 1, 0), f, s))(
        _negate(m / _MAX_LEVEL * hp["translate_pct"], r)),
    "TranslateYRel": lambda m, r, hp: (lambda p: lambda img, f, s: _affine(img, (1, 0, 0, 0, 1, p * img.height), f, s))(
        _negate(m / _MAX_LEVEL * hp["translate_pct"], r)),
}
INCREASING_OPS: tuple[str, ...] = tuple(_OPS)  # timm's _RAND_INCREASING_TRANSFORMS, in its order


class RandAugment:
    """timm's RandAugment for a config string such as ``'rand-m9-mstd0.5-inc1'`` (``m`` magnitude,
    ``n`` ops per image (default 2), ``mstd`` magnitude std, ``inc1`` the "increasing" op set, the only
    one implemented here). Each of the ``n`` ops is drawn uniformly with replacement and applied with
    probability ``prob`` (0.5)."""

    def __init__(self, config: str = "rand-m9-mstd0.5-inc1", fill: Sequence[int] = (124, 116, 104),
                 interpolation: str = "bilinear", translate_pct: float = 0.45, prob: float = 0.5):
        parts = config.split("-")
        if parts[0] != "rand":
            raise TextsegError(f"RandAugment config must start with 'rand', got {config!r}")
        self.magnitude, self.num_ops, self.magnitude_std, increasing = _MAX_LEVEL, 2, 0.0, False
        for part in parts[1:]:
            m = re.fullmatch(r"([a-z]+)(\d.*)", part)
            if m is None:
                continue
            key, val = m.groups()
            if key == "m":
                self.magnitude = float(int(val))
            elif key == "n":
                self.num_ops = int(val)
            elif key == "mstd":
                self.magnitude_std = float(val)
            elif key == "inc":
                increasing = bool(val)  # timm: bool of the string, so any value selects the set
            else:
                raise TextsegError(f"unknown RandAugment config section {part!r} in {config!r}")
        if not increasing:
            raise TextsegError(f"{config!r}: only the 'inc1' (increasing) op set is implemented")
        self.ops, self.prob = INCREASING_OPS, prob
        self.fill, self.resample = tuple(int(v) for v in fill), _filter(interpolation)
        self.hparams = {"translate_pct": translate_pct}

    def sample_magnitude(self, rng: random.Random) -> float:
        m = self.magnitude
        if self.magnitude_std == float("inf"):
            m = rng.uniform(0, m)
        elif self.magnitude_std > 0:
            m = rng.gauss(m, self.magnitude_std)
        return min(_MAX_LEVEL, max(0.0, m))

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        for name in [rng.choice(self.ops) for _ in range(self.num_ops)]:
            if self.prob < 1.0 and rng.random() > self.prob:
                continue
            op = _OPS[name](self.sample_magnitude(rng), rng, self.hparams)
            img = op(img, self.fill, self.resample)
        return img


class ColorJitter:
    """Brightness / contrast / saturation factors uniform in ``[1 - v, 1 + v]``, applied in a random
    order (torchvision's ColorJitter without hue). timm uses it only when RandAugment is off."""

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4):
        self.amounts = {"brightness": brightness, "contrast": contrast, "saturation": saturation}

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        order = list(self.amounts)
        rng.shuffle(order)
        for name in order:
            v = self.amounts[name]
            if v <= 0:
                continue
            k = rng.uniform(max(0.0, 1 - v), 1 + v)
            if name == "brightness":
                img = ImageEnhance.Brightness(img).enhance(k)
            elif name == "contrast":
                img = ImageEnhance.Contrast(img).enhance(k)
            else:
                img = ImageEnhance.Color(img).enhance(k)
        return img


class RandomErasing:
    """timm's RandomErasing on a normalised ``C x H x W`` tensor: with probability ``prob`` erase
    ``count`` rectangles of area fraction ``U(min_area, max_area) / count`` and log-uniform aspect ratio
    in ``[min_aspect, 1 / min_aspect]`` (10 tries each), filled with ``mode`` 'pixel' (per-pixel N(0,1)),
    'rand' (per-channel N(0,1)) or 'const' (0)."""

    def __init__(self, prob: float = 0.25, min_area: float = 0.02, max_area: float = 1 / 3,
                 min_aspect: float = 0.3, mode: str = "pixel", count: int = 1):
        if mode not in ("pixel", "rand", "const"):
            raise TextsegError(f"random erasing mode must be 'pixel', 'rand' or 'const', got {mode!r}")
        self.prob, self.min_area, self.max_area, self.mode, self.count = prob, min_area, max_area, mode, count
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def boxes(self, h: int, w: int, rng: random.Random) -> list[tuple[int, int, int, int]]:
        """The ``(top, left, eh, ew)`` rectangles one call erases (empty with probability 1 - prob)."""
        if rng.random() > self.prob:
            return []
        out = []
        for _ in range(self.count):
            for _ in range(10):
                target = rng.uniform(self.min_area, self.max_area) * h * w / self.count
                aspect = math.exp(rng.uniform(*self.log_aspect))
                eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
                if ew < w and eh < h:
                    out.append((rng.randint(0, h - eh), rng.randint(0, w - ew), eh, ew))
                    break
        return out

    def __call__(self, x: torch.Tensor, rng: random.Random) -> torch.Tensor:
        c, h, w = x.shape
        boxes = self.boxes(h, w, rng)
        if boxes:
            gen = torch.Generator().manual_seed(rng.getrandbits(63))
            x = x.clone()
            for top, left, eh, ew in boxes:
                if self.mode == "pixel":
                    fill = torch.randn((c, eh, ew), generator=gen, dtype=x.dtype)
                elif self.mode == "rand":
                    fill = torch.randn((c, 1, 1), generator=gen, dtype=x.dtype)
                else:
                    fill = torch.zeros((c, 1, 1), dtype=x.dtype)
                x[:, top:top + eh, left:left + ew] = fill
        return x


class DeiTTrainTransform:
    """The GroupViT (NVlabs ``configs/default.yml``) training transform: PIL image -> normalised
    ``3 x size x size`` tensor. ``auto_augment=""`` turns RandAugment off (then ``color_jitter`` > 0
    applies, as in timm); ``re_prob=0`` turns random erasing off."""

    seeded = True  # draws all randomness from the rng it is given (see textseg.data.imagetext)

    def __init__(self, size: int = 224, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), scale: tuple[float, float] = (0.08, 1.0),
                 interpolation: str = "bilinear", hflip: float = 0.5, auto_augment: str = "rand-m9-mstd0.5-inc1",
                 color_jitter: float = 0.4, re_prob: float = 0.25, re_mode: str = "pixel", re_count: int = 1):
        self.crop = RandomResizedCrop(size, tuple(scale), interpolation=interpolation)
        self.hflip = hflip
        fill = tuple(min(255, round(255 * v)) for v in mean)
        self.randaug = (RandAugment(auto_augment, fill, interpolation, translate_pct=0.45)
                        if auto_augment else None)
        self.jitter = ColorJitter(color_jitter, color_jitter, color_jitter) if not auto_augment and color_jitter > 0 else None
        self.erase = RandomErasing(re_prob, mode=re_mode, count=re_count) if re_prob > 0 else None
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        from textseg.io import to_rgb

        rng = rng if rng is not None else random.Random()
        img = self.crop(to_rgb(img), rng)
        if self.hflip > 0 and rng.random() < self.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.randaug is not None:
            img = self.randaug(img, rng)
        if self.jitter is not None:
            img = self.jitter(img, rng)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        x = (x - self.mean) / self.std
        return self.erase(x, rng) if self.erase is not None else x
