"""Does segmentation emerge from captions? GroupViT trained on :func:`textseg.data.synthetic.cell_scenes`.

The library half of ``benchmarks/groupvit_emergence.py`` (the tests use it too): a small GroupViT of
either track (:data:`textseg.models.groupvit.GROUPVIT_VARIANTS`) trained on the engine from captions
only, and everything the benchmark measures on held-out scenes:

- :func:`zero_shot` - the official inference (:meth:`GroupViT.segment_official`), the class nouns and
  the background noun as labels, every label kept (``top_k`` = all) -> mIoU;
- :func:`grouping_report` - the oracle mIoU (each final group labelled with its true majority class:
  what the grouping allows) and the groups per image;
- :func:`true_partition_zero_shot` - the zero-shot mIoU with the true partition in place of the
  learned assignment: is a failure the grouping's or the group-to-noun matching's?
- :func:`ceiling`, :func:`all_background` - perfect majority-class patches upsampled as the inference
  does (100 on cell scenes), and everything background;
- :func:`bypass_diagnostic` - the loss-relevant scores (caption retrieval, image-level noun presence
  and the noun margin, each by the score the track's multi-label loss uses) with the learned
  assignment and with it replaced by a random map, a per-image shuffle and "every patch in group 0":
  if they do not drop, the losses do not depend on the grouping.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from textseg.data.synthetic import SceneDataset, Scenes
from textseg.metrics import ConfusionMatrix
from textseg.models.groupvit import GroupViT
from textseg.train.groupvit import GroupViTCollate, GroupViTModelCfg, GroupViTTrainModule

PROMPT = ("a photo of a {}.",)


# A noise-free hard training assignment for the pure track (the argmax one-hot with the
# straight-through gradient of the softmax: training sees the inference's groups), measured at 600
# steps before the pure track had the assignment-diversity loss, and *not* the default: seed 2 rose to 64.0 mIoU (oracle 71.7, 2.6 groups per image; soft:
# 40.6 / 49.8 / 1.9) but seeds 0 / 1 fell to 27.7 / 24.8 (oracle 53.9 / 43.3; soft: 68.9 / 72.4).
# ``emergence_model_cfg("pure", **NOISE_FREE_HARD)``; the benchmark's question (d) measures it.
NOISE_FREE_HARD = {"hard_assignment": True, "gumbel_noise": False}


def emergence_model_cfg(variant: str = "faithful", groups: int = 8, image_size: int = 64,
                        **overrides) -> GroupViTModelCfg:
    """A GroupViT small enough for a shared CPU: 8 x 8-px patches, width 64, one grouping stage (no
    transformer layer before or after it: ``groups`` group tokens cross-attend to the patch
    embeddings and group them), a linear projector, a 2-layer text tower, no stochastic depth.
    ``overrides``: any other :class:`GroupViTModelCfg` field. (One layer before the grouping,
    ``depths=[1, 0]``, measured worse for the pure track at 600 steps, before its assignment-diversity
    loss: 64.4 / 66.2 / 41.6 mIoU on seeds 0 / 1 / 2 against 68.9 / 72.4 on seeds 0 / 1 without it.)"""
    cfg = dict(variant=variant, image_size=image_size, patch_size=8, width=64, heads=4, depths=[0, 0],
               num_group_tokens=[groups, 0], num_output_groups=[groups, 0], proj_layers=1, text_width=64,
               text_heads=2, text_layers=2, context_length=16, embed_dim=64, proj_hidden=256, drop_path_rate=0.0)
    cfg.update(overrides)
    return GroupViTModelCfg(**cfg)


def train_on_scenes(model_cfg: GroupViTModelCfg, scenes: Scenes, steps: int, out_dir: str, seed: int = 0,
                    batch_size: int = 48, lr: float = 2e-3, k: int = 3, log_every: int = 50,
                    progress: bool = False, tau_final: float | None = None) -> GroupViT:
    """Train ``model_cfg`` on the captions of ``scenes`` (masks never seen) with the recipe's losses
    (:class:`GroupViTTrainModule`: image-text + multi-label noun loss, the track's pooling) on the
    engine: AdamW, warm-up then cosine to 0. Returns the model in eval mode."""
    from textseg.train.engine import TrainConfig, Trainer, seed_everything

    seed_everything(seed)
    model = model_cfg.build()
    ds = SceneDataset(scenes, model.preprocess_cfg.mean, model.preprocess_cfg.std)
    cfg = TrainConfig(out_dir=out_dir, steps=steps, batch_size=batch_size, lr=lr, weight_decay=0.05,
                      betas=(0.9, 0.999), eps=1e-8, warmup_steps=max(1, steps // 10), min_lr_ratio=0.0,
                      schedule="cosine", clip_grad=5.0, log_every=log_every, resume="none", progress=progress,
                      tensorboard=False, device="cpu", seed=seed)
    trainer = Trainer(cfg, GroupViTTrainModule(model), ds,
                      collate_fn=GroupViTCollate(model.tokenize, k=k, template=PROMPT[0], seed=seed),
                      callbacks=[annealer(model, steps, tau_final)] if tau_final else ())
    trainer.fit()
    return model.eval()


def annealer(model: GroupViT, steps: int, tau_final: float):
    """An engine callback that anneals every grouping block's assignment temperature geometrically
    from its configured ``gumbel_tau`` to ``tau_final`` over ``steps``."""
    blocks = [s.grouping.assign for s in model.visual.stages if s.grouping is not None]
    start = blocks[0].tau

    def step(trainer):
        t = min(1.0, trainer.step / max(1, steps))
        for b in blocks:
            b.tau = start * (tau_final / start) ** t
    return step


def _batches(scenes: Scenes, model: GroupViT, batch_size: int):
    ds = SceneDataset(scenes, model.preprocess_cfg.mean, model.preprocess_cfg.std)
    for s in range(0, len(ds), batch_size):
        idx = np.arange(s, min(s + batch_size, len(ds)))
        yield idx, ds.pixels(idx)


def score_masks(pred: torch.Tensor, scenes: Scenes) -> dict:
    """``N x H x W`` predicted class indices against the scenes' masks -> mIoU (%) and per-class IoU."""
    cm = ConfusionMatrix(len(scenes.classes))
    cm.update(pred, torch.from_numpy(scenes.masks).long())
    m = cm.compute()
    return {"mIoU": 100 * m.miou,
            "iou": {c: (None if math.isnan(v) else round(100 * v, 2)) for c, v in zip(scenes.classes, m.iou)}}


@torch.no_grad()
def zero_shot_scores(model: GroupViT, scenes: Scenes, batch_size: int = 100, stage: int = -1) -> torch.Tensor:
    """``N x C x H x W`` official per-pixel scores (:meth:`GroupViT.segment_official`, the groups of
    grouping stage ``stage``) for the labels ``scenes.classes`` (background noun first), every label kept."""
    model.eval()
    text = model.embed_texts(list(scenes.classes), PROMPT)
    return torch.cat([model.segment_official(px, text, top_k=len(scenes.classes), stage=stage) for _, px in
                      _batches(scenes, model, batch_size)])


def zero_shot(model: GroupViT, scenes: Scenes, batch_size: int = 100, stage: int = -1) -> dict:
    """Zero-shot segmentation (argmax of :func:`zero_shot_scores`) -> :func:`score_masks`."""
    return score_masks(zero_shot_scores(model, scenes, batch_size, stage).argmax(1), scenes)


def threshold_background(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Object scores ``N x C x H x W`` (channel 0 ignored) -> labels with NVlabs' fixed rule on the
    best object score: background where it is below ``threshold``."""
    best, arg = scores[:, 1:].max(1)
    return torch.where(best < threshold, torch.zeros_like(arg), arg + 1)


@torch.no_grad()
def object_scores(model: GroupViT, scenes: Scenes, batch_size: int = 100) -> torch.Tensor:
    """Official scores with the object nouns only (the background left to a threshold), channel 0 zero."""
    model.eval()
    text = model.embed_texts(list(scenes.classes[1:]), PROMPT)
    out = [model.segment_official(px, text, top_k=len(scenes.classes) - 1) for _, px in
           _batches(scenes, model, batch_size)]
    s = torch.cat(out)
    return torch.cat([torch.zeros_like(s[:, :1]), s], 1)


def _majority_labels(groups: torch.Tensor, masks: torch.Tensor, n_cls: int, g: int):
    b = groups.shape[0]
    counts = torch.zeros(b * g, n_cls)
    key = (torch.arange(b)[:, None, None] * g + groups).flatten()
    counts.index_put_((key, masks.flatten()), torch.ones(key.numel()), accumulate=True)
    majority = counts.argmax(1).view(b, g)
    used = (counts.view(b, g, n_cls).sum(-1) > 0).sum(1)
    return torch.gather(majority, 1, groups.flatten(1)).view_as(masks), used


@torch.no_grad()
def grouping_report(model: GroupViT, scenes: Scenes, batch_size: int = 100, stage: int = -1) -> dict:
    """``oracle_mIoU`` (each group of grouping stage ``stage`` labelled with the true class most of
    its pixels have; pixels take the argmax of the bilinearly upsampled soft maps, as the inference)
    and ``groups_per_image`` (distinct groups among a scene's pixels)."""
    model.eval()
    preds, used = [], []
    for idx, px in _batches(scenes, model, batch_size):
        maps = model.forward_intermediates(px)["group_maps"][stage]
        groups = F.interpolate(maps, size=px.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
        p, u = _majority_labels(groups, torch.from_numpy(scenes.masks[idx]).long(), len(scenes.classes),
                                maps.shape[1])
        preds.append(p)
        used += u.tolist()
    return {"oracle_mIoU": score_masks(torch.cat(preds), scenes)["mIoU"], "groups_per_image": float(np.mean(used))}


def patch_classes(scenes: Scenes, patch: int = 8) -> torch.Tensor:
    """``N x (H/patch * W/patch)`` majority class of every patch (row-major, as the patch tokens)."""
    onehot = F.one_hot(torch.from_numpy(scenes.masks).long(), len(scenes.classes)).permute(0, 3, 1, 2).float()
    return F.avg_pool2d(onehot, patch).argmax(1).flatten(1)


def ceiling(scenes: Scenes, patch: int = 8) -> float:
    """The mIoU of perfect patch groups: every patch's one-hot majority class, bilinearly upsampled
    and arg-maxed as the inference does (100 when objects cover whole cells)."""
    n, h, w = scenes.masks.shape
    cls = patch_classes(scenes, patch).view(n, h // patch, w // patch)
    hard = F.one_hot(cls, len(scenes.classes)).permute(0, 3, 1, 2).float()
    up = F.interpolate(hard, size=(h, w), mode="bilinear", align_corners=False).argmax(1)
    return score_masks(up, scenes)["mIoU"]


def all_background(scenes: Scenes) -> float:
    """The mIoU of labelling every pixel background."""
    return score_masks(torch.zeros(scenes.masks.shape, dtype=torch.long), scenes)["mIoU"]


def _pool_by_index(blk, index: torch.Tensor, groups: int, segments: torch.Tensor):
    """A grouping block's output for a given hard assignment ``index`` (``B x S``: each segment's
    group): the groups pooled from their members as the block's own hard assignment pools them (the
    mean with ``eps`` or the sum), and the ``B x G x S`` one-hot assignment."""
    onehot = F.one_hot(index, groups).transpose(1, 2).to(segments.dtype)
    assign = onehot / (onehot.sum(-1, keepdim=True) + blk.eps) if blk.pool == "mean" else onehot
    return blk.proj(assign @ blk.v_proj(segments)), onehot


# ------------------------------------------------------------------------------ bypass diagnostic
@contextmanager
def replaced_assignment(model: GroupViT, mode: str, seed: int = 0):
    """Inside the block, every grouping block assigns segments by ``mode`` instead of its learned
    logits: ``"random"`` (each segment to a uniformly random group), ``"shuffle"`` (the learned
    hard assignment with the segments permuted per image) or ``"single"`` (every segment in group 0).
    The groups are then pooled from their members exactly as the block's own hard assignment."""
    if mode == "learned":
        yield
        return
    gen = torch.Generator().manual_seed(seed)
    blocks = [s.grouping.assign for s in model.visual.stages if s.grouping is not None]
    saved = [b.forward for b in blocks]

    def make(blk):
        def forward(groups, segments):
            raw = (blk.q_proj(groups) @ blk.k_proj(segments).transpose(1, 2)) * blk.scale  # B x G x S
            b, g, s = raw.shape
            if mode == "random":
                index = torch.randint(0, g, (b, s), generator=gen)
            elif mode == "shuffle":
                perm = torch.stack([torch.randperm(s, generator=gen) for _ in range(b)])
                index = torch.gather(raw.argmax(1), 1, perm)
            elif mode == "single":
                index = torch.zeros(b, s, dtype=torch.long)
            else:
                raise ValueError(f"mode must be learned, random, shuffle or single, not {mode!r}")
            return _pool_by_index(blk, index, g, segments)
        return forward

    try:
        for b in blocks:
            b.forward = make(b)
        yield
    finally:
        for b, f in zip(blocks, saved):
            b.forward = f


@torch.no_grad()
def true_partition_zero_shot(model: GroupViT, scenes: Scenes, batch_size: int = 100) -> dict:
    """Grouping or matching? The official zero-shot inference (:func:`zero_shot`) with the learned
    assignment of the (single) grouping block replaced by the true partition: group ``c`` holds the
    patches of class ``c`` (needs at least as many groups as classes), pooled by the block's own
    value path. The model's labelling of perfect groups: near the ceiling, a low zero-shot mIoU is
    the grouping's fault; well below it, the matching never learned some class."""
    blocks = [s.grouping.assign for s in model.visual.stages if s.grouping is not None]
    if len(blocks) != 1:
        raise ValueError("true_partition_zero_shot needs a model with one grouping stage")
    blk, saved, state = blocks[0], blocks[0].forward, {}

    def forward(groups, segments):
        return _pool_by_index(blk, state["classes"], groups.shape[1], segments)

    model.eval()
    text = model.embed_texts(list(scenes.classes), PROMPT)
    classes = patch_classes(scenes, model.cfg.vision.patch_size)
    out = []
    try:
        blk.forward = forward
        for idx, px in _batches(scenes, model, batch_size):
            state["classes"] = classes[idx]
            out.append(model.segment_official(px, text, top_k=len(scenes.classes)))
    finally:
        blk.forward = saved
    return score_masks(torch.cat(out).argmax(1), scenes)


@torch.no_grad()
def loss_scores(model: GroupViT, scenes: Scenes, batch_size: int = 100) -> dict:
    """The scores the track's losses see, on held-out scenes: ``retrieval`` (caption top-1 among the
    scenes' captions, from the image embedding), ``presence`` (the best-scoring noun is in the
    scene) and ``noun_margin`` (mean cosine of present nouns minus absent ones), the nouns scored by
    the track's multi-label pooling (image embedding, or best non-empty group for ``max_group``)."""
    model.eval()
    nouns = model.embed_texts(list(scenes.classes[1:]), PROMPT)
    caps = F.normalize(model.encode_text(model.tokenize(scenes.captions)), dim=-1)
    per_group = model.cfg.multi_label_pool == "max_group"
    imgs, noun_sim = [], []
    for _, px in _batches(scenes, model, batch_size):
        out = model.forward_intermediates(px)
        imgs.append(F.normalize(out["image_embed"], dim=-1))
        if per_group:
            from textseg.train.groupvit import group_max_similarity

            maps = out["group_maps"][-1].flatten(2)
            valid = F.one_hot(maps.argmax(1), maps.shape[1]).sum(1) > 0
            noun_sim.append(group_max_similarity(F.normalize(out["group_embeds"], dim=-1), nouns, valid))
        else:
            noun_sim.append(imgs[-1] @ nouns.t())
    img, sim = torch.cat(imgs), torch.cat(noun_sim)
    # a caption counts as retrieved when the top caption is identical text (duplicates are common)
    top = (img @ caps.t()).argmax(1)
    retrieval = float(np.mean([scenes.captions[j] == c for j, c in zip(top.tolist(), scenes.captions)]))
    present = torch.zeros_like(sim, dtype=torch.bool)
    for i, m in enumerate(scenes.masks):
        for c in np.unique(m):
            if c > 0:
                present[i, c - 1] = True
    presence = present.gather(1, sim.argmax(1, keepdim=True)).float().mean().item()
    margin = (sim[present].mean() - sim[~present].mean()).item()
    return {"retrieval": retrieval, "presence": presence, "noun_margin": margin}


def bypass_diagnostic(model: GroupViT, scenes: Scenes, seed: int = 0) -> dict:
    """:func:`loss_scores` with the learned assignment and each :func:`replaced_assignment`."""
    out = {}
    for mode in ("learned", "random", "shuffle", "single"):
        with replaced_assignment(model, mode, seed):
            out[mode] = loss_scores(model, scenes)
    return out
