"""Supervised LSeg training: per-pixel cross-entropy against frozen label embeddings.

One or more segmentation datasets (any reader of :mod:`textseg.data`; the folder layout by path)
are concatenated; every image is scored only against **its own dataset's** labels, as in the
paper's seven-dataset mix. The text tower is frozen: each dataset's label embeddings are computed
once (no gradient) and cached for the whole run.

Recipe (the paper's, scaled to the machine): random scale, random crop (padded with ``ignore``),
horizontal flip; AdamW or SGD with a polynomial (power 0.9) learning-rate decay and the backbone at
``backbone_lr_mult`` times the decoder's rate; bf16 autocast on GPU; checkpoints every
``save_every`` steps and each epoch (atomic, ``weights_only``-loadable, with optimizer and RNG
state) so a killed run resumes at the same step; validation mIoU after each epoch; ``torchrun``
DDP with sync batch norm on GPU. Data order and augmentation are a pure function of
``(seed, epoch, index)``, so a resumed run sees exactly the batches the uninterrupted one would.

Outputs in ``out_dir``: ``step_<n>.pt`` (training state), ``log.jsonl`` (one JSON object per logged
step / validation), ``model.safetensors`` (the final model, loadable by ``textseg segment --model
lseg --weights``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from textseg.constants import IGNORE_INDEX
from textseg.errors import TextsegError
from textseg.models.lseg import LSeg, LSegConfig, build_lseg, upsample_logits
from textseg.train import checkpoint as ckpt_io
from textseg.train import dist
from textseg.weights.load import save_model


@dataclass
class LSegTrainConfig:
    data: list[str] = field(default_factory=list)  # dataset roots, "root" or "root:split"
    train_split: str = "train"
    val_split: str | None = "val"
    backbone: str = "lite0"
    text_encoder: str = "minilm"
    init_from: str | None = None  # a CLIP checkpoint: its ViT (backbone "clip") and/or text tower (text "clip")
    features: int = 64
    block: str = "none"
    block_depth: int = 0
    template: str = "{}"
    crop: tuple[int, int] = (352, 480)  # h, w (multiples of 32)
    scale: tuple[float, float] = (0.5, 2.0)  # random scale range, relative to the stored image size
    epochs: int = 10
    max_steps: int = 0  # stop after this many optimizer steps in total (0 = epochs decide)
    batch_size: int = 8  # per process
    optimizer: str = "adamw"
    lr: float = 1e-3
    backbone_lr_mult: float = 0.1
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    learn_logit_scale: bool = False  # official lang-seg: temperature fixed at 1/0.07; True: learn it
    class_balance: bool = False  # median-frequency class weights in the loss (as SegNet)
    freeze_bn: bool = False  # keep the backbone's batch-norm statistics fixed
    freeze_stages: int = 0  # stem + this many leading backbone stages frozen
    light: bool = False  # separable decoder convs, dense map at stride 4 (CPU)
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    workers: int = 2
    seed: int = 0
    save_every: int = 0  # steps between checkpoints (0: each epoch only)
    keep_last: int = 2
    log_every: int = 10
    val_every: int = 1  # epochs between validations (0: never)
    out_dir: str = "runs/lseg"
    resume: bool = False
    device: str = "auto"
    threads: int = 0  # torch CPU threads (0: torch's default)
    image_size: int = 0  # card's preprocess image size (0: min of the crop)
    time_limit: float = 0  # seconds; after each epoch the step total shrinks to fit it (0: none)
    eval_scale: float = 1.0  # validation runs on images resized by this factor (logits scored at full size)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def open_dataset(spec: str, split: str | None):
    """``"root"`` or ``"root:split"`` -> a dataset of :mod:`textseg.data` (the folder layout)."""
    from textseg.data.folder import FolderDataset

    root, _, explicit = spec.partition(":") if ":" in Path(spec).name else (spec, "", "")
    return FolderDataset(root, split=explicit or split)


class LabelledSegData(torch.utils.data.Dataset):
    """Several datasets side by side: item ``i`` -> ``(image C x H x W, mask H x W, dataset index)``.

    ``train=True`` applies random scale / crop / flip with a generator seeded from
    ``(seed, epoch, i)``; otherwise images are returned whole. Pixels are normalised with ``mean``/
    ``std``; padding is ``ignore`` in the mask and 0 (the mean) in the image.
    """

    def __init__(self, datasets: Sequence, mean, std, train: bool, crop=(352, 480), scale=(0.5, 2.0), seed=0):
        self.datasets = list(datasets)
        self.offsets = np.cumsum([0] + [len(d) for d in self.datasets])
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.train, self.crop, self.scale, self.seed = train, tuple(crop), tuple(scale), seed
        self.epoch = 0

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, i: int) -> tuple[int, int]:
        d = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return d, i - int(self.offsets[d])

    def __getitem__(self, i: int):
        d, j = self.locate(i)
        sample = self.datasets[d][j]
        image, mask = sample["image"], sample["mask"]
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            image, mask, origin = self._augment(image, mask, rng)
        img = (np.asarray(image, np.float32) / 255.0 - self.mean) / self.std
        mask = np.array(mask, np.uint8)  # a writable copy
        if self.train:  # pad to the crop (image 0 = mean, mask = ignore)
            ch, cw = self.crop
            h, w = mask.shape
            ph, pw = max(ch - h, 0), max(cw - w, 0)
            if ph or pw:
                img = np.pad(img, ((0, ph), (0, pw), (0, 0)))
                mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
            y0, x0 = origin
            img, mask = img[y0 : y0 + ch, x0 : x0 + cw], mask[y0 : y0 + ch, x0 : x0 + cw]
        return (torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
                torch.from_numpy(np.ascontiguousarray(mask)).long(), d)

    def _augment(self, image: Image.Image, mask: np.ndarray, rng: np.random.Generator):
        s = rng.uniform(*self.scale)
        w, h = image.size
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        image = image.resize((nw, nh), Image.BILINEAR)
        mask = np.asarray(Image.fromarray(mask).resize((nw, nh), Image.NEAREST))
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            mask = mask[:, ::-1]
        ch, cw = self.crop
        origin = (int(rng.integers(0, max(nh - ch, 0) + 1)), int(rng.integers(0, max(nw - cw, 0) + 1)))
        return image, mask, origin


def epoch_order(n: int, epoch: int, seed: int, rank: int, world: int, batch: int) -> list[list[int]]:
    """This rank's batches for ``epoch``: a seeded permutation, dealt round-robin to ranks, cut
    into full batches (the remainder is dropped so every rank takes the same number of steps)."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    per_rank = n // world // batch * batch
    mine = perm[rank::world][:per_rank]
    return [mine[i : i + batch] for i in range(0, per_rank, batch)]


