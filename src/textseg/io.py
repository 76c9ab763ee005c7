"""Reading images the way users hand them to us: any mode, any bit depth, EXIF-rotated."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from textseg.errors import ImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# Decompression-bomb guard: Pillow's default warns at ~89 MP; we refuse beyond this explicitly.
MAX_IMAGE_PIXELS = 400_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB: EXIF orientation applied, alpha composited on white,
    16-bit / float images rescaled to their own range rather than clipped."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.round().astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def load_image(source: str | Path | bytes | Image.Image | np.ndarray) -> Image.Image:
    """Load an image from a path, raw bytes, a PIL image or an HxW[xC] uint8 array as RGB PIL.

    Raises :class:`ImageError` with a one-line reason for anything unreadable.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        arr = source
        if arr.dtype != np.uint8:
            raise ImageError(f"numpy images must be uint8 HxW or HxWxC, got dtype {arr.dtype}")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
            raise ImageError(f"numpy images must be HxW, HxWx3 or HxWx4, got shape {tuple(arr.shape)}")
        return to_rgb(Image.fromarray(arr))
    name = "<bytes>"
    try:
        if isinstance(source, (bytes, bytearray)):
            img = Image.open(io.BytesIO(source))
        else:
            name = str(source)
            path = Path(source)
            if not path.exists():
                raise ImageError(f"{name}: no such file")
            if path.is_dir():
                raise ImageError(f"{name}: is a directory, not an image")
            img = Image.open(path)
        img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: image too large ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: cannot read image ({type(e).__name__}: {e})") from None
    if img.width < 1 or img.height < 1:
        raise ImageError(f"{name}: empty image")
    return to_rgb(img)


def list_images(paths: list[str | Path]) -> list[Path]:
    """Expand files and directories (non-recursive, sorted) into image paths."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS and q.is_file()))
        else:
            out.append(p)
    return out
