"""GroupViT training: image-text contrastive loss + the multi-label contrastive loss (Xu et al. 2022).

Each image comes with its caption and ``K`` extra positive texts, prompts built from the caption's
nouns ("a photo of a {noun}.", :mod:`textseg.train.nouns`). The loss is

    InfoNCE(image, caption)  +  w * MultiLabel(image, K noun prompts)

with one learnable temperature each (NVlabs: not shared). Under ``torchrun`` features from every
rank are gathered with gradient to the local shard (:func:`textseg.train.dist.all_gather_with_grad`)
so the negatives are the whole global batch. The engine (:mod:`textseg.train.engine`) brings DDP,
AMP, clipping, schedules, checkpoints and resume.

Batches are dicts ``{"image": B x 3 x H x W, "text": B x (1+K) x L}`` (row 0 = the caption), made
by :class:`GroupViTCollate` from ``(image tensor, caption)`` samples.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from textseg.data.imagetext import sample_rng
from textseg.distributed import get_rank, get_world_size
from textseg.models.groupvit import GroupViT
from textseg.prompts import IMAGENET_TEMPLATES
from textseg.train.dist import all_gather_with_grad
from textseg.train.engine import TrainConfig
from textseg.train.losses import LogitScale, info_nce
from textseg.train.nouns import noun_prompts


def group_max_similarity(groups: torch.Tensor, texts: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``B x G x D`` unit group embeddings, ``T x D`` unit texts -> ``B x T``: each text's cosine with
    the image's best group among ``valid`` (``B x G`` bool: the non-empty groups; None = all)."""
    sim = torch.einsum("bgd,td->bgt", groups, texts)
    if valid is not None:
        sim = sim.masked_fill(~valid[:, :, None], float("-inf"))
    return sim.amax(1)


def multi_label_loss(image: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor | float,
                     gather: bool = True, valid: torch.Tensor | None = None) -> torch.Tensor:
    """GroupViT's multi-label contrastive loss.

    ``image``: ``B x D`` L2-normalised image embeddings; ``texts``: ``B x K x D`` L2-normalised
    embeddings of each image's ``K`` positive texts. Image -> text: a soft cross-entropy over all
    ``W*B*K`` texts of the global batch whose target puts ``1/K`` on each of the image's own ``K``
    texts. Text -> image: cross-entropy of each of the ``B*K`` texts over the ``W*B`` images, target
    its own image. Returns the mean of the two directions (rows of this rank; under DDP the mean
    over ranks is the global loss).

    textseg's pure track (``multi_label_pool="max_group"``): ``image`` is ``B x G x D`` unit group
    embeddings (``valid`` ``B x G``: the non-empty ones) and an image scores a text by its best
    valid group (:func:`group_max_similarity`) instead of the mean-pooled embedding."""
    b, k, _ = texts.shape
    flat = texts.reshape(b * k, -1)
    distributed = gather and get_world_size() > 1
    all_img = all_gather_with_grad(image) if distributed else image
    all_txt = all_gather_with_grad(flat) if distributed else flat
    offset = b * get_rank() if distributed else 0
    per_group = image.dim() == 3
    if per_group and valid is not None and distributed:
        all_valid = all_gather_with_grad(valid.float()) > 0.5
    else:
        all_valid = valid
    # image -> its K texts (positions offset*K + i*K .. +K in the gathered text list)
    if per_group:
        logits_i2t = logit_scale * group_max_similarity(image, all_txt, valid)  # B x (W*B*K)
    else:
        logits_i2t = logit_scale * image @ all_txt.t()  # B x (W*B*K)
    target = torch.zeros_like(logits_i2t)
    cols = (offset + torch.arange(b, device=image.device))[:, None] * k + torch.arange(k, device=image.device)
    target.scatter_(1, cols, 1.0 / k)
    loss_img = -(target * logits_i2t.log_softmax(-1)).sum(-1).mean()
    # each text -> its image
    if per_group:
        logits_t2i = logit_scale * group_max_similarity(all_img, flat, all_valid).t()  # (B*K) x (W*B)
    else:
        logits_t2i = logit_scale * flat @ all_img.t()  # (B*K) x (W*B)
    labels = offset + torch.arange(b, device=image.device).repeat_interleave(k)
    loss_txt = F.cross_entropy(logits_t2i, labels)
    return 0.5 * (loss_img + loss_txt)


