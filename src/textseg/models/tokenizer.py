"""OpenAI CLIP's byte-level BPE tokenizer, id-for-id.

Text is cleaned as OpenAI does (``ftfy.fix_text``, HTML unescaping twice, whitespace collapsed,
lower-cased), split with CLIP's regex, mapped byte-wise to printable unicode and merged with the
49,152-entry BPE vocabulary shipped as package data (``assets/bpe_simple_vocab_16e6.txt.gz``, MIT,
from openai/CLIP). Every sequence is ``<|startoftext|> ... <|endoftext|>`` (ids 49406 / 49407),
zero-padded to ``context_length``; over-long texts are cut and keep the end token last.

Producing ids needs no torch (``ClipTokenizer.encode`` / ``encode_batch``); ``tokenize`` returns an
``N x context_length`` LongTensor. Both word-level BPE and whole texts are cached (LRU), so
re-tokenizing label lists is cheap.

>>> from textseg.models.tokenizer import tokenize
>>> tokenize(["a dog"])[0, :4].tolist()
[49406, 320, 1929, 49407]
"""

from __future__ import annotations

import gzip
import html
import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import regex

try:  # ftfy is what OpenAI runs; without it we apply its main fixes for well-formed text
    import ftfy
except ImportError:  # pragma: no cover - ftfy is a core dependency
    ftfy = None

VOCAB_PATH = Path(__file__).resolve().parents[1] / "assets" / "bpe_simple_vocab_16e6.txt.gz"
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
SOT_ID, EOT_ID = 49406, 49407
CONTEXT_LENGTH = 77

# CLIP's pre-tokenization: special tokens, English contractions, letter runs, single digits,
# runs of anything else that is not whitespace.
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP reversible map from the 256 byte values to printable unicode characters:
    printable Latin-1 bytes map to themselves, the rest to code points 256, 257, ... in order.
    The dict's insertion order (printable bytes first) is the order of the first 256 vocab ids."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clean_text(text: str) -> str:
    """OpenAI's cleanup: fix mojibake/quotes/width (ftfy), unescape HTML twice, collapse whitespace,
    lower-case."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    else:  # pragma: no cover
        text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


class ClipTokenizer:
    """The CLIP BPE tokenizer. ``encode(text) -> list[int]`` (no special tokens),
    ``encode_batch(texts) -> list[list[int]]`` (padded, with special tokens), ``decode(ids)``, and
    ``__call__(texts) -> LongTensor N x context_length``."""

    def __init__(self, vocab_path: str | Path = VOCAB_PATH, context_length: int = CONTEXT_LENGTH,
                 cache_size: int = 1 << 16):
        self.context_length = context_length
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # line 0 is a version header; the first 48,894 merges are used (49152 - 256 bytes - 2 specials).
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        byte_chars = list(self.byte_encoder.values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.decoder: dict[int, str] = {i: tok for tok, i in self.encoder.items()}
        self.bpe_ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
        self.vocab_size = len(vocab)
        self._bpe = lru_cache(maxsize=cache_size)(self._bpe_uncached)
        self.encode = lru_cache(maxsize=cache_size)(self._encode_uncached)  # type: ignore[method-assign]

    # -- BPE -----------------------------------------------------------------------------------
    def _bpe_uncached(self, word: str) -> tuple[str, ...]:
        """Merge the characters of one pre-token (already byte-mapped) by rank; the last symbol
        carries the end-of-word marker ``</w>``."""
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols[:-1], symbols[1:])}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i < len(symbols) - 1 and symbols[i] == best[0] and symbols[i + 1] == best[1]:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(symbols)

    def _encode_uncached(self, text: str) -> tuple[int, ...]:
        ids: list[int] = []
        for piece in _PATTERN.findall(clean_text(text)):
            if piece in (SOT, EOT):  # literal special-token strings map to their ids, as in OpenAI's
                ids.append(self.encoder[piece])
                continue
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self._bpe(mapped))
        return tuple(ids)

    def encode(self, text: str) -> tuple[int, ...]:  # replaced per instance by the cached version
        return self._encode_uncached(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Ids back to text (special tokens and padding dropped; word ends become spaces)."""
        skip = {0, self.sot_id, self.eot_id}
        text = "".join(self.decoder[int(i)] for i in ids if int(i) not in skip)
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    # -- batches -------------------------------------------------------------------------------
    def encode_batch(self, texts: str | Sequence[str], context_length: int | None = None,
                     truncate: bool = True) -> list[list[int]]:
        """``[SOT, ids..., EOT, 0, ...]`` per text, each exactly ``context_length`` long (no torch).

        Over-long texts are cut to ``context_length`` with EOT as the last id (``truncate=False``
        raises ``ValueError`` instead, like OpenAI's ``clip.tokenize``)."""
        n = context_length or self.context_length
        if isinstance(texts, str):
            texts = [texts]
        rows = []
        for text in texts:
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > n:
                if not truncate:
                    raise ValueError(f"input {text!r} is too long for context length {n}")
                ids = ids[:n]
                ids[-1] = self.eot_id
            rows.append(ids + [0] * (n - len(ids)))
        return rows

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None,
                 truncate: bool = True):
        """``N x context_length`` LongTensor of token ids (torch imported here only)."""
        import torch

        return torch.tensor(self.encode_batch(texts, context_length, truncate), dtype=torch.long)


@lru_cache(maxsize=1)
def get_tokenizer() -> ClipTokenizer:
    """The shared default tokenizer (vocabulary read once per process)."""
    return ClipTokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH, truncate: bool = True):
    """OpenAI ``clip.tokenize``: texts -> ``N x context_length`` LongTensor (SOT ... EOT, zero-padded;
    truncation keeps EOT)."""
    return get_tokenizer()(texts, context_length, truncate)