def collate(items):
    imgs, masks, ds = zip(*items)
    return torch.stack(imgs), torch.stack(masks), torch.tensor(ds)


# ---------------------------------------------------------------------------------------------
# Model pieces
# ---------------------------------------------------------------------------------------------


class LSegLoss(nn.Module):
    """Wraps the model so DDP sees one forward: pixels + dataset ids -> mean CE over valid pixels,
    each image scored against its own dataset's cached label embeddings."""

    def __init__(self, model: LSeg, weights: Sequence[torch.Tensor | None] = ()):
        super().__init__()
        self.model = model
        self.weights = list(weights)

    def forward(self, pixels: torch.Tensor, masks: torch.Tensor, ds: torch.Tensor,
                texts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        dense = self.model.encode_dense(pixels)
        total = pixels.new_zeros((), dtype=torch.float32)
        count = (masks != IGNORE_INDEX).sum()
        for d in ds.unique().tolist():
            sel = ds == d
            logits = self.model.dense_logits(dense[sel], texts[d])
            logits = upsample_logits(logits.float(), pixels.shape[-2:], self.model.dense_stride)
            w = self.weights[d] if d < len(self.weights) else None
            total = total + F.cross_entropy(logits, masks[sel], weight=w, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / count.clamp_min(1), count


def build_from_clip(mcfg: LSegConfig, path: str | None) -> LSeg:
    """LSeg whose CLIP parts (the ViT image tower for backbone ``clip``, the text tower for text
    encoder ``clip``) start from the CLIP checkpoint at ``path`` (any format ``load_model`` reads)."""
    from textseg.constants import OPENAI_MEAN, OPENAI_STD
    from textseg.weights.load import load_model

    if not path:
        raise TextsegError("backbone / text encoder 'clip' needs --init-from CLIP_CHECKPOINT (no CLIP weights ship)")
    clip = load_model(weights=path)
    if clip.name != "clip":
        raise TextsegError(f"--init-from {path} is a {clip.name!r} checkpoint, not CLIP")
    changes: dict = {}
    if mcfg.text_encoder == "clip":
        changes.update(text_cfg=dataclasses.asdict(clip.cfg.text), embed_dim=clip.cfg.embed_dim)
    if mcfg.backbone == "clip":
        vision = dataclasses.asdict(clip.cfg.vision)
        changes.update(vision_cfg=vision, mean=tuple(clip.preprocess_cfg.mean or OPENAI_MEAN),
                       std=tuple(clip.preprocess_cfg.std or OPENAI_STD))
    mcfg = dataclasses.replace(mcfg, **changes)
    model = build_lseg(mcfg, pretrained=True)  # packaged weights for the non-CLIP parts
    if mcfg.backbone == "clip":
        visual = {k: v for k, v in clip.visual.state_dict().items() if k != "proj"}
        model.image_encoder.vit.load_state_dict(visual, strict=True)
    if mcfg.text_encoder == "clip":
        model.text_encoder.load_state_dict(clip.text.state_dict(), strict=True)
        model.text_encoder.requires_grad_(False)
    return model


def set_backbone_bn_eval(model: LSeg) -> None:
    for m in model.image_encoder.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


def param_groups(model: LSeg, cfg: LSegTrainConfig) -> list[dict]:
    back, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (back if name.startswith("image_encoder.") else rest).append(p)
    return [{"params": back, "lr": cfg.lr * cfg.backbone_lr_mult, "lr_mult": cfg.backbone_lr_mult},
            {"params": rest, "lr": cfg.lr, "lr_mult": 1.0}]


def median_frequency_weights(dataset) -> torch.Tensor:
    """SegNet's class balancing: ``w_c = median(f) / f_c`` with ``f_c`` the frequency of class ``c``
    over the images that contain it (classes never seen get weight 1)."""
    n = dataset.num_classes
    pixels, image_pixels = np.zeros(n), np.zeros(n)
    for i in range(len(dataset)):
        m = np.asarray(dataset.load_mask(i)).ravel()
        counts = np.bincount(m[m != IGNORE_INDEX], minlength=n)[:n]
        pixels += counts
        image_pixels += (counts > 0) * m.size
    seen = pixels > 0
    freq = np.where(seen, pixels / np.maximum(image_pixels, 1), 0)
    w = np.ones(n)
    w[seen] = np.median(freq[seen]) / freq[seen]
    return torch.tensor(w, dtype=torch.float32)


def poly_lr(base: float, step: int, total: int, power: float) -> float:
    return base * (1 - min(step, total) / max(total, 1)) ** power


@torch.no_grad()
def label_embeddings(model: LSeg, names: Sequence[str], template: str) -> torch.Tensor:
    """The frozen ``N x C`` L2-normalised embeddings of one dataset's labels."""
    return model.embed_texts(list(names), templates=(template,))


@torch.no_grad()
def evaluate(model: LSeg, data: LabelledSegData, texts: Sequence[torch.Tensor], device, amp: bool,
             scale: float = 1.0) -> list:
    """Whole-image validation, sharded over ranks; returns one :class:`SegMetrics` per dataset."""
    from textseg.metrics import ConfusionMatrix

    was = model.training
    model.eval()
    cms = [ConfusionMatrix(t.shape[0]) for t in texts]
    rank, world = dist.get_rank(), dist.get_world_size()
    for i in range(rank, len(data), world):
        img, mask, d = data[i]
        x = img[None].to(device)
        if scale != 1.0:
            size = (max(32, round(x.shape[-2] * scale)), max(32, round(x.shape[-1] * scale)))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            logits = model.forward_logits(x, texts[d])
        if scale != 1.0:
            logits = F.interpolate(logits.float(), size=mask.shape, mode="bilinear", align_corners=False)
        cms[d].update(logits.argmax(1)[0].cpu(), mask)
    model.train(was)
    return [cm.all_reduce().compute() for cm in cms]


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def train(cfg: LSegTrainConfig) -> dict:
    """Run (or resume) training; returns ``{"step", "loss", "val": [...], "seconds"}``."""
    if not cfg.data:
        raise TextsegError("no training data: pass --data ROOT[:split] (repeatable)")
    if cfg.crop[0] % 32 or cfg.crop[1] % 32:
        raise TextsegError(f"crop {cfg.crop} must be multiples of 32")
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: LSegTrainConfig) -> dict:
    info = dist.init_distributed(cfg.device)
    device = info.device
    out = Path(cfg.out_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    train_sets = [open_dataset(s, cfg.train_split) for s in cfg.data]
    val_sets = [open_dataset(s.partition(":")[0] if ":" in Path(s).name else s, cfg.val_split)
                for s in cfg.data] if cfg.val_split and cfg.val_every else []

    mcfg = LSegConfig(backbone=cfg.backbone, text_encoder=cfg.text_encoder, features=cfg.features,
                      block=cfg.block, block_depth=cfg.block_depth, freeze_stages=cfg.freeze_stages,
                      separable=cfg.light, last_upsample=not cfg.light, learn_logit_scale=cfg.learn_logit_scale,
                      image_size=cfg.image_size or min(cfg.crop))
    model = build_from_clip(mcfg, cfg.init_from) if "clip" in (cfg.backbone, cfg.text_encoder) else \
        build_lseg(mcfg, pretrained=True)
    mcfg = model.cfg
    if mcfg.text_encoder == "minilm":  # record the tower's dims so the card rebuilds it exactly
        mcfg = dataclasses.replace(mcfg, text_cfg=asdict(model.text_encoder.cfg))
        model.cfg = mcfg
    model.decoder.fusion[3].rcu1.requires_grad_(False)  # the coarsest level has no skip input: unused
    model.to(device)
    texts = [label_embeddings(model, ds.class_names, cfg.template).to(device) for ds in train_sets]
    if cfg.freeze_bn:
        set_backbone_bn_eval(model)

    weights = [median_frequency_weights(ds).to(device) for ds in train_sets] if cfg.class_balance else []
    if weights:
        dist.print0("class weights: " + "; ".join(
            ", ".join(f"{n} {w:.2f}" for n, w in zip(ds.class_names, wt.tolist())) for ds, wt in zip(train_sets, weights)))
    loss_fn = LSegLoss(model, weights)
    if info.world_size > 1 and device.type == "cuda":
        loss_fn = nn.SyncBatchNorm.convert_sync_batchnorm(loss_fn)
    wrapped = (torch.nn.parallel.DistributedDataParallel(loss_fn, device_ids=[device.index] if device.type == "cuda"
                                                         else None)
               if info.world_size > 1 else loss_fn)
    groups = param_groups(model, cfg)
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    else:
        raise TextsegError(f"optimizer must be adamw or sgd, got {cfg.optimizer!r}")

    mean, std = mcfg.mean, mcfg.std
    train_data = LabelledSegData(train_sets, mean, std, True, cfg.crop, cfg.scale, cfg.seed)
    val_data = LabelledSegData(val_sets, mean, std, False) if val_sets else None
    steps_per_epoch = len(epoch_order(len(train_data), 0, cfg.seed, info.rank, info.world_size, cfg.batch_size))
    if steps_per_epoch == 0:
        raise TextsegError(f"{len(train_data)} training images are fewer than one batch per process")
    total = cfg.max_steps or steps_per_epoch * cfg.epochs

    step, epoch, saved = 0, 0, -1
    if cfg.resume:
        last = ckpt_io.latest_checkpoint(out)
        if last is not None:
            state = ckpt_io.load_checkpoint(last, map_location=device)
            missing, unexpected = model.load_state_dict(state["model"], strict=False)
            if unexpected or any(not k.startswith("text_encoder.") for k in missing):
                raise TextsegError(f"{last} does not match this model: missing {missing[:3]}, "
                                   f"unexpected {unexpected[:3]}")
            opt.load_state_dict(state["optimizer"])
            step, epoch = int(state["step"]), int(state["epoch"])
            saved = step
            dist.print0(f"resumed from {last} at step {step} (epoch {epoch})")

    def save(step: int, epoch: int) -> None:
        nonlocal saved
        saved = step
        if info.is_main:
            trainable = {k: v for k, v in model.state_dict().items() if not k.startswith("text_encoder.")}
            ckpt_io.atomic_save({"format": "textseg-train", "version": 1, "recipe": "lseg", "step": step,
                                 "epoch": epoch, "model": trainable, "optimizer": opt.state_dict(),
                                 "config": _plain(asdict(cfg)), "model_config": mcfg.to_dict(),
                                 "world_size": info.world_size}, ckpt_io.checkpoint_path(out, step))
            ckpt_io.prune_checkpoints(out, cfg.keep_last)
        dist.barrier()

    log = (out / "log.jsonl").open("a") if info.is_main else None

    def record(entry: dict) -> None:
        if log is not None:
            log.write(json.dumps(entry) + "\n")
            log.flush()

    model.train()
    if cfg.freeze_bn:
        set_backbone_bn_eval(model)
    use_amp = cfg.amp and device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    t0, last_loss, val, val_step = time.time(), math.nan, [], -1
    run_loss, run_n = 0.0, 0
    while step < total:
        start = step - epoch * steps_per_epoch  # batches of this epoch already done (resume)
        if start >= steps_per_epoch:
            epoch, start = epoch + 1, 0
        train_data.epoch = epoch
        epoch_start, epoch_t0 = step, time.time()
        batches = epoch_order(len(train_data), epoch, cfg.seed, info.rank, info.world_size, cfg.batch_size)[start:]
        loader = torch.utils.data.DataLoader(train_data, batch_sampler=batches, collate_fn=collate,
                                             num_workers=cfg.workers, persistent_workers=False)
        for imgs, masks, ds in loader:
            lr_scale = poly_lr(1.0, step, total, cfg.poly_power)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * g["lr_mult"] * lr_scale
            imgs, masks, ds = imgs.to(device, non_blocking=True), masks.to(device), ds.to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                loss, _ = wrapped(imgs, masks, ds, texts)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            last_loss = float(dist.all_reduce_mean(loss.detach()))
            run_loss, run_n = run_loss + last_loss, run_n + 1
            if step % cfg.log_every == 0 or step == total:
                dist.print0(f"step {step}/{total} epoch {epoch} loss {run_loss / run_n:.4f} "
                            f"lr {cfg.lr * lr_scale:.2e} t {model.logit_scale.exp().item():.2f} "
                            f"{time.time() - t0:.0f}s")
                record({"step": step, "epoch": epoch, "loss": run_loss / run_n, "lr": cfg.lr * lr_scale,
                        "seconds": time.time() - t0})
                run_loss, run_n = 0.0, 0
            if cfg.save_every and step % cfg.save_every == 0:
                save(step, epoch)
            if step >= total:
                break
        else:
            epoch += 1
            save(step, epoch)
            total = _fit_time_limit(cfg, total, step, epoch_start, time.time() - t0, time.time() - epoch_t0)
            if val_data is not None and cfg.val_every and epoch % cfg.val_every == 0:
                val = _validate(model, val_data, texts, device, use_amp, val_sets, step, epoch, record, cfg.eval_scale)
                val_step = step
            continue
        break
    if saved != step:  # stopped by max_steps
        save(step, epoch)
    if val_data is not None and cfg.val_every and val_step != step:  # the final model, once
        val = _validate(model, val_data, texts, device, use_amp, val_sets, step, epoch, record, cfg.eval_scale)
    if info.is_main:
        save_model(model, str(out / "model.safetensors"),
                   card={"trained_on": [str(s) for s in cfg.data], "classes": [ds.class_names for ds in train_sets]})
    seconds = time.time() - t0
    record({"done": True, "step": step, "seconds": seconds})
    if log is not None:
        log.close()
    dist.barrier()
    return {"step": step, "loss": last_loss, "val": val, "seconds": seconds}


def _fit_time_limit(cfg: LSegTrainConfig, total: int, step: int, epoch_start: int, elapsed: float,
                    epoch_seconds: float) -> int:
    """With ``time_limit``, cut the step total to what the speed of the epoch just finished allows
    in the time left (the poly schedule then decays to zero at the new end). The first epoch, which
    pays for start-up, is not used. Every rank computes the same value."""
    if not cfg.time_limit or step <= epoch_start or epoch_start == 0 and elapsed < cfg.time_limit:
        return total
    per_step = float(dist.all_reduce_mean(torch.tensor(epoch_seconds / (step - epoch_start))))
    fit = step + max(0, int((cfg.time_limit - elapsed) / per_step))
    if fit < total:
        dist.print0(f"time limit {cfg.time_limit:.0f}s: training stops at step {fit} instead of {total}")
    return min(total, fit)


def _validate(model, val_data, texts, device, amp, val_sets, step, epoch, record, scale=1.0) -> list[dict]:
    metrics = evaluate(model, val_data, texts, device, amp, scale)
    out = []
    for ds, m in zip(val_sets, metrics):
        d = {"dataset": str(ds.root), "miou": m.miou * 100}
        out.append(d)
        dist.print0(f"val epoch {epoch} {ds.root.name}: mIoU {m.miou * 100:.2f}")
        record({"val": True, "step": step, "epoch": epoch, **d,
                "per_class": m.to_dict(ds.class_names)["per_class_iou"]})
    return out


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
