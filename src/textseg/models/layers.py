"""Layers shared by textseg's transformer towers: attention, MLP, pre-norm block, stochastic depth and
position-embedding resampling (one home each; CLIP, GroupViT and LSeg build on them).

The state-dict layout is a constructor option, so each model keeps the key names its checkpoints and
converters use:

* :class:`Attention` ``layout="fused"``: ``qkv`` (``C -> 3C``) and ``proj`` (timm, GroupViT);
  ``"in_proj"``: ``in_proj_weight``/``in_proj_bias``/``out_proj`` (``nn.MultiheadAttention``, OpenAI
  CLIP); ``"separate"``: ``q_proj``/``k_proj``/``v_proj``/``proj`` (cross-attention).
* :class:`Mlp` ``names=("fc1", "fc2")`` (timm) or ``("c_fc", "c_proj")`` (OpenAI).
* :class:`Block` ``layout="timm"``: ``norm1``/``attn``/``norm2``/``mlp`` with the fused attention;
  ``"openai"``: ``ln_1``/``attn``/``ln_2``/``mlp`` with ``in_proj`` attention and ``c_fc``/``c_proj``.

Shapes: tokens ``B x T x C``; per-head tensors ``B x heads x T x head_dim``. Attention is computed
with ``F.scaled_dot_product_attention`` (scale ``head_dim ** -0.5``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------
# Norms and activations
# ----------------------------------------------------------------------------------------------


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (as OpenAI's CLIP), returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """OpenAI's GELU approximation ``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_act(name: str) -> nn.Module:
    """``"gelu"`` (exact, erf) or ``"quick_gelu"`` (OpenAI's)."""
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r} (quick_gelu or gelu)")


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016) on a residual branch: in training each sample's branch is
    zeroed with probability ``p`` and the survivors scaled by ``1 / (1 - p)``; identity in evaluation
    and when ``p == 0``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path rate must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``B x T x C`` -> ``B x heads x T x C/heads``."""
    b, t, c = x.shape
    return x.view(b, t, heads, c // heads).transpose(1, 2)


def merge_heads(o: torch.Tensor) -> torch.Tensor:
    """``B x heads x T x head_dim`` -> ``B x T x (heads * head_dim)``."""
    b, _, t, _ = o.shape
    return o.transpose(1, 2).reshape(b, t, -1)


ATTENTION_LAYOUTS = ("fused", "in_proj", "separate")


class Attention(nn.Module):
    """Multi-head attention of ``B x T x C`` queries on ``B x S x C`` keys/values (``context``;
    default: the queries themselves), with SDPA.

    ``layout`` fixes the parameter names (module docstring); all three compute the same maths.
    Pieces for methods that rewire attention (MaskCLIP, SCLIP, ClearCLIP, NACLIP):
    ``q, k, v = attn.heads_qkv(x)`` (each ``B x heads x T x head_dim``, unscaled) and
    ``attn.project(o)`` (heads merged, output projection);
    ``attn(x) == attn.project(softmax(q k^T * attn.scale) v)``.
    """

    def __init__(self, dim: int, heads: int, layout: str = "fused", bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        if layout not in ATTENTION_LAYOUTS:
            raise ValueError(f"unknown attention layout {layout!r}; choose one of {ATTENTION_LAYOUTS}")
        self.layout = layout
        self.num_heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim**-0.5
        if layout == "in_proj":
            self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
            self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim)) if bias else None
            self.out_proj = nn.Linear(dim, dim)
        else:
            if layout == "fused":
                self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
            else:
                self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim, bias=bias) for _ in range(3))
            self.proj = nn.Linear(dim, dim)

    def heads_qkv(self, x: torch.Tensor, context: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries from ``x`` (``B x T x C``), keys and values from ``context`` (default ``x``) ->
        q, k, v, each ``B x heads x (T or S) x head_dim``."""
        if self.layout == "separate":
            kv = x if context is None else context
            return (split_heads(self.q_proj(x), self.num_heads), split_heads(self.k_proj(kv), self.num_heads),
                    split_heads(self.v_proj(kv), self.num_heads))
        if context is not None:
            raise ValueError(f"cross-attention needs layout='separate', not {self.layout!r}")
        b, t, _ = x.shape
        if self.layout == "in_proj":
            qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        else:
            qkv = self.qkv(x)
        qkv = qkv.view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def project(self, o: torch.Tensor) -> torch.Tensor:
        """``B x heads x T x head_dim`` -> ``B x T x C`` (heads merged, output projection)."""
        out = self.out_proj if self.layout == "in_proj" else self.proj
        return out(merge_heads(o))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, causal: bool = False,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.heads_qkv(x, context)
        return self.project(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal))


