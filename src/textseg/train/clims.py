"""CLIMS losses (Xie et al., "CLIMS: Cross Language Image Matching for Weakly Supervised Semantic
Segmentation", CVPR 2022) and the multi-label CAM baseline loss.

The official code is CVI-SZU/CLIMS: ``step/train_clims.py`` (the loss and the CLIP inputs),
``clip_loss.py`` (OTM, BTM, CBS), ``clip_utils.py`` (prompts, background words), ``run_sample.py`` /
``run_sample_coco.py`` and the README's COCO command (weights and optimiser, :data:`OFFICIAL_PRESETS`),
``misc/torchutils.py`` (``PolyOptimizer``).

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
* ``REG = mean(P)`` over **every** map, absent classes too (the official ``torch.mean(x)``): keeps the
  maps from covering everything. ``reg_over="present"`` (textseg's option) averages the present
  pairs' maps only (a larger per-pixel push when few classes are present).

``loss = alpha * OTM + beta * BTM + gamma * CBS + delta * REG`` (official VOC weights 10, 24, 1, 0.2;
COCO 2, 14, 1.25, 0.2 in the README's command, 2, 14, 2, 0.2 in ``run_sample_coco.py``'s defaults).
The evaluator is frozen (``requires_grad_(False)``, eval mode) and its text embeddings are computed
once without gradient; gradient reaches the CAM only through the evaluator's *input*. The official
code runs CLIP in half precision on the GPU; textseg runs the evaluator in its own dtype.

The baseline (IRN / CLIMS' first stage): ``multilabel_soft_margin_loss`` (BCE) of the pooled maps'
logits. :func:`train_cam` trains either, or both summed, on one process or under ``torchrun``.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from textseg.constants import IMAGENET_MEAN, IMAGENET_STD
from textseg.data.image_labels import canonical, load_image_labels, multi_hot, prompt_name, read_class_list
from textseg.errors import TextsegError
from textseg.models.base import DualEncoder
from textseg.models.cam import CAMConfig, CAMNet, load_cam, save_cam

CLAMP_LO, CLAMP_HI = 1e-4, 0.9999

# The official recipes (CVI-SZU/CLIMS). VOC: run_sample.py's defaults, which its README command uses.
# COCO: the README's training command (2 GPUs x 16 images, 8 epochs, lr 5e-4, hyper 2,14,1.25,0.2,
# CBS threshold 0.285); run_sample_coco.py's own defaults differ (hyper 2,14,2,0.2, lr 2.5e-4,
# 15 epochs, 16 images) and stay reachable with --hyper / --lr / --set epochs=15 / --batch-size 16.
# "baseline" is the CAM stage (step/train_cam.py: lr 0.1, 5 epochs, 16 images). Both stages: SGD
# through IRN's PolyOptimizer (misc/torchutils.py), backbone at lr and the classifier at 10 x lr,
# weight decay 1e-4, poly power 0.9 over (images // batch) * epochs steps, and momentum 1e-4: the
# optimiser passes weight_decay positionally into SGD's momentum slot. Data: long side random in
# [320, 640], flip, random 512 crop; batch norm in training mode; the person class prompted "player"
# (clip_utils.py).
OFFICIAL_PRESETS = {
    "voc": {"clims": {"weights": (10.0, 24.0, 1.0, 0.2), "cbs_threshold": 0.26, "lr": 2.5e-4, "epochs": 15,
                      "batch_size": 16},
            "baseline": {"lr": 0.1, "epochs": 5, "batch_size": 16}},
    "coco": {"clims": {"weights": (2.0, 14.0, 1.25, 0.2), "cbs_threshold": 0.285, "lr": 5e-4, "epochs": 8,
                       "batch_size": 32},
             "baseline": {"lr": 0.1, "epochs": 5, "batch_size": 16}},
}
OFFICIAL_OPTIM = {"classifier_lr_mult": 10.0, "weight_decay": 1e-4, "momentum": 1e-4, "freeze_bn": False}
OFFICIAL_DATA = {"crop_size": 512, "scale": (320 / 512, 640 / 512)}
OFFICIAL_PROMPT_NAMES = "person=player"
PRESET_WEIGHTS = {k: v["clims"]["weights"] for k, v in OFFICIAL_PRESETS.items()}
PRESET_CBS_THRESHOLD = {k: v["clims"]["cbs_threshold"] for k, v in OFFICIAL_PRESETS.items()}


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


def cbs_loss(sim: torch.Tensor, applies: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Co-occurring background suppression: ``-sum [sim > threshold] * applies * log(1 - sim)`` for
    ``N x M`` similarities of foreground images to background prompts (no clamp: the official
    ``BackgroundSuppressionLoss``). Entries outside the mask are zeroed before the log, so they
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
        return image_emb.float() @ text_emb[:, :NUM_CLASSES].float().t()
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
    unweighted ``otm``, ``btm``, ``cbs``, ``reg`` and ``pairs`` (number of present pairs).
    ``template``: ``None`` picks :func:`default_template`. ``eval_size``: side of the square
    evaluator input (``None``: the evaluator's own image size). ``reg_over``: ``"all"`` (official) or
    ``"present"``. ``input_norm``: ``"imagenet"`` (official) or ``"evaluator"`` (its own mean / std).
    ``prompt_names``: class -> prompt word overrides (``{"person": "player"}`` or ``"person=player"``,
    what the presets set, as the official prompts).
    """

    def __init__(self, evaluator: DualEncoder, class_names: list[str], background: str | Path = "voc",
                 weights: CLIMSWeights | None = None, cbs_threshold: float | None = 0.26,
                 template: str | None = None, eval_size: int | None = None, reg_over: str = "all",
                 input_norm: str = "imagenet", prompt_names: str | dict | None = None):
        super().__init__()
        if reg_over not in ("present", "all"):
            raise TextsegError(f"reg_over must be 'present' or 'all', got {reg_over!r}")
        if input_norm not in ("imagenet", "evaluator"):
            raise TextsegError(f"input_norm must be 'imagenet' or 'evaluator', got {input_norm!r}")
        evaluator.eval().requires_grad_(False)
        self.evaluator = evaluator
        self.weights = weights or CLIMSWeights()
        self.cbs_threshold = cbs_threshold
        self.reg_over, self.input_norm = reg_over, input_norm
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

    def forward(self, maps: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if maps.shape[:2] != labels.shape or images.shape[0] != maps.shape[0]:
            raise TextsegError(f"maps {tuple(maps.shape)}, images {tuple(images.shape)} and labels "
                               f"{tuple(labels.shape)} disagree")
        fg, bg, b_idx, k_idx = self.masked_inputs(maps, images, labels)
        zero = maps.sum() * 0.0  # keeps the graph (and DDP) whole when no class is present
        n = b_idx.numel()
        if n == 0:
            return {"loss": zero, "otm": zero, "btm": zero, "cbs": zero, "reg": zero, "pairs": 0}
        text = torch.cat([self.class_text, self.bg_text])
        sim = self.similarity(torch.cat([fg, bg]), text)  # 2N x (K + M)
        rows = torch.arange(n, device=sim.device)
        k = self.class_text.shape[0]
        otm = otm_loss(sim[rows, k_idx])
        btm = btm_loss(sim[n + rows, k_idx])
        cbs = cbs_loss(sim[:n, k:], self.applies[k_idx], self.cbs_threshold)
        reg = maps[b_idx, k_idx].mean() if self.reg_over == "present" else maps.mean()
        w = self.weights
        loss = w.alpha * otm + w.beta * btm + w.gamma * cbs + w.delta * reg
        return {"loss": loss, "otm": otm, "btm": btm, "cbs": cbs, "reg": reg, "pairs": n}


# ------------------------------------------------------------------------------------------ data
class CAMTrainDataset(torch.utils.data.Dataset):
    """Labeled images -> ``(3 x crop x crop`` RGB in [0, 1], ``K`` multi-hot): random rescale (long
    side ``crop * U(scale)``), horizontal flip, random crop / gray padding."""

    def __init__(self, items, class_names: list[str], crop_size: int = 320,
                 scale: tuple[float, float] = (0.9, 1.3), augment: bool = True):
        self.items, self.class_names = list(items), list(class_names)
        self.crop, self.scale, self.augment = int(crop_size), tuple(scale), augment
        self.targets = [multi_hot(it.names, self.class_names) for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from textseg.io import load_image

        img = load_image(self.items[i].path)
        long = self.crop * (random.uniform(*self.scale) if self.augment else 1.0)
        r = long / max(img.size)
        w, h = max(1, round(img.width * r)), max(1, round(img.height * r))
        x = torch.from_numpy(np.asarray(img.resize((w, h), resample=2), dtype=np.float32) / 255.0).permute(2, 0, 1)
        if self.augment and random.random() < 0.5:
            x = x.flip(-1)
        out = torch.full((3, self.crop, self.crop), 0.5)
        ch, cw = min(h, self.crop), min(w, self.crop)
        y0 = random.randint(0, h - ch) if self.augment else (h - ch) // 2
        x0 = random.randint(0, w - cw) if self.augment else (w - cw) // 2
        oy = random.randint(0, self.crop - ch) if self.augment else 0
        ox = random.randint(0, self.crop - cw) if self.augment else 0
        out[:, oy:oy + ch, ox:ox + cw] = x[:, y0:y0 + ch, x0:x0 + cw]
        return out, self.targets[i]


# ---------------------------------------------------------------------------------------- config
@dataclass
class CAMDataCfg:
    root: str = ""  # dataset folder (labels.json / VOC root) or labels file
    labels: str = ""  # explicit labels file (labels.json or COCO instances JSON)
    images: str = ""  # image folder when not the layout's default
    classes: str = ""  # classes file or comma list; default: <root>/classes.txt
    split: str = ""  # optional splits/<split>.txt (folder layout) to train on
    crop_size: int = 320
    scale: tuple[float, float] = (0.9, 1.3)
    workers: int = 0


@dataclass
class CLIMSCfg:
    evaluator: str = "offline"  # any model textseg loads (name) ...
    evaluator_weights: str = ""  # ... or weights file / folder
    background: str = "voc"  # voc | coco | FILE
    alpha: float = 10.0
    beta: float = 24.0
    gamma: float = 1.0
    delta: float = 0.2
    cbs_threshold: float | None = 0.26
    template: str = ""  # "" = "a photo of {}." (CLIP-like) / "{}" (offline), see default_template
    eval_size: int = 0  # 0 = the evaluator's own image size
    reg_over: str = "all"  # official: REG over every map; "present": over the present classes' maps only
    input_norm: str = "imagenet"  # official: ImageNet mean/std; "evaluator": the evaluator's own
    prompt_names: str = ""  # class=word overrides for the prompts; the presets set "person=player"


@dataclass
class CAMTrainCfg:
    out: str = "runs/cam"
    mode: str = "baseline"  # baseline | clims | baseline+clims
    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    backbone_weights: str = ""  # e.g. torchvision resnet50 ImageNet weights (ResNet-50 is random otherwise)
    init: str = ""  # CAM checkpoint to start from (CLIMS starts from the baseline, as the paper does)
    steps: int = 500
    epochs: int = 0  # > 0: steps = (images // batch_size) * epochs, the official max_step (presets set it)
    batch_size: int = 8
    lr: float = 0.01
    classifier_lr_mult: float = 10.0
    weight_decay: float = 1e-4
    momentum: float = 0.9
    freeze_bn: bool = True  # keep batch-norm statistics (small CPU batches)
    freeze_backbone: bool = False  # train only the 1x1 classifier
    cache_features: bool = False  # with freeze_backbone: compute backbone features once (no augmentation
    #                               but mirroring); the fast CPU setting
    cache_file: str = ""  # reuse / store that feature cache here (checked against ids, crop, backbone)
    seed: int = 0
    log_every: int = 10
    threads: int = 0  # torch.set_num_threads per process; 0 = leave
    data: CAMDataCfg = field(default_factory=CAMDataCfg)
    clims: CLIMSCfg = field(default_factory=CLIMSCfg)


MODES = ("baseline", "clims", "baseline+clims")


def preset_values(name: str, mode: str) -> dict[str, object]:
    """The official CLIMS recipe ``name`` (``voc`` / ``coco``, :data:`OFFICIAL_PRESETS`) for ``mode`` as
    dotted config keys: ``baseline`` gets the CAM stage's optimiser, a CLIMS mode the CLIMS stage's;
    both get the loss weights, CBS threshold, background list and prompts."""
    if name not in OFFICIAL_PRESETS:
        raise TextsegError(f"preset must be one of {', '.join(OFFICIAL_PRESETS)}, got {name!r}")
    stage = OFFICIAL_PRESETS[name]["clims" if "clims" in mode else "baseline"]
    clims = OFFICIAL_PRESETS[name]["clims"]
    alpha, beta, gamma, delta = clims["weights"]
    return {"lr": stage["lr"], "epochs": stage["epochs"], "batch_size": stage["batch_size"], **OFFICIAL_OPTIM,
            "data.crop_size": OFFICIAL_DATA["crop_size"], "data.scale": list(OFFICIAL_DATA["scale"]),
            "clims.alpha": alpha, "clims.beta": beta, "clims.gamma": gamma, "clims.delta": delta,
            "clims.cbs_threshold": clims["cbs_threshold"], "clims.background": name, "clims.reg_over": "all",
            "clims.input_norm": "imagenet", "clims.prompt_names": OFFICIAL_PROMPT_NAMES}


def preset_overrides(name: str, mode: str) -> list[str]:
    """:func:`preset_values` as ``key=value`` overrides for :func:`~textseg.train.config.load_config`
    (the CLI puts them before the user's ``--set`` items, which therefore win)."""
    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return str(v)

    return [f"{k}={fmt(v)}" for k, v in preset_values(name, mode).items()]


def apply_preset(cfg: CAMTrainCfg, name: str) -> CAMTrainCfg:
    """Set ``cfg`` (in place, for its ``mode``) to the official recipe ``name``; returns ``cfg``."""
    for key, v in preset_values(name, cfg.mode).items():
        node, *path = key.split(".")[::-1]
        obj = cfg
        for part in reversed(path):
            obj = getattr(obj, part)
        setattr(obj, node, tuple(v) if isinstance(v, list) else v)
    return cfg


def build_optimizer(model: CAMNet, cfg: CAMTrainCfg) -> torch.optim.SGD:
    """SGD over the backbone at ``lr`` and the classifier at ``classifier_lr_mult * lr`` (each group's
    ``initial_lr`` is what :func:`poly_lr` decays)."""
    groups = [g for g in model.param_groups(cfg.lr, cfg.classifier_lr_mult) if g["params"]]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def total_steps(cfg: CAMTrainCfg, n_images: int) -> int:
    """``(n_images // batch_size) * epochs`` when ``epochs`` is set (the official ``max_step``), else
    ``steps``."""
    if cfg.epochs > 0:
        return max(1, n_images // cfg.batch_size) * cfg.epochs
    return cfg.steps


def poly_lr(initial: float, step: int, total: int, power: float = 0.9) -> float:
    """The poly schedule of IRN / CLIMS' PolyOptimizer: ``initial * (1 - step / total) ** power``
    before optimiser step ``step`` (0-based)."""
    return initial * (1 - step / total) ** power


def load_evaluator(name: str, weights: str = "") -> DualEncoder:
    """Any model textseg loads (``load_model``), frozen."""
    from textseg.weights.load import load_model

    model = load_model(name=name or None, weights=weights or None)
    return model.eval().requires_grad_(False)


def resolve_classes(data: CAMDataCfg) -> list[str]:
    if data.classes:
        return read_class_list(data.classes)
    root = Path(data.root)
    cand = root / "classes.txt" if root.is_dir() else root.parent / "classes.txt"
    if cand.is_file():
        return read_class_list(cand)
    raise TextsegError("no class list: pass --classes FILE or a comma-separated list")


class _Scores(nn.Module):
    """DDP needs one forward: the raw score maps (logits and sigmoid maps both derive from them),
    from pixels or, with a frozen backbone, from cached backbone features."""

    def __init__(self, net: CAMNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, features: bool = False) -> torch.Tensor:
        return self.net.classifier(x) if features else self.net.scores(x)


class FeatureCache(torch.utils.data.Dataset):
    """Frozen-backbone training: every image (long side ``crop``, gray-padded square) and its mirror,
    with the backbone features computed once. Items: ``(image uint8 3 x S x S, features, target)``."""

    def __init__(self, dataset: CAMTrainDataset, model: CAMNet, batch_size: int = 8, progress: bool = False,
                 cache_file: str | Path | None = None):
        base = CAMTrainDataset(dataset.items, dataset.class_names, dataset.crop, augment=False)
        self.targets = base.targets
        key = {"ids": [it.id for it in base.items], "crop": base.crop,
               "backbone": float(sum(p.double().sum() for p in model.backbone.state_dict().values()))}
        if cache_file and Path(cache_file).is_file():
            saved = torch.load(cache_file, map_location="cpu", weights_only=True)
            if saved.get("key") == key:
                self.images, self.feats = saved["images"], saved["feats"]
                return
        images, feats = [], []
        idx = range(0, len(base), batch_size)
        if progress:
            from tqdm import tqdm

            idx = tqdm(idx, desc="caching backbone features", dynamic_ncols=True)
        with torch.no_grad():
            for i in idx:
                x = torch.stack([base[j][0] for j in range(i, min(i + batch_size, len(base)))])
                x = torch.stack([x, x.flip(-1)], dim=1).flatten(0, 1)  # image, mirror, image, mirror...
                feats.append(model.backbone(model.normalize(x)).to(torch.float16))
                images.append((x * 255).round().to(torch.uint8))
        self.images, self.feats = torch.cat(images), torch.cat(feats)
        if cache_file:
            Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
            torch.save({"key": key, "images": self.images, "feats": self.feats}, cache_file)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.feats[i], self.targets[i // 2]


def _set_bn_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def train_cam(cfg: CAMTrainCfg, progress: bool = True) -> dict:
    """Train a CAM network (baseline, CLIMS or both) and write ``<out>/cam.safetensors``,
    ``<out>/config.yaml`` and ``<out>/log.jsonl``. Works alone or under ``torchrun`` (DDP).
    Returns a summary dict (first/last logged losses, steps, seconds)."""
    from textseg.train import dist
    from textseg.train.config import save_config

    if cfg.mode not in MODES:
        raise TextsegError(f"mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    info = dist.init_distributed("cpu" if not torch.cuda.is_available() else "auto")
    device = info.device
    seed = cfg.seed + info.rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(cfg.seed)  # same initial classifier on every rank

    class_names = resolve_classes(cfg.data)
    items = load_image_labels(cfg.data.root, cfg.data.labels or None, cfg.data.images or None)
    if cfg.data.split:
        from textseg.data.splits import split_ids

        keep = set(split_ids(cfg.data.root, cfg.data.split))
        items = [it for it in items if it.id in keep]
    dataset = CAMTrainDataset(items, class_names, cfg.data.crop_size, cfg.data.scale)
    n_pos = sum(int(t.sum() > 0) for t in dataset.targets)
    if n_pos == 0:
        raise TextsegError("no training image holds any of the classes; check --classes against the labels")

    if cfg.init:
        model = load_cam(cfg.init)
        if [canonical(c) for c in model.class_names] != [canonical(c) for c in class_names]:
            raise TextsegError(f"{cfg.init}: its classes differ from the class list being trained")
    else:
        model = CAMNet(CAMConfig(class_names, cfg.backbone, cfg.pretrained, cfg.data.crop_size))
        if cfg.backbone_weights:
            from textseg.models.cam import load_backbone_weights

            load_backbone_weights(model, cfg.backbone_weights)
    model.to(device).train()
    if cfg.freeze_bn:
        _set_bn_eval(model)
    if cfg.cache_features and not cfg.freeze_backbone:
        raise TextsegError("cache_features needs freeze_backbone (features of a trained backbone change)")
    if cfg.freeze_backbone:
        model.backbone.requires_grad_(False).eval()
    scorer = _Scores(model)
    if info.world_size > 1:
        scorer = nn.parallel.DistributedDataParallel(scorer, device_ids=None if device.type == "cpu" else [device])

    clims = None
    if "clims" in cfg.mode:
        c = cfg.clims
        evaluator = load_evaluator(c.evaluator, c.evaluator_weights).to(device)
        clims = CLIMSLoss(evaluator, class_names, c.background, CLIMSWeights(c.alpha, c.beta, c.gamma, c.delta),
                          c.cbs_threshold, c.template or None, c.eval_size or None, c.reg_over, c.input_norm,
                          c.prompt_names).to(device)

    optimizer = build_optimizer(model, cfg)
    steps = total_steps(cfg, len(dataset))
    if cfg.cache_features:
        dataset = FeatureCache(dataset, model, progress=progress and info.is_main,
                               cache_file=cfg.cache_file if info.is_main or info.world_size == 1 else None)
    sampler = torch.utils.data.DistributedSampler(dataset, info.world_size, info.rank, shuffle=True,
                                                  seed=cfg.seed, drop_last=len(dataset) >= info.world_size)
    per_rank = max(1, cfg.batch_size // info.world_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=per_rank, sampler=sampler,
                                         num_workers=cfg.data.workers, drop_last=len(sampler) > per_rank)
    out = Path(cfg.out)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        log_file = (out / "log.jsonl").open("w")
    bar = None
    if progress and info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc=f"cam train ({cfg.mode})", dynamic_ncols=True)
    history: list[dict] = []
    step, epoch, t0 = 0, 0, time.time()
    acc: dict[str, float] = {}
    while step < steps:
        sampler.set_epoch(epoch)
        epoch += 1
        for batch in loader:
            if step >= steps:
                break
            for g in optimizer.param_groups:  # poly schedule (power 0.9), as IRN / CLIMS
                g["lr"] = poly_lr(g["initial_lr"], step, steps)
            if cfg.cache_features:
                images, feats, labels = batch
                images, labels = images.to(device).float() / 255, labels.to(device)
                scores = scorer(feats.to(device).float(), features=True)
            else:
                images, labels = batch[0].to(device), batch[1].to(device)
                scores = scorer(model.normalize(images))
            terms: dict[str, torch.Tensor] = {}
            loss = scores.sum() * 0.0
            if "baseline" in cfg.mode:
                terms["cls"] = baseline_loss(scores.mean(dim=(2, 3)), labels)
                loss = loss + terms["cls"]
            if clims is not None:
                parts = clims(torch.sigmoid(scores), images, labels)
                loss = loss + parts["loss"]
                terms.update({k: parts[k] for k in ("otm", "btm", "cbs", "reg")})
            check_finite(float(loss.detach()), "the training loss")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            vals = {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}
            for k, v in vals.items():
                acc[k] = acc.get(k, 0.0) + float(dist.all_reduce_mean(v.float()))
            acc["n"] = acc.get("n", 0) + 1
            if step % cfg.log_every == 0 or step == steps:
                n = acc.pop("n")
                rec = {"step": step, **{k: round(v / n, 6) for k, v in acc.items()},
                       "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.time() - t0, 1)}
                acc = {}
                history.append(rec)
                if info.is_main:
                    log_file.write(json.dumps(rec) + "\n")
                    log_file.flush()
                    if bar is not None:
                        bar.set_postfix({k: f"{v:.4f}" for k, v in rec.items() if k not in ("step", "seconds", "lr")})
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    summary = {"steps": step, "seconds": round(time.time() - t0, 1), "mode": cfg.mode,
               "first": history[0] if history else None, "last": history[-1] if history else None,
               "world_size": info.world_size, "checkpoint": str(out / "cam.safetensors")}
    if info.is_main:
        log_file.close()
        save_cam(model, out / "cam.safetensors", extra={"mode": cfg.mode, "steps": step})
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    dist.barrier()
    dist.cleanup()
    return summary


def check_finite(x: float, what: str) -> None:
    if not math.isfinite(x):
        raise TextsegError(f"{what} became {x}; lower the learning rate")
