"""CLIP (Radford et al., 2021): a vision tower and a text transformer meeting in one embedding space.

The vision tower is a :class:`VisionTransformer` or OpenAI's :class:`ModifiedResNet` (RN50 ... RN50x64);
the text tower a causal :class:`TextTransformer` pooled at the end-of-text token. Parameter names
follow OpenAI's state dicts (``visual.*`` as in OpenAI; the text tower lives under ``text.*``), so the
OpenAI converter only moves the text keys and drops three integer entries.

Shapes: images ``B x 3 x H x W`` (normalised), tokens ``N x L`` (``L <= context_length``),
embeddings ``B x embed_dim``. ViT patch tokens are ``B x (1 + h*w) x C`` (class token first).

Intermediate features come from ``forward_intermediates`` (no hooks): the dense segmentation methods
in :mod:`textseg.models.clip_dense` need the per-block tokens and the last block's q/k/v, which the
:class:`Attention` module exposes through ``attn.qkv(x)`` and ``attn.project(o)``. Attention, MLP,
block and position-embedding resampling are the shared ones of :mod:`textseg.models.layers` in their
OpenAI layouts (``in_proj_weight``, ``ln_1``, ``c_fc`` ...).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from textseg.models.base import (
    DualEncoder,
    Intermediates,
    PreprocessCfg,
    blocks_to_run,
    format_tokens,
    resolve_indices,
)
from textseg.models.clip_dense import CLIP_TEXT_MODES, clip_dense_features, clip_supported_modes
from textseg.models.layers import Attention as SharedAttention
from textseg.models.layers import Block, LayerNorm, merge_heads, resample_pos_embed, split_heads

# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------


@dataclass
class VisionConfig:
    """Vision tower. ``layers`` an int -> ViT with that many blocks; a 4-tuple -> ModifiedResNet with
    that many bottlenecks per stage (``width`` is then the stem width, 64 for RN50)."""

    image_size: int = 224
    layers: int | tuple[int, int, int, int] = 12
    width: int = 768
    patch_size: int = 16  # ViT only
    heads: int | None = None  # default: width // 64 (ViT), width * 32 // 64 (ResNet attention pool)
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"  # or "gelu"
    ln_eps: float = 1e-5

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.layers, (tuple, list))

    @property
    def num_heads(self) -> int:
        if self.heads:
            return self.heads
        return self.width * 32 // 64 if self.is_resnet else self.width // 64


@dataclass
class TextConfig:
    """Causal text transformer over CLIP BPE tokens."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"
    ln_eps: float = 1e-5


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    init_logit_scale: float = math.log(1 / 0.07)

    def to_dict(self) -> dict:
        d = asdict(self)
        if isinstance(d["vision"]["layers"], tuple):
            d["vision"]["layers"] = list(d["vision"]["layers"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CLIPConfig:
        vision = dict(d.get("vision", {}))
        if isinstance(vision.get("layers"), list):
            vision["layers"] = tuple(vision["layers"])
        return cls(
            embed_dim=d["embed_dim"],
            vision=VisionConfig(**vision),
            text=TextConfig(**d.get("text", {})),
            init_logit_scale=d.get("init_logit_scale", math.log(1 / 0.07)),
        )


# ----------------------------------------------------------------------------------------------
# Transformer pieces
# ----------------------------------------------------------------------------------------------


class Attention(SharedAttention):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names
    (``in_proj_weight`` 3C x C, ``in_proj_bias`` 3C, ``out_proj``): the shared
    :class:`~textseg.models.layers.Attention` in its ``in_proj`` layout.

    Pieces for methods that rewire attention (MaskCLIP, SCLIP, ClearCLIP, NACLIP):
    ``q, k, v = attn.qkv(x)`` (each ``B x heads x T x head_dim``, unscaled) and
    ``attn.project(o)`` (``B x heads x T x head_dim`` -> ``B x T x C`` through ``out_proj``);
    ``attn(x) == attn.project(softmax(q k^T * attn.scale) v)``.
    """

    def __init__(self, width: int, heads: int, layout: str = "in_proj"):
        super().__init__(width, heads, layout=layout)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``B x T x C`` -> q, k, v, each ``B x heads x T x head_dim``."""
        return self.heads_qkv(x)


class ResidualBlock(Block):
    """Pre-norm transformer block (OpenAI names ``ln_1``, ``attn``, ``ln_2``, ``mlp.c_fc``,
    ``mlp.c_proj``): ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``; the shared
    :class:`~textseg.models.layers.Block` in its ``openai`` layout with a float32 LayerNorm."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, act: str = "quick_gelu",
                 ln_eps: float = 1e-5):
        super().__init__(width, heads, mlp_hidden=round(width * mlp_ratio), act=act, eps=ln_eps,
                         layout="openai", norm_layer=LayerNorm, attn_layer=Attention)


class Transformer(nn.Module):
    """A stack of :class:`ResidualBlock` (``resblocks.{i}``), ``B x T x C`` in and out."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0,
                 act: str = "quick_gelu", ln_eps: float = 1e-5):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList(
            [ResidualBlock(width, heads, mlp_ratio, act, ln_eps) for _ in range(layers)])

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, causal=causal)
        return x

    def init_weights(self) -> None:
        """OpenAI's initialisation (std scaled by width and depth)."""
        proj_std = self.width**-0.5 * (2 * self.layers) ** -0.5
        attn_std, fc_std = self.width**-0.5, (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.zeros_(block.mlp.c_fc.bias)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            nn.init.zeros_(block.mlp.c_proj.bias)


# ----------------------------------------------------------------------------------------------
# Vision towers
# ----------------------------------------------------------------------------------------------


class VisionTransformer(nn.Module):
    """ViT image tower: patchify (``conv1``), class token, position embeddings (interpolated for
    other input sizes), ``ln_pre``, transformer, ``ln_post`` on the class token, ``@ proj``.

    ``B x 3 x H x W`` -> ``B x output_dim``; H and W should be multiples of ``patch_size``
    (the remainder is dropped, as a strided convolution does)."""

    def __init__(self, cfg: VisionConfig, output_dim: int | None):
        super().__init__()
        self.cfg = cfg
        self.patch_size, self.width = cfg.patch_size, cfg.width
        self.grid_size = (cfg.image_size // cfg.patch_size,) * 2
        scale = cfg.width**-0.5
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.width))
        self.positional_embedding = nn.Parameter(
            scale * torch.randn(1 + self.grid_size[0] * self.grid_size[1], cfg.width))
        self.ln_pre = LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.num_heads, cfg.mlp_ratio, cfg.act, cfg.ln_eps)
        self.ln_post = LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.proj = nn.Parameter(scale * torch.randn(cfg.width, output_dim)) if output_dim else None
        self.transformer.init_weights()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.resblocks

    def embed(self, pixels: torch.Tensor, pos_interp: str = "size") -> tuple[torch.Tensor, tuple[int, int]]:
        """``B x 3 x H x W`` -> (tokens after ``ln_pre``, ``B x (1 + h*w) x C``; grid ``(h, w)``).
        ``pos_interp``: how position embeddings are resized for other grids (:func:`resample_pos_embed`)."""
        x = self.conv1(pixels.to(self.conv1.weight.dtype))
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(b, 1, c)
        pos = resample_pos_embed(self.positional_embedding, self.grid_size, (h, w), method=pos_interp)
        x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)
        return self.ln_pre(x), (h, w)

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final tokens ``B x T x C`` (or any ``... x C``) -> ``ln_post`` then ``@ proj``."""
        x = self.ln_post(tokens)
        return x @ self.proj if self.proj is not None else x

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x, _ = self.embed(pixels)
        x = self.transformer(x)
        return self.head(x[:, 0])

    def forward_intermediates(self, pixels: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False, output_fmt: str = "NLC", intermediates_only: bool = False,
                              *, return_last_qkv: bool = False, pos_interp: str = "size") -> Intermediates:
        """The :class:`~textseg.models.base.Intermediates` contract over the transformer blocks.

        ``intermediates``: the selected blocks' outputs, ``B x (1 + h*w) x C`` (class token first,
        before ``ln_post``; ``norm=True``: through ``ln_post``); ``final``: the last block's tokens
        through ``ln_post`` (``head`` = ``ln_post`` then ``@ proj``); ``num_prefix_tokens`` 1. With
        ``return_last_qkv``: ``last_input`` and the last block's ``q``, ``k``, ``v`` (all blocks run).
        ``pos_interp``: see :meth:`embed`."""
        n = len(self.blocks)
        take = resolve_indices(indices, n)
        stop = n if return_last_qkv else blocks_to_run(take, n, intermediates_only)
        x, grid = self.embed(pixels, pos_interp)
        out = Intermediates([], grid, num_prefix_tokens=1)
        for i in range(stop):
            block = self.blocks[i]
            if return_last_qkv and i == n - 1:
                out.last_input = x
                out.q, out.k, out.v = block.attn.qkv(block.ln_1(x))
            x = block(x)
            if i in take:
                out.intermediates.append(format_tokens(self.ln_post(x) if norm else x, grid, 1, output_fmt))
        if not intermediates_only:
            out.final = self.ln_post(x)
        return out


class Bottleneck(nn.Module):
    """OpenAI's ResNet bottleneck: 1x1, 3x3, (avg-pool if strided), 1x1 (x4); anti-aliased
    downsampling path ``avgpool -> 1x1 conv -> BN``."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != out:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)), ("0", nn.Conv2d(inplanes, out, 1, bias=False)),
                ("1", nn.BatchNorm2d(out))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.act2(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(self.avgpool(y)))
        return self.act3(y + identity)


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling: the mean feature (prepended) attends over all positions.

    ``B x C x h x w`` -> ``B x output_dim``. ``k_proj``/``q_proj``/``v_proj``/``c_proj`` are Linear
    layers (OpenAI names); position embeddings are interpolated for other grids."""

    def __init__(self, spatial: int, dim: int, heads: int, output_dim: int):
        super().__init__()
        self.spatial, self.num_heads = spatial, heads
        self.positional_embedding = nn.Parameter(torch.randn(spatial * spatial + 1, dim) / dim**0.5)
        self.k_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # B x hw x C
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        pos = resample_pos_embed(self.positional_embedding, (self.spatial, self.spatial), (h, w))
        x = x + pos.to(x.dtype)
        heads = self.num_heads
        q, k, v = (split_heads(p(t), heads) for p, t in ((self.q_proj, x[:, :1]), (self.k_proj, x), (self.v_proj, x)))
        o = F.scaled_dot_product_attention(q, k, v)  # B x heads x 1 x hd
        return self.c_proj(merge_heads(o)[:, 0])


class ModifiedResNet(nn.Module):
    """OpenAI's CLIP ResNet: 3-conv stem with avg-pool, anti-aliased strided bottlenecks and an
    attention-pooling head. Overall stride 32. ``B x 3 x H x W`` -> ``B x output_dim``."""

    def __init__(self, cfg: VisionConfig, output_dim: int):
        super().__init__()
        self.cfg = cfg
        width = cfg.width
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.act3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, cfg.layers[0])
        self.layer2 = self._make_layer(width * 2, cfg.layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, cfg.layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, cfg.layers[3], stride=2)
        embed = width * 32
        self.attnpool = AttentionPool2d(cfg.image_size // 32, embed, cfg.num_heads, output_dim)
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        std = self.attnpool.c_proj.in_features**-0.5
        for lin in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(lin.weight, std=std)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                nn.init.zeros_(block.bn3.weight)  # each residual branch starts as identity

    @property
    def stages(self) -> tuple[nn.Sequential, ...]:
        return (self.layer1, self.layer2, self.layer3, self.layer4)

    def stem(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.conv1.weight.dtype)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.stem(pixels)
        for stage in self.stages:
            x = stage(x)
        return self.attnpool(x)

    def forward_intermediates(self, pixels: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False) -> Intermediates:
        """The :class:`~textseg.models.base.Intermediates` contract over the 4 stages:
        ``intermediates`` the selected stage outputs (strides 4, 8, 16, 32; channels
        ``width * 4 * 2**i``), ``final`` the ``B x (32*width) x h x w`` map the attention pool reads,
        ``grid`` its ``(h, w)``. ``norm`` is ignored (no final norm); NCHW only."""
        if output_fmt != "NCHW":
            raise ValueError(f"ModifiedResNet gives NCHW maps only, not {output_fmt!r}")
        take = resolve_indices(indices, 4)
        stop = blocks_to_run(take, 4, intermediates_only)
        x = self.stem(pixels)
        feats = []
        for i, stage in enumerate(self.stages[:stop]):
            x = stage(x)
            if i in take:
                feats.append(x)
        return Intermediates(feats, (x.shape[2], x.shape[3]), final=None if intermediates_only else x)


# ----------------------------------------------------------------------------------------------
# Text tower
# ----------------------------------------------------------------------------------------------


class TextTransformer(nn.Module):
    """Causal transformer over BPE tokens, pooled at the end-of-text token (the highest id in each
    row, as OpenAI's ``argmax``), then ``ln_final`` and ``@ text_projection``.

    ``N x L`` LongTensor (``L <= context_length``) -> ``N x output_dim`` (``N x width`` when
    ``output_dim`` is None: no projection, for towers with their own projector, e.g. GroupViT)."""

    def __init__(self, cfg: TextConfig, output_dim: int | None):
        super().__init__()
        self.cfg = cfg
        self.context_length, self.width = cfg.context_length, cfg.width
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.ln_eps)
        self.ln_final = LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, output_dim)) if output_dim else None
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if self.text_projection is not None:
            nn.init.normal_(self.text_projection, std=cfg.width**-0.5)
        self.transformer.init_weights()

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``N x L`` ids -> ``N x L x width`` features after ``ln_final`` (no pooling/projection)."""
        n, length = tokens.shape
        if length > self.context_length:
            raise ValueError(f"token sequences of length {length} exceed context length {self.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[:length].to(self.token_embedding.weight.dtype)
        x = self.transformer(x, causal=True)
        return self.ln_final(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        eot = tokens.argmax(dim=-1)
        # Causal attention: positions after the last EOT cannot affect any pooled feature, so the
        # padding tail is not computed at all (same result, several times faster for short prompts).
        x = self.forward_tokens(tokens[:, : int(eot.max()) + 1])
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        return x @ self.text_projection if self.text_projection is not None else x


# ----------------------------------------------------------------------------------------------
# CLIP
# ----------------------------------------------------------------------------------------------


class CLIP(DualEncoder):
    """CLIP: ``visual`` (ViT or ModifiedResNet), ``text`` (TextTransformer), learnable ``logit_scale``
    (log of the softmax temperature's inverse; ``logit_scale_value`` = its exp).

    >>> model = CLIP(CLIPConfig())            # ViT-B/16-shaped, random
    >>> img = model.encode_image(torch.randn(1, 3, 224, 224), normalize=True)   # 1 x 512
    >>> txt = model.encode_text(model.tokenize(["a cat"]), normalize=True)        # 1 x 512
    """

    name = "clip"

    def __init__(self, cfg: CLIPConfig | None = None, preprocess_cfg: PreprocessCfg | None = None):
        super().__init__()
        cfg = cfg or CLIPConfig()
        self.cfg = cfg
        if cfg.vision.is_resnet:
            self.visual: VisionTransformer | ModifiedResNet = ModifiedResNet(cfg.vision, cfg.embed_dim)
            self.dense_stride = 32
        else:
            self.visual = VisionTransformer(cfg.vision, cfg.embed_dim)
            self.dense_stride = cfg.vision.patch_size
        self.text = TextTransformer(cfg.text, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.preprocess_cfg = preprocess_cfg or PreprocessCfg(image_size=cfg.vision.image_size)
        # defined by textseg.models.clip_dense: sc-clip first (the default) for ViTs deep enough for it
        self.dense_modes = clip_supported_modes(self)
        self.text_modes = tuple(m for m in self.dense_modes if m in CLIP_TEXT_MODES)

    @classmethod
    def from_config_dict(cls, d: dict) -> CLIP:
        """A randomly initialised CLIP from :meth:`config_dict` output (the native card's config)."""
        return cls(CLIPConfig.from_dict(d))

    def config_dict(self) -> dict:
        return self.cfg.to_dict()

    def tokenize(self, texts: Sequence[str] | str) -> torch.Tensor:
        from textseg.models.tokenizer import tokenize

        return tokenize(texts, context_length=self.cfg.text.context_length)

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.visual(pixels)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.text(tokens)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_dense(self, pixels: torch.Tensor, mode: str | None = None, text=None,
                     options: dict | None = None) -> torch.Tensor:
        """``B x 3 x H x W`` -> ``B x embed_dim x h x w`` (h = H // dense_stride) by the dense method
        ``mode`` of :mod:`textseg.models.clip_dense` (MaskCLIP, SCLIP, ...); ``text``
        (:class:`~textseg.models.base.DenseText`): the labels, for the modes in ``text_modes`` (ResCLIP);
        ``options``: a label-free mode's settings (``pearl``: ``{"alpha_kk": 0.3}``, :class:`PEARLCfg`)."""
        return clip_dense_features(self, pixels, mode, text, options)
