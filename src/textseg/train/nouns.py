"""Nouns from captions, offline, for GroupViT's multi-label contrastive loss.

GroupViT (NVlabs) tags captions with NLTK and keeps nouns; NLTK's tagger data is a run-time download,
so here the part-of-speech lexicon of ``lemminflect`` (a PyPI package that ships its data) decides
which words can be nouns, and a small grammar rule picks the *head* of each noun phrase: a word that
can be a noun is kept unless the next word can be a noun too (then it is a modifier: "red star",
"tennis racket" -> "star", "racket"). Function words (articles, prepositions, pronouns, numbers,
colours used as adjectives...) never count. Nouns are returned singular (lemmatised), in order,
without repeats.

    >>> extract_nouns("a red star above a striped circle on a dotted background")
    ['star', 'circle', 'background']
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from functools import lru_cache

from textseg.errors import TextsegError

STOPWORDS = frozenset("""
a an the this that these those some any each every no another other such
of in on at by for with without from to into onto over under above below behind beside besides between
among near next beneath across along around through toward towards up down out off upon within inside
outside against about after before during while than like as via per
and or but nor so yet if then there here where when which who whom whose what why how
i me my mine we us our you your he him his she her it its they them their one ones
is are was were be been being am has have had do does did can could will would shall should may might
must not very too also just only
left right top bottom front back middle center centre side
two three four five six seven eight nine ten many several few lot lots
""".split())

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


@lru_cache(maxsize=1 << 16)
def _tags(word: str) -> tuple[str | None, bool]:
    """``(singular noun form or None, can be an adjective)`` for one lower-case word.

    Words the lexicon does not know (``frisbee``) are taken as nouns; ``-ing`` forms of verbs
    ("sitting") are not nouns; stop words are neither."""
    if word in STOPWORDS or len(word) < 2:
        return None, False
    try:
        import lemminflect
    except ImportError:  # pragma: no cover - a declared dependency of the train extra
        raise TextsegError("noun extraction needs lemminflect: pip install 'textseg[train]'") from None
    lemmas = lemminflect.getAllLemmas(word)
    adj = "ADJ" in lemmas or ("VERB" in lemmas and word.endswith("ed"))
    if not lemmas:
        return (word if len(word) > 2 else None), False
    if "NOUN" not in lemmas or ("VERB" in lemmas and word.endswith("ing")):
        return None, adj
    return lemmas["NOUN"][0], adj


def extract_nouns(caption: str) -> list[str]:
    """Head nouns of ``caption``, singular, in order of appearance, without repeats."""
    tags = [_tags(w) for w in _WORD.findall(caption.lower())]
    out: list[str] = []
    for i, (noun, adj) in enumerate(tags):
        if noun is None:
            continue
        if i + 1 < len(tags):
            nxt_noun, nxt_adj = tags[i + 1]
            if nxt_noun is not None or (adj and nxt_adj):
                continue  # a modifier: "red star", "tennis racket", "black striped circle"
        if noun not in out:
            out.append(noun)
    return out


def noun_prompts(caption: str, k: int, template: str | Sequence[str] = "a photo of a {}.",
                 rng: random.Random | None = None) -> list[str]:
    """``k`` extra positive texts for an image: prompts for up to ``k`` of its caption's nouns (chosen
    at random when there are more), padded with the caption itself as NVlabs does."""
    rng = rng or random
    nouns = extract_nouns(caption)
    if len(nouns) > k:
        nouns = rng.sample(nouns, k)
    templates = [template] if isinstance(template, str) else list(template)
    prompts = [rng.choice(templates).format(n) for n in nouns]
    return prompts + [caption] * (k - len(prompts))
