"""The one distributed setup: process group from the ``torchrun`` environment and rank helpers.

Training (:mod:`textseg.train`), evaluation (``textseg eval``, :mod:`textseg.evaluate`) and
metrics all join the group here; training-only collectives (gathers with gradient) live in
:mod:`textseg.train.dist`.

One process per device. Launched by ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set), the
process joins a group (nccl on GPU, gloo on CPU); launched plainly it runs alone and every helper
here degrades to the single-process answer, so training code never branches on "is this
distributed?".

    info = init_distributed()          # DistInfo(rank=0, world_size=1, local_rank=0, device=cpu)
    print0("only rank 0 prints this")
    cleanup()                          # barrier, then leave the group (no-op alone)
"""

from __future__ import annotations

import builtins
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from textseg.errors import TextsegError


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


def init_distributed(device: str | None = "auto", backend: str | None = None,
                     share_cpu_threads: bool = False) -> DistInfo:
    """Join the process group described by the torchrun environment, or run alone.

    ``device``: "auto" or None (cuda:LOCAL_RANK when CUDA is available, else cpu), "cpu", "cuda" or
    "cuda:N" (under torchrun the local rank picks the GPU). ``backend`` defaults to nccl for CUDA and
    gloo for CPU. ``share_cpu_threads``: on CPU under torchrun, give each process
    ``cores // LOCAL_WORLD_SIZE`` torch threads (processes on one machine would otherwise
    oversubscribe the cores). Safe to call twice.
    """
    device = device or "auto"
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        if not torch.cuda.is_available():
            raise TextsegError("device 'cuda' requested but CUDA is not available; use --set train.device=cpu")
        index = local_rank if launched_by_torchrun() or ":" not in device else int(device.split(":")[1])
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1 and not is_dist():
        if share_cpu_threads and not use_cuda:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
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
    """Wait for every rank, then leave the process group (no-op when alone)."""
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (a new tensor; ``t`` when alone). No gradient."""
    if not is_dist():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / get_world_size()
