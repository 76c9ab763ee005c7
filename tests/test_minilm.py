"""MiniLM text tower: strict load and parity with transformers' BertModel + mean pooling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from textseg.errors import CheckpointError
from textseg.models import minilm as ml

SENTENCES = ["a photo of a cat", "kitty", "A man riding a horse on the beach at sunset.", "automobile",
             "the quick brown fox " * 80]  # the last one is truncated to 256 tokens


@pytest.fixture(scope="module")
def model():
    return ml.minilm()


def test_parity_with_transformers(model):
    transformers = pytest.importorskip("transformers")
    path = str(ml.model_dir())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    hf = transformers.AutoModel.from_pretrained(path).eval()
    batch = tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = hf(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    ref = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    ids = model.tokenize(SENTENCES)
    assert torch.equal(ids, batch["input_ids"])
    emb = model.embed(SENTENCES, batch_size=2)  # several batches, length-sorted
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(SENTENCES)))


def test_semantics_and_padding_invariance(model):
    e = model.embed(["kitty", "cat", "automobile", "car", "banana"])
    assert e[0] @ e[1] > e[0] @ e[2] and e[2] @ e[3] > e[2] @ e[4]
    alone = model.embed(["cat"])
    torch.testing.assert_close(alone[0], e[1], atol=1e-5, rtol=1e-4)  # padding in a batch changes nothing


def test_strict_key_map():
    with pytest.raises(CheckpointError, match="unexpected key"):
        ml.map_hf_bert_keys({"encoder.layer.0.attention.self.rotary.weight": torch.zeros(1)})
    from safetensors.torch import load_file

    raw = load_file(str(ml.model_dir() / "model.safetensors"))
    mapped = ml.map_hf_bert_keys(raw)
    assert set(mapped) == set(ml.MiniLM().state_dict())
