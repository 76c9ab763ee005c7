"""The Segmenter: an image and any words in, per-pixel logits and a label map out.

Predictor style (like segment-anything's): ``set_image`` runs the image tower once and caches the
dense features; ``predict(labels)`` only embeds the labels (cached too) and scores the cached
features, so trying other words on the same image costs almost nothing::

    from textseg.segment import Segmenter, SegmentCfg
    seg = Segmenter(model, SegmentCfg(slide=(224, 112), threshold=0.5))
    seg.set_image("photo.jpg")                 # path, PIL, numpy HxWxC uint8, bytes
    res = seg.predict("cat, dog; puppy, grass")  # or ["cat", "dog; puppy", "grass"]
    res.label_map      # H x W (original size) indices into res.labels
    res.labels         # ["cat", "dog", "grass", "background"] (background added by the threshold)
    res.logits         # N x H x W at the original size (lazy); res.probs = softmax over labels
    res.fractions      # {"cat": 0.41, ...} pixel fraction per label

It works through the :class:`~textseg.models.base.DualEncoder` interface only (``encode_dense``,
``embed_texts``, ``dense_logits``, ``dense_stride``, ``dense_modes``, ``preprocess_cfg``), so CLIP,
the offline model, LSeg and GroupViT all run unchanged.

Pipeline (``resolution="pixel"``, the default: SCLIP / NACLIP / ClearCLIP ``forward_slide`` /
``predict`` / ``postprocess_result`` over mmseg's ``Resize(keep_ratio=True)``): resize to the exact
keep-ratio size (mmcv's ``int(side * scale + 0.5)``) -> whole image or crops of exactly ``crop`` pixels
(the last aligned to the border; optionally also flipped / at several scales) -> dense features
(cached; the patch convolution drops a crop's remainder) -> per-prompt logits divided by
``temperature``, each crop's bilinearly upsampled to its pixels and averaged on a pixel canvas ->
bilinear to the original size (optional PAMR there, on the per-prompt logits) -> softmax over all
prompts, max over each class's synonyms, ``area_threshold``, argmax, background where the best
probability is below ``threshold``, ``min_area`` -- at the original size, in class chunks and row bands.

``resolution="canvas"`` (textseg's, faster): sizes, crops and strides are rounded to multiples of the
model's dense stride, synonyms max-pooled per crop, crop logits averaged per patch cell, PAMR /
background / ``min_area`` on that canvas, then bilinear upsampling to the original size, band by band.

Text modes (a model's ``text_modes``; CLIP ``resclip``): the dense features depend on the labels, so
``set_image`` keeps the crops and ``predict`` encodes them with ``encode_dense(crops, mode, text=DenseText(
prompt embeddings, model.logit_scale_value / temperature, cfg.mode_options))``, again when the prompts change.

Pixel modes (a model's ``pixel_modes``; GroupViT's default ``"official"``): the model's own official
inference replaces ``encode_dense`` / ``dense_logits``. ``set_image`` caches
``model.official_features`` per crop; ``predict`` computes ``model.official_scores`` (GroupViT:
NVlabs' image-level top-5 mask, product of two softmaxes, group argmax after upsampling) and the
background channel of ``model.official_background`` at the crop's pixel resolution, averages those
per-class scores over overlapping windows on a pixel canvas (mmseg ``slide_inference``), and resizes
them bilinearly to the original size before the argmax. The resize follows mmcv's keep-ratio rule
(``int(side * scale + 0.5)``, no rounding to the patch size). With a threshold, a ``background``
label is not scored as text (NVlabs' ``with_bg``) unless ``background_words`` are given; the
``temperature`` divides the model's logit scale.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from textseg import viz
from textseg.errors import TextsegError
from textseg.io import load_image
from textseg.precision import autocast, resolve_precision, to_float32
from textseg.preprocess import canvas_size, keep_ratio_size, normalize, resize_to_tensor
from textseg.segment.pamr import NACLIP_DILATIONS, pamr
from textseg.segment.slide import BAND_BUDGET, argmax_bands, crop_boxes, stitch, upsample, upsample_bands
from textseg.segment.tlp import TLP_GRID, laplacian_propagation
from textseg.text import BACKGROUND, LabelClass, TextEmbeddingCache, parse_labels

Labels = str | Sequence[str | Sequence[str] | LabelClass]
PAMR_RESOLUTIONS = ("original", "canvas")
RESOLUTIONS = ("auto", "pixel", "canvas")
DEFAULT_SHORT_SIDE = 448  # SegmentCfg.short_side "auto" for models without a segment_short_side
# Elements of one query-chunk pixel canvas in the pixel-resolution path (256 MiB of float32).
PIXEL_BUDGET = 1 << 26
# Elements of the stored per-class record (logits_lowres) in the pixel-resolution path (512 MiB).
RECORD_BUDGET = 1 << 27


@dataclass(frozen=True)
class PamrSettings:
    """PAMR as one Segmenter runs it (:meth:`Segmenter.pamr_in_force`): steps, dilations, ``"original"`` /
    ``"canvas"`` resolution and the canvas variant's image stride."""

    iterations: int = 10
    dilations: tuple[int, ...] = NACLIP_DILATIONS
    resolution: str = "original"
    stride: int = 4

    def __post_init__(self):
        object.__setattr__(self, "dilations", tuple(int(d) for d in self.dilations))


