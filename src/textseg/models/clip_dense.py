"""Training-free dense features from CLIP: rewiring the last vision block so patch tokens stay local.

CLIP's final patch tokens are poor dense features: the last block's query-key attention mixes every
token with a few global ones. These methods change only the last block (all earlier blocks run as
usual), then apply ``ln_post`` and ``proj`` to the patch tokens. With ``x`` = input of the last block,
``a = ln_1(x)``, ``q, k, v`` = its attention projections (per head), ``P`` = ``out_proj`` and
``s = head_dim ** -0.5``:

==========  ===================================================================  =================
mode        last block output                                                    paper
==========  ===================================================================  =================
plain       ``y = x + P(softmax(q k^T s) v)``, ``y + FFN(ln_2(y))`` (CLIP as is)  baseline
maskclip    ``y = x + P(v)`` (no query-key attention), then ``y + FFN(ln_2(y))``  Zhou et al. 2022
sclip       ``y = x + P((softmax(q q^T s) + softmax(k k^T s)) v)``, then          Wang et al. 2024
            ``y + FFN(ln_2(y))`` (residual and FFN kept)
clearclip   ``P(softmax(q q^T s) v)``: no residual, no FFN                       Lan et al. 2024
naclip      ``P(softmax(k k^T s + G) v)``: no residual, no FFN; ``G`` a Gaussian  Hajimiri et al.
            over patch-grid distance (sigma 5, 0 for the class token)            2025
==========  ===================================================================  =================

Each row follows the official code: plain ``openai/CLIP clip/model.py`` (``ResidualAttentionBlock``);
maskclip ``chongzhou96/MaskCLIP mmseg/models/backbones/vit.py`` (``TransformerEncoderLayer.forward``,
``return_qkv``: ``v = out_proj(v) + x; v = ffn(norm2(v), identity=v)``); sclip ``wangf3014/SCLIP
clip/model.py`` (``VisionTransformer.forward`` + ``custom_attn(csa=True)``); clearclip ``mc-lan/ClearCLIP
open_clip/transformer.py`` (``VisionTransformer.forward`` with ``ignore_residual=True`` +
``custom_attn(model_type='ClearCLIP')``); naclip ``sinahmr/NACLIP clip/model.py`` (arch ``reduced``,
attention ``naclip``, ``gaussian_window`` / ``get_attention_addition``). For inputs whose patch grid
differs from the checkpoint's, sclip / clearclip / naclip resize the position embeddings as those
repositories do (``interpolate_pos_encoding``: bicubic with ``scale_factor = (n + 0.1) / N``);
plain and maskclip resample to the target size (mmseg's ``resize_pos_embed``).

The default is **naclip**: in the published comparisons of these training-free methods on the eight
standard benchmarks (VOC-21/20, Context-60/59, COCO-Object/Stuff, Cityscapes, ADE20K, ViT-B/16) NACLIP
reports the highest average mIoU (ahead of ClearCLIP, SCLIP, then MaskCLIP; plain CLIP tokens are
far behind). No real CLIP weights exist in this environment, so we could not re-rank them on our
data; ``--mode`` selects any of them.

ResNet CLIP has no last transformer block: every mode uses MaskCLIP's value path through the
attention pool (``c_proj(v_proj(x))`` at each position, no query-key attention, no position
embedding), the method MaskCLIP defines for ResNets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from textseg.errors import TextsegError

CLIP_DENSE_MODES: tuple[str, ...] = ("naclip", "clearclip", "sclip", "maskclip", "plain")
DENSE_MODES = CLIP_DENSE_MODES
NACLIP_SIGMA = 5.0
# position-embedding resizing per mode (textseg.models.layers.resample_pos_embed), as each official repo
POS_INTERP = {"plain": "size", "maskclip": "size", "sclip": "sclip", "clearclip": "sclip", "naclip": "sclip"}

_GAUSS_CACHE: dict[tuple, torch.Tensor] = {}


def neighbourhood_bias(grid: tuple[int, int], sigma: float = NACLIP_SIGMA, num_prefix: int = 1,
                       device=None, dtype=torch.float32) -> torch.Tensor:
    """NACLIP's additive attention bias ``T x T`` (``T = num_prefix + h*w``):
    ``exp(-|p_i - p_j|^2 / (2 sigma^2))`` between patch positions, 0 for prefix (class) tokens."""
    key = (grid, sigma, num_prefix, str(device), dtype)
    static = all(type(v) is int for v in (*grid, num_prefix))  # symbolic sizes (ONNX export): no cache
    bias = _GAUSS_CACHE.get(key) if static else None
    if bias is None:
        h, w = grid
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
        pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1)
        g = torch.exp(-torch.cdist(pos, pos).pow(2) / (2 * sigma**2))
        bias = torch.zeros(num_prefix + h * w, num_prefix + h * w, dtype=torch.float64)
        bias[num_prefix:, num_prefix:] = g
        bias = bias.to(device=device, dtype=dtype)
        if not static:
            return bias
        if len(_GAUSS_CACHE) > 16:
            _GAUSS_CACHE.clear()
        _GAUSS_CACHE[key] = bias
    return bias


def last_block(block, x: torch.Tensor, mode: str, grid: tuple[int, int]) -> torch.Tensor:
    """Apply the last transformer ``block`` to ``x`` (``B x T x C``, class token first) as ``mode`` does.

    ``block`` has ``ln_1``, ``attn`` (with ``qkv`` / ``project`` / ``scale``), ``ln_2``, ``mlp``."""
    if mode == "plain":
        return block(x)
    attn = block.attn
    q, k, v = attn.qkv(block.ln_1(x))  # B x heads x T x head_dim
    if mode == "maskclip":
        y = x + attn.project(v)
        return y + block.mlp(block.ln_2(y))
    if mode == "sclip":
        o = F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
        y = x + attn.project(o)
        return y + block.mlp(block.ln_2(y))
    if mode == "clearclip":
        return attn.project(F.scaled_dot_product_attention(q, q, v))
    if mode == "naclip":
        bias = neighbourhood_bias(grid, NACLIP_SIGMA, x.shape[1] - grid[0] * grid[1], x.device, q.dtype)
        return attn.project(F.scaled_dot_product_attention(k, k, v, attn_mask=bias))
    raise TextsegError(f"unknown CLIP dense mode {mode!r}; choose one of: {', '.join(CLIP_DENSE_MODES)}")


def clip_dense_features(model, pixels: torch.Tensor, mode: str | None = None) -> torch.Tensor:
    """``B x 3 x H x W`` normalised pixels -> ``B x embed_dim x h x w`` dense features of a CLIP
    ``model`` (ViT: ``h = H // patch_size``; ResNet: ``H // 32``) by ``mode`` (default: naclip)."""
    mode = mode or CLIP_DENSE_MODES[0]
    if mode not in CLIP_DENSE_MODES:
        raise TextsegError(f"unknown CLIP dense mode {mode!r}; choose one of: {', '.join(CLIP_DENSE_MODES)}")
    visual = model.visual
    if not hasattr(visual, "blocks"):  # ModifiedResNet
        x = visual.forward_intermediates(pixels, indices=[]).final  # the map the attention pool reads
        pool = visual.attnpool
        b, _, h, w = x.shape
        x = pool.c_proj(pool.v_proj(x.flatten(2).transpose(1, 2)))  # B x hw x D
        return x.transpose(1, 2).reshape(b, -1, h, w)
    n = len(visual.blocks)
    pos_interp = POS_INTERP[mode]
    if n >= 2:
        out = visual.forward_intermediates(pixels, indices=[n - 2], intermediates_only=True, pos_interp=pos_interp)
        x, grid = out.intermediates[-1], out.grid
    else:
        x, grid = visual.embed(pixels, pos_interp)
    x = last_block(visual.blocks[-1], x, mode, grid)
    feats = visual.head(x[:, x.shape[1] - grid[0] * grid[1] :])  # patch tokens: ln_post, proj
    return feats.transpose(1, 2).reshape(x.shape[0], -1, grid[0], grid[1])