def assignment_diversity(maps: torch.Tensor) -> torch.Tensor:
    """textseg's assignment-diversity loss (``assign_diversity``; not in GroupViT): ``B x G x N``
    soft assignments (each patch a distribution over the ``G`` groups) -> ``(H(p | patch) -
    H(mean p)) / log G``, the negative mutual information between patches and groups over the batch
    (as IIC's clustering objective), in [-1, 1]. Low when every patch is confident of one group and
    the batch as a whole uses all the groups: a group that swallows two objects' patches in most
    images raises it. (Without it the pure track's seed 2 merged objects: 1.9 groups per image
    against 2.5 true segments.)"""
    g = maps.shape[1]
    p = maps.clamp_min(1e-8)
    marginal = p.mean((0, 2))
    h_marginal = -(marginal * marginal.log()).sum()
    h_patch = -(p * p.log()).sum(1).mean()
    return (h_patch - h_marginal) / math.log(g)


class GroupViTTrainModule(nn.Module):
    """``forward(batch) -> {"loss", "itc", "mlc", "scale", "ml_scale"}`` (+ ``"div"`` with ``assign_diversity``) for the engine.

    Holds the model, the multi-label loss's own temperature and the loss weights. ``batch["text"]``
    is ``B x (1+K) x L``: column 0 the caption, columns 1.. the noun prompts (``K = 0``: plain
    image-text contrastive training)."""

    def __init__(self, model: GroupViT, multi_label_weight: float = 1.0, temperature: float = 0.07):
        super().__init__()
        self.model = model
        self.multi_label_weight = multi_label_weight
        self.ml_scale = LogitScale(1 / temperature)

    def forward(self, batch: dict) -> dict:
        images, text = batch["image"], batch["text"]
        b, n, length = text.shape
        per_group = getattr(self.model.cfg, "multi_label_pool", "image") == "max_group"
        diversity = getattr(self.model.cfg, "assign_diversity", 0.0)
        if per_group or diversity:  # one pass: the image embedding and the groups with their non-empty mask
            inter = self.model.forward_intermediates(images)
            img = F.normalize(inter["image_embed"], dim=-1)
            groups = F.normalize(inter["group_embeds"], dim=-1)
            maps = inter["group_maps"][-1].flatten(2)  # B x G x N_0
            valid = F.one_hot(maps.argmax(1), maps.shape[1]).sum(1) > 0  # B x G: argmax of some patch
        else:
            img = F.normalize(self.model.encode_image(images), dim=-1)
        txt = F.normalize(self.model.encode_text(text.reshape(b * n, length)), dim=-1).reshape(b, n, -1)
        scale = self.model.logit_scale_value
        itc = info_nce(img, txt[:, 0], scale)
        out = {"itc": itc.detach(), "scale": scale.detach()}
        loss = itc
        if n > 1 and self.multi_label_weight > 0:
            ml_scale = self.ml_scale()
            mlc = (multi_label_loss(groups, txt[:, 1:], ml_scale, valid=valid) if per_group
                   else multi_label_loss(img, txt[:, 1:], ml_scale))
            loss = loss + self.multi_label_weight * mlc
            out.update(mlc=mlc.detach(), ml_scale=ml_scale.detach())
        if diversity:
            div = assignment_diversity(maps)
            loss = loss + diversity * div
            out["div"] = div.detach()
        out["loss"] = loss
        return out