@dataclass
class SegmentCfg:
    """Options of dense segmentation (all have working defaults).

    mode: the model's dense mode (``model.dense_modes``; None = the model's default, its first).
    short_side: resize so the short side has this many pixels (None = keep the image's scale).
        ``"auto"`` (default): the model's ``segment_short_side`` (448 unless the model says otherwise;
        the offline v2 model's is its ``OfflineCfg.short_side``).
    max_side: cap on the resized long side (very elongated or huge images are scaled down to it).
    slide: ``(crop, stride)`` sliding-window inference, None = the whole image in one pass. At
        ``resolution="canvas"`` crop, stride and the resized size are rounded to multiples of the
        model's ``dense_stride``.
    resolution: ``"auto"`` (default): the model's ``segment_resolution`` (``"pixel"`` unless the model
        says otherwise: textseg's own offline and CAM models, tuned on the canvas, say ``"canvas"``).
        ``"pixel"`` (the official SCLIP / NACLIP / ClearCLIP inference, mmseg's
        slide inference): the image is resized to the exact keep-ratio size (mmcv's
        ``int(side * scale + 0.5)``), crops are exactly ``crop`` pixels (the last one aligned to the
        border), each crop's per-prompt logits are bilinearly upsampled to the crop's pixels and
        averaged on a pixel canvas, then upsampled to the original size, where the softmax over all
        prompts, the max over each class's synonyms, ``area_threshold``, the argmax and the
        background ``threshold`` (max probability below it) are taken, band by band.
        ``"canvas"`` (textseg's, faster): sizes, crops and strides are rounded to multiples of the
        dense stride, crops are averaged per patch cell, synonyms max-pooled and thresholds applied
        at patch resolution before the final bilinear upsampling. Pixel modes (GroupViT
        ``official``) always run at pixel resolution.
    scales: extra short-side multipliers for multi-scale inference (1.0 = ``short_side`` only).
    flip: also run the horizontally flipped image and average the logits. ``"auto"`` (default): the
        model's ``segment_flip`` (False unless the model says otherwise; the offline v2 model's is its
        ``OfflineCfg.flip``).
    templates: prompt templates: "imagenet" (80), "simple", "none", or a tuple of "{}" templates.
    temperature: logits are divided by it before softmax / thresholding / averaging.
    threshold: pixels whose best class probability is below it become background; "auto" = the
        model's ``default_background_threshold``; None or 0 = no threshold. In a pixel mode
        (GroupViT ``official``) it is the model's own rule (GroupViT: best score below
        ``min(threshold, best group probability)``, per window). A model with its own rule
        defines ``background_logits(logits, threshold)`` (CAM networks: every map below it).
    background_words: extra words (e.g. ("sky", "wall", "floor")) scored as synonyms of background.
    min_area: classes covering less than this fraction of the image are dropped (their pixels go to
        the next best label).
    area_threshold: SCLIP's ``area_thd`` (needs a ``background`` label): before the background
        threshold, non-background classes covering at most this fraction of the non-background
        arg-max pixels get probability 0 (their pixels go to the next best label).
    pamr: refine the logits with PAMR (``pamr_iterations`` steps at ``pamr_dilations``; defaults 10 and
        (8, 16), SCLIP's / NACLIP's). ``"auto"`` (default): the model's ``default_pamr`` (None for all
        models but the offline v2 default, whose own settings then apply: see
        :attr:`~textseg.models.offline.OfflineModel.default_pamr`), else off; True / False: on / off with
        the settings below. ``pamr_resolution="original"`` (default, NACLIP's / SCLIP's):
        logits and the resized network input are bilinearly resized to the original image size and
        refined there; ``"canvas"`` (cheaper, textseg's): the logits are refined on the resized image
        downsampled by ``pamr_stride``.
    propagation: a logit refinement after the dense features: None (default) or ``"tlp"``, PEARL's
        text-aware Laplacian propagation (:mod:`textseg.segment.tlp`; ``tlp_grid`` 80, Cityscapes 224)
        of the per-prompt cosine logits with the network input, both at the original size, before the
        logit scale (``pearl_ovss.py`` ``predict``). Pixel resolution only; not with ``pamr``.
    batch_size: crops per image-tower forward pass.
    precision: the image tower's precision (:mod:`textseg.precision`): ``"fp32"``, ``"bf16"``,
        ``"fp16"`` or ``"auto"`` (bf16 on CPUs with native bf16 and on CUDA capability >= 8, fp16 on
        older CUDA, else fp32); None = the model's ``inference_precision`` (set by
        ``load_model(precision=...)``), else fp32. The dense features are cast back to float32, so
        logits, softmax, thresholds and PAMR are float32 at every precision.
    cache_dir: directory for the on-disk text-embedding cache (None = memory only).
    mode_options: settings of the dense mode (a protocol's ``mode_options``; unknown keys are an error).
        A label-free mode's (CLIP ``pearl``: ``{"alpha_kk": 0.3}``) go to ``encode_dense(..., options=)``;
        they are fixed per Segmenter, so its features stay cached per image. A text-conditioned
        mode's (a model's ``text_modes``, e.g. ResCLIP's ``temp_thd``) are passed as
        ``DenseText.options``. Such a mode's features depend on the labels: ``set_image`` keeps the crops and ``predict`` encodes them with
        the prompt embeddings (``P x D``, one per class synonym, the order scored) and the logit scale
        ``model.logit_scale_value / temperature``, again whenever the prompts change.
    """

    mode: str | None = None
    short_side: int | str | None = "auto"
    max_side: int = 1792
    slide: tuple[int, int] | None = None
    resolution: str = "auto"
    scales: tuple[float, ...] = (1.0,)
    flip: bool | str = "auto"
    templates: str | tuple[str, ...] = "imagenet"
    temperature: float = 1.0
    threshold: float | str | None = "auto"
    background_words: tuple[str, ...] = ()
    min_area: float = 0.0
    area_threshold: float | None = None
    pamr: bool | str = "auto"
    pamr_iterations: int = 10
    pamr_dilations: tuple[int, ...] = NACLIP_DILATIONS
    pamr_resolution: str = "original"
    pamr_stride: int = 4
    propagation: str | None = None
    tlp_grid: int = TLP_GRID
    batch_size: int = 4
    precision: str | None = None
    cache_dir: str | None = None
    mode_options: dict = field(default_factory=dict)


