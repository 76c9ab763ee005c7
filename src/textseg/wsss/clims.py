"""CLIMS losses (Xie et al., "CLIMS: Cross Language Image Matching for Weakly Supervised Semantic
Segmentation", CVPR 2022) and the multi-label CAM baseline loss.

The official code is CVI-SZU/CLIMS: ``step/train_clims.py`` (the loss and the CLIP inputs),
``clip_loss.py`` (OTM, BTM, CBS), ``clip_utils.py`` (prompts, background words), ``run_sample.py`` /
``run_sample_coco.py`` and the README's COCO command (loss weights; the optimiser, ``misc/torchutils.py``'s
``PolyOptimizer``, is in the presets of :mod:`textseg.train.cam`).

A CAM network gives sigmoid activation maps ``P`` (``B x K x h x w``). Image ``x`` is normalised with
ImageNet mean / std (the official data loader's ``TorchvisionNormalize``, fed unchanged to CLIP;
``input_norm="evaluator"``: the evaluator's own mean / std instead), ``x`` and ``P`` are resized to
``S x S`` (bilinear, ``align_corners=True``; ``S`` = the evaluator's input size, 224 for ViT-B/32) and,
for every (image ``b``, class ``k``) pair whose class is in the image label, a frozen image-text
evaluator scores two masked images:

* ``fg = x_b * P_bk`` (the object the map claims) and ``bg = x_b * (1 - P_bk)`` (everything else).

With ``s(v, t)`` the cosine similarity of the evaluator's image embedding of ``v`` and its text
embedding of prompt ``t``, ``t_k = "a photo of {class k}."`` and ``c(x) = clamp(x, 1e-4, 0.9999)``:

* ``OTM = -mean_pairs log c(s(fg, t_k))``   object-text matching: the mask must contain the object.
* ``BTM = -mean_pairs log(1 - c(s(bg, t_k)))``  background-text matching: nothing of it outside.
* ``CBS = -sum_{pairs, m in B(k)} [s(fg, t_m) > tau] log(1 - s(fg, t_m))`` over the co-occurring
  background prompts ``t_m = "a photo of {word m}."`` that apply to class ``k`` (``B(k)``; see
  :func:`load_background`; the built-in lists apply to every class, as the official code): the mask
  must not grow onto rails, water... . ``tau`` is the official threshold (0.26 VOC, 0.285 COCO;
  ``None`` = every prompt counts). A sum and no clamp, as in the official code.
  ``cbs_reference="blank"`` (textseg's option; official: ``"none"``) makes the threshold relative:
  ``tau_m = s(blank, t_m) + tau``, with ``s(blank, t_m)`` the similarity of a fully masked image (every
  pixel the mean colour: what an empty map's ``fg`` is) to prompt ``m``. CLIP's cosines sit near 0.2,
  so 0.26 gates out masks that do not look like water; a small evaluator's cosines can sit near 0.5
  for every image and prompt, and then an absolute 0.26 never gates and CBS pushes every mask
  towards empty. Relative to the blank image, CBS fires only where the mask looks *more* like the
  background word than an empty mask does. ``cbs_reference="class"`` (textseg's option):
  ``tau_m = s(fg, t_k) + tau`` per pair, so a background word counts only where the masked foreground
  looks more like it than like its own class (``tau`` = 0: a mask that is mostly water, not boat).
* ``REG = mean(P)`` over **every** map, absent classes too (the official ``torch.mean(x)``): keeps the
  maps from covering everything. ``reg_over="present"`` (textseg's option) averages the present
  pairs' maps only (a larger per-pixel push when few classes are present).

``score="softmax"`` (textseg's option; the official ``"cosine"`` is the default) replaces every
``s(v, t)`` by the evaluator's probability of prompt ``t`` among all ``K + M`` class and background
prompts, ``softmax(logit_scale * cos)`` (its zero-shot classifier, as CLIP-ES's softmax over class
prompts): a cosine is only calibrated relative to other prompts, so a small evaluator can give a blank
or half-masked image a high cosine to every class, and then OTM pays little for an empty map. As a
probability, an empty or background-filled mask loses the class's mass to the other prompts.

``loss = alpha * OTM + beta * BTM + gamma * CBS + delta * REG`` (official VOC weights 10, 24, 1, 0.2;
COCO 2, 14, 1.25, 0.2 in the README's command, 2, 14, 2, 0.2 in ``run_sample_coco.py``'s defaults).
The evaluator is frozen (``requires_grad_(False)``, eval mode) and its text embeddings are computed
once without gradient; gradient reaches the CAM only through the evaluator's *input*. The official
code runs CLIP in half precision on the GPU; textseg runs the evaluator in its own dtype.

The baseline (IRN / CLIMS' first stage): ``multilabel_soft_margin_loss`` (BCE) of the pooled maps'
logits. The training recipe (:mod:`textseg.train.cam`, ``textseg train cam``) trains either, or both
summed, on the engine; the official optimiser and schedules are its presets.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from textseg.constants import IMAGENET_MEAN, IMAGENET_STD
from textseg.data.image_labels import canonical, prompt_name
from textseg.errors import TextsegError
from textseg.models.base import DualEncoder

CLAMP_LO, CLAMP_HI = 1e-4, 0.9999


# ------------------------------------------------------------------------------- background words
def load_background(spec: str | Path, class_names: list[str]) -> tuple[list[str], torch.Tensor]:
    """Co-occurring background words and which classes each applies to.

    ``spec``: ``"voc"`` / ``"coco"`` (the lists shipped in ``textseg/data/clims_background``) or a
    path to a file in that format: one word a line applies to every class, ``class: w1, w2`` applies
    to that class only, ``#`` starts a comment. Returns ``(words, applies)`` with ``applies`` a
    ``K x M`` bool tensor (``applies[k, m]``: word ``m`` is a background of class ``k``).
    """
    spec = str(spec)
    if spec in ("voc", "coco"):
        text = resources.files("textseg.data").joinpath("clims_background", f"{spec}.txt").read_text("utf-8")
        where = f"built-in {spec} list"
    else:
        p = Path(spec)
        if not p.is_file():
            raise TextsegError(f"background words {spec!r}: not 'voc', 'coco' or an existing file")
        text, where = p.read_text("utf-8"), str(p)
    index = {canonical(c): i for i, c in enumerate(class_names)}
    words: list[str] = []
    rows: list[set[int]] = []  # classes per word
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if ":" in line:
            cls, _, rest = line.partition(":")
            k = index.get(canonical(cls))
            if k is None:
                continue  # a class not in this class list
            targets, items = {k}, [w.strip() for w in rest.split(",") if w.strip()]
        else:
            targets, items = set(range(len(class_names))), [line]
        for w in items:
            if w in words:
                rows[words.index(w)] |= targets
            else:
                words.append(w)
                rows.append(set(targets))
    if not words:
        raise TextsegError(f"{where}: no background words")
    applies = torch.zeros(len(class_names), len(words), dtype=torch.bool)
    for m, ks in enumerate(rows):
        applies[sorted(ks), m] = True
    return words, applies


# ------------------------------------------------------------------------------------------ losses
def otm_loss(sim: torch.Tensor) -> torch.Tensor:
    """Object-text matching: ``-mean log clamp(sim)`` (maximises the similarity)."""
    return -torch.log(sim.clamp(CLAMP_LO, CLAMP_HI)).mean()


def btm_loss(sim: torch.Tensor) -> torch.Tensor:
    """Background-text matching: ``-mean log(1 - clamp(sim))`` (minimises the similarity)."""
    return -torch.log(1 - sim.clamp(CLAMP_LO, CLAMP_HI)).mean()


def cbs_loss(sim: torch.Tensor, applies: torch.Tensor, threshold: float | torch.Tensor | None) -> torch.Tensor:
    """Co-occurring background suppression: ``-sum [sim > threshold] * applies * log(1 - sim)`` for
    ``N x M`` similarities of foreground images to background prompts (no clamp: the official
    ``BackgroundSuppressionLoss``); ``threshold``: one number, or ``M`` (one per prompt). Entries outside the mask are zeroed before the log, so they
    contribute nothing, not even a NaN gradient."""
    keep = applies.to(torch.bool).expand_as(sim)
    if threshold is not None:
        keep = keep & (sim > threshold)
    return -(torch.log(1 - torch.where(keep, sim, torch.zeros_like(sim))) * keep.to(sim.dtype)).sum()


def baseline_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The multi-label CAM baseline: mean BCE-with-logits over the ``B x K`` pooled logits."""
    return F.multilabel_soft_margin_loss(logits, labels)