class GroupViTCollate:
    """``[(image 3 x H x W, caption str), ...]`` (or the ``{"image", "text", "index", "epoch"}`` dicts of
    :mod:`textseg.data.imagetext`) -> ``{"image": B x 3 x H x W, "text": B x (1+K) x L}``.

    The ``K`` extra texts are noun prompts drawn afresh on every load, as NVlabs does: a new subset of
    the caption's words and a new template (from ``template``, default the 80 ImageNet prompts =
    NVlabs ``full_imagenet_templates``) per epoch. The draw is seeded by ``(seed, epoch, index)`` when
    the sample carries ``index``/``epoch`` (the textseg datasets do), so a resumed run sees the same
    texts; plain ``(image, caption)`` samples draw from a generator seeded once by ``seed``."""

    def __init__(self, tokenize: Callable[[list[str]], torch.Tensor], k: int = 3,
                 template: str | Sequence[str] = IMAGENET_TEMPLATES, seed: int = 0, tagger: str = "packaged"):
        self.tokenize, self.k, self.template, self.seed, self.tagger = tokenize, k, template, seed, tagger
        self._rng = random.Random(seed)

    def texts(self, caption: str, epoch: int | None = None, index: int | str | None = None) -> list[str]:
        """``[caption, K prompts]``; the prompts are a function of ``(seed, epoch, index)`` when both are given."""
        if not self.k:
            return [caption]
        rng = sample_rng(self.seed, epoch, index, "text") if index is not None and epoch is not None else self._rng
        return [caption, *noun_prompts(caption, self.k, self.template, rng, tagger=self.tagger)]

    def __call__(self, samples: Sequence) -> dict:
        images, texts = [], []
        for s in samples:
            if isinstance(s, (tuple, list)):
                images.append(s[0])
                texts.extend(self.texts(s[1]))
            else:
                images.append(s["image"])
                texts.extend(self.texts(s.get("text", s.get("caption")), s.get("epoch"), s.get("index")))
        tokens = self.tokenize(texts)
        return {"image": torch.stack(images), "text": tokens.reshape(len(samples), 1 + self.k, -1)}


