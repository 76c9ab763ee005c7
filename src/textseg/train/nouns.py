"""Words from captions for GroupViT's multi-label contrastive loss, as NVlabs picks them.

NVlabs/GroupViT (``datasets/builder.py``, ``WordAugTokenizeWrapper``, ``word_type='noun'``) splits a
caption with ``nltk.word_tokenize``, tags it with ``nltk.pos_tag`` (NLTK's greedy averaged-perceptron
tagger) and keeps every token tagged ``NN``, ``NNS``, ``NNP`` or ``VB*`` (:data:`OFFICIAL_TAGS`):
as written (no lower-casing, no lemmatisation), in caption order, repeats kept. Then, on every load,
``min(K, n)`` of them are drawn without replacement, each put into a template drawn from the 80
ImageNet prompts, and the list is padded with the caption to ``K`` texts (:func:`noun_prompts`).

Offline tagging: NLTK's tagger weights are a run-time download (``nltk.download``), which textseg
never does. The default ``tagger="packaged"`` runs NLTK's own perceptron tagger code
(``nltk.tag.perceptron.PerceptronTagger``, the same features and greedy decoding as ``pos_tag``) with
the averaged-perceptron weights that the PyPI package ``textblob-aptagger`` ships (M. Honnibal's
WSJ-trained model, the one NLTK's tagger was ported from; read with a restricted unpickler that
admits only dicts, sets, strings and numbers). ``tagger="nltk"`` uses NLTK's own
``averaged_perceptron_tagger_eng`` data instead, when it is installed locally (the exact official
tagger). Tokenisation is NLTK's word tokenizer; sentences are split at ``.``/``!``/``?`` followed by
white space (NLTK's Punkt model is also a download).

    >>> extract_nouns("a dog runs across the field")
    ['dog', 'runs', 'field']
"""

from __future__ import annotations

import pickle
import random
import re
from collections.abc import Sequence
from functools import cache, lru_cache

from textseg.errors import TextsegError

# datasets/builder.py: get_tag(tokenized, ['NN', 'NNS', 'NNP', 'VBG', 'VB', 'VBD', 'VBN', 'VBP', 'VBZ'])
OFFICIAL_TAGS: tuple[str, ...] = ("NN", "NNS", "NNP", "VBG", "VB", "VBD", "VBN", "VBP", "VBZ")
TAGGERS = ("packaged", "nltk")
_MISSING = "GroupViT caption tagging needs nltk and textblob-aptagger: pip install 'textseg[train]'"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class _WeightsUnpickler(pickle.Unpickler):
    """Admits only the built-in containers a tagger model is made of (no code can run)."""

    def find_class(self, module, name):
        if module in ("builtins", "__builtin__") and name in ("set", "frozenset"):
            return set if name == "set" else frozenset
        raise pickle.UnpicklingError(f"tagger weights may not reference {module}.{name}")


@cache
def _tagger(kind: str):
    if kind not in TAGGERS:
        raise TextsegError(f"tagger must be one of {TAGGERS}, got {kind!r}")
    try:
        from nltk.tag.perceptron import PerceptronTagger
    except ImportError:
        raise TextsegError(_MISSING) from None
    if kind == "nltk":
        try:
            return PerceptronTagger()  # reads nltk_data/taggers/averaged_perceptron_tagger_eng; never downloads
        except LookupError:
            raise TextsegError("tagger='nltk' needs NLTK's averaged_perceptron_tagger_eng data installed "
                               "locally (nltk_data); tagger='packaged' works offline") from None
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("textblob_aptagger")  # locate the data without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise TextsegError(_MISSING)
    path = Path(list(spec.submodule_search_locations)[0]) / "trontagger-0.1.0.pickle"
    try:
        with open(path, "rb") as fh:
            weights, tagdict, classes = _WeightsUnpickler(fh, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, ValueError, EOFError) as e:
        raise TextsegError(f"cannot read the tagger weights {path}: {e}") from None
    tagger = PerceptronTagger(load=False)
    tagger.model.weights, tagger.tagdict, tagger.classes = weights, tagdict, set(classes)
    tagger.model.classes = tagger.classes
    return tagger


def tokenize(caption: str) -> list[str]:
    """NLTK word tokens of ``caption`` (sentence by sentence, as ``nltk.word_tokenize``)."""
    try:
        from nltk.tokenize import word_tokenize
    except ImportError:
        raise TextsegError(_MISSING) from None
    return [t for s in _SENTENCE_END.split(caption.strip()) if s for t in word_tokenize(s, preserve_line=True)]


def pos_tag(caption: str, tagger: str = "packaged") -> list[tuple[str, str]]:
    """``[(token, Penn Treebank tag), ...]`` for ``caption`` (one sequence, as ``nltk.pos_tag``)."""
    return list(_pos_tag_cached(caption, tagger))


@lru_cache(maxsize=1 << 16)
def _pos_tag_cached(caption: str, tagger: str) -> tuple[tuple[str, str], ...]:
    # the tagger is deterministic and the collate tags every caption on every load: once per caption
    tokens = tokenize(caption)
    return tuple(map(tuple, _tagger(tagger).tag(tokens))) if tokens else ()


def extract_nouns(caption: str, tags: Sequence[str] = OFFICIAL_TAGS, tagger: str = "packaged") -> list[str]:
    """The caption's tokens tagged with one of ``tags`` (default NVlabs' noun and verb tags), as
    written, in order, repeats kept (NVlabs ``WordAugTokenizeWrapper.get_tag``)."""
    keep = set(tags)
    return [word for word, tag in pos_tag(caption, tagger) if tag in keep]


def noun_prompts(caption: str, k: int, template: str | Sequence[str] = "a photo of a {}.",
                 rng: random.Random | None = None, tagger: str = "packaged") -> list[str]:
    """``k`` extra positive texts for an image: ``min(k, n)`` of the caption's ``n`` words drawn without
    replacement, each in a template drawn from ``template`` (one string or a list), padded with the
    caption itself to ``k`` texts (NVlabs ``WordAugTokenizeWrapper.__call__``)."""
    rng = rng or random
    nouns = extract_nouns(caption, tagger=tagger)
    chosen = rng.sample(nouns, min(k, len(nouns)))
    templates = [template] if isinstance(template, str) else list(template)
    prompts = [rng.choice(templates).format(n) for n in chosen]
    return prompts + [caption] * (k - len(prompts))