@dataclass
class SegmentResult:
    """Output of :meth:`Segmenter.predict`.

    labels: names in label-map index order (an added ``background`` comes last).
    logits_lowres: ``N x h x w`` scaled logits (after temperature, background, PAMR) on the canvas
        (at the original size after PAMR at ``pamr_resolution="original"``; pixel modes: the official
        per-class scores at the resized image's pixels, mmseg's ``seg_logit``; ``probs`` is then
        mmseg's softmax output).
    label_map: ``H x W`` numpy array at the original size (uint8 for <= 255 labels, else int32).
    fractions: pixel fraction of each label in ``label_map``.
    background_index: index of the background label, or None.
    dropped: labels removed by ``min_area``.
    timings: seconds per stage.
    precision: the image tower's resolved precision (``fp32`` / ``bf16`` / ``fp16``).
    """

    labels: list[str]
    logits_lowres: torch.Tensor
    size: tuple[int, int]
    label_map: np.ndarray
    fractions: dict[str, float]
    background_index: int | None = None
    dropped: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    precision: str = "fp32"

    @property
    def logits(self) -> torch.Tensor:
        """``N x H x W`` logits at the original image size (bilinear; computed on access)."""
        return upsample(self.logits_lowres.float().cpu(), self.size)

    @property
    def probs(self) -> torch.Tensor:
        """``N x H x W`` softmax over labels at the original size."""
        return self.logits.softmax(dim=0)

    def to_record(self) -> dict:
        """The per-image JSON record, the same for ``textseg segment`` (its ``<stem>.json`` and
        ``--json`` lines) and the web app's ``/v1/segment``: ``labels`` (names in label-map index
        order), ``legend`` (per label: ``name``, ``index``, ``color`` = RGB of the mask / overlay
        palette, ``fraction``), ``fractions`` (name -> pixel fraction), ``background_index``,
        ``dropped``, ``width``, ``height``, ``precision`` (the image tower's) and ``timings`` (seconds
        per stage). Callers add their
        own keys (files written, image id, model, mode)."""
        colors = viz.palette(self.labels, self.background_index)
        return {
            "labels": list(self.labels),
            "legend": [{"name": n, "index": i, "color": [int(c) for c in colors[i]], "fraction": self.fractions[n]}
                       for i, n in enumerate(self.labels)],
            "fractions": dict(self.fractions),
            "background_index": self.background_index,
            "dropped": list(self.dropped),
            "width": int(self.size[1]),
            "height": int(self.size[0]),
            "precision": self.precision,
            "timings": {k: round(float(v), 6) for k, v in self.timings.items()},
        }

    def mask_image(self) -> Image.Image:
        """The label map as a PNG-ready image (palette; 16-bit beyond 255 labels; 255 = unlabelled)."""
        return viz.label_map_image(self.label_map, self.labels, self.background_index)

    def overlay(self, image, legend: bool = True) -> Image.Image:
        """The label map blended over ``image`` (the segmented image), with a legend of fractions."""
        return viz.overlay(load_image(image), self.label_map, self.labels, background_index=self.background_index,
                           fractions=self.fractions, legend=legend)


@dataclass
class PreparedImage:
    """An image decoded, resized, normalised and cropped for the tower (:meth:`Segmenter.prepare`).

    views: per view (scale x flip) ``(crops K x 3 x h x w, boxes, canvas_hw, flipped)``.
    """

    size: tuple[int, int]
    views: list[tuple[torch.Tensor, list, tuple[int, int], bool]]
    image_small: torch.Tensor | None
    image_input: torch.Tensor | None
    seconds: float = 0.0


@dataclass
class _View:
    feats: torch.Tensor | dict | None  # K x D x h' x w' dense features of K crops (pixel modes: a dict of K-batches)
    boxes: list[tuple[int, int, int, int]]
    canvas_hw: tuple[int, int]
    flipped: bool
    crops: torch.Tensor | None = None  # a text mode's K x 3 x h x w crops, encoded once the labels are known
    text_key: tuple | None = None  # the prompts ``feats`` were computed with (text modes)


