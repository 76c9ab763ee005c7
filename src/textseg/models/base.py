"""The interface every image-text model in textseg implements.

CLIP (any loaded format), the offline default model, LSeg and GroupViT all subclass
:class:`DualEncoder`, so the classifier, the :class:`~textseg.segment.segmenter.Segmenter`, the
evaluator and the web app work with any of them unchanged.

Shapes: images are float tensors ``B x 3 x H x W`` already normalised with the model's
``preprocess_cfg`` mean/std; token tensors are ``N x L`` LongTensors from ``model.tokenize``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from textseg.constants import OPENAI_MEAN, OPENAI_STD  # noqa: F401  (re-exported)

CROP_OFFSETS = ("round", "floor")


# ----------------------------------------------------------------------------------------------
# forward_intermediates: one contract for every tower
# ----------------------------------------------------------------------------------------------


@dataclass
class Intermediates:
    """What every tower's ``forward_intermediates`` returns (textseg's one contract).

    Every image tower (CLIP :class:`~textseg.models.clip.VisionTransformer` and
    :class:`~textseg.models.clip.ModifiedResNet`, GroupViT's vision tower and the GroupViT model,
    LSeg's timm ViT, :class:`~textseg.models.efficientnet.EfficientNetLite`, the CAM ResNet-50)
    implements, after timm's method of that name::

        forward_intermediates(x, indices=None, norm=False, output_fmt=..., intermediates_only=False,
                              *, <tower options>) -> Intermediates

    * ``indices``: which blocks (transformers) or stages (CNNs) to return: None = all, an int ``n`` =
      the last ``n``, a sequence = those indices (negatives count from the end); returned in
      increasing order (:func:`resolve_indices`, which also rejects out-of-range ones).
    * ``norm``: pass each intermediate through the tower's final norm (CLIP ``ln_post``, GroupViT
      ``norm``); towers without one ignore it.
    * ``output_fmt``: ``"NLC"`` (tokens ``B x T x C``, prefix/class tokens included; the default of
      token towers) or ``"NCHW"`` (``B x C x h x w`` maps; patch tokens only, reshaped on ``grid``;
      the only format of CNNs). Unlike timm, token towers default to ``"NLC"``.
    * ``intermediates_only``: skip the tower's final features (``final`` is None) and stop after the
      last block/stage needed.
    * tower options (keyword): CLIP ViT ``return_last_qkv`` and ``pos_interp``.

    Fields (also readable by name: ``out["grid"]``, ``out["group_maps"]`` for an ``extras`` entry):

    * ``intermediates``: the selected block/stage outputs, in order.
    * ``grid``: ``(h, w)`` of the patch grid (token towers) or of the deepest map computed (CNNs).
    * ``final``: the tower's final features before pooling / projection (ViT: last block's tokens
      through the final norm; CNN: the last stage's or head's map; GroupViT: the final group
      tokens); None with ``intermediates_only``.
    * ``num_prefix_tokens``: class tokens at the front of each token tensor (CLIP / LSeg ViT: 1).
    * ``last_input``, ``q``, ``k``, ``v``: with ``return_last_qkv`` (CLIP ViT): the input of the last
      block ``B x T x C`` and its attention's per-head ``B x heads x T x head_dim`` projections of
      ``ln_1(last_input)``, unscaled.
    * ``extras``: tower-specific named outputs (GroupViT: ``assignments``, ``group_maps``,
      ``group_embeds``, ``image_embed``).
    """

    intermediates: list[torch.Tensor]
    grid: tuple[int, int]
    final: torch.Tensor | None = None
    num_prefix_tokens: int = 0
    last_input: torch.Tensor | None = None
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)

    def __getitem__(self, name: str):
        if name in _INTERMEDIATES_FIELDS:
            return getattr(self, name)
        return self.extras[name]


_INTERMEDIATES_FIELDS = frozenset(f.name for f in fields(Intermediates)) - {"extras"}
OUTPUT_FORMATS = ("NLC", "NCHW")


@dataclass
class DenseText:
    """The labels a text-conditioned dense mode reads (``encode_dense(pixels, mode, text=...)``).

    Most dense modes are label-free (the image features do not depend on the words, so the
    Segmenter caches them per image). A mode listed in a model's ``text_modes`` (ResCLIP's semantic
    feedback refinement segments the image once inside the forward) needs the labels too:

    * ``embeddings``: ``P x D`` prompt embeddings, one per (class, synonym), in the order the
      Segmenter scores them (the official ``query_features``; normalised by the mode).
    * ``logit_scale``: the factor cosine similarities are multiplied by before the softmax (the
      Segmenter's ``model.logit_scale_value / temperature``; a protocol's ``logit_scale``).
    * ``options``: the mode's settings (e.g. ResCLIP's ``temp_thd``), a protocol preset's
      ``mode_options``; unknown keys are an error.
    """

    embeddings: torch.Tensor
    logit_scale: float = 40.0
    options: dict = field(default_factory=dict)


def resolve_indices(indices: int | Sequence[int] | None, n: int) -> list[int]:
    """``forward_intermediates``' ``indices`` over ``n`` blocks/stages -> sorted unique indices in
    ``range(n)``: None -> all; int k -> the last k; a sequence -> those (negatives from the end)."""
    if indices is None:
        return list(range(n))
    if isinstance(indices, int):
        if not 0 < indices <= n:
            raise ValueError(f"cannot take the last {indices} of {n} blocks")
        return list(range(n - indices, n))
    bad = [i for i in indices if not -n <= i < n]
    if bad:
        raise ValueError(f"block index {bad[0]} out of range for {n} blocks")
    return sorted({i % n for i in indices})


def blocks_to_run(take: Sequence[int], n: int, intermediates_only: bool) -> int:
    """How many of ``n`` blocks/stages must run: all for the final features, else up to the last
    index in ``take``."""
    return n if not intermediates_only else (max(take) + 1 if take else 0)


def format_tokens(tokens: torch.Tensor, grid: tuple[int, int], num_prefix: int, output_fmt: str) -> torch.Tensor:
    """``B x (num_prefix + h*w) x C`` tokens in ``output_fmt``: as they are (``"NLC"``) or the patch
    tokens as a ``B x C x h x w`` map (``"NCHW"``)."""
    if output_fmt == "NLC":
        return tokens
    if output_fmt != "NCHW":
        raise ValueError(f"unknown output_fmt {output_fmt!r}; choose one of {OUTPUT_FORMATS}")
    patches = tokens[:, num_prefix:]
    return patches.transpose(1, 2).reshape(tokens.shape[0], -1, grid[0], grid[1])


@dataclass(frozen=True)
class PreprocessCfg:
    """How pixels must be prepared for a model; travels with its weights (the card).

    Classification input: resize the short side to :attr:`resize_size` (``floor(image_size /
    crop_pct)``, timm's rule: ``crop_pct=1`` is OpenAI CLIP's resize-to-``image_size``, NVlabs
    GroupViT evaluates at ``224 / 256``), centre-crop ``image_size``, ``(x - mean) / std``.
    ``crop_offset``: how an odd margin is split, ``"round"`` as torchvision's ``CenterCrop``
    (OpenAI, OpenCLIP, NVlabs), ``"floor"`` as Hugging Face image processors."""

    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    crop_offset: str = "round"

    def __post_init__(self):
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.crop_offset not in CROP_OFFSETS:
            raise ValueError(f"crop_offset must be one of {CROP_OFFSETS}, got {self.crop_offset!r}")

    @property
    def resize_size(self) -> int:
        """The short side before the centre crop (a hair of slack absorbs float error in ratios)."""
        return int(math.floor(self.image_size / self.crop_pct + 1e-6))

    def to_dict(self) -> dict:
        """The card's ``preprocess`` entry (plain JSON values)."""
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "crop_pct": self.crop_pct, "crop_offset": self.crop_offset}

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessCfg:
        """Inverse of :meth:`to_dict`; cards written before ``crop_pct`` existed read as ``crop_pct=1``."""
        return cls(image_size=int(d["image_size"]), mean=tuple(float(x) for x in d["mean"]),
                   std=tuple(float(x) for x in d["std"]), interpolation=d.get("interpolation", "bicubic"),
                   crop_pct=float(d.get("crop_pct", 1.0)), crop_offset=d.get("crop_offset", "round"))


