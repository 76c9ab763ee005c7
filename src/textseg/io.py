"""Reading images the way users hand them to us: any mode, any bit depth, EXIF-rotated."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from struct import error as struct_error

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from textseg.errors import ImageError, TextsegError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# Decompression-bomb guards, checked from the header before any pixel is decoded. Pillow's own
# process-wide limit (``PIL.Image.MAX_IMAGE_PIXELS``) is left as the user set it: images above twice
# it (179 MP by default) are refused by Pillow itself whatever ``max_pixels`` says.
DEFAULT_MAX_PIXELS = 100_000_000
# Longest accepted side (JPEG's own limit): bounds every per-row / per-column buffer downstream, so a
# tiny 40,000,000 x 1 PNG cannot cost gigabytes.
MAX_IMAGE_SIDE = 65_535


def check_image_size(width: int, height: int, max_pixels: float | None = DEFAULT_MAX_PIXELS,
                     name: str = "<image>") -> None:
    """Refuse an image of ``width x height`` above ``max_pixels`` or with a side above
    :data:`MAX_IMAGE_SIDE` (one :class:`ImageError` line)."""
    if max(width, height) > MAX_IMAGE_SIDE:
        raise ImageError(f"{name}: image is {width}x{height}; sides above {MAX_IMAGE_SIDE} pixels are refused")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"{name}: image is {width}x{height} ({width * height / 1e6:.1f} MP), above the "
            f"{max_pixels / 1e6:g} MP limit; downscale it or raise the limit (--max-megapixels) (needs about "
            f"{width * height * 8 / 2**30:.1f} GiB of memory)"
        )


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator:
    """Open a temporary file beside ``path`` for writing; on success it is flushed, fsynced and renamed
    onto ``path`` (atomic on POSIX), on any error removed: a crash never leaves a truncated ``path``.
    The one home of atomic writes (checkpoints, masks, overlays, reports, converted weights).
    Unwritable destinations raise :class:`TextsegError`."""
    path = Path(path)
    try:
        if path.is_dir():
            raise TextsegError(f"{path}: is a directory, cannot write a file there")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except FileExistsError:
        raise TextsegError(f"{path}: a parent of it is a file, not a folder") from None
    except OSError as e:
        if e.errno == errno.ENOTDIR:
            raise TextsegError(f"{path}: a parent of it is a file, not a folder") from None
        raise TextsegError(f"{path}: cannot write ({e.strerror or e})") from None
    try:
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_image(image: Image.Image, path: str | Path, **params) -> Path:
    """``image.save(path, **params)`` atomically (format from the extension), via :func:`atomic_write`."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise TextsegError(f"{path}: unknown image extension {path.suffix!r}")
    with atomic_write(path) as fh:
        image.save(fh, format=fmt, **params)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (:func:`atomic_write`)."""
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return Path(path)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files :func:`atomic_write` leaves when a process is killed mid-write."""
    d = Path(folder)
    if not d.is_dir():
        return []
    stale = [p for p in d.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


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


def load_image(source: str | Path | bytes | Image.Image | np.ndarray,
               max_pixels: float | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load an image from a path, raw bytes, a PIL image or an HxW[xC] uint8 array as RGB PIL.

    Files and bytes above ``max_pixels`` (default 100 MP) or with a side above :data:`MAX_IMAGE_SIDE`
    are refused from their header, before decoding (already decoded PIL / numpy images are the
    caller's memory and are not checked). Raises :class:`ImageError` with a one-line reason for
    anything unreadable.
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
            fp = io.BytesIO(source)
        else:
            name = str(source)
            fp = Path(source)
            _check_exists(fp, ImageError)
            if fp.is_dir():
                raise ImageError(f"{name}: is a directory, not an image")
        with warnings.catch_warnings():  # our own limit is checked below, before decoding
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
            check_image_size(img.width, img.height, max_pixels, name)
            img.load()
        if img.width < 1 or img.height < 1:
            raise ImageError(f"{name}: empty image")
        return to_rgb(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # above Pillow's own process-wide limit
        found = re.search(r"\((\d+) pixels\)", str(e))
        pixels = int(found.group(1)) if found else 0
        if max_pixels is not None and pixels > max_pixels:
            raise ImageError(f"{name}: image has {pixels / 1e6:.0f} MP, above the {max_pixels / 1e6:g} MP limit; "
                             "downscale it") from None
        raise ImageError(f"{name}: image too large for Pillow's limit PIL.Image.MAX_IMAGE_PIXELS ({e})") from None
    except MemoryError:
        raise ImageError(f"{name}: not enough memory to decode this image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError,
            struct_error, ZeroDivisionError, OverflowError, KeyError) as e:
        raise ImageError(f"{name}: cannot read image ({type(e).__name__}: {e})") from None


def _check_exists(path: Path, error: type[TextsegError] = TextsegError) -> None:
    """Raise ``error`` naming a missing file, a broken symlink or a symlink loop."""
    if path.exists():
        return
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except RuntimeError:  # Python < 3.13 reports loops this way
            raise error(f"{path}: symlink loop") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise error(f"{path}: symlink loop") from None
        raise error(f"{path}: broken symlink (its target does not exist)")
    raise error(f"{path}: no such file")


def list_images(paths: list[str | Path]) -> list[Path]:
    """Expand files and directories (non-recursive, sorted) into image paths.

    A given path that does not exist (or is a broken symlink / symlink loop) raises
    :class:`TextsegError` (a bad argument: CLI exit code 2). Entries of a folder with an image
    extension that are broken symlinks or loops are kept, so reading them reports why."""
    out: list[Path] = []
    for p in map(Path, paths):
        _check_exists(p)
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS
                              and (q.is_file() or (q.is_symlink() and not q.exists()))))
        else:
            out.append(p)
    return out