@dataclass
class CLIMSWeights:
    alpha: float = 10.0  # OTM
    beta: float = 24.0  # BTM
    gamma: float = 1.0  # CBS
    delta: float = 0.2  # REG


def similarity(evaluator: DualEncoder, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """``N x D`` image and ``M x D`` text embeddings of ``evaluator`` -> ``N x M`` image-text
    similarities. CLIP-like models: cosine similarity (what CLIMS uses). The offline model's
    embeddings are ImageNet class probabilities and bridge weights, not a cosine space: its
    similarity is the label's ImageNet probability mass ``sum_c p(c | image) w(c | label)``, in [0, 1]
    like CLIP's cosines (the raw mass: the offline model's own ``scores`` may rescale it for
    segmentation, which would break CLIMS' clamp to (0, 1))."""
    from textseg.models.offline import NUM_CLASSES, OfflineModel

    if isinstance(evaluator, OfflineModel):
        return image_emb[:, :NUM_CLASSES].float() @ text_emb[:, :NUM_CLASSES].float().t()  # v2: bridge part only
    return F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).t()


def parse_prompt_names(spec: str | dict | None) -> dict[str, str]:
    """``"person=player,tvmonitor=tv"`` (or a dict) -> ``{canonical class: prompt word}``."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        return {canonical(k): str(v) for k, v in spec.items()}
    out = {}
    for item in str(spec).split(","):
        if not item.strip():
            continue
        cls, sep, word = item.partition("=")
        if not sep or not cls.strip() or not word.strip():
            raise TextsegError(f"prompt names: expected class=word items, got {item.strip()!r}")
        out[canonical(cls)] = word.strip()
    return out


def default_template(evaluator: DualEncoder) -> str:
    """CLIMS' ``"a photo of {}."`` for CLIP-like models; the bare word for the offline model, whose
    bridge matches label words to concept names (a sentence would only blur the match)."""
    from textseg.models.offline import OfflineModel

    return "{}" if isinstance(evaluator, OfflineModel) else "a photo of {}."


class CLIMSLoss(nn.Module):
    """The four CLIMS terms with a frozen :class:`DualEncoder` evaluator (see the module docstring).

    ``forward(maps, images, labels)``: ``maps`` ``B x K x h x w`` sigmoid activations, ``images``
    ``B x 3 x H x W`` RGB in [0, 1], ``labels`` ``B x K`` multi-hot -> dict with ``loss`` and the
    unweighted ``otm``, ``btm``, ``cbs``, ``reg``, ``pairs`` (number of present pairs) and ``s_fg`` /
    ``s_bg`` (each pair's ``s(fg, t_k)`` / ``s(bg, t_k)``, pairs in ``labels.nonzero()`` order).
    ``template``: ``None`` picks :func:`default_template`. ``eval_size``: side of the square
    evaluator input (``None``: the evaluator's own image size). ``reg_over``: ``"all"`` (official) or
    ``"present"``. ``input_norm``: ``"imagenet"`` (official) or ``"evaluator"`` (its own mean / std).
    ``prompt_names``: class -> prompt word overrides (``{"person": "player"}`` or ``"person=player"``,
    what the presets set, as the official prompts).
    """

    def __init__(self, evaluator: DualEncoder, class_names: list[str], background: str | Path = "voc",
                 weights: CLIMSWeights | None = None, cbs_threshold: float | None = 0.26,
                 template: str | None = None, eval_size: int | None = None, reg_over: str = "all",
                 input_norm: str = "imagenet", prompt_names: str | dict | None = None,
                 score: str = "cosine", cbs_reference: str = "none"):
        super().__init__()
        if cbs_reference not in ("none", "blank", "class"):
            raise TextsegError(f"cbs_reference must be 'none', 'blank' or 'class', got {cbs_reference!r}")
        if cbs_reference != "none" and cbs_threshold is None:
            raise TextsegError(f"cbs_reference={cbs_reference!r} needs a cbs_threshold (the margin over the "
                               "reference's score)")
        if score not in ("cosine", "softmax"):
            raise TextsegError(f"score must be 'cosine' or 'softmax', got {score!r}")
        if reg_over not in ("present", "all"):
            raise TextsegError(f"reg_over must be 'present' or 'all', got {reg_over!r}")
        if input_norm not in ("imagenet", "evaluator"):
            raise TextsegError(f"input_norm must be 'imagenet' or 'evaluator', got {input_norm!r}")
        from textseg.models.offline import OfflineModel

        if score == "softmax" and isinstance(evaluator, OfflineModel):
            raise TextsegError("score='softmax' needs a CLIP-like evaluator (a logit scale); the offline "
                               "model's similarity is already a probability mass")
        evaluator.eval().requires_grad_(False)
        self.evaluator = evaluator
        self.weights = weights or CLIMSWeights()
        self.cbs_threshold = cbs_threshold
        self.reg_over, self.input_norm, self.score = reg_over, input_norm, score
        cfg = evaluator.preprocess_cfg
        self.eval_size = int(eval_size or cfg.image_size)
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if input_norm == "imagenet" else (cfg.mean, cfg.std)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.class_names = list(class_names)
        template = template or default_template(evaluator)
        renames = parse_prompt_names(prompt_names)
        self.prompts = [template.format(renames.get(canonical(c), prompt_name(c))) for c in class_names]
        self.background_words, applies = load_background(background, class_names)
        self.background_prompts = [template.format(w) for w in self.background_words]
        with torch.no_grad():
            class_text = evaluator.embed_texts(self.prompts).float()
            bg_text = evaluator.embed_texts(self.background_prompts).float()
        self.register_buffer("class_text", class_text, persistent=False)  # K x D
        self.register_buffer("bg_text", bg_text, persistent=False)  # M x D
        self.register_buffer("applies", applies, persistent=False)  # K x M
        self.cbs_reference = cbs_reference
        self.register_buffer("blank_bg", torch.zeros(len(self.background_words)), persistent=False)  # M
        if cbs_reference == "blank":  # s(blank, t_m): a fully masked input is all zeros (the mean colour)
            with torch.no_grad():
                blank = torch.zeros(1, 3, self.eval_size, self.eval_size, device=class_text.device)
                self.blank_bg = self.scores(blank)[0, len(self.prompts):].clone()

    def train(self, mode: bool = True) -> CLIMSLoss:
        super().train(mode)
        self.evaluator.eval()  # frozen: batch norm / dropout stay in inference mode
        return self

    def masked_inputs(self, maps: torch.Tensor, images: torch.Tensor, labels: torch.Tensor):
        """``(fg, bg, b_idx, k_idx)``: ``N x 3 x S x S`` evaluator inputs of the ``N`` present pairs,
        ``fg = x * P`` and ``bg = x * (1 - P)`` with ``x`` normalised (``input_norm``; a masked pixel
        is the mean colour) and both resized bilinearly with ``align_corners=True``, as the official
        ``F.interpolate(..., (224, 224), mode='bilinear', align_corners=True)``."""
        b_idx, k_idx = labels.nonzero(as_tuple=True)
        size = (self.eval_size, self.eval_size)
        pixels = F.interpolate((images - self.mean) / self.std, size, mode="bilinear", align_corners=True)[b_idx]
        p = F.interpolate(maps, size, mode="bilinear", align_corners=True)[b_idx, k_idx].unsqueeze(1)
        return pixels * p, pixels * (1 - p), b_idx, k_idx

    def similarity(self, pixels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``N x 3 x S x S`` evaluator inputs, ``M x D`` text embeddings -> ``N x M`` similarities."""
        return similarity(self.evaluator, self.evaluator.encode_image(pixels), text)

    def scores(self, pixels: torch.Tensor) -> torch.Tensor:
        """``N x 3 x S x S`` evaluator inputs -> ``N x (K + M)`` scores ``s(v, t)`` against the class then the
        background prompts: cosines, or (``score="softmax"``) probabilities over all of them."""
        sim = self.similarity(pixels, torch.cat([self.class_text, self.bg_text]))
        if self.score == "softmax":  # textseg's option: probabilities over every prompt (see the docstring)
            sim = (self.evaluator.logit_scale_value.float() * sim).softmax(dim=-1)
        return sim

    def forward(self, maps: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if maps.shape[:2] != labels.shape or images.shape[0] != maps.shape[0]:
            raise TextsegError(f"maps {tuple(maps.shape)}, images {tuple(images.shape)} and labels "
                               f"{tuple(labels.shape)} disagree")
        fg, bg, b_idx, k_idx = self.masked_inputs(maps, images, labels)
        zero = maps.sum() * 0.0  # keeps the graph (and DDP) whole when no class is present
        n = b_idx.numel()
        if n == 0:
            none = maps.new_zeros(0)
            return {"loss": zero, "otm": zero, "btm": zero, "cbs": zero, "reg": zero, "pairs": 0,
                    "s_fg": none, "s_bg": none}
        sim = self.scores(torch.cat([fg, bg]))  # 2N x (K + M)
        rows = torch.arange(n, device=sim.device)
        k = self.class_text.shape[0]
        s_fg, s_bg = sim[rows, k_idx], sim[n + rows, k_idx]
        otm, btm = otm_loss(s_fg), btm_loss(s_bg)
        tau = self.cbs_threshold  # official: absolute
        if self.cbs_reference == "blank":
            tau = self.blank_bg + self.cbs_threshold
        elif self.cbs_reference == "class":
            tau = s_fg.detach()[:, None] + self.cbs_threshold
        cbs = cbs_loss(sim[:n, k:], self.applies[k_idx], tau)
        reg = maps[b_idx, k_idx].mean() if self.reg_over == "present" else maps.mean()
        w = self.weights
        loss = w.alpha * otm + w.beta * btm + w.gamma * cbs + w.delta * reg
        return {"loss": loss, "otm": otm, "btm": btm, "cbs": cbs, "reg": reg, "pairs": n, "s_fg": s_fg, "s_bg": s_bg}
