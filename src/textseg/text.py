"""The text side of segmentation: the label grammar (classes with synonyms) and a text-embedding cache.

The label grammar, the one parser of class names in textseg (``segment``, ``classify``, ``eval``,
``serve`` and ``cam`` all read labels through it):

- **Command line / one string** (``--labels``, the web app's ``labels`` field,
  ``parse_labels("cat, dog; puppy, grass")``): ``,`` separates classes, ``;`` separates the
  synonyms of one class -> ``cat``, ``dog`` (scored by "dog" and "puppy"), ``grass``.
- **File** (``--labels-file``, ``--classes``, the shipped ``textseg/data/classnames/*.txt``;
  :func:`read_labels_file`): one line is one class, in class-id order; within a line ``,`` or ``;``
  separate synonyms (the ``cls_*.txt`` format of SCLIP / NACLIP / ClearCLIP, which separate them
  with ``,``); ``name: prompt; prompt`` gives a display name that differs from the prompts
  (``tvmonitor: tv monitor; television``). Blank lines and ``#`` comments are skipped. So the line
  ``person, person in shirt`` is one class ``person`` with two prompts, for every command.
- **Python sequence** (``parse_labels(["tv: television; tv monitor", ["sofa", "couch"]])``): each
  item is one class, a string read like a file line, a list of synonyms, or a :class:`LabelClass`.

The display name is the ``name:`` part, else the first synonym. Whitespace is normalised and empty
entries dropped; repeated synonyms of a class are merged; two classes with the same name
(case-insensitively) are an error. A class is scored as the **max over its synonyms** of the logits
(per pixel for segmentation, per image for classification); each synonym's embedding is the
model's prompt ensemble (``DualEncoder.embed_texts``: mean over templates, L2-normalised;
templates resolved by :func:`textseg.prompts.resolve_templates`).

:class:`TextEmbeddingCache` remembers every ``(templates, text)`` embedding a model has computed (in
memory, shared by every Segmenter of that model; optionally on disk keyed by a fingerprint of the
model's weights + the template set), so a repeated label costs no text forward pass.
"""

from __future__ import annotations

import hashlib
import os
import re
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from textseg.errors import TextsegError
from textseg.prompts import resolve_templates

BACKGROUND = "background"
MAX_LABELS = 65_000  # label maps are written as 16-bit PNGs beyond 254 labels
MAX_LABEL_CHARS = 1_000  # longer texts are refused; the tokenizer truncates at 77 tokens anyway
MAX_PROMPTS = 65_000  # synonyms over all classes (each one is a text forward per template)
CACHE_BYTES = 64 << 20  # default bound of a TextEmbeddingCache, in memory and per file on disk

_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class LabelClass:
    """One output class: ``name`` (shown, written to JSON) and the ``synonyms`` it is scored by."""

    name: str
    synonyms: tuple[str, ...]


