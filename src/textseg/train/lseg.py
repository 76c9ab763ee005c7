"""Supervised LSeg training: per-pixel cross-entropy against frozen label embeddings.

One or more segmentation datasets (any reader of :mod:`textseg.data`; the folder layout by path)
are concatenated; every image is scored only against **its own dataset's** labels, as in the
paper's seven-dataset mix. The text tower is frozen: each dataset's label embeddings are computed
once (no gradient) and cached for the whole run.

Recipe (the paper's, scaled to the machine): random scale, random crop (padded with ``ignore``),
horizontal flip; AdamW or SGD with a polynomial (power 0.9) learning-rate decay and the backbone at
``backbone_lr_mult`` times the decoder's rate; bf16 autocast on GPU; ``torchrun`` DDP with sync
batch norm on GPU. It runs on :class:`textseg.train.engine.Trainer`: checkpoints every
``train.ckpt_every`` steps and each epoch (the engine's layout, the frozen text tower left out) so
a killed run resumes at the same step; validation mIoU after each epoch. Augmentation is a pure
function of ``(seed, epoch, index)`` and the engine's sampler is seeded, so a resumed run sees
exactly the batches the uninterrupted one would.

Outputs in ``train.out_dir``: ``checkpoints/step_<n>.pt`` (training state), ``log.jsonl``,
``config.yaml`` and ``model.safetensors`` (the final model, loadable by ``textseg segment --model
lseg --weights``).

    cfg = load_config(LSegTrainConfig, None, ["data.roots=[data/camvid]", "train.epochs=8"])
    result = train(cfg)   # {"step": ..., "loss": ..., "miou": ..., "weights": "<out>/model.safetensors"}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from textseg.constants import IGNORE_INDEX
from textseg.distributed import get_rank, get_world_size, init_distributed, print0
from textseg.errors import TextsegError
from textseg.models.lseg import LSeg, LSegConfig, build_lseg, upsample_logits
from textseg.train.engine import TrainConfig, Trainer, cpu_threads, seed_everything, set_bn_eval


@dataclass
class LSegDataSection:
    roots: list[str] = field(default_factory=list)  # dataset roots, "root" or "root:split"
    train_split: str = "train"
    val_split: str | None = "val"  # validated every train.eval_every_epochs and at the end ("none": never)
    template: str = "{}"  # prompt around each label, e.g. "a photo of a {}."
    crop: tuple[int, int] = (352, 480)  # h, w (multiples of 32)
    scale: tuple[float, float] = (0.5, 2.0)  # random scale range, relative to the stored image size
    class_balance: bool = False  # median-frequency class weights in the loss (as SegNet)
    eval_scale: float = 1.0  # validation runs on images resized by this factor (logits scored at full size)


@dataclass
class LSegModelSection:
    backbone: str = "lite0"  # lite0/1/2 (EfficientNet-Lite, ImageNet) or clip (CLIP's ViT, init_from)
    text_encoder: str = "minilm"  # minilm | clip
    init_from: str | None = None  # a CLIP checkpoint: its ViT (backbone "clip") and/or text tower (text "clip")
    features: int = 64  # DPT decoder width
    block: str = "none"  # spatial regularisation block on the logits: none | bottleneck | depthwise
    block_depth: int = 0
    learn_logit_scale: bool = False  # official lang-seg: temperature fixed at 1/0.07; True: learn it
    freeze_bn: bool = False  # keep the backbone's batch-norm statistics fixed
    freeze_stages: int = 0  # stem + this many leading backbone stages frozen
    light: bool = False  # separable decoder convs, dense map at stride 4 (CPU)
    image_size: int = 0  # card's preprocess image size (0: min of the crop)
    backbone_lr_mult: float = 0.1  # the backbone trains at this multiple of train.lr


@dataclass
class LSegTrainConfig:
    data: LSegDataSection = field(default_factory=LSegDataSection)
    model: LSegModelSection = field(default_factory=LSegModelSection)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        out_dir="runs/lseg", steps=0, epochs=10, batch_size=8, optimizer="adamw", lr=1e-3, weight_decay=1e-4,
        betas=(0.9, 0.999), eps=1e-8, schedule="poly", poly_power=0.9, amp="auto", num_workers=2,
        ckpt_every_epochs=1, eval_every_epochs=1, log_every=10))


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

    def set_epoch(self, epoch: int) -> None:  # called by the engine at each epoch's start
        self.epoch = epoch

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


class LSegTrainModule(nn.Module):
    """What the engine runs: ``(pixels, masks, dataset ids)`` -> ``{"loss"}`` (:class:`LSegLoss`
    against the cached label embeddings). The frozen text tower is rebuilt from its packaged (or
    ``init_from``) weights, so checkpoints leave it out; ``freeze_bn`` keeps the backbone's
    batch-norm layers in eval mode through ``train()``."""

    checkpoint_skip = ("loss.model.text_encoder.",)

    def __init__(self, model: LSeg, texts: Sequence[torch.Tensor], weights: Sequence[torch.Tensor] = (),  # on device
                 freeze_bn: bool = False):
        super().__init__()
        self.loss = LSegLoss(model, weights)
        self.freeze_bn = freeze_bn
        self.n_texts = len(texts)
        for i, t in enumerate(texts):  # buffers: they follow the module to its device, not saved
            self.register_buffer(f"text_{i}", t, persistent=False)
        if freeze_bn:
            set_bn_eval(model.image_encoder)

    @property
    def model(self) -> LSeg:
        return self.loss.model

    def texts(self) -> list[torch.Tensor]:
        return [getattr(self, f"text_{i}") for i in range(self.n_texts)]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_bn:
            set_bn_eval(self.model.image_encoder)
        return self

    def forward(self, batch) -> dict:
        pixels, masks, ds = batch
        loss, _ = self.loss(pixels, masks, ds, self.texts())
        return {"loss": loss}


def build_from_clip(mcfg: LSegConfig, path: str | None) -> LSeg:
    """LSeg whose CLIP parts (the ViT image tower for backbone ``clip``, the text tower for text
    encoder ``clip``) start from the CLIP checkpoint at ``path`` (any format ``load_model`` reads)."""
    from textseg.constants import OPENAI_MEAN, OPENAI_STD
    from textseg.weights.load import load_model

    if not path:
        raise TextsegError("backbone / text encoder 'clip' needs --set model.init_from=CLIP_CHECKPOINT (no CLIP weights ship)")
    clip = load_model(weights=path)
    if clip.name != "clip":
        raise TextsegError(f"model.init_from {path} is a {clip.name!r} checkpoint, not CLIP")
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


def param_groups(model: LSeg, cfg: LSegTrainConfig) -> list[dict]:
    """The backbone at ``backbone_lr_mult`` times ``train.lr``, the rest (decoder, head) at it;
    weight decay on every parameter (the optimizer's), as lang-seg."""
    back, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (back if name.startswith("image_encoder.") else rest).append(p)
    return [{"params": back, "lr_mult": cfg.model.backbone_lr_mult}, {"params": rest, "lr_mult": 1.0}]


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
    rank, world = get_rank(), get_world_size()
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


def build_trainer(cfg: LSegTrainConfig) -> Trainer:
    """Model, data, validation and engine for ``cfg`` (call ``.fit()`` on the result)."""
    d, m = cfg.data, cfg.model
    if not d.roots:
        raise TextsegError("no training data: --set data.roots=[ROOT[:split], ...]")
    if d.crop[0] % 32 or d.crop[1] % 32:
        raise TextsegError(f"data.crop {d.crop} must be multiples of 32")
    val_split = None if str(d.val_split).lower() in ("none", "") else d.val_split
    info = init_distributed(cfg.train.device)
    device = info.device
    seed_everything(cfg.train.seed)

    train_sets = [open_dataset(s, d.train_split) for s in d.roots]
    val_sets = [open_dataset(s.partition(":")[0] if ":" in Path(s).name else s, val_split)
                for s in d.roots] if val_split else []

    mcfg = LSegConfig(backbone=m.backbone, text_encoder=m.text_encoder, features=m.features,
                      block=m.block, block_depth=m.block_depth, freeze_stages=m.freeze_stages,
                      separable=m.light, last_upsample=not m.light, learn_logit_scale=m.learn_logit_scale,
                      image_size=m.image_size or min(d.crop))
    model = build_from_clip(mcfg, m.init_from) if "clip" in (m.backbone, m.text_encoder) else \
        build_lseg(mcfg, pretrained=True)
    if model.cfg.text_encoder == "minilm":  # record the tower's dims so the card rebuilds it exactly
        model.cfg = dataclasses.replace(model.cfg, text_cfg=asdict(model.text_encoder.cfg))
    model.decoder.fusion[3].rcu1.requires_grad_(False)  # the coarsest level has no skip input: unused
    model.to(device)
    texts = [label_embeddings(model, ds.class_names, d.template).to(device) for ds in train_sets]
    weights = [median_frequency_weights(ds).to(device) for ds in train_sets] if d.class_balance else []
    if weights:
        print0("class weights: " + "; ".join(
            ", ".join(f"{n} {w:.2f}" for n, w in zip(ds.class_names, wt.tolist())) for ds, wt in zip(train_sets, weights)))
    module = LSegTrainModule(model, texts, weights, freeze_bn=m.freeze_bn)
    groups = param_groups(model, cfg)
    if info.world_size > 1 and device.type == "cuda":
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    mean, std = model.cfg.mean, model.cfg.std
    train_data = LabelledSegData(train_sets, mean, std, True, d.crop, d.scale, cfg.train.seed)
    eval_fn = None
    if val_sets:
        val_data = LabelledSegData(val_sets, mean, std, False)
        amp = cfg.train.amp in ("auto", "bf16")

        def eval_fn(module: LSegTrainModule, step: int) -> dict[str, float]:
            metrics = evaluate(module.model, val_data, module.texts(), device, amp, d.eval_scale)
            out = {f"miou/{ds.root.name}": mm.miou * 100 for ds, mm in zip(val_sets, metrics)}
            out["miou"] = float(np.mean(list(out.values())))
            return out

    return Trainer(cfg.train, module, train_data, collate_fn=collate, eval_fn=eval_fn, config=cfg, groups=groups)


def train(cfg: LSegTrainConfig) -> dict:
    """Run (or resume) training, then write ``<out_dir>/model.safetensors``; returns the final
    metrics (``step``, ``loss``, ``miou`` when validating, ``weights``)."""
    with cpu_threads(cfg.train.threads):  # the label embeddings too, as in training
        trainer = build_trainer(cfg)
        result = trainer.fit()
        path = trainer.save_model(trainer.final_module().model,
                                  {"source": "textseg train lseg", "trained_on": [str(s) for s in cfg.data.roots],
                                   "classes": [ds.class_names for ds in trainer.dataset.datasets]})
    return {**result, "weights": str(path)}
