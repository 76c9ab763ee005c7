"""An ensemble of CLIP-like dual encoders that scores by the mean of its members' cosines.

Each member embeds an image (or a text) on its own; the ensemble's embedding is the concatenation of the
members' L2-normalised embeddings divided by ``sqrt(n)``. That vector has unit norm, and the cosine of two
such vectors is the mean of the members' cosines:

    cos(cat(u_i) / sqrt(n), cat(v_i) / sqrt(n)) = (1 / n) sum_i cos(u_i, v_i)

so everything that scores by cosine (CLIMS' OTM / BTM / CBS, the evaluator probe, zero-shot
classification) sees the members' average judgement without knowing it is an ensemble. textseg's option
for CLIMS' evaluator (``clims.evaluator_weights=A,B,C``): the official code uses one CLIP; a small
evaluator trained from scratch is one draw of many, and the average of a few draws is a steadier judge.
The members must share the input format (``preprocess_cfg``: image size, mean, std), since one input
tensor feeds them all. Dense features and tokenising are not defined for an ensemble (members
tokenise differently); use :meth:`embed_texts`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from textseg.errors import TextsegError
from textseg.models.base import DualEncoder


class EnsembleEvaluator(DualEncoder):
    name = "ensemble"

    def __init__(self, members: Sequence[DualEncoder]):
        super().__init__()
        from textseg.models.offline import OfflineModel

        members = list(members)
        if len(members) < 2:
            raise TextsegError(f"an ensemble needs at least 2 models, got {len(members)}")
        if any(isinstance(m, OfflineModel) for m in members):
            raise TextsegError("the offline model does not score by cosine: it cannot be an ensemble member")
        cfgs = {(m.preprocess_cfg.image_size, tuple(m.preprocess_cfg.mean), tuple(m.preprocess_cfg.std))
                for m in members}
        if len(cfgs) > 1:
            raise TextsegError(f"ensemble members disagree on their input (image size, mean, std): {sorted(cfgs)}")
        self.members = nn.ModuleList(members)
        self.preprocess_cfg = members[0].preprocess_cfg

    def _join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([F.normalize(p.float(), dim=-1) for p in parts], dim=-1) / math.sqrt(len(parts))

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``B x 3 x H x W`` -> ``B x (sum of the members' D)``, unit norm whatever ``normalize``."""
        return self._join([m.encode_image(pixels) for m in self.members])

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], templates: Sequence[str] = ("{}",)) -> torch.Tensor:
        return self._join([m.embed_texts(texts, templates) for m in self.members])

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        raise TextsegError("an ensemble has no single tokenizer: use embed_texts")

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        raise TextsegError("an ensemble has no single tokenizer: use embed_texts")

    def encode_dense(self, pixels, mode=None, text=None, options=None):
        raise TextsegError("an ensemble evaluator has no dense features")

    @property
    def logit_scale_value(self) -> torch.Tensor:
        """The members' mean logit scale (what ``image_logits`` multiplies the mean cosine by)."""
        return torch.stack([m.logit_scale_value.detach().float() for m in self.members]).mean()  # a frozen judge