# ----------------------------------------------------------------------------------------------
# MLP and block
# ----------------------------------------------------------------------------------------------


class Mlp(nn.Module):
    """``... x dim -> ... x dim_out`` two-layer MLP ``fc2(act(fc1(x)))``; ``names`` are the two
    Linear layers' attribute (state-dict) names."""

    def __init__(self, dim: int, hidden: int, dim_out: int | None = None, act: str = "gelu",
                 names: tuple[str, str] = ("fc1", "fc2")):
        super().__init__()
        self._names = names
        self.add_module(names[0], nn.Linear(dim, hidden))
        self.act = make_act(act)
        self.add_module(names[1], nn.Linear(hidden, dim_out or dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = (self._modules[n] for n in self._names)
        return fc2(self.act(fc1(x)))


BLOCK_LAYOUTS = {  # layout -> (norm names, attention layout, MLP names)
    "timm": (("norm1", "norm2"), "fused", ("fc1", "fc2")),
    "openai": (("ln_1", "ln_2"), "in_proj", ("c_fc", "c_proj")),
}


class Block(nn.Module):
    """Pre-norm transformer block over ``B x T x C``: ``x + drop_path(attn(norm1(x)))``, then
    ``x + drop_path(mlp(norm2(x)))``.

    ``layout`` fixes the names (module docstring: ``norm1``/``norm2`` or ``ln_1``/``ln_2``).
    ``mlp_hidden`` defaults to ``int(dim * mlp_ratio)``;
    ``attn_layer`` is the attention class (called ``attn_layer(dim, heads, layout=...)``);
    ``drop_path`` the stochastic-depth rate of both branches (0 = identity)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, *, mlp_hidden: int | None = None,
                 act: str = "gelu", eps: float = 1e-5, layout: str = "timm",
                 norm_layer: type[nn.LayerNorm] = nn.LayerNorm, attn_layer: type[Attention] = Attention,
                 drop_path: float = 0.0):
        super().__init__()
        if layout not in BLOCK_LAYOUTS:
            raise ValueError(f"unknown block layout {layout!r}; choose one of {tuple(BLOCK_LAYOUTS)}")
        norm_names, attn_layout, mlp_names = BLOCK_LAYOUTS[layout]
        self._norm_names = norm_names
        self.add_module(norm_names[0], norm_layer(dim, eps=eps))
        self.attn = attn_layer(dim, heads, layout=attn_layout)
        self.add_module(norm_names[1], norm_layer(dim, eps=eps))
        self.mlp = Mlp(dim, mlp_hidden or int(dim * mlp_ratio), act=act, names=mlp_names)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, causal: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        norm1, norm2 = (self._modules[n] for n in self._norm_names)
        x = x + self.drop_path(self.attn(norm1(x), causal=causal, attn_mask=attn_mask))
        return x + self.drop_path(self.mlp(norm2(x)))


# ----------------------------------------------------------------------------------------------
# Position embeddings
# ----------------------------------------------------------------------------------------------


POS_INTERPOLATIONS: tuple[str, ...] = ("size", "sclip")


def resample_pos_embed(pos: torch.Tensor, src: tuple[int, int], dst: tuple[int, int], num_prefix: int = 1,
                       method: str = "size", mode: str = "bicubic") -> torch.Tensor:
    """Resize a ``(num_prefix + h*w) x C`` position table (a leading batch axis of 1 is kept) from
    grid ``src`` to ``dst``; prefix (class-token) rows are kept as they are. Interpolation ``mode``
    ``"bicubic"`` (CLIP, GroupViT) or ``"bilinear"`` (lang-seg's ViT), ``align_corners=False``,
    computed in float32.

    ``method="size"``: resample to the target size (mmseg's ``resize_pos_embed``, timm's).
    ``method="sclip"``: the training-free dense CLIP repositories' ``interpolate_pos_encoding``
    (SCLIP / NACLIP / ClearCLIP ``clip/model.py``): ``scale_factor = (dst + 0.1) / src`` is handed to
    the resampler, so source coordinates are ``(i + 0.5) * src / (dst + 0.1) - 0.5`` (not
    ``... * src / dst``); the output still has ``dst`` cells."""
    symbolic = not all(type(v) is int for v in (*src, *dst))  # sizes traced by torch.export (ONNX)
    if not symbolic and tuple(src) == tuple(dst):
        return pos
    if method not in POS_INTERPOLATIONS:
        raise ValueError(f"unknown position interpolation {method!r}; choose one of {POS_INTERPOLATIONS}")
    if pos.ndim == 3:
        return resample_pos_embed(pos[0], src, dst, num_prefix, method, mode)[None]
    prefix, grid = pos[:num_prefix], pos[num_prefix:]
    grid = grid.reshape(1, src[0], src[1], -1).permute(0, 3, 1, 2).float()
    if symbolic:  # the same resampling as separable matrices built from tensors: exports with dynamic sizes
        mh, mw = (_resample_matrix(int(s_), d, method, mode) for s_, d in zip(src, dst))
        out = torch.einsum("ih,chw,jw->cij", mh, grid[0], mw)[None]
        if method == "sclip":  # the official code keeps the table as is when the grid is the checkpoint's
            same = ((torch.arange(dst[0])[-1:] + 1 == src[0]) & (torch.arange(dst[1])[-1:] + 1 == src[1]))
            mh, mw = (_resample_matrix(int(s_), d, "size", mode) for s_, d in zip(src, dst))  # identity there
            out = torch.where(same, torch.einsum("ih,chw,jw->cij", mh, grid[0], mw)[None], out)
        grid = out
    elif method == "sclip":
        scale = ((dst[0] + 0.1) / src[0], (dst[1] + 0.1) / src[1])
        grid = F.interpolate(grid, scale_factor=scale, mode=mode, align_corners=False,
                             recompute_scale_factor=False)[..., : dst[0], : dst[1]]
    else:
        grid = F.interpolate(grid, size=tuple(dst), mode=mode, align_corners=False)
    return torch.cat([prefix, grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(dst[0] * dst[1], -1)])


CUBIC_A = -0.75  # PyTorch's (and OpenCV's) bicubic convolution coefficient


def _resample_matrix(src: int, dst, method: str, mode: str) -> torch.Tensor:
    """``dst x src`` weights of PyTorch's ``align_corners=False`` 1-D ``mode`` resampling (bicubic: cubic
    convolution with ``A = -0.75``, taps clamped to the border; bilinear: source index clamped at 0):
    source coordinate ``(i + 0.5) * src / dst' - 0.5`` with ``dst' = dst`` (``"size"``) or ``dst + 0.1``
    (``"sclip"``: the scale factor ``(dst + 0.1) / src``). ``dst`` may be a traced size."""
    i = torch.arange(dst, dtype=torch.float32)
    denom = (i[-1:] + 1.1) if method == "sclip" else (i[-1:] + 1.0)  # dst + 0.1 / dst, as a tensor
    real = (i + 0.5) * (src / denom) - 0.5
    cols = torch.arange(src)
    if mode == "bilinear":
        real = real.clamp_min(0)
        i0 = real.floor()
        lam = real - i0
        taps = [(i0, 1 - lam), ((i0 + 1).clamp_max(src - 1), lam)]
    elif mode == "bicubic":
        i0 = real.floor()
        t = real - i0
        a = CUBIC_A

        def near(x):  # |x| <= 1
            return ((a + 2) * x - (a + 3)) * x * x + 1

        def far(x):  # 1 < |x| < 2
            return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

        weights = (far(t + 1), near(t), near(1 - t), far(2 - t))
        taps = [((i0 - 1 + k).clamp(0, src - 1), w) for k, w in enumerate(weights)]
    else:
        raise ValueError(f"no traced resampling for mode {mode!r}")
    m = torch.zeros(i.shape[0], src)
    for idx, w in taps:
        m = m + (idx.long()[:, None] == cols[None, :]).float() * w[:, None]
    return m