def _clean(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def _make_class(synonyms: Iterable[str], name: str | None = None) -> LabelClass | None:
    seen: dict[str, None] = {}  # ordered set: linear in the number of synonyms
    for s in synonyms:
        if not isinstance(s, str):
            raise TextsegError(f"labels must be strings, got {type(s).__name__}")
        s = _clean(s)
        if len(s) > MAX_LABEL_CHARS:
            raise TextsegError(f"label {s[:40]!r}... is {len(s)} characters long; the limit is {MAX_LABEL_CHARS}")
        if s:
            seen[s] = None
    syn = list(seen)
    name = _clean(name) if name else ""
    if name and not syn:
        syn = [name]
    return LabelClass(name or syn[0], tuple(syn)) if syn else None


def parse_class_spec(spec: str, separators: str = ",;") -> LabelClass | None:
    """One class from ``"[name:] synonym<sep>synonym..."`` (a line of a labels file with the default
    ``separators``; one comma-separated item of ``--labels`` with ``";"``). None when it is empty.

    ``"tvmonitor: tv monitor; television"`` -> ``LabelClass("tvmonitor", ("tv monitor", "television"))``;
    ``"person, person in shirt"`` -> ``LabelClass("person", ("person", "person in shirt"))``."""
    name, sep, rest = spec.partition(":")
    if not (sep and name.strip() and not any(c in name for c in separators)):
        name, rest = None, spec  # no display name (or the colon belongs to a synonym)
    return _make_class(re.split(f"[{re.escape(separators)}]", rest), name)


def parse_labels(labels: str | Sequence[str | Sequence[str] | LabelClass],
                 max_prompts: int = MAX_PROMPTS) -> list[LabelClass]:
    """Classes from a labels string (``"cat, dog; puppy"``: ``,`` between classes, ``;`` between
    synonyms) or a sequence (one class per item: a string read as a file line, a list of synonyms,
    or a :class:`LabelClass`); the grammar is in the module docstring. Raises :class:`TextsegError`
    when no label is left, a class name repeats (case-insensitively), there are more than
    ``MAX_LABELS`` classes or more than ``max_prompts`` synonyms in all (synonyms cost a text
    forward each: a limit on classes alone is bypassed with thousands of ``;``)."""
    if isinstance(labels, str):
        classes = [parse_class_spec(item, ";") for item in labels.split(",")]
    elif isinstance(labels, LabelClass):
        classes = [_make_class(labels.synonyms, labels.name)]
    else:
        classes = []
        for item in labels:
            if isinstance(item, LabelClass):
                classes.append(_make_class(item.synonyms, item.name))
            elif isinstance(item, str):
                classes.append(parse_class_spec(item))
            else:
                classes.append(_make_class(item))
    classes = [c for c in classes if c is not None]
    if not classes:
        raise TextsegError('no labels given: pass class names such as --labels "cat,dog;puppy,grass"')
    if len(classes) > MAX_LABELS:
        raise TextsegError(f"{len(classes)} labels given; the limit is {MAX_LABELS}")
    prompts = sum(len(c.synonyms) for c in classes)
    if prompts > max_prompts:
        raise TextsegError(f"{prompts} label texts (classes and their synonyms) given; the limit is {max_prompts}")
    seen: dict[str, str] = {}
    for c in classes:
        key = c.name.lower()
        if key in seen:
            raise TextsegError(f"label {c.name!r} is given twice; merge them as synonyms with ';'")
        seen[key] = c.name
    return classes


def read_labels_file(path: str | Path) -> list[LabelClass]:
    """Classes of a labels file: one class per line (``[name:] prompt; prompt``, ``,`` or ``;``
    between prompts), blank lines and ``#`` comments skipped (the grammar is in the module
    docstring)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TextsegError(f"cannot read labels file {path}: {e}") from None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise TextsegError(f"labels file {path} holds no classes")
    return parse_labels(lines)


def load_labels(labels: str | None = None, labels_file: str | Path | None = None) -> list[LabelClass]:
    """Classes from exactly one of a labels string (``--labels``) and a labels file (``--labels-file``)."""
    if labels is not None and labels_file is not None:
        raise TextsegError("give either --labels or --labels-file, not both")
    if labels_file is not None:
        return read_labels_file(labels_file)
    if labels is None:
        raise TextsegError('no labels: pass --labels "cat,dog;puppy,grass" or --labels-file FILE')
    return parse_labels(labels)


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

    The cache is an LRU bounded in bytes (``max_bytes``, default :data:`CACHE_BYTES`): the least
    recently used embeddings are dropped from memory, and a disk file holds at most the entries of
    its template set that are in memory, so neither grows without bound under unique labels.
    """

    def __init__(self, model, disk_dir: str | Path | None = None, batch_prompts: int = 2048,
                 max_bytes: int = CACHE_BYTES):
        self.model = model
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self.batch_prompts = batch_prompts
        self.max_bytes = max_bytes
        self._mem: OrderedDict[tuple[tuple[str, ...], str], torch.Tensor] = OrderedDict()
        self._loaded: set[tuple[str, ...]] = set()
        self.nbytes = 0
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

    def _put(self, key: tuple[tuple[str, ...], str], value: torch.Tensor) -> None:
        old = self._mem.pop(key, None)
        if old is not None:
            self.nbytes -= old.numel() * old.element_size()
        self._mem[key] = value
        self.nbytes += value.numel() * value.element_size()
        while self.nbytes > self.max_bytes and len(self._mem) > 1:
            _, dropped = self._mem.popitem(last=False)
            self.nbytes -= dropped.numel() * dropped.element_size()

    def _get(self, key: tuple[tuple[str, ...], str]) -> torch.Tensor | None:
        value = self._mem.get(key)
        if value is not None:
            self._mem.move_to_end(key)
        return value

    def _load_disk(self, templates: tuple[str, ...]) -> None:
        path = self._disk_path(templates)
        if path is None or not path.is_file():
            return
        if path.stat().st_size > 2 * self.max_bytes + (1 << 20):
            return  # larger than this cache may hold: ignored (and rewritten within the bound)
        from safetensors.torch import load_file

        try:
            stored = load_file(str(path))
        except Exception:  # a damaged cache file is ignored and rewritten
            return
        for k, v in stored.items():
            if (templates, k) not in self._mem:
                self._put((templates, k), v)

    def _save_disk(self, templates: tuple[str, ...]) -> None:
        path = self._disk_path(templates)
        if path is None:
            return
        from safetensors.torch import save

        from textseg.io import atomic_write

        table = {k: v.contiguous() for (tpl, k), v in self._mem.items() if tpl == templates}
        try:
            with atomic_write(path) as fh:
                fh.write(save(table))
        except (TextsegError, OSError):  # an unwritable cache folder costs only the disk copy
            pass

    @torch.no_grad()
    def embed(self, texts: Sequence[str], templates: str | Sequence[str] = "imagenet") -> torch.Tensor:
        """``N`` texts -> ``N x D`` embeddings (as returned by ``model.embed_texts``), on CPU, float32;
        ``templates`` as :func:`textseg.prompts.resolve_templates`."""
        if not texts:
            raise TextsegError("no texts to embed")
        tpl = resolve_templates(templates)
        if tpl not in self._loaded:
            self._loaded.add(tpl)
            self._load_disk(tpl)
        keys = [_text_key(t) for t in texts]
        found: dict[str, torch.Tensor] = {}  # this call's embeddings, whatever the LRU drops meanwhile
        for k in keys:
            if k not in found and (v := self._get((tpl, k))) is not None:
                found[k] = v
        missing = list(dict.fromkeys(t for t, k in zip(texts, keys) if k not in found))
        if missing:
            step = max(1, self.batch_prompts // len(tpl))
            for i in range(0, len(missing), step):
                chunk = missing[i : i + step]
                emb = self.model.embed_texts(chunk, tpl)
                self.text_forwards += 1
                for t, e in zip(chunk, emb.detach().float().cpu()):
                    found[_text_key(t)] = e.clone()
                    self._put((tpl, _text_key(t)), found[_text_key(t)])
            self._save_disk(tpl)
        return torch.stack([found[k] for k in keys])
