"""Image-text pairs for contrastive training: a folder + caption file, or webdataset tar shards.

Two sources, both yielding samples ``{"image": transform(PIL RGB), "text": str, "key": str,
"index": int | str, "epoch": int}`` (``index``: the record index, or the key for tar shards; a
transform with ``seeded = True`` gets a generator seeded by ``(seed, epoch, index)``, see
:func:`sample_rng`, so random augmentation is resumable):

* :class:`CaptionDataset` (map-style): images under a root plus a caption file, either JSONL
  (``{"image": "images/0001.jpg", "captions": ["...", ...]}`` or ``"caption": "..."`` per line,
  the layout of ``coco-mini/captions.jsonl``) or CSV with a header (``image``/``filepath`` and
  ``caption``/``captions``/``title`` columns; rows of one image are grouped). One sample per
  image; each epoch picks one of its captions, deterministically from ``(seed, epoch, index)``.
  ``split`` keeps the ids in ``<root>/splits/<split>.txt`` or, failing that, the images whose
  ``"split"`` is ``split`` in ``<root>/images_meta.json`` (coco-mini: ``train2017`` / ``val2017``).
* :class:`TarShardDataset` (iterable): webdataset-style tar shards (``0001.jpg`` + ``0001.txt``
  members sharing a key), streamed with the standard library's ``tarfile`` and split over ranks
  and DataLoader workers (whole shards when there are enough, else every k-th sample).

Decoding-error policy: a sample that cannot be read (corrupt image, missing caption, truncated
tar) is skipped, counted in ``dataset.num_skipped`` (per process / worker) and reported once as a
warning; the run never crashes on bad data. A map-style dataset replaces a bad sample by the next
readable one so batch sizes stay equal across ranks.

Batching: ``ImageTextCollate(model.tokenize)`` stacks images and tokenizes the captions.
"""

from __future__ import annotations

import csv
import io
import json
import random
import tarfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from glob import glob
from pathlib import Path

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from textseg.data.splits import split_ids
from textseg.errors import ImageError, TextsegError
from textseg.io import IMAGE_EXTENSIONS, load_image

Transform = Callable[[object], torch.Tensor]


@dataclass
class CaptionRecord:
    """One image and all its captions."""

    key: str
    image: Path
    captions: list[str]