@dataclass
class GroupViTModelCfg:
    """Architecture of a GroupViT trained from scratch (defaults: NVlabs gcc_yfcc_30e)."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 384
    heads: int = 6
    depths: list[int] = field(default_factory=lambda: [6, 3, 3])
    num_group_tokens: list[int] = field(default_factory=lambda: [64, 8, 0])
    num_output_groups: list[int] = field(default_factory=lambda: [64, 8, 0])
    # "faithful" (the official GroupViT) or "pure" (textseg's track, models.groupvit.GROUPVIT_VARIANTS):
    # the fields below left at None take the variant's value; set explicitly they override it.
    variant: str = "faithful"
    hard_assignment: bool | None = None  # Gumbel hard one-hot in training (faithful: True; False: softmax)
    eval_hard_assignment: bool | None = None  # argmax one-hot at inference (None: as hard_assignment)
    content_only: bool | None = None  # groups from their members only (pure: True)
    multi_label_pool: str | None = None  # "image" (faithful) / "max_group" (pure): the noun loss's pooling
    assign_diversity: float | None = None  # weight of the assignment-diversity loss (faithful: 0 = off)
    assign_pool: str = "mean"  # "mean" (official, eps 1) or "sum" of the assigned segments
    gumbel_tau: float = 1.0
    gumbel_noise: bool = True  # Gumbel noise on a hard training assignment (False: plain straight-through argmax)
    text_width: int = 256
    text_heads: int = 4
    text_layers: int = 12
    context_length: int = 77
    embed_dim: int = 256
    proj_hidden: int = 4096
    proj_layers: int = 2  # projector depth (NVlabs: 2, Linear-BN-ReLU-Linear; 1 = one linear layer)
    drop_path_rate: float = 0.1  # stochastic depth, linear over the vision layers (NVlabs: 0.1; 0 = off)
    # Frozen pretrained towers (textseg's option; "" = the official towers, trained from scratch):
    # backbone "lite0" = the offline default's EfficientNet-Lite0 feature map at stride patch_size as
    # the patch tokens (a trained 1x1 projection in); text_backbone "minilm" = its MiniLM sentence
    # encoder as the text tower (text_width/heads/layers unused). Only the grouping stages, the
    # projections and the temperatures train.
    backbone: str = ""
    text_backbone: str = ""

    def build(self) -> GroupViT:
        from textseg.errors import TextsegError
        from textseg.models.clip import TextConfig
        from textseg.models.groupvit import GROUPVIT_VARIANTS, GroupViTCfg, GroupViTVisionCfg

        if self.variant not in GROUPVIT_VARIANTS:
            raise TextsegError(f"model.variant must be one of {', '.join(GROUPVIT_VARIANTS)}, not {self.variant!r}")
        vis, top = GROUPVIT_VARIANTS[self.variant]
        vis = {"hard_assignment": True, "eval_hard_assignment": None, "content_only": False, **vis}
        top = {"multi_label_pool": "image", "assign_diversity": 0.0, **top}
        for fields in (vis, top):
            for key in fields:
                if getattr(self, key) is not None:
                    fields[key] = getattr(self, key)
        vision = GroupViTVisionCfg(
            image_size=self.image_size, patch_size=self.patch_size, width=self.width, heads=self.heads,
            depths=tuple(self.depths), num_group_tokens=tuple(self.num_group_tokens),
            num_output_groups=tuple(self.num_output_groups), drop_path_rate=self.drop_path_rate,
            assign_pool=self.assign_pool, gumbel_tau=self.gumbel_tau,
            gumbel_noise=self.gumbel_noise, backbone=self.backbone, **vis)
        text = TextConfig(context_length=self.context_length, width=self.text_width, heads=self.text_heads,
                          layers=self.text_layers)
        return GroupViT(GroupViTCfg(vision=vision, text=text, embed_dim=self.embed_dim,
                                    proj_hidden=self.proj_hidden, proj_layers=self.proj_layers,
                                    text_backbone=self.text_backbone, **top))


# ------------------------------------------------------------------ frozen towers: cached features
class JoinedCaptions(torch.utils.data.Dataset):
    """Caption folders (:class:`~textseg.data.imagetext.CaptionDataset`) as one dataset, samples
    indexed globally. With ``feats`` (one ``N_i x C x h x w`` tensor per folder, from
    :func:`backbone_features`) a sample's ``"image"`` is its cached frozen feature map instead of
    pixels, and its caption is drawn as the folder dataset draws it (seeded by seed, epoch, index)."""

    def __init__(self, datasets: Sequence, feats: Sequence[torch.Tensor] | None = None, seed: int = 0):
        self.datasets, self.feats, self.seed, self.epoch = list(datasets), feats, seed, 0
        self.offsets = [0]
        for ds in self.datasets:
            self.offsets.append(self.offsets[-1] + len(ds))

    def __len__(self) -> int:
        return self.offsets[-1]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for ds in self.datasets:
            ds.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        import bisect

        from textseg.data.imagetext import pick_caption

        k = bisect.bisect_right(self.offsets, index) - 1
        ds, j = self.datasets[k], index - self.offsets[k]
        if self.feats is None:
            return {**ds[j], "index": index}
        caps = ds.records[j].captions
        text = caps[pick_caption(self.seed, self.epoch, index, len(caps))]
        return {"image": self.feats[k][j].float(), "text": text, "index": index, "epoch": self.epoch}


@torch.no_grad()
def backbone_features(model: GroupViT, ds, cache_dir: str = "", batch_size: int = 8) -> torch.Tensor:
    """``N x C x h x w`` (float16) frozen backbone feature maps of every image of ``ds`` (a
    :class:`~textseg.data.imagetext.CaptionDataset` whose transform is the model's preprocessing).
    With ``cache_dir`` kept in ``<cache_dir>/groupvit-<hash>.pt``, keyed by the backbone, its stride,
    the preprocessing and the image files (path, size, mtime), and reused by later runs."""
    from dataclasses import asdict
    from pathlib import Path

    from textseg.distributed import print0
    from textseg.train.checkpoint import cached, file_stamp

    embed = model.visual.patch_embed

    def compute() -> torch.Tensor:
        out = []
        for s in range(0, len(ds), batch_size):
            pixels = torch.stack([ds.load(i) for i in range(s, min(s + batch_size, len(ds)))])
            out.append(embed.features(pixels.to(embed.proj.weight.device)).half().cpu())
            if (s // batch_size) % 25 == 0:
                print0(f"backbone features {s + len(pixels)}/{len(ds)} ({ds.root})")
        return torch.cat(out)

    v = model.cfg.vision
    key = [v.backbone, v.patch_size, asdict(model.preprocess_cfg),
           [(str(Path(r.image).resolve()), file_stamp(r.image)) for r in ds.records]]
    return cached(cache_dir, "groupvit", key, compute)


class CachedTextEmbedder:
    """The collate's ``tokenize`` for a frozen text tower: texts -> ``N x 384`` embeddings, each
    distinct text encoded once (the model's :meth:`~textseg.models.groupvit.FrozenTextTower.embed`)."""

    def __init__(self, tower):
        self.tower, self.memo = tower, {}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        new = list(dict.fromkeys(t for t in texts if t not in self.memo))
        if new:
            for t, e in zip(new, self.tower.embed(new).cpu()):
                self.memo[t] = e
        return torch.stack([self.memo[t] for t in texts])


# ------------------------------------------------------------------------------------------ recipe
@dataclass
class GroupViTDataSection:
    train: str = ""  # folder with a caption file, or tar shards ("shards/{0000..0099}.tar", globs)
    captions: str = "captions.jsonl"  # folder sources: JSONL or CSV relative to the folder
    train_split: str = ""
    more_train: list[str] = field(default_factory=list)  # more caption folders (all their images), trained too
    # model.backbone with augment "none": every training image's frozen feature map is computed once
    # and kept in this folder between runs ("" = in memory for this run only)
    feature_cache: str = ""
    shuffle_buffer: int = 1000  # tar shards
    # Training augmentation. "deit" (NVlabs configs/default.yml img_aug, timm create_transform):
    # RandomResizedCrop(scale 0.08-1, bilinear) + flip + RandAugment + normalise + random erasing;
    # "none": the model's evaluation preprocessing (resize + centre crop), no randomness.
    augment: str = "deit"
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # "" = off (then color_jitter applies, as in timm)
    color_jitter: float = 0.4
    re_prob: float = 0.25  # random-erasing probability (mode 'pixel', one box)


@dataclass
class GroupViTLossSection:
    multi_label: int = 3  # K noun prompts per image (0: image-text contrastive only)
    multi_label_weight: float = 1.0
    # noun prompt templates: "imagenet" = one of the 80 at random per noun and load (NVlabs
    # full_imagenet_templates); a set name of textseg.prompts or one template with "{}"
    template: str = "imagenet"
    tagger: str = "packaged"  # caption tagger (textseg.train.nouns): "packaged" offline, "nltk" NLTK's data
    temperature: float = 0.07  # initial temperature of both losses (learnable)


@dataclass
class GroupViTRecipeConfig:
    model: GroupViTModelCfg = field(default_factory=GroupViTModelCfg)
    init: str = ""  # start from a checkpoint (any GroupViT format) instead of random weights
    data: GroupViTDataSection = field(default_factory=GroupViTDataSection)
    loss: GroupViTLossSection = field(default_factory=GroupViTLossSection)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        out_dir="runs/groupvit", lr=1.6e-3, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8,
        clip_grad=5.0, warmup_steps=100, min_lr_ratio=0.025))


