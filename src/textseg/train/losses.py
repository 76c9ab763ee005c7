"""Contrastive losses: symmetric InfoNCE (the CLIP loss) with a learnable, clamped logit scale.

Under ``torchrun`` the features of every rank are gathered (with gradient to the local shard) so
each image is contrasted with the texts of the whole global batch; with DDP the parameter
gradients then equal those of a single process holding the whole batch.

    scale = LogitScale()                                   # exp(log(1/0.07)) = 14.3, clamped at 100
    loss_fn = ClipLoss(local_loss=True)
    loss = loss_fn(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale())
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from textseg.distributed import get_rank, get_world_size
from textseg.train.dist import all_gather_with_grad

MAX_LOGIT_SCALE = 100.0


class LogitScale(nn.Module):
    """A learnable temperature stored as ``log(scale)``; ``forward()`` returns ``exp`` of it,
    clamped at ``max_scale`` (100 as in CLIP) so training cannot blow it up."""

    def __init__(self, init: float = 1 / 0.07, max_scale: float = MAX_LOGIT_SCALE, learnable: bool = True):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(init)), requires_grad=learnable)
        self.max_log = math.log(max_scale)

    def forward(self) -> torch.Tensor:
        return self.log_scale.clamp(max=self.max_log).exp()


def info_nce(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    local_loss: bool = False,
    gather: bool = True,
) -> torch.Tensor:
    """Symmetric InfoNCE: ``(CE(image->text) + CE(text->image)) / 2`` where pair i is the positive.

    ``image_features``, ``text_features``: ``B x D`` L2-normalised features of this process's
    B pairs (row i of one matches row i of the other). ``logit_scale``: the multiplier (already
    exponentiated, e.g. ``LogitScale()()``).

    With ``gather`` and a process group, features of all ranks are gathered (``N = world * B``).
    ``local_loss=False`` computes the full ``N x N`` loss on every rank (as one process would);
    ``local_loss=True`` (open_clip's memory trick) computes only this rank's ``B x N`` rows of
    both directions, i.e. its share of the same global loss. Both give the single-process
    parameter gradients under DDP; the local loss's value is this rank's share (its mean over ranks
    equals the global loss). Returns a scalar.
    """
    b = image_features.shape[0]
    if gather and get_world_size() > 1:
        all_img = all_gather_with_grad(image_features)
        all_txt = all_gather_with_grad(text_features)
    else:
        all_img, all_txt = image_features, text_features
    if local_loss:
        logits_i2t = logit_scale * image_features @ all_txt.t()  # B x N
        logits_t2i = logit_scale * text_features @ all_img.t()  # B x N
        labels = torch.arange(b, device=image_features.device) + b * (get_rank() if all_img is not image_features else 0)
    else:
        logits_i2t = logit_scale * all_img @ all_txt.t()  # N x N
        logits_t2i = logits_i2t.t()
        labels = torch.arange(all_img.shape[0], device=image_features.device)
    return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


class ClipLoss(nn.Module):
    """:func:`info_nce` as a module (holds the ``local_loss`` / ``gather`` choice)."""

    def __init__(self, local_loss: bool = False, gather: bool = True):
        super().__init__()
        self.local_loss, self.gather = local_loss, gather

    def forward(self, image_features, text_features, logit_scale) -> torch.Tensor:
        return info_nce(image_features, text_features, logit_scale, self.local_loss, self.gather)
