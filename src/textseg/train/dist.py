"""Training-only collectives (gathers with gradient); the process-group setup and rank helpers
live in :mod:`textseg.distributed`, the one home of distributed setup.

    feats = all_gather_with_grad(local)   # (world_size * B) x D, gradient flows back to ``local``
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from textseg.distributed import get_world_size, is_dist


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.world, ctx.n = dist.get_rank(), dist.get_world_size(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every rank's loss used every shard: the local shard's gradient is the sum over ranks.
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (``B x ...``, the same B on every rank) from all ranks in rank order ->
    ``(world_size * B) x ...``; gradients flow back to the local shard.

    Backward sums the incoming gradients over ranks, so with DDP (which averages parameter
    gradients over ranks) the parameter gradients equal those of one process holding the whole
    concatenated batch and computing the same mean loss. Alone, returns ``x`` unchanged.
    """
    if not is_dist() or get_world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)
