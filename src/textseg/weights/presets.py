"""OpenAI's released CLIP models by name, with their published download address and SHA-256.

Files are fetched only when a preset that is not cached is asked for (``load_model("ViT-B/16")``,
``textseg classify --model ViT-B/16``), into ``$TEXTSEG_CACHE/clip`` (default
``~/.cache/textseg/clip``); a file already in OpenAI's own cache (``~/.cache/clip``) is used as is.
Offline, the error says which URL to fetch and where to put the file. The SHA-256 of every file is
the directory name in its URL (as openai/CLIP's ``clip.py`` checks it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from textseg.errors import CheckpointError
from textseg.weights.read import sha256_file

_BASE = "https://openaipublic.azureedge.net/clip/models"


@dataclass(frozen=True)
class Preset:
    name: str
    sha256: str
    filename: str
    image_size: int

    @property
    def url(self) -> str:
        return f"{_BASE}/{self.sha256}/{self.filename}"


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("RN50", "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50.pt", 224),
    Preset("RN101", "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599", "RN101.pt", 224),
    Preset("RN50x4", "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd", "RN50x4.pt", 288),
    Preset("RN50x16", "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa", "RN50x16.pt", 384),
    Preset("RN50x64", "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c", "RN50x64.pt", 448),
    Preset("ViT-B/32", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt", 224),
    Preset("ViT-B/16", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt", 224),
    Preset("ViT-L/14", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt", 224),
    Preset("ViT-L/14@336px", "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
           "ViT-L-14-336px.pt", 336),
)}


def _key(name: str) -> str:
    return name.lower().replace("/", "-").replace("@", "-").replace("_", "-").removesuffix(".pt")


_ALIASES = {_key(p.name): p for p in PRESETS.values()} | {_key(p.filename): p for p in PRESETS.values()}
_ALIASES["vit-l-14-336"] = PRESETS["ViT-L/14@336px"]


def find(name: str) -> Preset | None:
    """The preset called ``name`` (OpenAI spelling ``ViT-B/16`` or open_clip's ``ViT-B-16``), or None."""
    return _ALIASES.get(_key(name))


def cache_dir() -> Path:
    return Path(os.environ.get("TEXTSEG_CACHE", Path.home() / ".cache" / "textseg")).expanduser() / "clip"


def _candidates(preset: Preset) -> list[Path]:
    return [cache_dir() / preset.filename, Path.home() / ".cache" / "clip" / preset.filename]


def cached_path(preset: Preset) -> Path | None:
    """Where the preset's file already is (textseg's or OpenAI's cache), else None."""
    return next((p for p in _candidates(preset) if p.is_file()), None)


def _verified(path: Path, preset: Preset) -> bool:
    """SHA-256 check, remembered in ``<file>.sha256`` (keyed by size and mtime) so it runs once."""
    stamp = path.with_name(path.name + ".sha256")
    st = path.stat()
    tag = f"{preset.sha256} {st.st_size} {int(st.st_mtime)}"
    try:
        if stamp.read_text().strip() == tag:
            return True
    except OSError:
        pass
    if sha256_file(path) != preset.sha256:
        return False
    try:
        stamp.write_text(tag + "\n")
    except OSError:
        pass
    return True


def fetch(preset: Preset, download: bool = True) -> Path:
    """The preset's verified local file, downloading it once if needed and allowed."""
    path = cached_path(preset)
    if path is not None:
        if not _verified(path, preset):
            raise CheckpointError(f"{path}: SHA-256 does not match the published {preset.sha256[:12]}... of "
                                  f"{preset.name}; delete it and fetch {preset.url} again")
        return path
    target = cache_dir() / preset.filename
    where = f"download {preset.url} and put it at {target}"
    if not download:
        raise CheckpointError(f"{preset.name} is not cached; {where}")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        from tqdm import tqdm

        with urllib.request.urlopen(preset.url, timeout=30) as src, \
                tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".part") as tmp:
            total = int(src.headers.get("Content-Length") or 0)
            with tqdm(total=total, unit="B", unit_scale=True, desc=preset.filename) as bar:
                while block := src.read(1 << 20):
                    tmp.write(block)
                    bar.update(len(block))
            part = Path(tmp.name)
    except OSError as e:  # URLError, timeouts, no network
        raise CheckpointError(f"cannot fetch {preset.name} ({type(e).__name__}: {e}); {where}") from None
    if not _verified(part, preset):
        part.unlink(missing_ok=True)
        raise CheckpointError(f"downloaded {preset.name} but its SHA-256 does not match; {where}")
    shutil.move(part, target)
    part.with_name(part.name + ".sha256").unlink(missing_ok=True)
    return target
