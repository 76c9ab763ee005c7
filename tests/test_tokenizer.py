"""CLIP BPE tokenizer: ids equal OpenAI's on tricky strings.

Expected ids: the anchors ``a diagram / a dog / a cat`` are the ids printed in openai/CLIP's README
example; the rest were cross-checked against Hugging Face's independent (Rust) BPE implementation
(``CLIPTokenizer`` built from the same vocabulary, test below) for NFC-stable strings, and for strings
that OpenAI's ``ftfy`` + double HTML-unescape cleanup changes, against the cleaned text.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time

import pytest
import torch

from textseg.models.tokenizer import (
    EOT_ID,
    SOT_ID,
    VOCAB_PATH,
    ClipTokenizer,
    clean_text,
    get_tokenizer,
    tokenize,
)

KNOWN = {
    "a diagram": [320, 22697],
    "a dog": [320, 1929],
    "a cat": [320, 2368],
    "a photo of a cat.": [320, 1125, 539, 320, 2368, 269],
    "Hello   World!!\n\tTabs": [3306, 1002, 748, 29163],  # case + whitespace collapse
    "naïve café RÉSUMÉ": [1097, 35689, 563, 15304, 29106, 7054, 4166],
    "I'm can't we'll THEY'RE": [328, 880, 753, 713, 649, 1342, 889, 982],  # contractions split
    "🐶 dog 🐱🐱 cat": [10631, 1929, 35710, 22979, 2368],  # emoji
    "东京塔": [19759, 250, 21078, 105, 161, 94, 498],  # CJK falls back to byte pieces
    "12345 3.14": [272, 273, 274, 275, 276, 274, 269, 272, 275],  # digits one by one
    "<|endoftext|> hi": [49407, 1883],
    "&amp;amp; rock &lt;3": [261, 2172, 283, 274],  # HTML unescaped twice: "& rock <3"
    "“curly” ‘quotes’": [257, 20795, 257, 262, 5808, 262],  # ftfy uncurls quotes
    "ＦＵＬＬ ｗｉｄｔｈ": [1476, 23571],  # ftfy: full-width -> ASCII
    "ﬁne": [3797],  # ftfy: ligature expanded
    "ß straße": [127, 509, 1894, 127, 253, 324],
}


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return get_tokenizer()


@pytest.mark.parametrize("text", list(KNOWN))
def test_known_ids(tok, text):
    assert list(tok.encode(text)) == KNOWN[text]


def test_cleanup_equivalences(tok):
    assert tok.encode("“curly” ‘quotes’") == tok.encode("\"curly\" 'quotes'")
    assert tok.encode("ＦＵＬＬ ｗｉｄｔｈ") == tok.encode("full width")
    assert tok.encode("&amp;amp; rock &lt;3") == tok.encode("& rock <3")
    assert clean_text("  A\u00a0B\n") == "a b"


def test_batch_layout_and_truncation(tok):
    ids = tokenize(["a dog", "", "a cat"])
    assert ids.dtype == torch.long and ids.shape == (3, 77)
    assert ids[0, :4].tolist() == [SOT_ID, 320, 1929, EOT_ID] and ids[0, 4:].eq(0).all()
    assert ids[1, :2].tolist() == [SOT_ID, EOT_ID]
    long = tokenize(["a " * 200], context_length=77)
    assert long.shape == (1, 77) and long[0, 0] == SOT_ID and long[0, -1] == EOT_ID
    assert long[0, 1:-1].eq(320).all()
    with pytest.raises(ValueError):
        tokenize(["a " * 200], truncate=False)
    short = tokenize("a dog", context_length=16)
    assert short.shape == (1, 16)


def test_decode_roundtrip(tok):
    assert tok.decode(tokenize(["A Photo of 2 Cats!"])[0].tolist()) == "a photo of 2 cats !"


def test_matches_huggingface_bpe(tok, tmp_path):
    """HF's tokenizers (Rust BPE) on the same vocab/merges agrees wherever cleanup is NFC-only."""
    transformers = pytest.importorskip("transformers")
    with gzip.open(VOCAB_PATH, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    (tmp_path / "vocab.json").write_text(json.dumps(tok.encoder))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    hf = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    texts = [t for t in KNOWN if clean_text(t) == " ".join(t.split()).lower()] + [
        "Ελληνικά русский עברית العربية हिन्दी", "x" * 300, "don't stop-believing 4ever_and_ever",
        "👨‍👩‍👧 family", "tab\tand\u3000ideographic space", "MiXeD CaSe ÅÄÖ"]
    # seeded fuzz over mixed scripts, digits, punctuation, emoji and odd whitespace
    import random
    import unicodedata

    rng = random.Random(0)
    alphabet = ("abcxyzABCXYZ0123456789 ,.;:!?'-_/()[]{}#@&%$*+=~`^|\\\"\t\n"
                "éèüßøåÆŒçñ" "αβγΩЖжשלוםمرحبا" "中文字東京かなカナ한국어" "😀🐱🚀👍🏽✨" "\u00a0\u2009\u3000")
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        if clean_text(text) != " ".join(unicodedata.normalize("NFC", text).split()).lower():
            continue  # ftfy / HTML cleanup changes it: HF does not do that step
        texts.append(text)
    assert len(texts) > 150
    for text in texts:
        assert list(tok.encode(text)) == hf(text, add_special_tokens=False)["input_ids"], text


def test_no_torch_needed_and_fast():
    code = ("import sys; from textseg.models.tokenizer import ClipTokenizer; t = ClipTokenizer();"
            "r = t.encode_batch(['a dog']); assert r[0][:4] == [49406, 320, 1929, 49407];"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
    labels = [f"label {i} of things" for i in range(10_000)]
    tokenize(labels)  # warm-up fills the cache
    t0 = time.perf_counter()
    tokenize(labels)
    assert time.perf_counter() - t0 < 1.0
