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
pearl       ``P(softmax(s q (k R)^T + 0.08 s k_c k_c^T) v)``: no residual, no FFN;  PEARL 2026
            ``R`` the rotation closest to ``k_c^T q_c`` (centred q, k), polar
==========  ===================================================================  =================

Each row follows the official code: plain ``openai/CLIP clip/model.py`` (``ResidualAttentionBlock``);
maskclip ``chongzhou96/MaskCLIP mmseg/models/backbones/vit.py`` (``TransformerEncoderLayer.forward``,
``return_qkv``: ``v = out_proj(v) + x; v = ffn(norm2(v), identity=v)``); sclip ``wangf3014/SCLIP
clip/model.py`` (``VisionTransformer.forward`` + ``custom_attn(csa=True)``); clearclip ``mc-lan/ClearCLIP
open_clip/transformer.py`` (``VisionTransformer.forward`` with ``ignore_residual=True`` +
``custom_attn(model_type='ClearCLIP')``); naclip ``sinahmr/NACLIP clip/model.py`` (arch ``reduced``,
attention ``naclip``, ``gaussian_window`` / ``get_attention_addition``); pearl ``PGSmall/PEARL
clip/model.py`` (arch ``reduced``, attention ``pearl``) + ``pearl/attn.py`` ``pa_attn``. For inputs whose patch grid
differs from the checkpoint's, sclip / clearclip / naclip resize the position embeddings as those
repositories do (``interpolate_pos_encoding``: bicubic with ``scale_factor = (n + 0.1) / N``);
plain and maskclip resample to the target size (mmseg's ``resize_pos_embed``).

**sc-clip** (Bai et al. 2024, ``SuleBai/SC-CLIP clip/model.py`` ``VisionTransformer.forward``) changes
more than the last block. With ``f_i`` = the output of block ``i`` (0-based, class token first) for
``i < n - 1``, ``x = f_{n-2}`` the input of the last block, and ``c`` its class token:

1. *anomaly tokens*: a local-outlier-factor score of every patch token of ``x`` (``lof_pytorch``: 30
   neighbours by squared Euclidean distance, reach distance ``max(d_ij, k-distance_i)``, the top 5%
   above the ``0.95`` quantile are anomalies); each anomaly is replaced by the mean of its non-anomalous
   3 x 3 neighbours (``mean_interpolation``); the class token is set aside (``x`` = patches only).
2. *intermediate aggregation*: ``S = cos(f_8, f_8)`` between patches of block 8 (anomalies resolved
   the same way); ``x <- A(x, S)`` with ``A(x, S) = (S * [S >= 0.4]) x / (row sums + 1e-6)``.
3. *attention enhancement* in the last block: ``P((softmax(M) + softmax(k k^T s)) / 2 v) + 0.3 c`` on
   ``ln_1(x)``, ``M = 3 (S - mean S)`` with negatives set to ``-inf``; no residual, no FFN; then
   ``x <- A(x, S')`` with ``S' = cos(f_3, f_3)`` (not resolved).
4. *multi-level fusion*: ``r = f_3 + ... + f_9``; ``x <- x + A(last-block attention of r's patches
   + 0.3 r_cls, S')``; then ``ln_post`` and ``proj``.

The settings (``SCCLIP``: beta 0.4, block indices 8 / 3 / 3..9, class-token weight 0.3, LOF 30 / 0.05)
are the official ones for every depth, so a tower needs at least ``SCCLIP_MIN_BLOCKS`` (11) blocks.
Where textseg differs from the official code, only where that code cannot run: it squeezes the
batch (batch 1 only), so textseg computes every step per image (the mean of ``S`` in step 3 too);
it maps anomaly indices to (row, column) with the grid height for both axes (right only on square
grids), textseg uses the row-major grid (``index // w, index % w``), which equals it on square grids;
an image with fewer than 31 patches (``lof_pytorch``'s ``topk`` fails there) uses ``patches - 1``
neighbours; an image with no anomaly (its ``mean_interpolation`` fails on an empty index list) is left
as it is. Position embeddings: ``interpolate_pos_encoding`` as SCLIP's.

**resclip** (Yang et al., CVPR 2025, ``yvhangyang/ResCLIP clip/model.py`` ``VisionTransformer.forward``
with arch ``wo_resi``, attention ``resclip``, ``use_rcs`` and ``use_sfr``; ``ResCLIPCfg``) rewires
NACLIP's last block with two priors; it is a *text mode*: its forward segments the image, so
``encode_dense(pixels, mode="resclip", text=DenseText(prompt_embeddings, logit_scale, options))``
needs the labels (:class:`~textseg.models.base.DenseText`; the Segmenter passes them). With ``x`` the
last block's input, ``A_i = softmax(q_i k_i^T s)`` block ``i``'s own attention (per head) and
``G`` NACLIP's Gaussian bias:

1. *RCS*: ``R = mean(A_5, A_6, A_7, A_8)``; ``W(M) = tau_r ((1 - lam_r) softmax(M + G) + lam_r R)``;
   the block output is ``P(W(M) v)`` (no residual, no FFN), then ``ln_post`` / ``proj``.
2. *SFR*: a first pass with ``M = k k^T s`` gives patch logits against the prompts (cosine),
   bilinearly upsampled to the input, PAMR (10 steps, dilations 8 / 16), ``softmax(logit_scale z)``;
   the arg-max prompt, prompt 0 where its probability is below ``temp_thd`` (AdaThr); each patch's
   most frequent pixel label (``torch.mode``). ``S_ij = 1`` for patches of one label (and ``i = j``),
   decayed by ``exp(-d_ij / d_max)`` (Chebyshev distances) where the straight line from ``i`` towards
   ``j`` leaves the label (``delete_same_entity``, the official ``check_path``, which samples the
   line on the image's longest-distance grid and so tests only the first ``d_ij + 1`` samples);
   each row blurred by a 1-D Gaussian (std 5) along the flattened patch index, ReLU, rows
   normalised; then ``S / max S``, rounded to float16 as the official code does.
3. the second pass: ``M = tau_s ((1 - lam_s) k k^T s + lam_s S)`` (0 on class-token rows/columns).

``(tau_r, lam_r)``, ``(tau_s, lam_s)`` and ``temp_thd`` are per-benchmark in the official configs
(the ``resclip`` protocol presets carry them as ``mode_options``; the defaults are ADE20K's). RCS
reads blocks 5..8 at every depth, so a tower needs ``RESCLIP_MIN_BLOCKS`` (10) blocks. Where textseg
differs, only where the official code cannot run: it squeezes the batch (batch 1), textseg refines
each image of a batch by its own segmentation; its patch indices are row-major (``i // w, i % w``)
and so right on non-square grids too. Position embeddings: ``interpolate_pos_encoding``.

The default is the first of ``CLIP.dense_modes``: **sc-clip** for towers with at least 11 blocks
(every real CLIP ViT), else **naclip**; a text mode is never the default (it needs the labels). The published averages over the eight standard benchmarks
(VOC-21/20, Context-60/59, COCO-Object/Stuff, Cityscapes, ADE20K; OpenAI ViT-B/16, no
post-processing) rank them SC-CLIP 43.9 > ResCLIP (on NACLIP) 41.4 > NACLIP 39.4 (without PAMR) >
ClearCLIP, SCLIP (about 38 each) > MaskCLIP, with plain CLIP tokens far behind (SC-CLIP paper, arXiv
2411.15869, Table 1; ResCLIP README tables; NACLIP paper, arXiv 2404.08181).
No real CLIP weights exist in this environment, so we could not re-rank them on our data;
``--mode`` selects any of them.

Cost (``benchmarks/bench_segment.py --mode all --repeats 3 --no-clipseg``, ViT-B/16 shapes, 448 x 600
whole image, 2 CPU threads): every last-block mode runs at 0.95-1.01x the bare ``encode_image``;
sc-clip at 1.39x, most of the extra being the exact pairwise distances of its LOF (kept exact: the
anomaly choice sits on a quantile threshold), the rest its second pass of the last block's attention
and the N x N similarity products. resclip (``--mode sc-clip,resclip,naclip --repeats 3``, 21 labels,
machine load 11-12 on the 2 shared cores, so noisy) at 3.09x (sc-clip 1.48x, naclip 1.11x in the same
run): its first pass's PAMR of 21 prompt maps at the input size (about one bare forward), the N x N
semantic prior with its line-of-sight test (about 1 M patch pairs x 37 samples at 28 x 37 patches;
computed only for same-label pairs), four earlier blocks' attention maps and a second last-block pass.

ResNet CLIP has no last transformer block: every mode uses MaskCLIP's value path through the
attention pool (``c_proj(v_proj(x))`` at each position, no query-key attention, no position
embedding), the method MaskCLIP defines for ResNets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from textseg.errors import TextsegError

# ranked by the published eight-benchmark average (module docstring); the first a tower supports is its default
# pearl: its only published average (43.2) includes its Laplacian propagation, so it ranks after naclip
CLIP_DENSE_MODES: tuple[str, ...] = ("sc-clip", "resclip", "naclip", "pearl", "clearclip", "sclip", "maskclip",
                                     "plain")
DENSE_MODES = CLIP_DENSE_MODES
# modes whose features depend on the labels: encode_dense(pixels, mode, text=DenseText(...))
CLIP_TEXT_MODES: tuple[str, ...] = ("resclip",)
NACLIP_SIGMA = 5.0
# position-embedding resizing per mode (textseg.models.layers.resample_pos_embed), as each official repo
POS_INTERP = {"plain": "size", "maskclip": "size", "sclip": "sclip", "clearclip": "sclip", "naclip": "sclip",
              "sc-clip": "sclip", "resclip": "sclip", "pearl": "sclip"}


@dataclass(frozen=True)
class SCCLIPCfg:
    """SC-CLIP's settings (``VisionTransformer.__init__`` / ``SCCLIPForSegmentation`` defaults, the same
    in every config): similarity threshold ``beta``, the block whose similarities refine the last
    block's input and attention (``pre_adjust_idx``) and its output (``post_adjust_idx``), the fused
    blocks ``multi_start_idx <= i < multi_end_idx``, the class-token weight ``res_cls`` and
    ``lof_pytorch``'s ``n_neighbors`` / ``contamination``."""

    beta: float = 0.4
    pre_adjust_idx: int = 8
    post_adjust_idx: int = 3
    multi_start_idx: int = 3
    multi_end_idx: int = 10
    res_cls: float = 0.3
    lof_neighbors: int = 30
    lof_contamination: float = 0.05

    @property
    def min_blocks(self) -> int:
        """Blocks a tower needs: the indices read are outputs of blocks ``0 .. n - 2``."""
        return max(self.pre_adjust_idx, self.post_adjust_idx, self.multi_end_idx - 1) + 2


SCCLIP = SCCLIPCfg()
SCCLIP_MIN_BLOCKS = SCCLIP.min_blocks  # 11

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


def last_block(block, x: torch.Tensor, mode: str, grid: tuple[int, int], cfg=None) -> torch.Tensor:
    """Apply the last transformer ``block`` to ``x`` (``B x T x C``, class token first) as ``mode`` does.

    ``block`` has ``ln_1``, ``attn`` (with ``qkv`` / ``project`` / ``scale``), ``ln_2``, ``mlp``. ``cfg``: the
    mode's settings (``pearl``: a :class:`PEARLCfg`, default ``PEARL``; :func:`mode_cfg`)."""
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
    if mode == "pearl":
        return attn.project(pearl_attention(q, k, v, cfg or PEARL).to(v.dtype))
    raise TextsegError(f"unknown CLIP dense mode {mode!r}; choose one of: {', '.join(CLIP_DENSE_MODES)}")


# ----------------------------------------------------------------------------------------------
# PEARL (Procrustes-aligned attention)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PEARLCfg:
    """PEARL's attention settings (``PGSmall/PEARL pearl_ovss.py`` defaults): the k-k term and its weight
    ``alpha_kk`` (0.08; the ADE20K / Cityscapes configs use 0.3), the rotation solver (``polar``: Newton-Schulz
    iterations; ``svd``: exact) and its iterations."""

    use_kk: bool = True
    alpha_kk: float = 0.08
    solver: str = "polar"
    polar_iters: int = 5


PEARL = PEARLCfg()


def cfg_from_options(cls, mode: str, options: dict | None):
    """A frozen settings dataclass ``cls`` of dense ``mode`` from a protocol's / ``SegmentCfg``'s
    ``mode_options`` (names as the fields, the rest at their defaults; lists become tuples); an unknown
    key is a :class:`TextsegError` naming the known ones."""
    options = dict(options or {})
    known = set(cls.__dataclass_fields__)
    bad = sorted(set(options) - known)
    if bad:
        raise TextsegError(f"unknown {mode} option(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})


# label-free modes that take settings (``encode_dense(pixels, mode, options=...)``; SegmentCfg.mode_options)
MODE_CFGS: dict[str, type] = {"pearl": PEARLCfg}


def mode_cfg(mode: str, options: dict | None):
    """The settings of label-free dense ``mode`` from ``options`` (None when the mode takes none); options
    for a mode without settings, or an unknown key, are a :class:`TextsegError`."""
    if mode in MODE_CFGS:
        return cfg_from_options(MODE_CFGS[mode], mode, options)
    if options:
        raise TextsegError(f"dense mode {mode!r} takes no options (got {', '.join(sorted(options))}); modes with "
                           f"options: {', '.join(sorted(MODE_CFGS) + list(CLIP_TEXT_MODES))}")
    return None


def polar_rotation(m: torch.Tensor, iters: int = 5, eps: float = 1e-6) -> torch.Tensor:
    """The orthogonal polar factor ``m (m^T m)^{-1/2}`` of each ``... x d x d`` matrix, the inverse root by
    coupled Newton-Schulz iterations on ``m^T m`` scaled by its Frobenius norm (+ ``eps`` I), as PEARL's
    ``_polar_unitary_newton_schulz``."""
    eye = torch.eye(m.shape[-1], device=m.device, dtype=m.dtype).expand_as(m)
    a = m.transpose(-1, -2) @ m
    norm = a.flatten(-2).norm(dim=-1).clamp_min(eps)[..., None, None]
    y, z = a / norm + eps * eye, eye
    for _ in range(iters):
        t = 0.5 * (3.0 * eye - z @ y)
        y, z = y @ t, t @ z
    return m @ (z / norm.sqrt())


def pearl_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: PEARLCfg = PEARL) -> torch.Tensor:
    """PEARL's Procrustes-aligned attention (``pearl/attn.py`` ``pa_attn``, class token first), in float32,
    per image and head (``... x T x d``): ``q`` and ``k`` centred on their means weighted by ``|q_i|``
    (class token weight 0); ``R`` = the rotation closest to ``k_c^T q_c``; logits ``s q (k R)^T`` plus
    ``alpha_kk s k_c k_c^T``; ``softmax(logits) v``."""
    q, k, v = q.float(), k.float(), v.float()
    s = q.shape[-1] ** -0.5
    w = q.norm(dim=-1, keepdim=True)
    w[..., :1, :] = 0.0
    w = w / (w.sum(dim=-2, keepdim=True) + 1e-6)
    qc = q - (w * q).sum(dim=-2, keepdim=True)
    kc = k - (w * k).sum(dim=-2, keepdim=True)
    m = kc.transpose(-1, -2) @ qc
    if cfg.solver == "polar":
        r = polar_rotation(m, cfg.polar_iters)
    elif cfg.solver == "svd":
        u, _, vh = torch.linalg.svd(m, full_matrices=False)
        r = u @ vh
    else:
        raise TextsegError(f"unknown PEARL solver {cfg.solver!r}; choose polar or svd")
    logits = (q * s) @ (k @ r).transpose(-1, -2)
    if cfg.use_kk:
        logits = logits + cfg.alpha_kk * (kc @ kc.transpose(-1, -2)) * s
    return logits.softmax(dim=-1) @ v


# ----------------------------------------------------------------------------------------------
# SC-CLIP
# ----------------------------------------------------------------------------------------------


def lof_anomalies(x: torch.Tensor, n_neighbors: int = 30, contamination: float = 0.05) -> torch.Tensor:
    """SC-CLIP's ``lof_pytorch`` per image: ``B x N x C`` tokens -> ``B x N`` bool, True for the tokens
    whose local-outlier-factor score is above the ``1 - contamination`` quantile of the image's scores.

    Squared Euclidean distances; the ``k = n_neighbors`` nearest others (``min(k, N - 1)``: the
    official ``topk`` fails on fewer tokens); reach distance ``max(d_ij, d_i^(k))`` (the token's own
    k-distance, as the official code); ``lrd = k / mean reach``; score = mean ``lrd_j / lrd_i`` over
    the neighbours."""
    k = min(n_neighbors, x.shape[1] - 1)
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    knn_d, knn_i = d.topk(k + 1, dim=-1, largest=False)
    knn_d, knn_i = knn_d[..., 1:], knn_i[..., 1:]  # drop the token itself
    reach = torch.maximum(knn_d, knn_d[..., -1:])
    lrd = k / torch.nan_to_num(reach.mean(-1), nan=1e-6)  # B x N
    scores = (lrd.gather(1, knn_i.flatten(1)).view_as(knn_i) / lrd[..., None]).mean(-1)
    threshold = torch.quantile(scores.float(), 1 - contamination, dim=1, keepdim=True)
    return scores > threshold


def resolve_anomalies(fmap: torch.Tensor, anomalies: torch.Tensor) -> torch.Tensor:
    """SC-CLIP's ``mean_interpolation``: ``B x C x h x w`` features, ``B x h x w`` bool anomalies ->
    each anomaly replaced by the mean of its non-anomalous 3 x 3 neighbours (zero padding; an anomaly
    with none is kept)."""
    c = fmap.shape[1]
    keep = (~anomalies).to(fmap.dtype)[:, None]
    ring = torch.ones(1, 1, 3, 3, dtype=fmap.dtype, device=fmap.device)
    ring[..., 1, 1] = 0
    total = F.conv2d(fmap * keep, ring.expand(c, 1, 3, 3), padding=1, groups=c)
    count = F.conv2d(keep, ring, padding=1)
    update = anomalies[:, None] & (count > 0)
    return torch.where(update, total / count.clamp_min(1), fmap)


def _cosine(x: torch.Tensor) -> torch.Tensor:
    """``B x N x C`` -> ``B x N x N`` cosine similarities (``x / |x|``, as the official code)."""
    x = x / x.norm(dim=-1, keepdim=True)
    return x @ x.transpose(1, 2)


def _aggregate(x: torch.Tensor, corrs: torch.Tensor) -> torch.Tensor:
    """SC-CLIP's ``adaptively_aggregate``: rows of ``corrs`` normalised by their sum (+1e-6), times ``x``."""
    return (corrs / (corrs.sum(-1, keepdim=True) + 1e-6)) @ x


def _sc_attention(block, x: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
    """SC-CLIP's ``custom_attn`` on ``ln_1(x)`` (``x``: ``B x N x C`` patches, ``sim``: ``B x N x N``):
    ``P((softmax(M) + softmax(k k^T s)) / 2 v)``, ``M = 3 (sim - mean sim)`` (per image), ``-inf`` below 0."""
    attn = block.attn
    _, k, v = attn.qkv(block.ln_1(x))
    m = (sim - sim.mean(dim=(1, 2), keepdim=True)) * 3.0
    m = m.masked_fill(m < 0, float("-inf"))
    o = (F.softmax(m, dim=-1)[:, None] @ v + F.scaled_dot_product_attention(k, k, v)) / 2
    return attn.project(o)


def sc_clip_features(visual, pixels: torch.Tensor, cfg: SCCLIPCfg = SCCLIP) -> torch.Tensor:
    """SC-CLIP dense tokens of a CLIP ViT ``visual``: ``B x 3 x H x W`` -> (``B x h*w x D`` patch
    features after ``ln_post`` / ``proj``, grid). The steps are the module docstring's."""
    n = len(visual.blocks)
    if n < cfg.min_blocks:
        raise TextsegError(f"sc-clip reads blocks {cfg.post_adjust_idx}..{cfg.multi_end_idx - 1} and "
                           f"{cfg.pre_adjust_idx} before the last: it needs a ViT of at least {cfg.min_blocks} "
                           f"blocks, this one has {n}")
    out = visual.forward_intermediates(pixels, indices=list(range(n - 1)), intermediates_only=True,
                                       pos_interp=POS_INTERP["sc-clip"])
    feats, (h, w) = out.intermediates, out.grid  # feats[i]: block i's output, B x (1 + h*w) x C

    def fmap(t):  # B x h*w x C <-> B x C x h x w
        return t.transpose(1, 2).reshape(t.shape[0], -1, h, w)

    def tokens(m):
        return m.flatten(2).transpose(1, 2)

    x, cls = feats[-1][:, 1:], feats[-1][:, :1]
    anomalies = lof_anomalies(x, cfg.lof_neighbors, cfg.lof_contamination).view(-1, h, w)  # row-major
    x = tokens(resolve_anomalies(fmap(x), anomalies))
    pre = _cosine(tokens(resolve_anomalies(fmap(feats[cfg.pre_adjust_idx][:, 1:]), anomalies)))
    x = _aggregate(x, pre.masked_fill(pre < cfg.beta, 0.0))
    block = visual.blocks[-1]
    x = _sc_attention(block, x, pre) + cfg.res_cls * cls
    post = _cosine(feats[cfg.post_adjust_idx][:, 1:])
    post = post.masked_fill(post < cfg.beta, 0.0)
    x = _aggregate(x, post)
    fused = sum(feats[cfg.multi_start_idx : cfg.multi_end_idx])
    fused = _sc_attention(block, fused[:, 1:], pre) + cfg.res_cls * fused[:, :1]
    return visual.head(x + _aggregate(fused, post)), (h, w)


# ----------------------------------------------------------------------------------------------
# ResCLIP
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResCLIPCfg:
    """ResCLIP's settings (``ResCLIPSegmentation`` / ``VisionTransformer`` of yvhangyang/ResCLIP, arch
    ``wo_resi``, attention ``resclip``, ``gaussian_std`` 5): the blocks whose query-key attention RCS
    averages (``attn_map[5:9]``), RCS / SFR ``(tau, lambda)`` weights, SFR's ``temp_thd`` (AdaThr),
    ``delete_same_entity``, the PAMR of the first pass (always 10 steps at dilations 8 / 16 there).
    The per-benchmark values are the protocol presets' ``mode_options``; the defaults are the
    ADE20K config's (the repository's segmentor has none: it fails without them)."""

    rcs_blocks: tuple[int, ...] = (5, 6, 7, 8)
    rcs_weights: tuple[float, float] = (2.0, 0.3)
    sfr_weights: tuple[float, float] = (2.1, 0.7)
    temp_thd: float = 0.25
    delete_same_entity: bool = True
    gaussian_std: float = NACLIP_SIGMA
    pamr_iterations: int = 10
    pamr_dilations: tuple[int, ...] = (8, 16)

    @property
    def min_blocks(self) -> int:
        """RCS reads blocks before the last one: the deepest of them plus the last."""
        return max(self.rcs_blocks) + 2

    @classmethod
    def from_options(cls, options: dict | None) -> ResCLIPCfg:
        """A config from a protocol's ``mode_options`` (names as the fields; lists become tuples)."""
        return cfg_from_options(cls, "resclip", options)


RESCLIP = ResCLIPCfg()
RESCLIP_MIN_BLOCKS = RESCLIP.min_blocks  # 10
_SIGHT_BUDGET = 1 << 24  # elements per chunk of the line-of-sight test


def _line_of_sight(cat: torch.Tensor, coords: torch.Tensor, pairs: torch.Tensor, max_steps: int) -> torch.Tensor:
    """ResCLIP's ``check_path`` for the (start, end) patch index ``pairs`` (``M x 2``) -> ``M`` bool:
    the category ``cat`` (``h x w``) is the start's at each sample ``round(start (1 - t) + end t)``,
    ``t`` on a ``max_steps + 1``-point grid of [0, 1] (the image's longest Chebyshev distance), for the
    first ``steps + 1`` samples, ``steps`` = the pair's own Chebyshev distance (as the official code:
    shorter pairs test only the start of their segment)."""
    h, w = cat.shape
    flat = cat.reshape(-1)
    t = torch.linspace(0, 1, steps=max_steps + 1, device=coords.device)
    rank = torch.arange(max_steps + 1, device=coords.device)[None]

    def axis(n):  # the official per-axis sample, round(s (1 - t) + e t), for every (s, e): n x n x (S + 1)
        a = torch.arange(n, device=coords.device)
        return (a[:, None, None] * (1 - t) + a[None, :, None] * t).round().long()

    rows_at, cols_at = axis(h) * w, axis(w)
    out = torch.empty(pairs.shape[0], dtype=torch.bool, device=coords.device)
    chunk = max(1, _SIGHT_BUDGET // (2 * (max_steps + 1)))
    for r0 in range(0, pairs.shape[0], chunk):
        i, j = pairs[r0 : r0 + chunk, 0], pairs[r0 : r0 + chunk, 1]
        start, stop = coords[i], coords[j]
        steps = (stop - start).abs().max(dim=1)[0]
        here = flat[rows_at[start[:, 0], stop[:, 0]] + cols_at[start[:, 1], stop[:, 1]]] == flat[i][:, None]
        out[r0 : r0 + chunk] = (here | ~(rank <= steps[:, None])).all(dim=1)
    return out


def sfr_attention(cat: torch.Tensor, cfg: ResCLIPCfg = RESCLIP) -> torch.Tensor:
    """ResCLIP's ``generate_attention_sfr`` for one image: ``h x w`` patch categories -> ``N x N``
    (``N = h*w``, row-major) attention prior: 1 between patches of one category (and on the
    diagonal); with ``delete_same_entity`` a pair not joined by a same-category line
    (:func:`_line_of_sight`) is decayed by ``exp(-steps / max_steps)``; each row blurred by a 1-D
    Gaussian (``gaussian_std``, size ``min(N, 6 std + 1)`` made odd, zero padding) along the
    flattened patch index, ReLU, rows normalised to sum 1 (+1e-8)."""
    h, w = cat.shape
    n = h * w
    flat = cat.reshape(-1)
    same = (flat[:, None] == flat[None, :]).float()
    same.fill_diagonal_(1.0)
    if cfg.delete_same_entity:
        idx = torch.arange(n, device=cat.device)
        coords = torch.stack([idx // w, idx % w], dim=-1)
        steps = (coords[None] - coords[:, None]).abs().max(dim=-1)[0]
        max_steps = int(steps.max())
        if max_steps > 0:  # only same-category pairs can be decayed (the others are 0 either way)
            pairs = (same > 0).nonzero()
            keep = _line_of_sight(cat, coords, pairs, max_steps)
            decay = torch.exp(-steps / max_steps)
            far = pairs[~keep]
            same[far[:, 0], far[:, 1]] = same[far[:, 0], far[:, 1]] * decay[far[:, 0], far[:, 1]]
    size = min(n, int(6 * cfg.gaussian_std + 1))
    size = size if size % 2 == 1 else size + 1
    x = torch.arange(size, device=cat.device) - size // 2
    kernel = torch.exp(-(x**2) / (2 * cfg.gaussian_std**2))
    kernel = kernel / kernel.sum()
    blurred = F.relu(F.conv1d(same[:, None], kernel.view(1, 1, -1), padding=size // 2)[:, 0])
    return blurred / (blurred.sum(dim=1, keepdim=True) + 1e-8)


def resclip_features(visual, pixels: torch.Tensor, text, cfg: ResCLIPCfg = RESCLIP) -> tuple[torch.Tensor, tuple]:
    """ResCLIP dense tokens of a CLIP ViT ``visual`` (``text``: a :class:`~textseg.models.base.DenseText`)
    -> (``B x h*w x D`` patch features after ``ln_post`` / ``proj``, grid). The steps are the module
    docstring's; every image of a batch is refined by its own segmentation."""
    from textseg.segment.pamr import pamr  # the dense modes sit below the segment package

    n = len(visual.blocks)
    if n < cfg.min_blocks:
        raise TextsegError(f"resclip averages the attention of blocks {', '.join(map(str, cfg.rcs_blocks))}: "
                           f"it needs a ViT of at least {cfg.min_blocks} blocks, this one has {n}")
    if min(cfg.rcs_blocks) < 1:
        raise TextsegError("resclip's rcs_blocks must be >= 1 (their inputs are earlier blocks' outputs)")
    out = visual.forward_intermediates(pixels, indices=list(range(n - 1)), intermediates_only=True,
                                       pos_interp=POS_INTERP["resclip"])
    feats, (h, w) = out.intermediates, out.grid
    x = feats[-1]
    b, t = x.shape[:2]
    prefix = t - h * w
    rcs = 0.0
    for i in cfg.rcs_blocks:  # RCS: the blocks' own softmax(q k^T s), head by head, averaged
        blk = visual.blocks[i]
        q, k, _ = blk.attn.qkv(blk.ln_1(feats[i - 1]))
        rcs = rcs + F.softmax((q * blk.attn.scale) @ k.transpose(-1, -2), dim=-1)
    rcs = rcs / len(cfg.rcs_blocks)
    blk = visual.blocks[-1]
    _, k, v = blk.attn.qkv(blk.ln_1(x))
    kk = (k @ k.transpose(-1, -2)) * blk.attn.scale
    omega = neighbourhood_bias((h, w), cfg.gaussian_std, prefix, x.device, kk.dtype)
    tau_r, lam_r = cfg.rcs_weights

    def attend(sfr: torch.Tensor | None) -> torch.Tensor:
        a = kk
        if sfr is not None:
            tau_s, lam_s = cfg.sfr_weights
            a = tau_s * ((1 - lam_s) * a + lam_s * sfr[:, None])
        a = tau_r * ((1 - lam_r) * F.softmax(a + omega, dim=-1) + lam_r * rcs)
        return visual.head(blk.attn.project(a @ v)[:, prefix:])  # no residual, no FFN; ln_post, proj

    # SFR: segment once (RCS only), PAMR, AdaThr, the patch categories, the prior, attend again
    emb = F.normalize(text.embeddings.to(x.dtype), dim=-1)
    logits = (F.normalize(attend(None), dim=-1) @ emb.t()).transpose(1, 2).reshape(b, -1, h, w)
    size = pixels.shape[-2:]
    logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    logits = pamr(pixels.float(), logits, cfg.pamr_iterations, tuple(cfg.pamr_dilations))
    probs = F.softmax(logits * float(text.logit_scale), dim=1)
    pred = probs.argmax(1)
    pred[probs.max(1)[0] < cfg.temp_thd] = 0
    ps = visual.patch_size  # each patch's pixels (a remainder beyond the grid is dropped, as there)
    patches = pred.unfold(1, ps, ps).unfold(2, ps, ps).reshape(b, h, w, -1)
    cats = torch.mode(patches, dim=-1)[0]
    sfr = kk.new_zeros(b, t, t)
    for i in range(b):
        sfr[i, prefix:, prefix:] = sfr_attention(cats[i], cfg).to(kk.dtype)
    sfr = sfr / sfr.amax(dim=(1, 2), keepdim=True)
    sfr = sfr.to(torch.float16).to(kk.dtype)  # the official casts the prior to float16
    return attend(sfr), (h, w)


def clip_supported_modes(model) -> tuple[str, ...]:
    """The dense modes of a CLIP ``model``, best first (its default): all of ``CLIP_DENSE_MODES``, less
    ``sc-clip`` / ``resclip`` for a ViT with fewer than ``SCCLIP_MIN_BLOCKS`` / ``RESCLIP_MIN_BLOCKS``
    blocks; a ResNet has no ``resclip`` (it needs attention maps). The default (first) is label-free:
    on a 10-block tower (no sc-clip) naclip comes before resclip."""
    blocks = getattr(model.visual, "blocks", None)
    if blocks is None:
        return tuple(m for m in CLIP_DENSE_MODES if m not in CLIP_TEXT_MODES)  # ResNet: the value path
    short = {"sc-clip": SCCLIP_MIN_BLOCKS, "resclip": RESCLIP_MIN_BLOCKS}
    modes = [m for m in CLIP_DENSE_MODES if len(blocks) >= short.get(m, 0)]
    if modes[0] in CLIP_TEXT_MODES:  # the default must run without labels: the best label-free mode first
        first = next(m for m in modes if m not in CLIP_TEXT_MODES)
        modes.remove(first)
        modes.insert(0, first)
    return tuple(modes)


def clip_dense_features(model, pixels: torch.Tensor, mode: str | None = None, text=None,
                        options: dict | None = None) -> torch.Tensor:
    """``B x 3 x H x W`` normalised pixels -> ``B x embed_dim x h x w`` dense features of a CLIP
    ``model`` (ViT: ``h = H // patch_size``; ResNet: ``H // 32``) by ``mode`` (default: the model's
    first, :func:`clip_supported_modes`). ``text`` (a :class:`~textseg.models.base.DenseText`) is
    required by the modes of ``CLIP_TEXT_MODES`` and ignored by the others (a text mode reads its
    settings from ``text.options``). ``options``: a label-free mode's settings (``MODE_CFGS``: ``pearl``'s
    :class:`PEARLCfg` fields, e.g. ``{"alpha_kk": 0.3}``); unknown keys are an error."""
    mode = mode or clip_supported_modes(model)[0]
    if mode not in CLIP_DENSE_MODES:
        raise TextsegError(f"unknown CLIP dense mode {mode!r}; choose one of: {', '.join(CLIP_DENSE_MODES)}")
    visual = model.visual
    if mode in CLIP_TEXT_MODES:
        if text is None:
            raise TextsegError(f"dense mode {mode!r} segments the image inside its forward: it needs the labels, "
                               f"encode_dense(pixels, mode={mode!r}, text=DenseText(embeddings, logit_scale))")
        if not hasattr(visual, "blocks"):
            raise TextsegError(f"dense mode {mode!r} needs a CLIP ViT (attention maps); this CLIP is a ResNet")
        opts = {**(text.options or {}), **(options or {})}
        feats, grid = resclip_features(visual, pixels, text, ResCLIPCfg.from_options(opts))
        return feats.transpose(1, 2).reshape(feats.shape[0], -1, grid[0], grid[1])
    cfg = mode_cfg(mode, options)
    if not hasattr(visual, "blocks"):  # ModifiedResNet
        x = visual.forward_intermediates(pixels, indices=[]).final  # the map the attention pool reads
        pool = visual.attnpool
        b, _, h, w = x.shape
        x = pool.c_proj(pool.v_proj(x.flatten(2).transpose(1, 2)))  # B x hw x D
        return x.transpose(1, 2).reshape(b, -1, h, w)
    if mode == "sc-clip":
        feats, grid = sc_clip_features(visual, pixels)
        return feats.transpose(1, 2).reshape(feats.shape[0], -1, grid[0], grid[1])
    n = len(visual.blocks)
    pos_interp = POS_INTERP[mode]
    if n >= 2:
        out = visual.forward_intermediates(pixels, indices=[n - 2], intermediates_only=True, pos_interp=pos_interp)
        x, grid = out.intermediates[-1], out.grid
    else:
        x, grid = visual.embed(pixels, pos_interp)
    x = last_block(visual.blocks[-1], x, mode, grid, cfg)
    feats = visual.head(x[:, x.shape[1] - grid[0] * grid[1] :])  # patch tokens: ln_post, proj
    return feats.transpose(1, 2).reshape(x.shape[0], -1, grid[0], grid[1])