def read_captions(path: str | Path, root: str | Path | None = None) -> list[CaptionRecord]:
    """Read a JSONL or CSV caption file -> one record per image (image paths relative to ``root``,
    default: the caption file's folder), in file order."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    if not path.is_file():
        raise TextsegError(f"caption file not found: {path}")
    grouped: dict[str, list[str]] = {}
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            cols = reader.fieldnames or []
            img_col = next((c for c in ("image", "filepath", "file", "path") if c in cols), None)
            cap_col = next((c for c in ("caption", "captions", "title", "text") if c in cols), None)
            if img_col is None or cap_col is None:
                raise TextsegError(f"{path}: CSV needs an image column (image/filepath) and a caption column "
                                   f"(caption/title/text); found {cols}")
            for row in reader:
                grouped.setdefault(row[img_col], []).append(row[cap_col])
    else:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TextsegError(f"{path}:{n}: not JSON ({e.msg})") from None
            caps = obj.get("captions", obj.get("caption"))
            if "image" not in obj or caps is None:
                raise TextsegError(f"{path}:{n}: needs 'image' and 'captions' (or 'caption')")
            grouped.setdefault(obj["image"], []).extend([caps] if isinstance(caps, str) else list(caps))
    records = []
    for rel, caps in grouped.items():
        caps = [c.strip() for c in caps if isinstance(c, str) and c.strip()]
        if caps:
            records.append(CaptionRecord(Path(rel).stem, root / rel, caps))
    if not records:
        raise TextsegError(f"{path}: no image with a caption")
    return records


def pick_caption(seed: int, epoch: int, index: int, n: int) -> int:
    """Deterministic caption choice for ``(seed, epoch, index)`` among ``n`` (same in every process)."""
    return random.Random(f"{seed}:{epoch}:{index}").randrange(n)


def sample_rng(seed: int, epoch: int, index: int | str, purpose: str) -> random.Random:
    """The random generator of one sample's ``purpose`` ("image", "text") in one epoch: a function of
    ``(seed, epoch, index)`` only, so every process and a resumed run draw the same."""
    return random.Random(f"{seed}:{epoch}:{index}:{purpose}")


def apply_transform(transform: Transform | None, img, seed: int, epoch: int, index: int | str):
    """``transform(img)``; a transform with ``seeded = True`` (random augmentation, e.g.
    :class:`textseg.data.augment.DeiTTrainTransform`) also gets ``rng=sample_rng(..., "image")``."""
    if transform is None:
        return img
    if getattr(transform, "seeded", False):
        return transform(img, rng=sample_rng(seed, epoch, index, "image"))
    return transform(img)


class _SkipCounter:
    def __init__(self):
        self.num_skipped = 0

    def _skip(self, what: str, err: Exception) -> None:
        self.num_skipped += 1
        if self.num_skipped <= 3:
            warnings.warn(f"skipping unreadable sample {what}: {err}", stacklevel=3)


class CaptionDataset(_SkipCounter, Dataset):
    """Folder of images + caption file (JSONL / CSV); see the module docstring.

    Args:
        root: dataset folder (image paths in the caption file are relative to it).
        captions: caption file, relative to ``root`` or absolute.
        split: keep only this split's images (``splits/<split>.txt`` or ``images_meta.json``).
        transform: PIL RGB image -> ``3 x H x W`` tensor (e.g. the model's preprocessing).
        caption: "random" (a caption per epoch, seeded) or "first".
        seed: caption-choice seed.
    """

    def __init__(self, root: str | Path, captions: str = "captions.jsonl", split: str | None = None,
                 transform: Transform | None = None, caption: str = "random", seed: int = 0):
        super().__init__()
        self.root = root = Path(root)
        self.records = read_captions(root / captions, root)
        if split:
            keep = set(split_ids(root, split))
            self.records = [r for r in self.records if r.key in keep]
            if not self.records:
                raise TextsegError(f"no captioned image of split {split!r} in {root}")
        if caption not in ("random", "first"):
            raise TextsegError(f"caption must be 'random' or 'first', got {caption!r}")
        self.transform, self.caption, self.seed, self.epoch = transform, caption, seed, 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def texts(self) -> tuple[list[str], list[int]]:
        """Every caption and the index of its image (for retrieval evaluation)."""
        texts, owner = [], []
        for i, r in enumerate(self.records):
            texts.extend(r.captions)
            owner.extend([i] * len(r.captions))
        return texts, owner

    def load(self, index: int):
        """The transformed image of record ``index`` (raises ImageError if unreadable)."""
        img = load_image(self.records[index].image)
        return apply_transform(self.transform, img, self.seed, self.epoch, index)

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self.records)):
            i = (index + offset) % len(self.records)
            rec = self.records[i]
            try:
                image = self.load(i)
            except (ImageError, OSError) as e:
                self._skip(str(rec.image), e)
                continue
            c = 0 if self.caption == "first" else pick_caption(self.seed, self.epoch, i, len(rec.captions))
            return {"image": image, "text": rec.captions[c], "key": rec.key, "index": i, "epoch": self.epoch}
        raise TextsegError("no readable image in the dataset")


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard list from paths, globs and brace ranges (``data/train-{0000..0099}.tar``), comma-separated."""
    items = [s for part in ([spec] if isinstance(spec, str) else spec) for s in str(part).split(",") if s]
    out: list[str] = []
    for item in items:
        start, end = item.find("{"), item.find("}")
        if start >= 0 and end > start and ".." in item[start:end]:
            lo, hi = item[start + 1 : end].split("..")
            width = len(lo)
            for n in range(int(lo), int(hi) + 1):
                out.extend(expand_shards(f"{item[:start]}{n:0{width}d}{item[end + 1:]}"))
        elif any(ch in item for ch in "*?["):
            out.extend(sorted(glob(item)))
        else:
            out.append(item)
    return out


class TarShardDataset(_SkipCounter, IterableDataset):
    """Webdataset-style tar shards streamed with ``tarfile`` (no webdataset dependency).

    Members sharing a key (the file name up to its first dot) form a sample; the image is the member
    with an image extension, the caption the ``.txt`` (or ``caption``/``text`` field of ``.json``).

    Each epoch the shard list is shuffled with ``seed + epoch`` (the same on every rank), then split:
    global worker ``g`` of ``G = world_size * num_workers`` reads shards ``g, g+G, ...`` when there are
    at least ``G`` shards, else reads all shards and keeps samples ``g, g+G, ...``. ``shuffle_buffer``
    > 0 shuffles samples within a seeded buffer. Ranks may see different numbers of samples; the
    training engine counts steps, so no rank waits for another.
    """

    def __init__(self, shards: str | Sequence[str], transform: Transform | None = None,
                 shuffle: bool = True, shuffle_buffer: int = 0, seed: int = 0):
        super().__init__()
        self.shards = expand_shards(shards)
        if not self.shards:
            raise TextsegError(f"no tar shards match {shards!r}")
        self.transform, self.shuffle, self.buffer, self.seed, self.epoch = transform, shuffle, shuffle_buffer, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _worker_slot(self) -> tuple[int, int]:
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * nw + wid, world * nw

    def _raw_samples(self, shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
        key, parts = None, {}
        try:
            with tarfile.open(shard, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    name = member.name.rsplit("/", 1)[-1]
                    if name.startswith("."):
                        continue
                    prefix = member.name[: len(member.name) - len(name)]
                    k, _, ext = name.partition(".")
                    k = prefix + k
                    if k != key and key is not None:
                        yield key, parts
                        parts = {}
                    key = k
                    fh = tar.extractfile(member)
                    parts[ext.lower()] = fh.read() if fh is not None else b""
        except (tarfile.TarError, OSError, EOFError) as e:
            self._skip(f"{shard} (rest of shard)", e)
        if key is not None and parts:
            yield key, parts

    def _decode(self, key: str, parts: dict[str, bytes]) -> dict | None:
        img_ext = next((e for e in parts if "." + e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
        if "txt" in parts:
            text = parts["txt"].decode("utf-8", errors="replace").strip()
        elif "json" in parts:
            try:
                meta = json.loads(parts["json"])
                text = str(meta.get("caption", meta.get("text", ""))).strip()
            except (json.JSONDecodeError, AttributeError):
                text = ""
        else:
            text = ""
        if img_ext is None or not text:
            self._skip(key, ValueError("missing image or caption"))
            return None
        try:
            img = load_image(parts[img_ext])
            image = apply_transform(self.transform, img, self.seed, self.epoch, key)
        except (ImageError, OSError) as e:
            self._skip(key, e)
            return None
        return {"image": image, "text": text, "key": key, "index": key, "epoch": self.epoch}

    def _samples(self) -> Iterator[dict]:
        g, total = self._worker_slot()
        shards = list(self.shards)
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(shards)
        by_shard = len(shards) >= total
        mine = shards[g::total] if by_shard else shards
        j = 0
        for shard in mine:
            for key, parts in self._raw_samples(shard):
                j += 1
                if not by_shard and (j - 1) % total != g:
                    continue
                sample = self._decode(key, parts)
                if sample is not None:
                    yield sample

    def __iter__(self) -> Iterator[dict]:
        samples = self._samples()
        if not (self.shuffle and self.buffer > 1):
            yield from samples
            return
        g, _ = self._worker_slot()
        rng, buf = random.Random(f"{self.seed}:{self.epoch}:{g}"), []
        for s in samples:
            buf.append(s)
            if len(buf) >= self.buffer:
                yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf


def write_tar_shard(path: str | Path, samples: Sequence[tuple[str, bytes, str]]) -> Path:
    """Write ``(key, jpeg_bytes, caption)`` samples as a webdataset tar (``key.jpg`` + ``key.txt``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, data, caption in samples:
            for name, payload in ((f"{key}.jpg", data), (f"{key}.txt", caption.encode("utf-8"))):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


class ImageTextCollate:
    """Batch samples: ``{"image": B x 3 x H x W, "text": tokenize(captions) (B x L), "key": [str]}``.

    ``tokenize``: the model's ``tokenize`` (any callable list[str] -> LongTensor). Picklable, so it
    works in DataLoader workers when ``tokenize`` is.
    """

    def __init__(self, tokenize: Callable[[list[str]], torch.Tensor] | None = None):
        self.tokenize = tokenize

    def __call__(self, samples: list[dict]) -> dict:
        texts = [s["text"] for s in samples]
        return {
            "image": torch.stack([s["image"] for s in samples]),
            "text": self.tokenize(texts) if self.tokenize is not None else texts,
            "key": [s["key"] for s in samples],
        }
