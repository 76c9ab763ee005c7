"""The text side of segmentation: label parsing (classes with synonyms) and a text-embedding cache.

A label spec is a string like ``"cat, dog; puppy, grass"``: commas separate classes, semicolons
separate synonyms of one class (its first synonym is its display name). A class is scored as the
**max over its synonyms** of the per-pixel logits; each synonym's embedding is the model's prompt
ensemble (``DualEncoder.embed_texts``: mean over templates, L2-normalised).

:class:`TextEmbeddingCache` remembers every ``(templates, text)`` embedding a model has computed (in
memory, shared by every Segmenter of that model; optionally on disk keyed by a fingerprint of the
model's weights + the template set), so a repeated label costs no text forward pass.
"""

from __future__ import annotations

import hashlib
import os
import re
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from textseg.errors import TextsegError

BACKGROUND = "background"
MAX_LABELS = 65_000  # label maps are written as 16-bit PNGs beyond 254 labels
MAX_LABEL_CHARS = 1_000  # longer texts are refused; the tokenizer truncates at 77 tokens anyway

_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class LabelClass:
    """One output class: ``name`` (shown, written to JSON) and the ``synonyms`` it is scored by."""

    name: str
    synonyms: tuple[str, ...]


def _clean(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def _make_class(synonyms: Iterable[str]) -> LabelClass | None:
    syn = []
    for s in synonyms:
        if not isinstance(s, str):
            raise TextsegError(f"labels must be strings, got {type(s).__name__}")
        s = _clean(s)
        if len(s) > MAX_LABEL_CHARS:
            raise TextsegError(f"label {s[:40]!r}... is {len(s)} characters long; the limit is {MAX_LABEL_CHARS}")
        if s and s not in syn:
            syn.append(s)
    return LabelClass(syn[0], tuple(syn)) if syn else None


def parse_labels(labels: str | Sequence[str | Sequence[str] | LabelClass]) -> list[LabelClass]:
    """Parse labels into classes.

    Accepts ``"cat,dog;puppy"`` (commas between classes, ``;`` between synonyms), a list of strings
    (each one class, ``;`` between synonyms), a list of synonym lists, or :class:`LabelClass` items.
    Whitespace is normalised, empty entries are dropped. Raises :class:`TextsegError` when no label
    is left, a class name repeats (case-insensitively) or there are more than ``MAX_LABELS``.
    """
    if isinstance(labels, str):
        items: list = labels.split(",")
    elif isinstance(labels, LabelClass):
        items = [labels]
    else:
        items = list(labels)
    classes: list[LabelClass] = []
    for item in items:
        if isinstance(item, LabelClass):
            cls = _make_class(item.synonyms)
            cls = LabelClass(_clean(item.name) or cls.name, cls.synonyms) if cls else None
        elif isinstance(item, str):
            cls = _make_class(item.split(";"))
        else:
            cls = _make_class(item)
        if cls is not None:
            classes.append(cls)
    if not classes:
        raise TextsegError('no labels given: pass class names such as --labels "cat,dog;puppy,grass"')
    if len(classes) > MAX_LABELS:
        raise TextsegError(f"{len(classes)} labels given; the limit is {MAX_LABELS}")
    seen: dict[str, str] = {}
    for c in classes:
        key = c.name.lower()
        if key in seen:
            raise TextsegError(f"label {c.name!r} is given twice; merge them as synonyms with ';'")
        seen[key] = c.name
    return classes


def read_labels_file(path: str | Path) -> list[LabelClass]:
    """One class per line, ``;`` between synonyms; ``name: prompt; prompt`` gives a display name
    that differs from the prompts (the format of ``textseg/data/classnames/*.txt``). Blank lines
    and ``#`` comments are ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TextsegError(f"cannot read labels file {path}: {e}") from None
    items: list = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, rest = line.partition(":")
        if sep and name.strip() and rest.strip() and ";" not in name:
            cls = _make_class(rest.split(";"))
            if cls is not None:
                items.append(LabelClass(_clean(name), cls.synonyms))
        else:
            items.append(line)
    return parse_labels(items)


def resolve_templates(templates: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"imagenet"`` (the 80 CLIP templates), ``"simple"``, ``"none"`` (the label as is), or a list of
    templates each containing ``{}``."""
    if templates is None or templates == "none":
        return ("{}",)
    if isinstance(templates, str):
        if templates in ("imagenet", "simple"):
            from textseg import prompts  # the CLIP core's template lists

            return tuple(prompts.IMAGENET_TEMPLATES if templates == "imagenet" else prompts.SIMPLE_TEMPLATES)
        if "{}" in templates:
            return (templates,)
        raise TextsegError(f"unknown template set {templates!r}: use imagenet, simple, none or a text with {{}}")
    out = tuple(templates)
    if not out or any("{}" not in t for t in out):
        raise TextsegError("every prompt template must contain '{}' (where the label goes)")
    return out


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's weights (names, shapes and values), for on-disk cache keys.

    Uses ``model.fingerprint`` when the model defines it (e.g. the sha256 of its checkpoint).
    """
    fp = getattr(model, "fingerprint", None)
    if isinstance(fp, str) and fp:
        return fp[:16]
    h = hashlib.sha256(type(model).__name__.encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.numel():
            flat = t.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 256)][:256].float().cpu()
            h.update(sample.numpy().tobytes())
            h.update(repr(float(flat.float().sum())).encode())
    return h.hexdigest()[:16]


def _templates_key(templates: Sequence[str]) -> str:
    return hashlib.sha256("\x1f".join(templates).encode()).hexdigest()[:12]


def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def default_cache_dir() -> Path:
    root = os.environ.get("TEXTSEG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "textseg")
    return Path(root) / "text"


class TextEmbeddingCache:
    """Embeddings of texts under a model and a template set, computed once.

    ``embed(texts, templates) -> N x D`` calls ``model.embed_texts`` only for texts it has not seen
    (in batches of ``batch_prompts`` prompts). With ``disk_dir`` the embeddings also persist in
    ``<disk_dir>/<model fingerprint>-<templates hash>.safetensors``. Use :meth:`for_model` to share
    one cache between all users of a model.
    """

    def __init__(self, model, disk_dir: str | Path | None = None, batch_prompts: int = 2048):
        self.model = model
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self.batch_prompts = batch_prompts
        self._mem: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}
        self._fingerprint: str | None = None
        self.text_forwards = 0  # number of embed_texts calls made (for tests / stats)

    @classmethod
    def for_model(cls, model, disk_dir: str | Path | None = None) -> TextEmbeddingCache:
        cache = _CACHES.get(model)
        if cache is None:
            cache = cls(model, disk_dir)
            _CACHES[model] = cache
        elif disk_dir and cache.disk_dir is None:
            cache.disk_dir = Path(disk_dir)
        return cache

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def _disk_path(self, templates: tuple[str, ...]) -> Path | None:
        if self.disk_dir is None:
            return None
        return self.disk_dir / f"{self.fingerprint}-{_templates_key(templates)}.safetensors"

    def _load_disk(self, templates: tuple[str, ...], table: dict[str, torch.Tensor]) -> None:
        path = self._disk_path(templates)
        if path is None or not path.is_file():
            return
        from safetensors.torch import load_file

        try:
            stored = load_file(str(path))
        except Exception:  # a damaged cache file is ignored and rewritten
            return
        for k, v in stored.items():
            table.setdefault(k, v)

    def _save_disk(self, templates: tuple[str, ...], table: dict[str, torch.Tensor]) -> None:
        path = self._disk_path(templates)
        if path is None:
            return
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.contiguous() for k, v in table.items()}, str(tmp))
        os.replace(tmp, path)

    @torch.no_grad()
    def embed(self, texts: Sequence[str], templates: str | Sequence[str] | None = "imagenet") -> torch.Tensor:
        """``N`` texts -> ``N x D`` embeddings (as returned by ``model.embed_texts``), on CPU, float32."""
        if not texts:
            raise TextsegError("no texts to embed")
        tpl = resolve_templates(templates)
        table = self._mem.get(tpl)
        if table is None:
            table = self._mem[tpl] = {}
            self._load_disk(tpl, table)
        keys = [_text_key(t) for t in texts]
        missing = list(dict.fromkeys(t for t, k in zip(texts, keys) if k not in table))
        if missing:
            step = max(1, self.batch_prompts // len(tpl))
            for i in range(0, len(missing), step):
                chunk = missing[i : i + step]
                emb = self.model.embed_texts(chunk, tpl)
                self.text_forwards += 1
                for t, e in zip(chunk, emb.detach().float().cpu()):
                    table[_text_key(t)] = e.clone()
            self._save_disk(tpl, table)
        return torch.stack([table[k] for k in keys])
