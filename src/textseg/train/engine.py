"""The training engine every textseg recipe (CLIP, LSeg, GroupViT, CLIMS) runs on.

A recipe supplies three things and gets DDP, AMP, accumulation, clipping, schedules, EMA, logging,
evaluation, atomic checkpoints and exact resume:

1. a **training module**: an ``nn.Module`` whose ``forward(batch)`` returns a dict with a scalar
   ``"loss"`` and, optionally, other scalars to log (tensors or floats). Put everything that needs
   gradients inside ``forward`` (DDP synchronises gradients only through ``forward``); hold the
   model and the loss in it. Frozen parts: set ``requires_grad_(False)`` before building the
   Trainer (they get no optimizer state, no DDP sync); if they contain BatchNorm/Dropout,
   override ``train()`` to keep them in eval mode.
2. a **dataset**: map-style (``__getitem__``/``__len__``; the engine shards it over ranks with a
   seeded, resumable :class:`ShardedSampler`, drops the last partial batch) or an
   ``IterableDataset`` that shards itself over ranks and workers (see
   :mod:`textseg.data.imagetext`). Training is counted in optimizer steps; the data restarts at
   each epoch's end (``dataset.set_epoch(epoch)`` is called when it exists).
3. a :class:`TrainConfig` (usually the ``train`` section of the recipe's config dataclass, see
   :mod:`textseg.train.config`), plus an optional ``eval_fn(model, step) -> {name: float}``.

Example (runs alone, or ``torchrun --nproc_per_node 2 my_recipe.py`` for DDP)::

    from dataclasses import dataclass, field
    from textseg.train.config import load_config
    from textseg.train.engine import Trainer, TrainConfig, seed_everything

    class Regress(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(8, 1)
        def forward(self, batch):
            x, y = batch
            loss = F.mse_loss(self.net(x).squeeze(1), y)
            return {"loss": loss}

    @dataclass
    class Cfg:
        train: TrainConfig = field(default_factory=TrainConfig)

    cfg = load_config(Cfg, None, ["train.steps=100", "train.out_dir=runs/demo"])
    seed_everything(cfg.train.seed)            # before building the model: same init on every rank
    trainer = Trainer(cfg.train, Regress(), TensorDataset(x, y), config=cfg,
                      eval_fn=lambda m, step: {"val_mse": ...})
    result = trainer.fit()                     # {"step": 100, "loss": ..., "val_mse": ...}

What it writes (rank 0) under ``cfg.out_dir``: ``config.yaml`` (the resolved config),
``checkpoints/step_XXXXXXXX.pt`` (every ``ckpt_every`` steps and at the end; the newest
``keep_last`` are kept), ``log.jsonl`` (one JSON object per log/eval event) and TensorBoard events
in ``tb/`` when ``tensorboard`` is installed; the recipe ends with :meth:`Trainer.save_model`, the
native ``model.safetensors`` (+ ``.json`` card) that ``textseg segment/classify/eval --weights``
loads. Every recipe's checkpoints share this one layout (:mod:`textseg.train.checkpoint`). With ``resume="auto"`` a restarted run continues from
the newest checkpoint in ``out_dir`` and reaches bit-identical weights to an uninterrupted run
(CPU, ``num_workers=0`` or augmentations that draw their randomness from the sample index).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from textseg.distributed import DistInfo, all_reduce_mean, barrier, init_distributed, is_dist
from textseg.errors import CheckpointError, TextsegError
from textseg.io import remove_stale_temporaries, write_text
from textseg.train import checkpoint as ckpt_lib
from textseg.train.config import config_to_dict, save_config
from textseg.weights.load import save_model as save_native_model


@dataclass
class TrainConfig:
    """Engine settings (the ``train:`` section of every recipe config).

    ``batch_size`` is per process and per micro-batch: the global batch of one optimizer step is
    ``batch_size * grad_accum * world_size``. ``steps`` counts optimizer steps. ``epochs`` (> 0,
    map-style data only) sets the run length to ``epochs`` passes over the data instead, capped at
    ``steps`` when ``steps`` > 0. ``optimizer``: "adamw" (``betas``, ``eps``) or "sgd"
    (``momentum``). ``lr`` is the peak learning rate reached after ``warmup_steps`` of linear
    warm-up; then ``schedule`` decays it ("cosine" to ``min_lr_ratio * lr``, "poly" with
    ``poly_power``, or "constant"). ``amp``: "none", "bf16" (GPU or CPU), "fp16" (GPU only, with a
    GradScaler) or "auto" (bf16 on GPU, none on CPU). ``clip_grad``: max global grad norm (null =
    off). ``ema_decay``: keep an exponential moving average of the weights (used for evaluation and
    saved in checkpoints). ``resume``: "auto" (newest checkpoint in ``out_dir/checkpoints`` if
    any), "none", or a checkpoint path. ``eval_every``/``ckpt_every``/``log_every``: in optimizer
    steps, 0 = only at the end; ``eval_every_epochs``/``ckpt_every_epochs``: also at the end of every
    n-th epoch (map-style data). ``time_limit`` (seconds, 0 = none): at each epoch's end the run is
    shortened to what the measured speed allows in the time left (the schedule then ends at the
    new last step; the first epoch of a process, which pays for start-up, is not measured unless
    the time is already up). ``threads``: torch CPU threads during ``fit`` (0 = torch's default).
    """

    out_dir: str = "runs/train"
    steps: int = 1000
    epochs: int = 0
    batch_size: int = 32
    grad_accum: int = 1
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    poly_power: float = 0.9
    clip_grad: float | None = None
    amp: str = "none"
    ema_decay: float | None = None
    seed: int = 0
    shuffle: bool = True
    num_workers: int = 0
    device: str = "auto"
    find_unused_parameters: bool = False
    log_every: int = 10
    eval_every: int = 0
    ckpt_every: int = 0
    eval_every_epochs: int = 0
    ckpt_every_epochs: int = 0
    keep_last: int = 2
    resume: str = "auto"
    time_limit: float = 0.0
    threads: int = 0
    progress: bool = True
    tensorboard: bool = True


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (0: leave torch's setting), restored after.
    Recipes wrap model building in it too, so setup and training use the same thread count."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class LRSchedule:
    """Learning-rate multiplier per optimizer step: linear warm-up, then cosine / poly / constant.

    A plain callable object (not a closure) so ``LambdaLR.state_dict()`` stays ``weights_only``-safe.
    """

    total_steps: int
    warmup_steps: int = 0
    kind: str = "cosine"
    min_ratio: float = 0.0
    power: float = 0.9

    def __post_init__(self):
        if self.kind not in ("cosine", "poly", "constant"):
            raise TextsegError(f"unknown schedule {self.kind!r}; use cosine, poly or constant")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.kind == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            decay = (1.0 - progress) ** self.power
        return self.min_ratio + (1.0 - self.min_ratio) * decay


def build_optimizer(cfg: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``groups``. A group may carry ``lr_mult`` (its learning rate is
    ``cfg.lr * lr_mult``, and the schedule scales it like every other) and its own
    ``weight_decay`` (default ``cfg.weight_decay``)."""
    groups = [{**g, "lr": cfg.lr * g.get("lr_mult", 1.0)} for g in groups]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise TextsegError(f"train.optimizer must be adamw or sgd, got {cfg.optimizer!r}")


def set_bn_eval(module: nn.Module) -> None:
    """Put every BatchNorm layer inside ``module`` in eval mode with frozen affine parameters
    (call it before building the Trainer, and again from the training module's ``train()``)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed (matrices, conv kernels) and not decayed (biases,
    norms, scalars such as the logit scale, and names in ``module.no_weight_decay()`` if defined)."""
    skip = set(module.no_weight_decay()) if hasattr(module, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name in skip else decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if not groups:
        raise TextsegError("the model has no trainable parameters (everything is frozen)")
    return groups


class ModelEMA:
    """Exponential moving average of a module's floating-point parameters (buffers are copied).

    ``ema.module`` is a frozen deep copy in eval mode; ``update(module)`` after each optimizer step.
    """

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise TextsegError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self._pairs = [
            (e, p) for e, p in zip(self.module.parameters(), module.parameters()) if p.requires_grad
        ]
        self._buffers = list(zip(self.module.buffers(), module.buffers()))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for e, p in self._pairs:
            e.lerp_(p.detach(), 1.0 - self.decay)
        for e, b in self._buffers:
            e.copy_(b)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state, strict=True)


class ShardedSampler(Sampler[int]):
    """Seeded, rank-sharded, resumable index sampler for map-style datasets.

    Each epoch permutes ``range(n)`` with ``seed + epoch`` (identical on all ranks), truncates to a
    multiple of ``world_size`` and gives rank ``r`` every ``world_size``-th index starting at ``r``.
    ``start`` skips the first indices of this rank's epoch (resume mid-epoch without loading them).
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0):
        self.n, self.rank, self.world, self.shuffle, self.seed = n, rank, world_size, shuffle, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(0, self.n // self.world - self.start)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        mine = order[: self.n // self.world * self.world][self.rank :: self.world]
        return iter(mine[self.start :])


def move_to(batch: Any, device: torch.device) -> Any:
    """Tensors inside nested dicts / lists / tuples -> ``device`` (other values unchanged)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        out = [move_to(v, device) for v in batch]
        return type(batch)(*out) if hasattr(batch, "_fields") else type(batch)(out)
    return batch


class _Logger:
    """stdout (rank 0, through tqdm when a bar is shown), JSONL and TensorBoard."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, write: Callable[[str], None]):
        self.enabled, self.write = enabled, write
        self.jsonl = out_dir / "log.jsonl" if enabled else None
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard not installed: JSONL + stdout only
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(str(out_dir / "tb"))

    def log(self, kind: str, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        text = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        self.write(f"[{kind} step {step}] {text}")
        with open(self.jsonl, "a") as fh:
            fh.write(json.dumps({"kind": kind, "step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{kind}/{k}", v, step)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Trainer:
    """Runs ``cfg.steps`` (or ``cfg.epochs`` worth of) optimizer steps of ``module`` on ``dataset``.

    Args:
        cfg: engine settings.
        module: the training module (``forward(batch) -> {"loss": scalar, ...}``); moved to the
            device and wrapped in DDP under torchrun. ``trainer.module`` is the unwrapped module.
        dataset: map-style or shard-aware ``IterableDataset`` (see module docstring).
        collate_fn: the DataLoader's collate function (default: torch's).
        eval_fn: ``eval_fn(model, step) -> dict[str, float]``, called on every rank under
            ``torch.no_grad()`` with the unwrapped module (its EMA copy when ``ema_decay`` is set) in
            eval mode, every ``eval_every`` steps and at the end; rank 0's result is logged.
        optimizer: default ``cfg.optimizer`` (:func:`build_optimizer`) over ``groups``; pass your own
            for other optimizers (the schedule multiplies every group's initial lr).
        groups: parameter groups for the default optimizer (each may set ``lr_mult`` and
            ``weight_decay``); default :func:`param_groups` (no decay on biases / norms / scalars).
        config: the full recipe config (a dataclass) saved as ``out_dir/config.yaml`` and inside
            checkpoints; defaults to ``cfg``.
        callbacks: ``fn(trainer)`` called after every optimizer step (after logging/eval/saving);
            ``trainer.step``, ``trainer.last_metrics`` are available; call ``trainer.stop()`` to end
            ``fit`` early.

    Frozen parts rebuilt identically at construction (packaged pretrained towers) may be left out
    of checkpoints: the training module lists their state-dict key prefixes in a
    ``checkpoint_skip`` attribute (a tuple of str); loading then requires exactly those keys to be
    missing. The final model file is written by :meth:`save_model`.

    Attributes: ``info`` (:class:`DistInfo`), ``device``, ``step``, ``epoch``, ``optimizer``,
    ``scheduler``, ``scaler``, ``ema`` (or None), ``out_dir``, ``ckpt_dir``.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        module: nn.Module,
        dataset: Dataset | IterableDataset,
        *,
        collate_fn: Callable | None = None,
        eval_fn: Callable[[nn.Module, int], dict[str, float]] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        config: Any = None,
        callbacks: Sequence[Callable[[Trainer], None]] = (),
        groups: list[dict] | None = None,
    ):
        if cfg.grad_accum < 1 or cfg.batch_size < 1 or (cfg.steps < 1 and cfg.epochs < 1):
            raise TextsegError("train.batch_size and train.grad_accum must be >= 1, and train.steps "
                               "or train.epochs too")
        if cfg.amp not in ("none", "bf16", "fp16", "auto"):
            raise TextsegError(f"train.amp must be none, bf16, fp16 or auto, got {cfg.amp!r}")
        self.cfg = cfg
        self.info: DistInfo = init_distributed(cfg.device)
        self.device = self.info.device
        self.amp = ("bf16" if self.device.type == "cuda" else "none") if cfg.amp == "auto" else cfg.amp
        if self.amp == "fp16" and self.device.type != "cuda":
            raise TextsegError("train.amp=fp16 needs a GPU; use bf16 or none on CPU")
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.config = config if config is not None else cfg
        self.eval_fn, self.callbacks = eval_fn, list(callbacks)
        self.dataset, self.collate_fn = dataset, collate_fn
        self.step = self.epoch = self.batch_in_epoch = 0
        self._fit_t0 = 0.0
        self.resumed_from: Path | None = None
        self.last_metrics: dict[str, float] = {}
        self._stop = False
        self._logger = _Logger(self.out_dir, self.info.is_main, cfg.tensorboard, lambda s: print(s, flush=True))

        self.module = module.to(self.device)
        self._skip = tuple(getattr(module, "checkpoint_skip", ()))
        self.optimizer = optimizer or build_optimizer(
            cfg, groups if groups is not None else param_groups(self.module, cfg.weight_decay))
        self._sampler = None
        self._batches_per_epoch = 0
        if not isinstance(dataset, IterableDataset):
            self._sampler = ShardedSampler(len(dataset), self.info.rank, self.info.world_size, cfg.shuffle, cfg.seed)
            self._batches_per_epoch = len(dataset) // self.info.world_size // cfg.batch_size
            if self._batches_per_epoch < 1:
                raise TextsegError(
                    f"dataset has {len(dataset)} samples: fewer than one batch of {cfg.batch_size} per process"
                )
        elif cfg.epochs or cfg.eval_every_epochs or cfg.ckpt_every_epochs or cfg.time_limit:
            raise TextsegError("train.epochs, *_every_epochs and time_limit need a map-style dataset "
                               "(an iterable one has no known epoch length)")
        self.total_steps = cfg.steps
        if cfg.epochs:
            by_epochs = max(1, cfg.epochs * self._batches_per_epoch // cfg.grad_accum)
            self.total_steps = min(cfg.steps, by_epochs) if cfg.steps > 0 else by_epochs
        self.elapsed = 0.0  # training seconds of earlier processes of this run (time_limit)
        self.schedule = LRSchedule(self.total_steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio,
                                   cfg.poly_power)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        self.ema = ModelEMA(self.module, cfg.ema_decay) if cfg.ema_decay else None
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if is_dist() and self.info.world_size > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters,
            )
        else:
            self.model = self.module
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)
        self._autocast = (
            (lambda: torch.autocast(self.device.type, dtype=dtype)) if dtype else contextlib.nullcontext
        )

        if self.info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.out_dir / "config.yaml")
        self._resume()

    # ---------------------------------------------------------------- data
    def _loader(self) -> DataLoader:
        gen = torch.Generator().manual_seed((self.cfg.seed * 100_003 + self.epoch) * 1_009 + self.info.rank)
        common = dict(
            batch_size=self.cfg.batch_size, collate_fn=self.collate_fn, num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda", drop_last=True, generator=gen,
        )
        if self._sampler is not None:
            self._sampler.set_epoch(self.epoch, self.batch_in_epoch * self.cfg.batch_size)
            return DataLoader(self.dataset, sampler=self._sampler, **common)
        return DataLoader(self.dataset, **common)

    def _batches(self) -> Iterator[Any]:
        while True:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            it = iter(self._loader())
            if self._sampler is None:  # iterable: replay the consumed part of this epoch
                for _ in range(self.batch_in_epoch):
                    next(it, None)
            produced = 0
            for batch in it:
                produced += 1
                self.batch_in_epoch += 1
                yield batch
            if produced == 0 and self.batch_in_epoch == 0:
                raise TextsegError("the dataset yielded no full batch in an epoch (too small or all samples bad)")
            self.epoch += 1
            self.batch_in_epoch = 0

    def epochs_done(self, step: int | None = None) -> int:
        """Whole passes over a map-style dataset completed after ``step`` optimizer steps."""
        step = self.step if step is None else step
        return step * self.cfg.grad_accum // self._batches_per_epoch if self._batches_per_epoch else 0

    # ---------------------------------------------------------------- state
    def _model_state(self, module: nn.Module) -> dict:
        return {k: v for k, v in module.state_dict().items() if not (self._skip and k.startswith(self._skip))}

    def _load_model_state(self, module: nn.Module, state: dict) -> None:
        result = module.load_state_dict(state, strict=not self._skip)
        if self._skip:
            missing = [k for k in result.missing_keys if not k.startswith(self._skip)]
            if missing or result.unexpected_keys:
                raise RuntimeError(f"missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")

    def state_dict(self) -> dict:
        """The checkpoint content (see :mod:`textseg.train.checkpoint`). Collective under DDP."""
        rng = ckpt_lib.capture_rng_state()
        if is_dist():
            gathered: list = [None] * self.info.world_size
            torch.distributed.all_gather_object(gathered, rng)
            rng_all = gathered
        else:
            rng_all = [rng]
        return {
            "format": "textseg-train",
            "version": 1,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.info.world_size,
            "total_steps": self.total_steps,
            "elapsed": self.elapsed + (time.perf_counter() - self._fit_t0 if self._fit_t0 else 0.0),
            "model": self._model_state(self.module),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self._model_state(self.ema.module) if self.ema else None,
            "rng": rng_all,
            "config": config_to_dict(self.config),
        }

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_XXXXXXXX.pt`` atomically on rank 0 (all ranks must call)."""
        state = self.state_dict()
        path = ckpt_lib.checkpoint_path(self.ckpt_dir, self.step)
        if self.info.is_main:
            ckpt_lib.atomic_save(state, path)
            ckpt_lib.prune_checkpoints(self.ckpt_dir, self.cfg.keep_last)
        barrier()
        return path

    def load_state_dict(self, state: dict) -> None:
        """Restore everything saved by :meth:`state_dict` (strict model keys)."""
        try:
            self._load_model_state(self.module, state["model"])
        except RuntimeError as e:
            raise TextsegError(f"checkpoint does not match the model: {str(e).splitlines()[0]}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        # The schedule's shape comes from the current config (so train.steps can be extended on
        # resume), except a run shortened by train.time_limit, which keeps its shortened end.
        if self.cfg.time_limit and state.get("total_steps"):
            self.total_steps = self.schedule.total_steps = min(self.total_steps, int(state["total_steps"]))
        self.elapsed = float(state.get("elapsed", 0.0))
        sched = dict(state["scheduler"], lr_lambdas=[None] * len(self.optimizer.param_groups))
        self.scheduler.load_state_dict(sched)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * self.schedule(self.scheduler.last_epoch)
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise TextsegError("train.ema_decay is set but the checkpoint has no EMA weights")
            self._load_model_state(self.ema.module, state["ema"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        rng = state.get("rng") or []
        if len(rng) == self.info.world_size:
            ckpt_lib.restore_rng_state(rng[self.info.rank])
        else:  # another world size: same step and epoch, fresh per-rank randomness (not bit-exact)
            seed_everything(self.cfg.seed + 7919 * self.step + self.info.rank)

    def _resume(self) -> None:
        r = self.cfg.resume
        if r in ("", "none", "no", "false"):
            path = None
        elif r == "auto":
            path = ckpt_lib.latest_checkpoint(self.ckpt_dir)
        else:
            path = Path(r)
        if r == "auto" and self.info.is_main:  # what a killed save left behind
            for stale in remove_stale_temporaries(self.ckpt_dir):
                self._print(f"removed the unfinished checkpoint {stale.name}")
        state = None
        if r == "auto":  # the newest readable checkpoint: a corrupt newest one falls back to the previous
            for candidate in reversed(ckpt_lib.list_checkpoints(self.ckpt_dir)):
                try:
                    state, path = ckpt_lib.load_checkpoint(candidate, map_location="cpu"), candidate
                    break
                except CheckpointError as e:
                    self._print(f"warning: skipping an unreadable checkpoint: {e}")
            else:
                path = None
        elif path is not None:
            state = ckpt_lib.load_checkpoint(path, map_location="cpu")
        if r == "auto" and self.info.is_main:
            self._trim_log(state["step"] if state is not None else 0)
        if state is None:
            return
        self.load_state_dict(state)
        self.resumed_from = path
        self._print(f"resumed from {path} at step {self.step}")

    def _trim_log(self, step: int) -> None:
        """Drop the ``log.jsonl`` rows after ``step`` (written after the checkpoint resumed from, by a
        run that was then killed): the resumed run logs those steps again, once."""
        log = self.out_dir / "log.jsonl"
        if not log.is_file():
            return
        keep = []
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a row cut by the kill
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                keep.append(line + "\n")
        write_text(log, "".join(keep))

    # ---------------------------------------------------------------- loop
    def stop(self) -> None:
        """Ask :meth:`fit` to return after the current step (from a callback)."""
        self._stop = True

    def _print(self, msg: str) -> None:
        if self.info.is_main:
            print(msg, flush=True)

    def evaluate(self) -> dict[str, float]:
        """Run ``eval_fn`` now (all ranks) and log its result; returns it."""
        if self.eval_fn is None:
            return {}
        model = self.ema.module if self.ema is not None else self.module
        was_training = model.training
        model.eval()
        with torch.no_grad():
            result = {k: float(v) for k, v in (self.eval_fn(model, self.step) or {}).items()}
        model.train(was_training)
        self._logger.log("eval", self.step, result)
        return result

    def fit(self) -> dict[str, float]:
        """Train until ``total_steps`` (or :meth:`stop`); returns the last train metrics merged with
        the last evaluation. Checkpoints at the end."""
        with cpu_threads(self.cfg.threads):
            return self._fit()

    def _fit(self) -> dict[str, float]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        self._stop = False
        show = self.info.is_main and cfg.progress
        pbar = tqdm(total=self.total_steps, initial=self.step, disable=not show, desc="train", dynamic_ncols=True)
        if show:
            self._logger.write = pbar.write
        self.module.train()
        batches = self._batches()
        sums: dict[str, torch.Tensor] = {}
        n_logged, t_last = 0, time.perf_counter()
        self._fit_t0 = t_last
        epoch_mark = (self.step, t_last, True)  # (first step, start time, first epoch of this process)
        result: dict[str, float] = {}
        saved_at = -1
        try:
            while self.step < self.total_steps and not self._stop:
                metrics = self._train_step(batches)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_logged += 1
                self.step += 1
                pbar.update(1)
                epochs = self.epochs_done()
                epoch_end = bool(self._batches_per_epoch) and epochs > self.epochs_done(self.step - 1)
                if epoch_end and cfg.time_limit:
                    self._fit_time_limit(epoch_mark)
                    pbar.total = self.total_steps
                    epoch_mark = (self.step, time.perf_counter(), False)
                end = self.step >= self.total_steps
                if (cfg.log_every and self.step % cfg.log_every == 0) or end:
                    now = time.perf_counter()
                    keys = sorted(sums)
                    vals = all_reduce_mean(torch.stack([torch.as_tensor(sums[k], dtype=torch.float32)
                                                        for k in keys]).to(self.device)) / n_logged
                    self.last_metrics = {k: v for k, v in zip(keys, vals.tolist())}
                    if not math.isfinite(self.last_metrics["loss"]):
                        raise TextsegError(f"loss is {self.last_metrics['loss']} at step {self.step}; "
                                           "lower train.lr, clip gradients or use amp=none")
                    self.last_metrics["lr"] = self.optimizer.param_groups[0]["lr"]
                    self.last_metrics["samples_per_s"] = (
                        n_logged * cfg.batch_size * cfg.grad_accum * self.info.world_size / (now - t_last)
                    )
                    self._logger.log("train", self.step, self.last_metrics)
                    pbar.set_postfix(loss=f"{self.last_metrics.get('loss', float('nan')):.4f}")
                    sums, n_logged, t_last = {}, 0, time.perf_counter()
                if (_every(cfg.eval_every, self.step) or end
                        or epoch_end and _every(cfg.eval_every_epochs, epochs)):
                    result = self.evaluate()
                    t_last = time.perf_counter()
                if (_every(cfg.ckpt_every, self.step) or end
                        or epoch_end and _every(cfg.ckpt_every_epochs, epochs)):
                    self.save_checkpoint()
                    saved_at = self.step
                    t_last = time.perf_counter()
                for cb in self.callbacks:
                    cb(self)
            if self._stop and saved_at != self.step:
                self.save_checkpoint()
        finally:
            pbar.close()
            self._logger.write = lambda s: print(s, flush=True)
            self._logger.flush()
        return {"step": self.step, **self.last_metrics, **result}

    def _fit_time_limit(self, epoch_mark: tuple[int, float, bool]) -> None:
        """Shorten the run to what the speed of the epoch just finished allows in the time left
        (the schedule then ends at the new last step). Every rank computes the same value."""
        first_step, t0, first = epoch_mark
        now = time.perf_counter()
        elapsed = self.elapsed + now - self._fit_t0
        if self.step <= first_step or (first and elapsed < self.cfg.time_limit):
            return
        per_step = float(all_reduce_mean(torch.tensor((now - t0) / (self.step - first_step), device=self.device)))
        fit = self.step + max(0, int((self.cfg.time_limit - elapsed) / per_step))
        if fit < self.total_steps:
            self._print(f"time limit {self.cfg.time_limit:.0f}s: training stops at step {fit} "
                        f"instead of {self.total_steps}")
            self.total_steps = self.schedule.total_steps = fit

    def final_module(self) -> nn.Module:
        """The trained training module: its EMA copy when ``ema_decay`` is set."""
        return self.ema.module if self.ema is not None else self.module

    def save_model(self, model: nn.Module, card: dict | None = None, name: str = "model.safetensors") -> Path:
        """Write ``model`` (a :class:`~textseg.models.base.DualEncoder` taken from
        :meth:`final_module`) as the run's native model file ``out_dir/name`` (safetensors + JSON
        card, loadable with ``--weights``) on rank 0; every rank must call. Returns the path."""
        path = self.out_dir / name
        if self.info.is_main:
            save_native_model(model, path, {"steps": self.step, **(card or {})})
        barrier()
        return path

    def _train_step(self, batches: Iterator[Any]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        ddp = self.model is not self.module
        metrics: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum):
            batch = move_to(next(batches), self.device)
            sync = not ddp or micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with self._autocast():
                    out = self.model(batch)
                if not isinstance(out, dict) or "loss" not in out:
                    raise TextsegError("the training module's forward(batch) must return a dict with 'loss'")
                loss = out["loss"]
                self.scaler.scale(loss.float() / cfg.grad_accum).backward()
            for k, v in out.items():
                v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v), device=self.device)
                metrics[k] = metrics.get(k, 0.0) + v / cfg.grad_accum
        if cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(self._params, cfg.clip_grad).detach().float()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.module)
        return metrics


def _every(n: int, count: int) -> bool:
    return bool(n) and count % n == 0