class DualEncoder(nn.Module):
    """An image encoder and a text encoder that meet in one embedding space.

    Subclasses set ``name``, ``preprocess_cfg``, ``dense_modes`` (first = default) and
    ``dense_stride`` (and ``text_modes``: the dense modes whose features depend on the labels, which
    ``encode_dense`` then reads from its ``text`` argument, a :class:`DenseText`) and implement ``tokenize``, ``encode_image``, ``encode_text`` and
    ``encode_dense``. ``embed_texts``, ``image_logits`` and ``dense_logits`` have defaults that suit
    CLIP-like models and may be overridden (the offline model scores by a ConSE bridge; GroupViT by group assignment).
    """

    name: str = "dual-encoder"
    preprocess_cfg: PreprocessCfg = PreprocessCfg()
    dense_modes: tuple[str, ...] = ("plain",)
    text_modes: tuple[str, ...] = ()  # dense modes that need encode_dense(..., text=DenseText(...))
    dense_stride: int = 16  # input pixels per dense-map cell
    # Probability below which a pixel becomes "background" when the user asks for the model's default.
    default_background_threshold: float | None = None
    # The Segmenter's default resolution for this model: "pixel" (the official slide inference of the
    # training-free CLIP methods, mmseg's) or "canvas" (patch cells; textseg's own models tuned there).
    segment_resolution: str = "pixel"

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``B x 3 x H x W`` -> ``B x D`` global image embeddings."""
        raise NotImplementedError

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``N x L`` tokens -> ``N x D`` text embeddings."""
        raise NotImplementedError

    def encode_dense(self, pixels: torch.Tensor, mode: str | None = None, text: DenseText | None = None,
                     options: dict | None = None) -> torch.Tensor:
        """``B x 3 x H x W`` -> ``B x D x h x w`` dense features in the text embedding space.

        ``text``: the labels, read only by the modes in ``text_modes`` (required there); the other
        modes ignore it. ``options``: a label-free mode's settings (``SegmentCfg.mode_options``; CLIP's
        ``pearl``), unknown keys an error; passed by the Segmenter only when non-empty. Models without
        text modes or mode settings may keep the two-argument signature."""
        raise NotImplementedError

    @property
    def logit_scale_value(self) -> torch.Tensor:
        scale = getattr(self, "logit_scale", None)
        if scale is None:
            return torch.tensor(100.0)
        return scale.exp() if isinstance(scale, torch.Tensor) else torch.tensor(float(scale))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], templates: Sequence[str] = ("{}",)) -> torch.Tensor:
        """One L2-normalised embedding per text, averaged over the prompt ``templates``
        (each containing ``{}``) as in CLIP's prompt ensembling -> ``N x D``."""
        prompts = [t.format(x) for x in texts for t in templates]
        device = next(self.parameters()).device
        emb = self.encode_text(self.tokenize(prompts).to(device), normalize=True)
        emb = emb.view(len(texts), len(templates), -1).mean(dim=1)
        return F.normalize(emb, dim=-1)

    def image_logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``B x D`` image embeddings (from :meth:`encode_image`, normalised or not) and ``N x D``
        text embeddings -> ``B x N`` image-level logits ``logit_scale * cos(image, text)``: what
        CLIP's ``forward`` (and every CLIP-like model's) scores, so a softmax gives zero-shot
        classification probabilities. Models that do not score by cosine override it."""
        image = F.normalize(image.to(text.dtype), dim=-1)
        return self.logit_scale_value.to(text.dtype) * image @ F.normalize(text, dim=-1).t()

    def dense_logits(self, dense: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``B x D x h x w`` dense features and ``N x D`` text embeddings -> ``B x N x h x w`` logits."""
        dense = F.normalize(dense, dim=1)
        return self.logit_scale_value * torch.einsum("bdhw,nd->bnhw", dense, F.normalize(text, dim=-1))

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP-style logits ``(logits_per_image B x N, logits_per_text N x B)``."""
        logits = self.image_logits(self.encode_image(pixels), self.encode_text(tokens))
        return logits, logits.t()