class Segmenter:
    """Zero-shot dense segmentation with any :class:`~textseg.models.base.DualEncoder`.

    ``labels`` given here are the default for :meth:`predict`.
    """

    def __init__(self, model, cfg: SegmentCfg | None = None, labels: Labels | None = None):
        self.model = model.eval()
        self.cfg = cfg or SegmentCfg()
        modes = tuple(getattr(model, "dense_modes", ()) or ())
        if self.cfg.mode is not None and modes and self.cfg.mode not in modes:
            raise TextsegError(
                f"model {getattr(model, 'name', type(model).__name__)!r} has no dense mode {self.cfg.mode!r}; "
                f"choose one of: {', '.join(modes)}"
            )
        self.mode = self.cfg.mode or (modes[0] if modes else None)
        if self.cfg.mode is None and getattr(model, "dense_runtime", None) is not None:
            self.mode = model.dense_runtime.mode  # an ONNX export's mode is the default
        # A pixel mode is scored by the model's official per-pixel inference on a pixel canvas.
        self.pixel_mode = self.mode is not None and self.mode in tuple(getattr(model, "pixel_modes", ()) or ())
        # A text mode (ResCLIP) reads the labels inside the image forward: encoded at predict time.
        self.text_mode = (not self.pixel_mode and self.mode is not None
                          and self.mode in tuple(getattr(model, "text_modes", ()) or ()))
        if self.cfg.resolution not in RESOLUTIONS:
            raise TextsegError(f"resolution must be one of {', '.join(RESOLUTIONS)}, got {self.cfg.resolution!r}")
        # Pixel resolution: exact keep-ratio resize, exact crops, a pixel canvas (cell = 1 pixel).
        resolution = self.cfg.resolution
        if resolution == "auto":
            resolution = getattr(model, "segment_resolution", "pixel")
        self.pixel_res = self.pixel_mode or resolution == "pixel"
        short_side = self.cfg.short_side
        if short_side == "auto":
            short_side = getattr(model, "segment_short_side", DEFAULT_SHORT_SIDE)
        if short_side is not None and (isinstance(short_side, (str, bool)) or int(short_side) != short_side
                                       or short_side < 1):
            raise TextsegError(f"short_side must be a positive integer, None or 'auto', got {self.cfg.short_side!r}")
        self.short_side = None if short_side is None else int(short_side)
        flip = getattr(model, "segment_flip", False) if self.cfg.flip == "auto" else self.cfg.flip
        if not isinstance(flip, bool):
            raise TextsegError(f"flip must be True, False or 'auto', got {self.cfg.flip!r}")
        self.flip = flip
        self.cell = 1 if self.pixel_res else int(getattr(model, "dense_stride", 16))
        if self.cfg.pamr_resolution not in PAMR_RESOLUTIONS:
            raise TextsegError(f"pamr_resolution must be one of {', '.join(PAMR_RESOLUTIONS)}, "
                               f"got {self.cfg.pamr_resolution!r}")
        if self.cfg.propagation not in (None, "tlp"):
            raise TextsegError(f"propagation must be None or 'tlp', got {self.cfg.propagation!r}")
        if self.cfg.pamr not in (True, False, "auto"):
            raise TextsegError(f"pamr must be True, False or 'auto', got {self.cfg.pamr!r}")
        if self.cfg.propagation and (self.cfg.pamr is True or not self.pixel_res or self.pixel_mode):
            raise TextsegError("propagation='tlp' refines pixel-resolution logits of a dense model (resolution="
                               "'pixel') and replaces PAMR: drop pamr or propagation")
        if self.cfg.temperature <= 0:
            raise TextsegError(f"temperature must be positive, got {self.cfg.temperature}")
        self.text_cache = TextEmbeddingCache.for_model(model, self.cfg.cache_dir)
        wanted = self.cfg.precision if self.cfg.precision is not None else getattr(model, "inference_precision", None)
        self.precision = resolve_precision(wanted, self.device)  # fp32 / bf16 / fp16, resolved once
        if getattr(model, "inference_cast", None) == "weights" and self.precision == "fp32":
            raise TextsegError("the image tower's weights were cast to reduced precision (cast_weights); "
                               "fp32 needs the model loaded without it")
        # an exported ONNX dense graph (textseg.export.load_onnx) replaces the PyTorch tower (fp32)
        self.runtime = None if self.pixel_mode else getattr(model, "dense_runtime", None)
        if self.cfg.mode_options and not self.text_mode and (
                self.pixel_mode or self.runtime is not None
                or "options" not in inspect.signature(model.encode_dense).parameters):
            raise TextsegError(f"mode_options {sorted(self.cfg.mode_options)} need a dense mode that takes settings "
                               f"(CLIP pearl, resclip); {self.mode!r} of this model does not")
        if self.runtime is not None:
            if self.runtime.mode != self.mode:
                raise TextsegError(f"the ONNX graph was exported for dense mode {self.runtime.mode!r}, not "
                                   f"{self.mode!r}; export that mode or drop --mode")
            self.precision = "fp32"
        self.labels = labels
        self._views: list[_View] = []
        self._image_small: torch.Tensor | None = None  # 1 x 3 x h x w in [0, 1], for PAMR ("canvas")
        self._image_input: torch.Tensor | None = None  # 1 x 3 x h x w normalised input, for PAMR ("original")
        self.image_size: tuple[int, int] | None = None  # (H, W) of the original image
        self.timings: dict[str, float] = {}

    def feature_nbytes(self) -> int:
        """Bytes held by the cached image features of :meth:`set_image` (what a cache bounds)."""

        def size(x) -> int:
            if isinstance(x, torch.Tensor):
                return x.element_size() * x.nelement()
            if isinstance(x, dict):
                return sum(size(v) for v in x.values())
            if isinstance(x, (list, tuple)):
                return sum(size(v) for v in x)
            return 0

        return (size([v.feats for v in self._views]) + size([v.crops for v in self._views])
                + size([self._image_small, self._image_input]))

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    # ---------------------------------------------------------------- image side
    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor, text=None) -> torch.Tensor:
        p = next(self.model.parameters(), None)
        dtype = p.dtype if p is not None and p.dtype.is_floating_point else torch.float32
        feats = []
        for i in range(0, pixels.shape[0], max(1, self.cfg.batch_size)):
            x = pixels[i : i + self.cfg.batch_size].to(self.device, dtype)
            if self.runtime is not None:
                feats.append(self.runtime(x))
                continue
            with autocast(self.precision, self.device):  # the tower only; its output back to float32
                if self.pixel_mode:
                    feats.append(to_float32(self.model.official_features(x)))
                elif text is not None:
                    feats.append(to_float32(self.model.encode_dense(x, mode=self.mode, text=text)))
                elif self.cfg.mode_options:  # a label-free mode's settings (fixed per Segmenter: cacheable)
                    feats.append(to_float32(self.model.encode_dense(x, mode=self.mode,
                                                                    options=dict(self.cfg.mode_options))))
                else:
                    feats.append(to_float32(self.model.encode_dense(x, mode=self.mode)))
        if self.pixel_mode:
            return {k: torch.cat([f[k] for f in feats]) for k in feats[0]}
        return torch.cat(feats)

    def _resized(self, height: int, width: int, short: int | None) -> tuple[int, int]:
        if not self.pixel_res:
            return canvas_size(height, width, short, self.cfg.max_side, self.cell)
        # mmcv's keep-ratio Resize (the official pipelines, mmseg Resize(scale=(max_side, short),
        # keep_ratio=True)); an image side below the patch size is grown to one patch (the official
        # code would fail there)
        least = 1 if self.pixel_mode else int(getattr(self.model, "dense_stride", 1))
        h, w = keep_ratio_size(height, width, short, self.cfg.max_side)
        return max(least, h), max(least, w)

    def _crop_geometry(self, size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
        if self.cfg.slide is None:
            return [(0, 0, size[0], size[1])]
        crop, stride = self.cfg.slide
        c = self.cell
        crop, stride = max(c, round(crop / c) * c), max(c, round(stride / c) * c)
        return crop_boxes(size[0], size[1], crop, stride)

    @torch.no_grad()
    def prepare(self, image) -> PreparedImage:
        """Decode, resize, normalise and crop ``image`` (path, bytes, PIL, numpy HxW[xC] uint8, or a
        ``3 x H x W`` uint8 tensor) for the image tower, without running it: the CPU half of
        :meth:`set_image`, safe to call from background threads (:mod:`textseg.pipeline`)."""
        t0 = time.perf_counter()
        if isinstance(image, torch.Tensor):
            if image.dim() != 3 or image.shape[0] not in (1, 3) or image.dtype != torch.uint8:
                raise TextsegError("tensor images must be 3 x H x W (or 1 x H x W) uint8")
            image = image.expand(3, -1, -1).permute(1, 2, 0).cpu().numpy()
        img = load_image(image if not isinstance(image, Path) else str(image))
        views: list[tuple[torch.Tensor, list, tuple[int, int], bool]] = []
        small = first = None
        scales = tuple(self.cfg.scales) or (1.0,)
        for si, s in enumerate(scales):
            short = None if self.short_side is None else max(1, round(self.short_side * s))
            if short is None and s != 1.0:
                short = max(1, round(min(img.height, img.width) * s))
            size = self._resized(img.height, img.width, short)
            pcfg = self.model.preprocess_cfg
            x = resize_to_tensor(img, size, pcfg.interpolation)  # 1 x 3 x H' x W' in [0, 1]
            if si == 0 and (pm := self.pamr_in_force()) and pm.resolution != "original":  # PAMR's canvas image
                small = self._pamr_small(x)
            x = normalize(x, pcfg.mean, pcfg.std, inplace=True)  # x is this call's own fresh tensor
            if si == 0:
                first = x
            boxes = self._crop_geometry(size)
            for flipped in (False, True) if self.flip else (False,):
                xi = x.flip(-1) if flipped else x
                if len(boxes) == 1 and boxes[0] == (0, 0, *size):  # the whole image: no copy
                    crops = xi.contiguous()
                else:
                    crops = torch.cat([xi[:, :, y0:y1, x0:x1] for y0, x0, y1, x1 in boxes])
                views.append((crops, boxes, size, flipped))
        return PreparedImage((img.height, img.width), views, small, first, time.perf_counter() - t0)

    def _pamr_small(self, x: torch.Tensor) -> torch.Tensor:
        """The resized image ``1 x 3 x H' x W'`` in [0, 1] downsampled by ``pamr_stride`` (area): the
        image textseg's canvas PAMR refines against."""
        ps = max(1, self.pamr_in_force().stride)
        return F.interpolate(x, size=(max(1, x.shape[-2] // ps), max(1, x.shape[-1] // ps)), mode="area")

    def pamr_in_force(self) -> PamrSettings | None:
        """The PAMR settings in force (None: off): ``cfg.pamr`` True -> the cfg's ``pamr_*`` fields;
        ``"auto"`` -> the model's ``default_pamr`` (a dict of :class:`PamrSettings` fields; not for pixel
        modes, text-aware propagation or an exported ONNX graph's own model), else off. Read at every
        call, so switching ``cfg.pamr`` after :meth:`set_image` takes effect."""
        c = self.cfg
        if c.pamr is True:
            return PamrSettings(c.pamr_iterations, tuple(c.pamr_dilations), c.pamr_resolution, c.pamr_stride)
        if c.pamr != "auto" or self.pixel_mode or c.propagation:
            return None
        own = getattr(self.model, "default_pamr", None)
        if not own:
            return None
        pm = PamrSettings(**own)
        if pm.resolution not in PAMR_RESOLUTIONS:
            raise TextsegError(f"the model's default_pamr resolution must be one of {', '.join(PAMR_RESOLUTIONS)}, "
                               f"got {pm.resolution!r}")
        return pm if pm.iterations > 0 else None

    def _pamr_image(self) -> torch.Tensor:
        """:meth:`_pamr_small` of the current image; made from the cached network input when PAMR was
        turned on after the image was prepared (prepare skips it when PAMR is off)."""
        if self._image_small is None:
            pcfg = self.model.preprocess_cfg
            std = torch.tensor(pcfg.std, dtype=self._image_input.dtype).view(-1, 1, 1)
            mean = torch.tensor(pcfg.mean, dtype=self._image_input.dtype).view(-1, 1, 1)
            self._image_small = self._pamr_small(self._image_input * std + mean)
        return self._image_small

    @torch.no_grad()
    def encode_prepared(self, items: Sequence[PreparedImage]) -> list[list[_View]]:
        """Run the image tower over the crops of several prepared images at once: crops of the same
        size (same-size images, or the crops of a sliding window) share forward passes of
        ``cfg.batch_size`` crops; returns each image's views (its cached dense features)."""
        if self.text_mode:  # encoded by _text_features once the labels are known
            return [[_View(None, boxes, size, flipped, crops=crops) for crops, boxes, size, flipped in item.views]
                    for item in items]
        groups: dict[tuple, list[tuple[int, int]]] = {}
        for i, item in enumerate(items):
            for v, (crops, *_rest) in enumerate(item.views):
                groups.setdefault(tuple(crops.shape[1:]), []).append((i, v))
        feats: dict[tuple[int, int], torch.Tensor | dict] = {}
        for members in groups.values():
            sizes = [items[i].views[v][0].shape[0] for i, v in members]
            out = self._encode(torch.cat([items[i].views[v][0] for i, v in members]))
            parts = ({k: t.split(sizes) for k, t in out.items()} if isinstance(out, dict) else out.split(sizes))
            for j, key in enumerate(members):
                feats[key] = {k: p[j] for k, p in parts.items()} if isinstance(parts, dict) else parts[j]
        return [[_View(feats[(i, v)], boxes, size, flipped) for v, (_, boxes, size, flipped) in enumerate(item.views)]
                for i, item in enumerate(items)]

    def set_encoded(self, item: PreparedImage, views: list[_View], seconds: float = 0.0) -> None:
        """Cache ``views`` (``encode_prepared([item, ...])``'s entry for ``item``, e.g. computed by a
        batched forward elsewhere) as the current image's features, like :meth:`set_image`."""
        self._use(item, views, seconds)

    def _use(self, item: PreparedImage, views: list[_View], seconds: float) -> None:
        self.image_size = item.size
        self._views = views
        self._image_small, self._image_input = item.image_small, item.image_input
        self.timings = {"encode_image": seconds}

    @torch.no_grad()
    def set_image(self, image) -> None:
        """Compute and cache the dense features of ``image`` (path, bytes, PIL, numpy HxW[xC] uint8,
        or a ``3 x H x W`` uint8 tensor, or a :class:`PreparedImage` from :meth:`prepare`)."""
        t0 = time.perf_counter()
        item = image if isinstance(image, PreparedImage) else self.prepare(image)
        views = self.encode_prepared([item])[0]
        self._use(item, views, time.perf_counter() - t0)

    def segment_batch(self, images: Sequence, labels: Labels | None = None) -> list[SegmentResult]:
        """:meth:`segment` of several images (or :class:`PreparedImage`\\ s) with one batched tower
        pass over their same-size crops; the results equal one :meth:`segment` per image (the cached
        features are the last image's). ``timings["encode_image"]`` is each image's share."""
        t0 = time.perf_counter()
        items = [im if isinstance(im, PreparedImage) else self.prepare(im) for im in images]
        views = self.encode_prepared(items)
        share = (time.perf_counter() - t0) / max(1, len(items))
        out = []
        for item, v in zip(items, views):
            self._use(item, v, share)
            out.append(self.predict(labels))
        return out

    # ---------------------------------------------------------------- text side
    def _classes(self, labels: Labels | None) -> tuple[list[LabelClass], int | None, float | None]:
        if labels is None:
            labels = self.labels
        if labels is None:
            raise TextsegError("no labels: pass labels to predict() or to Segmenter(...)")
        classes = parse_labels(labels)
        bg = next((i for i, c in enumerate(classes) if c.name.lower() == BACKGROUND), None)
        words = tuple(w for w in (self.cfg.background_words or ()) if w.strip())
        if words:
            if bg is None:
                classes.append(LabelClass(BACKGROUND, words))
                bg = len(classes) - 1
            else:
                c = classes[bg]
                classes[bg] = LabelClass(c.name, c.synonyms + tuple(w for w in words if w not in c.synonyms))
        t = self.cfg.threshold
        if t == "auto":
            t = getattr(self.model, "default_background_threshold", None)
        if isinstance(t, str):
            raise TextsegError(f"threshold must be a number, 'auto' or None, got {t!r}")
        if t is not None and not 0 <= t <= 1:
            raise TextsegError(f"background threshold must be in [0, 1], got {t}")
        return classes, bg, (t or None)

    def _prompts(self, classes: list[LabelClass]) -> tuple[torch.Tensor, torch.Tensor]:
        """One embedding per (class, synonym) prompt ``P x D`` and its class index ``P`` (the official
        ``query_features`` / ``query_idx``); texts are embedded once each (cached)."""
        texts = list(dict.fromkeys(s for c in classes for s in c.synonyms))
        index = {t: i for i, t in enumerate(texts)}
        pairs = [(ci, index[s]) for ci, c in enumerate(classes) for s in c.synonyms]
        t0 = time.perf_counter()
        emb = self.text_cache.embed(texts, self.cfg.templates).to(self.device)
        self.timings["embed_text"] = time.perf_counter() - t0
        emb = emb[torch.tensor([p[1] for p in pairs], device=self.device)]
        if self.text_mode:
            self._text_features(emb, (tuple(texts[p[1]] for p in pairs), str(self.cfg.templates)))
        return emb, torch.tensor([p[0] for p in pairs], device=self.device)

    def _text_features(self, emb: torch.Tensor, key: tuple) -> None:
        """A text mode's dense features for the prompts ``emb`` (``P x D``): each view's crops encoded
        with :class:`~textseg.models.base.DenseText` (kept until the prompts change)."""
        from textseg.models.base import DenseText

        scale = float(self.model.logit_scale_value.detach()) / self.cfg.temperature
        key = (*key, scale)
        text = DenseText(emb, scale, dict(self.cfg.mode_options or {}))
        for view in self._views:  # its time counts in predict's "logits" timing
            if view.text_key != key:
                view.feats, view.text_key = self._encode(view.crops, text), key

    def _average_views(self, crop_scores) -> torch.Tensor:
        """``crop_scores(view) -> K x N x h x w`` per-crop scores, stitched on each view's canvas
        (:func:`~textseg.segment.slide.stitch`: at pixel resolution each crop is bilinearly resized to
        its pixels first; mmseg's count-matrix average), un-flipped, resized to the first view's
        canvas and averaged over the views -> ``N x H' x W'``."""
        total = ref_hw = None
        for view in self._views:
            canvas = stitch(crop_scores(view), view.boxes, view.canvas_hw, self.cell)
            if view.flipped:
                canvas = canvas.flip(-1)
            if ref_hw is None:
                ref_hw = tuple(canvas.shape[-2:])
            elif tuple(canvas.shape[-2:]) != ref_hw:
                canvas = F.interpolate(canvas[None], size=ref_hw, mode="bilinear", align_corners=False)[0]
            total = canvas if total is None else total + canvas
        return total / len(self._views)

    def _dense_scores(self, view: _View, emb: torch.Tensor) -> torch.Tensor:
        """``K x P x h x w`` logits (``model.dense_logits``) of a view's crops against ``P`` prompts."""
        out = []
        for i in range(0, view.feats.shape[0], max(1, self.cfg.batch_size)):
            feats = view.feats[i : i + self.cfg.batch_size]
            out.append(self.model.dense_logits(feats, emb.to(feats.dtype)).float())
        return torch.cat(out)

    @torch.no_grad()
    def _class_logits(self, classes: list[LabelClass]) -> torch.Tensor:
        """Canvas logits ``C x h x w`` for ``classes`` (synonym max, temperature, views averaged)."""
        emb, owner = self._prompts(classes)
        n_cls = len(classes)

        def scores(view):
            lg = self._dense_scores(view, emb)
            out = lg.new_full((lg.shape[0], n_cls, *lg.shape[-2:]), -torch.inf)
            return out.scatter_reduce(1, owner.view(1, -1, 1, 1).expand_as(lg), lg, reduce="amax")

        return self._average_views(scores) / self.cfg.temperature

    @torch.no_grad()
    def _pixel_logits(self, classes: list[LabelClass], bg: int | None, threshold: float | None,
                      names: list[str], timings: dict) -> tuple[torch.Tensor, np.ndarray, int | None, list[str]]:
        """Pixel resolution for ``encode_dense`` models: the official SCLIP / NACLIP / ClearCLIP
        inference (``forward_slide`` / ``predict`` / ``postprocess_result``).

        Per-prompt logits of each crop are stitched on a pixel canvas of the resized image
        (:meth:`_average_views`), then (optionally PAMR at the original size, on the per-prompt
        logits as NACLIP does) bilinearly upsampled to the original size band by band; there the
        softmax over all prompts, the max over each class's synonyms, SCLIP's area threshold, the
        argmax and the ``threshold`` rule (max probability below it -> background) are taken.
        Classes are processed in chunks so that one chunk's prompt canvas stays within
        ``PIXEL_BUDGET`` elements; the original-size work is banded (``BAND_BUDGET``).

        Returns the per-class record (class logits = max over synonyms at the canvas resolution, or
        at the original size after PAMR; a background channel ``logsumexp(prompts) + log t`` as the
        canvas path's; coarser if it would exceed ``RECORD_BUDGET``), the label map, ``bg`` and the
        dropped labels. ``names`` gets an appended ``background`` when the threshold needs one."""
        emb, owner = self._prompts(classes)
        n_cls = len(classes)
        height, width = self.image_size
        hc, wc = self._views[0].canvas_hw
        image = None
        pm = self.pamr_in_force()
        if pm and pm.resolution == "original":  # NACLIP: the network input, resized
            image = F.interpolate(self._image_input.to(self.device), size=(height, width), mode="bilinear",
                                  align_corners=False)
        elif pm:  # textseg's cheaper variant: on the resized image downsampled by pamr_stride
            image = self._pamr_image().to(self.device)
        tlp = self.cfg.propagation == "tlp"
        if tlp:  # PEARL: the network input resized to the original size, like NACLIP's PAMR
            image = F.interpolate(self._image_input.to(self.device), size=(height, width), mode="bilinear",
                                  align_corners=False)
        src_hw = tuple(image.shape[-2:]) if image is not None else (hc, wc)
        counts = torch.bincount(owner.cpu(), minlength=n_cls).tolist()
        # TLP's softmax spans every prompt: one chunk
        per = n_cls + len(owner) if tlp else max(1, PIXEL_BUDGET // max(1, src_hw[0] * src_hw[1], hc * wc))
        chunks: list[list[int]] = [[]]
        n = 0
        for c in range(n_cls):  # whole classes per chunk (a class's synonyms stay together)
            if chunks[-1] and n + counts[c] > per:
                chunks.append([])
                n = 0
            chunks[-1].append(c)
            n += counts[c]
        cache: dict[int, tuple] = {}
        t_pamr = 0.0

        def source(ci: int):
            nonlocal t_pamr
            if ci in cache:
                return cache[ci]
            cls = torch.tensor(chunks[ci], device=owner.device)
            sel = torch.isin(owner, cls).nonzero().squeeze(1)
            local = torch.searchsorted(cls, owner[sel])  # prompt -> index within the chunk
            zq = self._average_views(lambda view: self._dense_scores(view, emb[sel])) / self.cfg.temperature
            if tlp:  # on the cosines (the official logits before logit_scale), at the original size
                t1 = time.perf_counter()
                scale = float(self.model.logit_scale_value.detach()) / self.cfg.temperature
                zq = F.interpolate(zq[None], size=src_hw, mode="bilinear", align_corners=False) / scale
                zq = laplacian_propagation(image.to(zq.dtype), zq, emb[sel], self.cfg.tlp_grid)[0] * scale
                t_pamr += time.perf_counter() - t1
            elif image is not None:
                t1 = time.perf_counter()
                zq = zq[None]
                if pm.resolution == "original":
                    zq = F.interpolate(zq, size=src_hw, mode="bilinear", align_corners=False)
                zq = pamr(image.to(zq.dtype), zq, pm.iterations, pm.dilations)[0]
                t_pamr += time.perf_counter() - t1
            out = (cls.cpu(), zq.float().cpu(), local.cpu())
            if len(chunks) == 1:
                cache[ci] = out
            return out

        def bands(zq: torch.Tensor):
            if tuple(zq.shape[-2:]) == (height, width):
                band = max(1, BAND_BUDGET // max(1, zq.shape[0] * width))
                for y0 in range(0, height, band):
                    yield y0, min(height, y0 + band), zq[:, y0 : y0 + band]
            else:
                for y0, y1, _, block in upsample_bands(zq, (height, width), whole_channels=True):
                    yield y0, y1, block

        # the record (logits_lowres) and the per-pixel log-normaliser over all prompts
        rec_hw = src_hw
        if n_cls * src_hw[0] * src_hw[1] > RECORD_BUDGET:
            f = math.sqrt(RECORD_BUDGET / (n_cls * src_hw[0] * src_hw[1]))
            rec_hw = (max(1, int(src_hw[0] * f)), max(1, int(src_hw[1] * f)))
        record = torch.empty(n_cls, *rec_hw)
        rec_lse = torch.full(rec_hw, -torch.inf)
        lse = torch.full((height, width), -torch.inf)

        def argmax_pass(exclude: set[int], first: bool) -> tuple[torch.Tensor, torch.Tensor]:
            best = torch.full((height, width), -torch.inf)
            arg = torch.zeros((height, width), dtype=torch.long)
            for ci in range(len(chunks)):
                cls, zq, local = source(ci)
                ex = torch.tensor([int(c) in exclude for c in cls])
                if first:
                    cm = zq.new_full((len(cls), *zq.shape[-2:]), -torch.inf)
                    cm = cm.scatter_reduce(0, local.view(-1, 1, 1).expand_as(zq), zq, reduce="amax")
                    if rec_hw != src_hw:
                        cm = F.interpolate(cm[None], size=rec_hw, mode="bilinear", align_corners=False)[0]
                    record[cls] = cm
                    if threshold is not None:
                        top = zq.amax(0, keepdim=True)
                        zl = top + (zq - top).exp_().sum(0, keepdim=True).log_()
                        if rec_hw != src_hw:
                            zl = F.interpolate(zl[None], size=rec_hw, mode="bilinear", align_corners=False)[0]
                        torch.logaddexp(rec_lse, zl[0], out=rec_lse)
                single = len(local) == len(cls)  # one prompt per class: no synonym max needed
                for y0, y1, block in bands(zq):
                    if first and threshold is not None:  # log of the softmax normaliser over all prompts
                        top = block.amax(0)
                        part = top + (block - top).exp_().sum(0).log_()
                        torch.logaddexp(lse[y0:y1], part, out=lse[y0:y1])
                    if single:
                        cm = block.clone() if ex.any() else block
                    else:
                        cm = block.new_full((len(cls), *block.shape[1:]), -torch.inf)
                        cm = cm.scatter_reduce(0, local.view(-1, 1, 1).expand_as(block), block, reduce="amax")
                    if ex.any():
                        cm[ex] = -torch.inf
                    m, a = cm.max(0)
                    upd = m > best[y0:y1]
                    best[y0:y1] = torch.where(upd, m, best[y0:y1])
                    arg[y0:y1] = torch.where(upd, cls[a], arg[y0:y1])
            return best, arg

        t_up = time.perf_counter()
        best, arg = argmax_pass(set(), first=True)
        dropped: set[int] = set()
        if self.cfg.area_threshold and bg is not None:  # SCLIP area_thd on the arg-max map
            cnt = torch.bincount(arg.reshape(-1), minlength=n_cls)
            fg = [i for i in range(n_cls) if i != bg]
            total = int(cnt[fg].sum())
            dropped = {i for i in fg if not int(cnt[i]) > self.cfg.area_threshold * total}
            if dropped:
                best, arg = argmax_pass(dropped, first=False)
        if threshold is not None and bg is None:
            names.append(BACKGROUND)
            bg = len(names) - 1

        def finish(best, arg) -> np.ndarray:
            if threshold is not None:  # prob_thd: the best class probability (softmax over all prompts)
                arg = torch.where((best - lse).exp() < threshold, torch.full_like(arg, bg), arg)
            return arg.numpy().astype(np.uint8 if len(names) <= 255 else np.int32)

        label_map = finish(best, arg)
        low: list[int] = []
        if self.cfg.min_area > 0:
            frac = self._fractions(label_map, len(names))
            low = [i for i in range(n_cls) if i != bg and 0 < frac[i] < self.cfg.min_area]
            if low and len(low) < len(names):
                label_map = finish(*argmax_pass(dropped | set(low), first=False))
            else:
                low = []
        timings["pamr"] = t_pamr
        timings["upsample"] = time.perf_counter() - t_up - t_pamr
        if threshold is not None:
            floor = rec_lse[None] + math.log(threshold)
            if bg == n_cls:
                record = torch.cat([record, floor])
            else:
                record[bg : bg + 1] = torch.maximum(record[bg : bg + 1], floor)
        gone = sorted(dropped) + low
        if gone:
            record[gone] = record.min() - 100.0
        return record, label_map, bg, [names[i] for i in gone]

    @torch.no_grad()
    def _pixel_scores(self, classes: list[LabelClass], bg: int | None, threshold: float | None,
                      n_out: int) -> torch.Tensor:
        """Pixel modes: canvas scores ``n_out x H' x W'`` from the model's official inference (see the
        module docstring); channel ``bg`` holds the official background indicator when a threshold
        is set (``n_out`` includes an appended background)."""
        scored = [i for i in range(len(classes))
                  if not (i == bg and threshold is not None and not self.cfg.background_words)]
        if not scored:
            raise TextsegError("the official inference needs at least one label besides background")
        texts = list(dict.fromkeys(s for i in scored for s in classes[i].synonyms))
        index = {t: i for i, t in enumerate(texts)}
        pairs = [(ci, index[s]) for ci in scored for s in classes[ci].synonyms]
        t0 = time.perf_counter()
        emb = self.text_cache.embed(texts, self.cfg.templates).to(self.device)
        self.timings["embed_text"] = time.perf_counter() - t0
        text_idx = torch.tensor([p[1] for p in pairs], device=self.device)
        owner = torch.tensor([p[0] for p in pairs], device=self.device)
        fg = torch.tensor([c for c in range(n_out) if c != bg], device=self.device)

        def scores(view):
            crops = []
            for k in range(len(view.boxes)):
                feats = {key: v[k : k + 1] for key, v in view.feats.items()}
                sc, probs = self.model.official_scores(feats, emb, temperature=self.cfg.temperature)
                lg = sc[:, text_idx].float()  # 1 x P x h x w, all >= 0
                out = lg.new_zeros(1, n_out, *lg.shape[-2:])
                out = out.scatter_reduce(1, owner.view(1, -1, 1, 1).expand_as(lg), lg, reduce="amax")
                if threshold is not None:
                    ind = self.model.official_background(out[:, fg], probs.float(), threshold)
                    out[:, bg] = torch.maximum(out[:, bg], ind.to(out.dtype))
                crops.append(out)
            return torch.cat(crops)

        return self._average_views(scores)

    # ---------------------------------------------------------------- predict
    @torch.no_grad()
    def predict(self, labels: Labels | None = None) -> SegmentResult:
        """Score the cached image against ``labels`` -> :class:`SegmentResult` at the original size."""
        if not self._views:
            raise TextsegError("no image set: call set_image(image) before predict(labels)")
        timings = dict(self.timings)
        classes, bg, threshold = self._classes(labels)
        t0 = time.perf_counter()
        names = [c.name for c in classes]
        if self.pixel_mode:
            if threshold is not None and bg is None:
                names.append(BACKGROUND)
                bg = len(names) - 1
            z = self._pixel_scores(classes, bg, threshold, len(names))
        elif self.pixel_res:  # the official CLIP-family inference, at pixel resolution
            z, label_map, bg, dropped = self._pixel_logits(classes, bg, threshold, names, timings)
            timings["embed_text"] = self.timings.pop("embed_text", 0.0)
            timings["logits"] = (time.perf_counter() - t0 - timings["embed_text"] - timings["pamr"]
                                 - timings["upsample"])
            if not self.pamr_in_force():
                timings.pop("pamr")
            frac = self._fractions(label_map, len(names))
            return SegmentResult(labels=names, logits_lowres=z, size=self.image_size, label_map=label_map,
                                 fractions={n: float(f) for n, f in zip(names, frac)}, background_index=bg,
                                 dropped=dropped, timings=timings, precision=self.precision)
        else:
            z = self._class_logits(classes)
        timings["embed_text"] = self.timings.pop("embed_text", 0.0)
        pm = self.pamr_in_force()
        if pm:
            t1 = time.perf_counter()
            if pm.resolution == "original":  # NACLIP / SCLIP: both resized to the original size
                img = F.interpolate(self._image_input.to(z.device), size=self.image_size, mode="bilinear",
                                    align_corners=False)
                z = F.interpolate(z[None], size=self.image_size, mode="bilinear", align_corners=False)[0]
            else:
                img = self._pamr_image().to(z.device)
            z = pamr(img, z[None], pm.iterations, pm.dilations)[0]
            timings["pamr"] = time.perf_counter() - t1
        floor = None
        if threshold is not None and not self.pixel_mode:
            own = getattr(self.model, "background_logits", None)  # a model's own rule (CAM networks)
            floor = own(z, threshold) if own else torch.logsumexp(z, dim=0, keepdim=True) + math.log(threshold)
        area_dropped = self._area_drop(z, bg) if self.cfg.area_threshold and bg is not None else []
        if area_dropped:  # SCLIP area_thd: their probabilities -> 0, the threshold still uses the full softmax
            z = z.clone()
            z[area_dropped] = z.min() - 100.0
        if floor is not None:
            if bg is None:
                z = torch.cat([z, floor])
                names.append(BACKGROUND)
                bg = len(names) - 1
            else:
                z[bg : bg + 1] = torch.maximum(z[bg : bg + 1], floor)
        timings["logits"] = time.perf_counter() - t0 - timings["embed_text"] - timings.get("pamr", 0.0)
        t0 = time.perf_counter()
        z = z.float().cpu()
        label_map = argmax_bands(z, self.image_size)
        dropped: list[str] = [names[i] for i in area_dropped]
        if self.cfg.min_area > 0:
            frac = self._fractions(label_map, len(names))
            low = [i for i in range(len(names)) if i != bg and 0 < frac[i] < self.cfg.min_area]
            if low and len(low) < len(names):
                z = z.clone()
                z[low] = z.min() - 100.0
                dropped += [names[i] for i in low]
                label_map = argmax_bands(z, self.image_size)
        frac = self._fractions(label_map, len(names))
        timings["upsample"] = time.perf_counter() - t0
        return SegmentResult(
            labels=names,
            logits_lowres=z,
            size=self.image_size,
            label_map=label_map,
            fractions={n: float(f) for n, f in zip(names, frac)},
            background_index=bg,
            dropped=dropped,
            timings=timings,
            precision=self.precision,
        )

    def _area_drop(self, z: torch.Tensor, bg: int) -> list[int]:
        """SCLIP's ``area_thd`` (``clip_segmentor.py`` ``postprocess_result``): on the arg-max map at the
        original size, the non-background classes whose pixel count is not above ``area_threshold``
        times the non-background total."""
        counts = np.bincount(argmax_bands(z.float().cpu(), self.image_size).reshape(-1), minlength=z.shape[0])
        fg = [i for i in range(z.shape[0]) if i != bg]
        total = counts[fg].sum()
        return [i for i in fg if not counts[i] > self.cfg.area_threshold * total]

    @staticmethod
    def _fractions(label_map: np.ndarray, n: int) -> np.ndarray:
        counts = np.bincount(label_map.reshape(-1), minlength=n)[:n]
        return counts / max(1, label_map.size)

    def segment(self, image, labels: Labels | None = None) -> SegmentResult:
        """``set_image(image)`` then ``predict(labels)``."""
        self.set_image(image)
        return self.predict(labels)
