"""Process-group setup from the ``torchrun`` environment, rank helpers and gathers with gradient.

One process per device. Launched by ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set), the
process joins a group (nccl on GPU, gloo on CPU); launched plainly it runs alone and every helper
here degrades to the single-process answer, so training code never branches on "is this
distributed?".

    info = init_distributed()          # DistInfo(rank=0, world_size=1, local_rank=0, device=cpu)
    print0("only rank 0 prints this")
    feats = all_gather_with_grad(local) # (world_size * B) x D, gradient flows back to ``local``
    cleanup()
"""

from __future__ import annotations

import builtins
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its global ``rank``, the ``world_size``, the node-local rank and
    the device it should use."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str = "auto", backend: str | None = None) -> DistInfo:
    """Join the process group described by the torchrun environment, or run alone.

    ``device``: "auto" (cuda:LOCAL_RANK when CUDA is available, else cpu), "cpu" or "cuda".
    ``backend`` defaults to nccl for CUDA and gloo for CPU. Safe to call twice.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        if not torch.cuda.is_available():
            from textseg.errors import TextsegError

            raise TextsegError("device 'cuda' requested but CUDA is not available; use --set train.device=cpu")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1 and not is_dist():
        dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"), init_method="env://")
    if is_dist():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)
    return DistInfo(0, 1, 0, dev)


def is_dist() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return get_rank() == 0


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0 only (flushes, so torchrun's interleaved logs stay readable)."""
    if is_main():
        kwargs.setdefault("flush", True)
        builtins.print(*args, **kwargs)


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (no-op when alone)."""
    if is_dist():
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (a new tensor; ``t`` when alone). No gradient."""
    if not is_dist():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / get_world_size()


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
