"""GroupViT (Xu et al., CVPR 2022): semantic segmentation that emerges from text supervision.

An image is cut into patches ("segment tokens"). Each stage runs transformer layers over the segment
tokens concatenated with that stage's learnable *group tokens*; a **grouping block** then assigns
every segment token to one group token (Gumbel-softmax over the group axis: hard one-hot with a
straight-through gradient in training, ``argmax`` one-hot in evaluation) and the groups, averaged
from their members, become the next stage's segment tokens. The image embedding is the mean of the
final groups, passed through an MLP projector; the text tower is CLIP's causal transformer (reused
from :mod:`textseg.models.clip`) with its own MLP projector.

Zero-shot segmentation follows NVlabs' ``GroupViTSegInference.encode_decode``
(``segmentation/evaluation/group_vit_seg.py``) and mmseg's inference (dense mode ``"official"``, the
default, in the :class:`~textseg.segment.Segmenter` and so in ``textseg segment``, ``textseg eval`` and
the web app): the product of the stage-wise *soft* assignment matrices gives every patch a
distribution over the final groups; these maps are bilinearly upsampled to the input (crop) size and
each pixel takes its argmax group. A group's class probabilities are the softmax of ``scale *
cos(group, text)`` restricted to the 5 classes the whole image (mean of the groups) scores highest,
times the unrestricted softmax; a pixel reads its group's row. Background (when a threshold is set)
is 1 where the best class score is below ``min(threshold, the largest group probability)``, else 0.
Sliding windows average these per-class scores over overlaps (mmseg ``slide_inference``), which are
then bilinearly resized to the original image and arg-maxed. Dense modes ``"groups"`` (patch-level
argmax group, no top-k) and ``"soft"`` are textseg's simpler alternatives.

textseg's frozen-tower option (``GroupViTVisionCfg.backbone="lite0"``, ``GroupViTCfg.text_backbone=
"minilm"``): the offline default's pretrained EfficientNet-Lite0 feature map as the patch tokens
(:class:`BackbonePatchEmbed`) and its MiniLM sentence encoder as the text tower
(:class:`FrozenTextTower`), both frozen (``scripts/groupvit_real_captions.py``).

Shapes: ``B`` images, ``N_0 = (H/p)*(W/p)`` patches, ``G_i`` groups after grouping stage ``i``,
``C`` vision width, ``D`` joint embedding dimension.

Numerically this matches ``transformers.GroupViTModel`` and NVlabs' ``MultiLabelContrastive``
(``group_vit_gcc_yfcc_30e``), whose checkpoints ``textseg.weights.convert.groupvit_{hf,nvlabs}`` load.

Command line (the official evaluation, NVlabs ``segmentation/configs/_base_/datasets/*.py``: short
side 448, 448 x 448 windows with stride 224, the prompt "a photo of a {}.", background below 0.95 on
VOC / COCO, 0.35 on Context; only the slide and the prompt are not textseg's defaults)::

    textseg segment photo.jpg --weights group_vit_gcc_yfcc_30e-74d335e6.pth --labels "cat,dog,grass" \
        --short-side 448 --slide 448 224 --templates "a photo of a {}."
    textseg eval --dataset voc --root VOCdevkit/VOC2012 --model groupvit --weights groupvit-gcc-yfcc/ \
        --short-side 448 --slide 448 224 --templates "a photo of a {}." --threshold 0.95
    python scripts/groupvit_groups.py photo.jpg --weights ...      # each stage's groups as colours
    textseg train groupvit --set data.train=captions_folder_or_shards   # see textseg.train.groupvit
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from textseg.constants import IMAGENET_MEAN, IMAGENET_STD
from textseg.errors import TextsegError
from textseg.models.base import DualEncoder, Intermediates, PreprocessCfg, blocks_to_run, resolve_indices
from textseg.models.clip import TextConfig, TextTransformer
from textseg.models.layers import Attention, Block, DropPath, Mlp, resample_pos_embed  # noqa: F401 (DropPath)

# Frozen pretrained image towers GroupViTVisionCfg.backbone accepts (feature channels).
BACKBONES = {"lite0": 1280, "lite1": 1280, "lite2": 1280}
# Background thresholds of the GroupViT paper and of NVlabs' released evaluation configs.
BACKGROUND_THRESHOLDS = {
    "paper": {"voc": 0.9, "context": 0.5},
    "released": {"voc": 0.95, "coco": 0.95, "context": 0.35},
}
# The official evaluation: short side 448, sliding 448 x 448 crops with stride 224.
OFFICIAL_SLIDE = (448, 224)


def nvlabs_preprocess(image_size: int = 224) -> PreprocessCfg:
    """NVlabs' classification evaluation transform (``datasets/builder.py``, ``build_img_transform``,
    ``is_train=False``): short side to ``int(256 / 224 * n)`` with PIL bilinear, ``CenterCrop(n)``
    (torchvision's rounding), ImageNet mean/std. The card of checkpoints that carry none."""
    return PreprocessCfg(image_size, IMAGENET_MEAN, IMAGENET_STD, "bilinear",
                         crop_pct=image_size / int(256 / 224 * image_size), crop_offset="round")


# --------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class GroupViTVisionCfg:
    """The grouping vision transformer. ``depths[i]`` layers run in stage ``i`` over the segment
    tokens plus ``num_group_tokens[i]`` group tokens (0 = a plain stage, no grouping); a stage with
    group tokens ends in a grouping block that outputs ``num_output_groups[i]`` groups."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 384
    heads: int = 6
    depths: tuple[int, ...] = (6, 3, 3)
    num_group_tokens: tuple[int, ...] = (64, 8, 0)
    num_output_groups: tuple[int, ...] = (64, 8, 0)
    mlp_ratio: float = 4.0
    assign_mlp_ratio: tuple[float, float] = (0.5, 4.0)  # token-mixing, channel MLP of the grouping block
    assign_eps: float = 1.0
    gumbel_tau: float = 1.0
    hard_assignment: bool = True
    layer_norm_eps: float = 1e-5
    # textseg's options (the GROUPVIT_VARIANTS "pure" track; the defaults are the official model):
    # content_only: a group is built from its own members only: the stage's transformer layers run
    # over the segment tokens alone (the group tokens join only the cross-attention that forms the
    # assignment queries) and the grouping block has no ``new_x + queries`` residual, so no global
    # summary reaches an empty group. assign_pool: "mean" (official: assigned values / (count +
    # assign_eps)) or "sum" (the paper's text). eval_hard_assignment: the assignment used outside
    # training (None: as hard_assignment; True with hard_assignment=False: soft in training, argmax
    # one-hot at inference).
    # gumbel_noise: Gumbel(0, 1) noise on the assignment logits of a hard training assignment
    # (official: True; False: a deterministic straight-through argmax, the inference's assignment).
    content_only: bool = False
    assign_pool: str = "mean"
    eval_hard_assignment: bool | None = None
    gumbel_noise: bool = True
    # Stochastic depth of the transformer layers (training only): layer j of all sum(depths) drops its
    # residual branches with probability drop_path_rate * j / (sum(depths) - 1) (NVlabs: linspace over
    # the blocks; 0.1 in gcc_yfcc_30e). 0 = off; an identity at eval either way.
    drop_path_rate: float = 0.0
    # backbone: "" (official: a trained patch convolution) or an EfficientNet-Lite variant ("lite0",
    # the offline default's image tower): its frozen pretrained feature map at stride ``patch_size``
    # (8 / 16 / 32) are the patch tokens, through a trained 1x1 projection (BackbonePatchEmbed).
    backbone: str = ""

    def __post_init__(self):
        n = len(self.depths)
        if len(self.num_group_tokens) != n or len(self.num_output_groups) != n:
            raise TextsegError(
                f"GroupViT: depths {self.depths}, num_group_tokens {self.num_group_tokens} and "
                f"num_output_groups {self.num_output_groups} must have one entry per stage")
        if not any(self.num_group_tokens):
            raise TextsegError("GroupViT needs group tokens in at least one stage")
        if self.width % self.heads:
            raise TextsegError(f"GroupViT: width {self.width} is not divisible by heads {self.heads}")
        for g, o in zip(self.num_group_tokens, self.num_output_groups):
            if g and o <= 0:
                raise TextsegError("GroupViT: every grouping stage needs num_output_groups > 0")
        if self.assign_pool not in ("mean", "sum"):
            raise TextsegError(f"GroupViT: assign_pool must be 'mean' or 'sum', not {self.assign_pool!r}")
        if self.backbone and (self.backbone not in BACKBONES or self.patch_size not in (8, 16, 32)):
            raise TextsegError(f"GroupViT: backbone must be one of {', '.join(BACKBONES)} with patch_size 8, 16 "
                               f"or 32 (its output stride), not {self.backbone!r} / {self.patch_size}")


@dataclass(frozen=True)
class GroupViTCfg:
    vision: GroupViTVisionCfg = field(default_factory=GroupViTVisionCfg)
    text: TextConfig = field(default_factory=lambda: TextConfig(width=256, heads=4, layers=12))
    embed_dim: int = 256  # joint space
    proj_hidden: int = 4096  # MLP projector's hidden width
    proj_layers: int = 2  # 1 = a single linear layer
    logit_scale_init: float = math.log(1 / 0.07)
    # How the multi-label (noun) loss scores an image against a noun prompt: "image" (official: the
    # mean-pooled image embedding) or "max_group" (textseg's pure track: the best non-empty group).
    multi_label_pool: str = "image"
    # assign_diversity: weight of textseg's assignment-diversity loss in training (0 = off, official;
    # textseg.train.groupvit.assignment_diversity): the negative mutual information between patches
    # and groups, pushing each patch to one group and the batch to use every group.
    assign_diversity: float = 0.0
    # text_backbone: "" (official: CLIP's text transformer, trained) or "minilm": the offline default's
    # frozen pretrained sentence encoder (384-d, FrozenTextTower); only text_proj trains.
    text_backbone: str = ""

    def __post_init__(self):
        if self.text_backbone not in ("", "minilm"):
            raise TextsegError(f"GroupViT: text_backbone must be '' or 'minilm', not {self.text_backbone!r}")
        if self.multi_label_pool not in ("image", "max_group"):
            raise TextsegError(f"GroupViT: multi_label_pool must be 'image' or 'max_group', "
                               f"not {self.multi_label_pool!r}")


# The two tracks: "faithful" = the official GroupViT; "pure" = textseg's variant in which every group
# is built from its members only, a noun is scored by its best group, training assigns softly
# (argmax one-hot at inference, as the official inference) and adds the assignment-diversity loss. Values: (vision fields, model fields).
GROUPVIT_VARIANTS = {
    "faithful": ({}, {}),
    "pure": ({"content_only": True, "hard_assignment": False, "eval_hard_assignment": True},
             {"multi_label_pool": "max_group", "assign_diversity": 1.0}),
}


# --------------------------------------------------------------------------------------------------
# building blocks (transformer layers: the shared Block / Attention / Mlp of textseg.models.layers in
# their timm layout, ``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``;
# cross-attention in the ``separate`` layout, ``q_proj``/``k_proj``/``v_proj``/``proj``)


class TokenMixer(Mlp):
    """An MLP across the token axis: ``B x S_in x C -> B x S_out x C`` (MLP-Mixer style)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def drop_path_rates(rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Per-stage, per-layer drop-path probabilities: ``linspace(0, rate, sum(depths))`` split by stage."""
    flat = torch.linspace(0, rate, sum(depths), device="cpu").tolist()  # cpu: also under a meta build
    starts = [sum(depths[:i]) for i in range(len(depths))]
    return [flat[s:s + d] for s, d in zip(starts, depths)]


class CrossAttnBlock(nn.Module):
    """Group tokens attend to segment tokens, then an MLP, then a post-norm (as GroupViT)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.attn = Attention(dim, heads, layout="separate")
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm_post = nn.LayerNorm(dim, eps=eps)

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        x = query + self.attn(query, key)
        x = x + self.mlp(self.norm2(x))
        return self.norm_post(x)


def hard_one_hot(soft: torch.Tensor, dim: int) -> torch.Tensor:
    """One-hot of ``soft.argmax(dim)`` with the straight-through gradient of ``soft``."""
    index = soft.argmax(dim, keepdim=True)
    hard = torch.zeros_like(soft).scatter_(dim, index, 1.0)
    return hard - soft.detach() + soft


def gumbel_assign(logits: torch.Tensor, dim: int, tau: float = 1.0, hard: bool = True,
                  gumbel: bool = True) -> torch.Tensor:
    """Assignment probabilities along ``dim`` from raw ``logits``.

    ``gumbel=True`` adds Gumbel(0, 1) noise and divides by ``tau`` (training); ``hard=True`` returns a
    one-hot forward value whose gradient is that of the soft probabilities (straight-through)."""
    if gumbel:
        # -log(Exp(1)) ~ Gumbel(0, 1); the exponential sample is clamped away from 0 for stability.
        noise = -torch.empty_like(logits).exponential_().clamp_min(torch.finfo(logits.dtype).tiny).log()
        logits = (logits + noise) / tau
    soft = logits.softmax(dim)
    return hard_one_hot(soft, dim) if hard else soft


class AssignAttention(nn.Module):
    """Single-head assignment of ``B x S x C`` segment tokens to ``B x G x C`` group queries.

    Returns the new group tokens ``B x G x C`` (mean of their assigned segments' values) and the soft
    assignment ``B x G x S`` (softmax over groups, so each column sums to 1). Not the shared
    attention: the softmax runs over the *query* (group) axis, with Gumbel noise and a hard one-hot."""

    def __init__(self, dim: int, eps: float, tau: float, hard: bool, eval_hard: bool | None = None,
                 pool: str = "mean", noise: bool = True):
        super().__init__()
        self.scale = dim ** -0.5
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.proj = nn.Linear(dim, dim)
        self.eps, self.tau, self.hard = eps, tau, hard
        self.eval_hard = hard if eval_hard is None else eval_hard
        self.pool, self.noise = pool, noise

    def forward(self, groups: torch.Tensor, segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = (self.q_proj(groups) @ self.k_proj(segments).transpose(1, 2)) * self.scale  # B x G x S
        hard = self.hard if self.training else self.eval_hard
        if self.training and not hard:  # soft training: softmax at temperature tau (annealed by the recipe)
            assign = (raw / self.tau).softmax(dim=1)
        else:
            assign = gumbel_assign(raw, dim=1, tau=self.tau, hard=hard, gumbel=hard and self.training and self.noise)
        soft = raw.softmax(dim=1)
        if self.pool == "mean":
            assign = assign / (assign.sum(dim=-1, keepdim=True) + self.eps)
        return self.proj(assign @ self.v_proj(segments)), soft


class GroupingBlock(nn.Module):
    """Merge ``B x S x C`` segment tokens into ``B x G_out x C`` groups using ``B x G_in x C`` group
    tokens: token-mix the group tokens to ``G_out`` queries, cross-attend to the segments, assign each
    segment to one query, add an MLP. Returns ``(groups, soft assignment B x G_out x S)``."""

    def __init__(self, dim: int, heads: int, num_group_tokens: int, num_output_groups: int,
                 cfg: GroupViTVisionCfg):
        super().__init__()
        eps = cfg.layer_norm_eps
        tokens_hidden, channels_hidden = (int(r * dim) for r in cfg.assign_mlp_ratio)
        self.norm_tokens = nn.LayerNorm(dim, eps=eps)
        self.mlp_inter = TokenMixer(num_group_tokens, tokens_hidden, num_output_groups)
        self.norm_post_tokens = nn.LayerNorm(dim, eps=eps)
        self.norm_x = nn.LayerNorm(dim, eps=eps)
        self.pre_assign_attn = CrossAttnBlock(dim, heads, cfg.mlp_ratio, eps)
        self.assign = AssignAttention(dim, cfg.assign_eps, cfg.gumbel_tau, cfg.hard_assignment,
                                      cfg.eval_hard_assignment, cfg.assign_pool, cfg.gumbel_noise)
        self.content_only = cfg.content_only
        self.norm_new_x = nn.LayerNorm(dim, eps=eps)
        self.mlp_channels = Mlp(dim, channels_hidden)

    def forward(self, x: torch.Tensor, group_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        group_tokens = self.norm_tokens(group_tokens)
        x = self.norm_x(x)
        queries = self.norm_post_tokens(self.mlp_inter(group_tokens))
        queries = self.pre_assign_attn(queries, x)
        new_x, soft = self.assign(queries, x)
        if not self.content_only:
            new_x = new_x + queries
        return new_x + self.mlp_channels(self.norm_new_x(new_x)), soft


class BackbonePatchEmbed(nn.Module):
    """Frozen pretrained patch tokens (textseg's option ``backbone``): ``B x 3 x H x W`` pixels -> the
    EfficientNet-Lite feature map ``B x 1280 x H/s x W/s`` (the offline default's image tower, batch
    norms folded, never trained) -> a trained 1x1 convolution to ``width``. Precomputed features
    (:meth:`features`, e.g. cached on disk for training) are accepted in place of pixels."""

    def __init__(self, variant: str, stride: int, width: int, pretrained: bool = True):
        super().__init__()
        from textseg.models.efficientnet import efficientnet_lite

        net = efficientnet_lite(variant, pretrained=pretrained).set_output_stride(stride).fuse()
        self.backbone = net.to(memory_format=torch.channels_last).requires_grad_(False).eval()
        self.in_channels = BACKBONES[variant]
        self.proj = nn.Conv2d(self.in_channels, width, 1)

    def train(self, mode: bool = True) -> BackbonePatchEmbed:
        super().train(mode)
        self.backbone.eval()  # frozen
        return self

    @torch.no_grad()
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` -> ``B x 1280 x H/s x W/s`` frozen backbone features."""
        return self.backbone.forward_features(pixels.contiguous(memory_format=torch.channels_last)).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels:  # pixels (3 channels), not cached features
            x = self.features(x)
        return self.proj(x.to(self.proj.weight.dtype))


class FrozenTextTower(nn.Module):
    """The offline default's MiniLM sentence encoder as a frozen text tower (``text_backbone=
    "minilm"``): ``N x L`` MiniLM ids -> ``N x 384`` L2-normalised embeddings. A floating-point
    ``N x 384`` input is taken as precomputed embeddings (the training recipe caches them)."""

    def __init__(self):
        super().__init__()
        from textseg.models.minilm import minilm

        self.encoder = minilm().requires_grad_(False).eval()
        self.width = self.encoder.width

    def train(self, mode: bool = True) -> FrozenTextTower:
        super().train(mode)
        self.encoder.eval()
        return self

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encoder.tokenize(list(texts))

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> ``N x 384`` embeddings (what :meth:`forward` returns for their ids)."""
        return self.encoder.embed(list(texts))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.is_floating_point():
            return tokens
        with torch.no_grad():
            return self.encoder(tokens, normalize=True)


class GroupingStage(nn.Module):
    """One stage: transformer layers over ``[segments; group tokens]`` then (if the stage has group
    tokens) a grouping block. Group tokens of a later stage are conditioned on the previous stage's
    group tokens through a token-mixing projector."""

    def __init__(self, cfg: GroupViTVisionCfg, index: int):
        super().__init__()
        dim, eps = cfg.width, cfg.layer_norm_eps
        self.num_group_tokens = g = cfg.num_group_tokens[index]
        self.content_only = cfg.content_only
        rates = drop_path_rates(cfg.drop_path_rate, cfg.depths)[index]
        self.blocks = nn.ModuleList(Block(dim, cfg.heads, cfg.mlp_ratio, eps=eps, drop_path=r) for r in rates)
        self.group_token = nn.Parameter(torch.zeros(1, g, dim)) if g else None
        self.grouping = GroupingBlock(dim, cfg.heads, g, cfg.num_output_groups[index], cfg) if g else None
        prev = cfg.num_group_tokens[index - 1] if index > 0 else 0
        self.group_projector = (nn.Sequential(nn.LayerNorm(dim, eps=eps), TokenMixer(prev, dim // 2, g))
                                if g and prev else None)

    def forward(self, x: torch.Tensor, prev_group_tokens: torch.Tensor | None):
        """``B x S x C`` segments -> (``B x S' x C`` next segments, ``B x g x C`` group tokens or None,
        ``B x S' x S`` soft assignment or None)."""
        if self.group_token is None:
            for blk in self.blocks:
                x = blk(x)
            return x, None, None
        groups = self.group_token.expand(x.shape[0], -1, -1)
        if self.group_projector is not None:
            groups = groups + self.group_projector(prev_group_tokens)
        if self.content_only:  # the layers see the segments only; the tokens meet them in the grouping
            for blk in self.blocks:
                x = blk(x)
        else:
            cat = torch.cat([x, groups], dim=1)
            for blk in self.blocks:
                cat = blk(cat)
            x, groups = cat[:, : -self.num_group_tokens], cat[:, -self.num_group_tokens:]
        new_x, soft = self.grouping(x, groups)
        return new_x, groups, soft


class GroupViTVision(nn.Module):
    """Patch embedding + grouping stages + final LayerNorm.

    ``forward(pixels) -> (B x G x C final group tokens, [B x G_i x S_i soft assignments], (h, w))``."""

    def __init__(self, cfg: GroupViTVisionCfg, pretrained: bool = True):
        super().__init__()
        self.cfg = cfg
        grid = cfg.image_size // cfg.patch_size
        self.patch_embed = (BackbonePatchEmbed(cfg.backbone, cfg.patch_size, cfg.width, pretrained) if cfg.backbone
                            else nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size))
        self.patch_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, cfg.width))
        self.stages = nn.ModuleList(GroupingStage(cfg, i) for i in range(len(cfg.depths)))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        """The ``1 x (h*w) x C`` position embedding, bicubically resized when the patch grid differs
        from the training grid (as NVlabs and transformers do at inference)."""
        side = math.isqrt(self.pos_embed.shape[1])
        return resample_pos_embed(self.pos_embed, (side, side), (h, w), num_prefix=0)

    def forward_intermediates(self, pixels: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False, output_fmt: str = "NLC",
                              intermediates_only: bool = False) -> Intermediates:
        """The :class:`~textseg.models.base.Intermediates` contract over the grouping stages:
        ``intermediates`` each selected stage's output tokens ``B x S_i x C`` (its groups, for a
        grouping stage; ``norm=True``: through the final ``norm``), ``final`` the last stage's tokens
        through ``norm`` (the final group tokens), ``grid`` the patch grid, ``extras["assignments"]``
        the soft assignments ``B x G_i x G_{i-1}`` of the grouping stages run. NLC only."""
        if output_fmt != "NLC":
            raise ValueError(f"GroupViT's tokens are groups, not a grid: output_fmt must be 'NLC', not {output_fmt!r}")
        take = resolve_indices(indices, len(self.stages))
        x = self.patch_embed(pixels)
        h, w = x.shape[-2:]
        x = self.patch_norm(x.flatten(2).transpose(1, 2)) + self.pos_embed_for(h, w)
        groups, assignments, feats = None, [], []
        for i, stage in enumerate(self.stages[:blocks_to_run(take, len(self.stages), intermediates_only)]):
            x, groups, soft = stage(x, groups)
            if soft is not None:
                assignments.append(soft)
            if i in take:
                feats.append(self.norm(x) if norm else x)
        return Intermediates(feats, (h, w), final=None if intermediates_only else self.norm(x),
                             extras={"assignments": assignments})

    def forward(self, pixels: torch.Tensor):
        out = self.forward_intermediates(pixels, indices=[])
        return out.final, out["assignments"], out.grid


class ProjectionMLP(nn.Module):
    """GroupViT's projector: ``(Linear -> BatchNorm1d -> ReLU) x (layers-1) -> Linear``, applied to
    the last axis of any ``... x dim_in`` tensor."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, layers: int = 2):
        super().__init__()
        mods: list[nn.Module] = []
        for i in range(layers - 1):
            mods += [nn.Linear(dim_in if i == 0 else hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        self.hidden = nn.Sequential(*mods)
        self.out = nn.Linear(dim_in if layers == 1 else hidden, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return self.out(self.hidden(x.reshape(-1, shape[-1]))).reshape(*shape[:-1], -1)


# --------------------------------------------------------------------------------------------------
# the model


def soft_group_maps(assignments: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Cumulative products of the stage-wise soft assignments: for each grouping stage ``i`` a
    ``B x G_i x N_0`` map giving each patch its probability of belonging to each group of stage ``i``
    (each column sums to 1)."""
    maps, acc = [], None
    for a in assignments:  # B x G_i x G_{i-1}
        acc = a if acc is None else a @ acc
        maps.append(acc)
    return maps


class GroupViT(DualEncoder):
    """GroupViT as a :class:`DualEncoder`.

    >>> model = GroupViT(GroupViTCfg())          # the gcc_yfcc_30e architecture
    >>> model.encode_image(pixels)               # B x 256 (mean of the 8 projected groups)
    >>> model.forward_intermediates(pixels)      # groups, per-stage assignments, group maps
    """

    name = "groupvit"
    # "official" (default): NVlabs' inference, scored per pixel by official_scores (the Segmenter's
    # pixel path); "groups" / "soft": patch-level dense features scored by dense_logits.
    dense_modes = ("official", "groups", "soft")
    pixel_modes = ("official",)
    official_top_k = 5  # NVlabs keeps the min(5, N) classes the whole image scores highest
    # The grouping stage whose groups the official inference labels (-1: the last, official; an
    # earlier one, e.g. gcc_yfcc's 64 first-stage groups, for images with more than 8 classes).
    official_stage = -1
    # Background when the best label's score is below min(this, the best group probability), NVlabs'
    # rule. The paper uses 0.9 (VOC) and 0.5 (Context); NVlabs' released configs 0.95 (VOC, COCO) and
    # 0.35 (Context): BACKGROUND_THRESHOLDS.
    default_background_threshold = 0.95

    def __init__(self, cfg: GroupViTCfg | None = None, pretrained: bool = True):
        super().__init__()
        self.cfg = cfg = cfg or GroupViTCfg()
        self.visual = GroupViTVision(cfg.vision, pretrained)  # pretrained: a frozen backbone's weights
        self.text = FrozenTextTower() if cfg.text_backbone else TextTransformer(cfg.text, output_dim=None)
        text_width = self.text.width if cfg.text_backbone else cfg.text.width
        self.image_proj = ProjectionMLP(cfg.vision.width, cfg.proj_hidden, cfg.embed_dim, cfg.proj_layers)
        self.text_proj = ProjectionMLP(text_width, cfg.proj_hidden, cfg.embed_dim, cfg.proj_layers)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        self.preprocess_cfg = nvlabs_preprocess(cfg.vision.image_size)
        if cfg.vision.backbone:  # the backbone's own preprocessing (the offline model's), at image_size
            self.preprocess_cfg = PreprocessCfg(cfg.vision.image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
        self.dense_stride = cfg.vision.patch_size
        self.init_weights()

    def init_weights(self) -> None:
        """NVlabs' initialisation: truncated-normal(0.02) linears and tokens, unit LayerNorms."""
        for name, m in self.visual.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not name.startswith("patch_embed.backbone"):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.visual.pos_embed, std=0.02)
        for stage in self.visual.stages:
            if stage.group_token is not None and stage.group_projector is None:
                nn.init.trunc_normal_(stage.group_token, std=0.02)

    @property
    def logit_scale_value(self) -> torch.Tensor:
        """``exp(logit_scale)`` clamped at 100 as NVlabs does (transformers does not clamp)."""
        return self.logit_scale.exp().clamp(max=100)

    def config_dict(self) -> dict:
        """The architecture as plain JSON values (the native checkpoint card's ``config``)."""
        return asdict(self.cfg)

    @classmethod
    def from_config_dict(cls, d: dict) -> GroupViT:
        """A randomly initialised GroupViT of the architecture :meth:`config_dict` describes."""
        v = dict(d["vision"])
        for key in ("depths", "num_group_tokens", "num_output_groups", "assign_mlp_ratio"):
            v[key] = tuple(v[key])
        rest = {k: d[k] for k in ("embed_dim", "proj_hidden", "proj_layers", "logit_scale_init", "multi_label_pool",
                                  "assign_diversity", "text_backbone") if k in d}
        # pretrained=False: a frozen backbone's weights come from the checkpoint, as every other weight
        return cls(GroupViTCfg(vision=GroupViTVisionCfg(**v), text=TextConfig(**d["text"]), **rest), pretrained=False)

    # ---- towers --------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        if self.cfg.text_backbone:
            return self.text.tokenize(texts)
        from textseg.models.tokenizer import tokenize

        return tokenize(list(texts), context_length=self.cfg.text.context_length)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``N x L`` tokens -> ``N x D``."""
        x = self.text_proj(self.text(tokens))
        return F.normalize(x, dim=-1) if normalize else x

    def forward_intermediates(self, pixels: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False, output_fmt: str = "NLC",
                              intermediates_only: bool = False) -> Intermediates:
        """Everything the image tower computes, for segmentation and visualisation: the vision
        tower's :meth:`GroupViTVision.forward_intermediates` (``final``: the ``B x G x C`` final group
        tokens after the last LayerNorm; ``extras["assignments"]``: per grouping stage the
        ``B x G_i x G_{i-1}`` soft assignments, ``G_{-1} = N_0`` patches; ``grid`` ``(h, w)``) with
        these ``extras`` added (unless ``intermediates_only``): ``group_embeds`` ``B x G x D``
        (projected groups), ``image_embed`` ``B x D`` (projected mean of the groups) and
        ``group_maps`` (per grouping stage ``B x G_i x h x w``: the product of the assignments so far,
        a distribution over that stage's groups for every patch)."""
        out = self.visual.forward_intermediates(pixels, indices, norm, output_fmt, intermediates_only)
        if intermediates_only:
            return out
        (h, w), groups = out.grid, out.final
        maps = [m.reshape(m.shape[0], m.shape[1], h, w) for m in soft_group_maps(out["assignments"])]
        out.extras.update(group_embeds=self.image_proj(groups), image_embed=self.image_proj(groups.mean(dim=1)),
                          group_maps=maps)
        return out

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``B x 3 x H x W`` -> ``B x D``: the projected mean of the final group tokens."""
        groups, _, _ = self.visual(pixels)
        x = self.image_proj(groups.mean(dim=1))
        return F.normalize(x, dim=-1) if normalize else x

    # ---- segmentation --------------------------------------------------------------------------

    def encode_dense(self, pixels: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """``B x 3 x H x W`` -> ``B x D x h x w`` patch features in the joint space.

        ``"groups"``: each patch carries the L2-normalised embedding of its final group, the argmax
        of the product of the soft assignments at patch level; ``"official"`` (the default mode) gives
        the same features here, but the official inference (image-level top-k, product of two
        softmaxes, background rule, group argmax after upsampling) is per pixel and text-dependent, so
        it is computed by :meth:`official_features` / :meth:`official_scores`, which the Segmenter uses
        for this mode. ``"soft"``: the mixture of the normalised group embeddings weighted by
        that product; it is linear in the assignment, so bilinear upsampling of its logits equals
        upsampling the group maps first (the order transformers uses)."""
        mode = mode or self.dense_modes[0]
        if mode not in self.dense_modes:
            raise TextsegError(f"groupvit has dense modes {', '.join(self.dense_modes)}, not {mode!r}")
        out = self.forward_intermediates(pixels)
        emb = F.normalize(out["group_embeds"], dim=-1)  # B x G x D
        maps = out["group_maps"][-1]  # B x G x h x w
        if mode in ("groups", "official"):
            maps = F.one_hot(maps.argmax(1), maps.shape[1]).permute(0, 3, 1, 2).to(emb.dtype)
        return torch.einsum("bghw,bgd->bdhw", maps, emb)

    def dense_logits(self, dense: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Patch features from :meth:`encode_dense` (unit group embeddings or their probability
        mixture: not re-normalised) and text -> ``B x N x h x w`` logits ``scale * cos(group, text)``
        (mixed over groups in the soft mode)."""
        return self.logit_scale_value * torch.einsum("bdhw,nd->bnhw", dense, F.normalize(text, dim=-1))

    # ---- the official inference (NVlabs segmentation/evaluation/group_vit_seg.py) -------------

    @torch.no_grad()
    def official_features(self, pixels: torch.Tensor, stage: int | None = None) -> dict:
        """The text-independent part of NVlabs' ``GroupViTSegInference.encode_decode`` for ``B``
        images (or crops) of size ``H x W``: ``group_index`` ``B x H x W`` (each pixel's final group:
        the argmax of the product of the soft assignments after bilinear upsampling to the input size,
        ``get_attn_maps(rescale=True)``), ``group_embeds`` ``B x G x D`` and ``image_embed`` ``B x D``
        (L2-normalised projected groups and projected mean of the groups: ``image_feat``,
        ``image_x``).

        ``stage`` (default :attr:`official_stage`, -1 = the last grouping stage: official) picks the
        grouping stage whose groups label the pixels. textseg's option for scenes with more classes
        than final groups (the paper's open question): an earlier stage's groups (gcc_yfcc: 64 in
        stage 0), each embedded as the final groups are (the tower's final LayerNorm, then the image
        projector) and read through the product of the assignments up to that stage; the image
        embedding (the top-k mask) stays the final one."""
        stage = self.official_stage if stage is None else stage
        phys = [i for i, s in enumerate(self.visual.stages) if s.grouping is not None]
        if not -len(phys) <= stage < len(phys):
            raise TextsegError(f"GroupViT has {len(phys)} grouping stage(s): stage must be in "
                               f"{-len(phys)}..{len(phys) - 1}, not {stage}")
        stage %= len(phys)
        last = stage == len(phys) - 1
        out = self.forward_intermediates(pixels, indices=[] if last else [phys[stage]], norm=True)
        embeds = out["group_embeds"] if last else self.image_proj(out.intermediates[0])
        maps = F.interpolate(out["group_maps"][stage], size=tuple(pixels.shape[-2:]), mode="bilinear",
                             align_corners=False)
        return {"group_index": maps.argmax(1), "group_embeds": F.normalize(embeds, dim=-1),
                "image_embed": F.normalize(out["image_embed"], dim=-1)}

    @torch.no_grad()
    def official_group_probs(self, feats: dict, text: torch.Tensor, top_k: int | None = None,
                             temperature: float = 1.0) -> torch.Tensor:
        """``B x G x N`` class probabilities of every final group (``encode_decode``'s
        ``group_affinity_mat``): the softmax of ``scale * cos(group, text)`` restricted to the
        ``min(top_k, N)`` classes the whole image scores highest (softmax of ``scale * cos(image,
        text)``), times the unrestricted softmax. ``top_k`` default :attr:`official_top_k` (5, as
        NVlabs); ``temperature`` divides the scale (1 = official)."""
        top_k = self.official_top_k if top_k is None else top_k
        text = F.normalize(text, dim=-1).to(feats["group_embeds"].dtype)
        scale = self.logit_scale_value / temperature
        group_logits = scale * feats["group_embeds"] @ text.t()  # B x G x N
        image_probs = (scale * feats["image_embed"] @ text.t()).softmax(-1)  # B x N
        keep = torch.zeros_like(image_probs, dtype=torch.bool)
        keep.scatter_(1, image_probs.topk(min(top_k, text.shape[0]), dim=-1).indices, True)
        masked = group_logits.masked_fill(~keep[:, None, :], float("-inf")).softmax(-1)
        return masked * group_logits.softmax(-1)

    @torch.no_grad()
    def official_scores(self, feats: dict, text: torch.Tensor, top_k: int | None = None,
                        temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel class scores ``B x N x H x W`` (each pixel reads its group's row of
        :meth:`official_group_probs`: ``onehot_attn_map @ group_affinity_mat``) and the ``B x G x N``
        group probabilities, from :meth:`official_features`."""
        probs = self.official_group_probs(feats, text, top_k, temperature)
        idx = feats["group_index"]  # B x H x W
        b, h, w = idx.shape
        rows = torch.gather(probs, 1, idx.reshape(b, h * w, 1).expand(-1, -1, probs.shape[-1]))
        return rows.transpose(1, 2).reshape(b, -1, h, w), probs

    @staticmethod
    def official_background(scores: torch.Tensor, probs: torch.Tensor, threshold: float) -> torch.Tensor:
        """NVlabs' background rule: ``B x H x W`` True where a pixel's best class score is below
        ``min(threshold, max of the image's group probabilities)`` (``bg_thresh = min(self.bg_thresh,
        group_affinity_mat.max())``), so the pixels of the most confident group stay foreground."""
        thr = probs.flatten(1).amax(1).clamp(max=float(threshold))
        return scores.amax(1) < thr[:, None, None]

    @torch.no_grad()
    def segment_official(self, pixels: torch.Tensor, text: torch.Tensor, size: tuple[int, int] | None = None,
                         top_k: int | None = None, background_threshold: float | None = None,
                         stage: int | None = None) -> torch.Tensor:
        """NVlabs' ``encode_decode`` + mmseg's whole-image inference for ``B`` images: per-pixel
        scores ``B x N x H x W`` (:meth:`official_scores`), or ``B x (1 + N) x H x W`` with channel 0 =
        background (1 where :meth:`official_background`, else 0; NVlabs' ``with_bg`` layout) when
        ``background_threshold`` is given. ``size``: the scores are bilinearly resized to it after
        being computed at the input size (mmseg ``whole_inference(rescale=True)``); the label of a
        pixel is the argmax (the softmax mmseg applies first does not change it). ``stage``: the
        grouping stage (:meth:`official_features`)."""
        scores, probs = self.official_scores(self.official_features(pixels, stage), text, top_k)
        if background_threshold is not None:
            bg = self.official_background(scores, probs, background_threshold).to(scores.dtype)
            scores = torch.cat([bg[:, None], scores], dim=1)
        if size is not None and tuple(size) != tuple(scores.shape[-2:]):
            scores = F.interpolate(scores, size=tuple(size), mode="bilinear", align_corners=False)
        return scores

    @torch.no_grad()
    def group_label_probs(self, pixels: torch.Tensor, text: torch.Tensor, top_k: int | None = None) -> dict:
        """:meth:`official_group_probs` of ``pixels`` -> ``probs`` ``B x G x N``, ``group_maps``
        ``B x G x h x w`` (soft, patch grid) and ``grid``."""
        out = self.forward_intermediates(pixels)
        feats = {"group_embeds": F.normalize(out["group_embeds"], dim=-1),
                 "image_embed": F.normalize(out["image_embed"], dim=-1)}
        return {"probs": self.official_group_probs(feats, text, top_k), "group_maps": out["group_maps"][-1],
                "grid": out["grid"]}

    @torch.no_grad()
    def segmentation_logits(self, pixels: torch.Tensor, text: torch.Tensor,
                            size: tuple[int, int] | None = None) -> torch.Tensor:
        """``B x N x H x W``: soft group maps upsampled to ``size`` (default: the input size) mixing
        ``scale * cos(group, text)``. ``transformers.GroupViTModel(output_segmentation=True)`` returns
        this times ``logit_scale`` once more."""
        dense = self.encode_dense(pixels, mode="soft")
        logits = self.dense_logits(dense, text)
        size = size or tuple(pixels.shape[-2:])
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def group_label_maps(self, pixels: torch.Tensor, size: tuple[int, int] | None = None) -> list[torch.Tensor]:
        """Which group each pixel belongs to, at every grouping stage (the official demo's
        ``all_groups`` view): per stage a ``B x H x W`` LongTensor of group indices, the argmax of
        that stage's soft group map bilinearly upsampled to ``size`` (default: the input size)."""
        size = size or tuple(pixels.shape[-2:])
        maps = self.forward_intermediates(pixels)["group_maps"]
        return [F.interpolate(m, size=size, mode="bilinear", align_corners=False).argmax(1) for m in maps]

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.encode_image(pixels, normalize=True)
        txt = self.encode_text(tokens, normalize=True)
        logits = self.logit_scale_value * img @ txt.t()
        return logits, logits.t()