def train_transform(data: GroupViTDataSection, preprocess):
    """The recipe's image transform: :class:`textseg.data.augment.DeiTTrainTransform` at the model's
    size and mean/std (``data.augment == "deit"``, the NVlabs default) or the model's evaluation
    preprocessing (``"none"``)."""
    from textseg.errors import TextsegError

    if data.augment == "none":
        from textseg.preprocess import Preprocess

        return Preprocess(preprocess)
    if data.augment != "deit":
        raise TextsegError(f"data.augment must be 'deit' or 'none', got {data.augment!r}")
    from textseg.data.augment import DeiTTrainTransform

    return DeiTTrainTransform(preprocess.image_size, preprocess.mean, preprocess.std, interpolation="bilinear",
                              auto_augment=data.auto_augment,
                              color_jitter=data.color_jitter, re_prob=data.re_prob)


def build_trainer(cfg: GroupViTRecipeConfig):
    """Model, data and engine for ``cfg`` (call ``.fit()`` on the result)."""
    from pathlib import Path

    from textseg.data.imagetext import CaptionDataset, TarShardDataset
    from textseg.distributed import init_distributed
    from textseg.errors import TextsegError
    from textseg.prompts import resolve_templates
    from textseg.train.engine import Trainer, seed_everything

    info = init_distributed(cfg.train.device)
    seed_everything(cfg.train.seed)
    if cfg.init:
        from textseg.weights.load import load_model

        model = load_model(weights=cfg.init)
        if not isinstance(model, GroupViT):
            raise TextsegError(f"{cfg.init}: is a {model.name!r} checkpoint, not a GroupViT")
    else:
        model = cfg.model.build()
    if info.world_size > 1 and info.device.type == "cuda":  # NVlabs syncs the projector BatchNorms
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    d = cfg.data
    if not d.train:
        raise TextsegError("set data.train to a caption folder or tar shards (--set data.train=PATH)")
    transform = train_transform(d, model.preprocess_cfg)
    if d.train.endswith(".tar") or ".tar," in d.train or Path(d.train).suffix == ".tar":
        if d.more_train:
            raise TextsegError("data.more_train takes caption folders, with a caption-folder data.train")
        dataset = TarShardDataset(d.train, transform, shuffle=cfg.train.shuffle, shuffle_buffer=d.shuffle_buffer,
                                  seed=cfg.train.seed)
    else:
        dataset = CaptionDataset(d.train, d.captions, d.train_split or None, transform, seed=cfg.train.seed)
        if d.more_train or (model.cfg.vision.backbone and d.augment == "none"):
            parts = [dataset] + [CaptionDataset(p, d.captions, None, transform, seed=cfg.train.seed)
                                 for p in d.more_train]
            feats = None
            if model.cfg.vision.backbone and d.augment == "none":  # frozen and deterministic: cache
                feats = [backbone_features(model, ds, d.feature_cache) for ds in parts]
            dataset = JoinedCaptions(parts, feats, cfg.train.seed)
    template = cfg.loss.template
    templates = resolve_templates(template) if "{}" not in template else template
    tokenize = CachedTextEmbedder(model.text) if model.cfg.text_backbone else model.tokenize
    collate = GroupViTCollate(tokenize, cfg.loss.multi_label, templates, cfg.train.seed, cfg.loss.tagger)
    module = GroupViTTrainModule(model, cfg.loss.multi_label_weight, cfg.loss.temperature)
    return Trainer(cfg.train, module, dataset, collate_fn=collate, config=cfg)


def train_groupvit(cfg: GroupViTRecipeConfig) -> dict:
    """Train, then export the weights as ``<out_dir>/model.safetensors`` (native format, loadable
    with ``--weights``). Returns the final metrics."""
    trainer = build_trainer(cfg)
    result = trainer.fit()
    path = trainer.save_model(trainer.final_module().model, {"source": "textseg train groupvit"})
    return {**result, "weights": str(path)}
