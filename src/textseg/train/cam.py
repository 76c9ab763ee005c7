"""The CAM / CLIMS training recipe (``textseg train cam``) on the engine (:mod:`textseg.train.engine`).

A CAM network (:mod:`textseg.wsss.cam`) learns from image-level labels with the multi-label
baseline loss, the CLIMS loss (:mod:`textseg.wsss.clims`) with a frozen image-text evaluator, or
both summed (``mode``). The engine brings DDP (``torchrun``), logging, atomic checkpoints and exact
resume (``train.resume=auto``, the default: a restarted run continues from ``train.out_dir``'s newest
checkpoint); the recipe supplies the training module, the dataset and the official optimiser: SGD
with the classifier at ``classifier_lr_mult`` x ``train.lr`` under the engine's poly schedule. The run
ends with ``<train.out_dir>/model.safetensors``, a native checkpoint that ``--weights`` loads.

Every setting lives in :class:`CAMTrainCfg`; ``--config FILE`` and ``--set key=value`` override it
and ``--preset voc|coco`` (:func:`preset_values`) sets the official recipe beneath ``--set``.
``train.batch_size`` is per process, as everywhere on the engine: the presets' batch is the official
global batch on one process (under ``torchrun`` divide it by the number of processes).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from textseg.data.image_labels import canonical, load_image_labels, multi_hot, read_class_list
from textseg.distributed import barrier, init_distributed
from textseg.errors import TextsegError
from textseg.models.base import DualEncoder
from textseg.train.engine import TrainConfig, Trainer, seed_everything
from textseg.wsss.cam import CAMConfig, CAMNet, load_backbone_weights
from textseg.wsss.clims import CLIMSLoss, CLIMSWeights, baseline_loss

# The official recipes (CVI-SZU/CLIMS). VOC: run_sample.py's defaults, which its README command uses.
# COCO: the README's training command (2 GPUs x 16 images, 8 epochs, lr 5e-4, hyper 2,14,1.25,0.2,
# CBS threshold 0.285); run_sample_coco.py's own defaults differ (hyper 2,14,2,0.2, lr 2.5e-4,
# 15 epochs, 16 images) and stay reachable with --set clims.gamma=2 / train.lr / epochs / train.batch_size.
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
OFFICIAL_OPTIM = {"classifier_lr_mult": 10.0, "train.weight_decay": 1e-4, "momentum": 1e-4, "freeze_bn": False}
OFFICIAL_DATA = {"crop_size": 512, "scale": (320 / 512, 640 / 512)}
OFFICIAL_PROMPT_NAMES = "person=player"
MODES = ("baseline", "clims", "baseline+clims")


# ------------------------------------------------------------------------------------------ data
class CAMTrainDataset(torch.utils.data.Dataset):
    """Labeled images -> ``(3 x crop x crop`` RGB in [0, 1], ``K`` multi-hot): random rescale (long
    side ``crop * U(scale)``), horizontal flip, random crop / gray padding (python ``random``: the
    engine's checkpoints restore its state, so a resumed run draws the same crops)."""

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
        device = model.classifier.weight.device
        with torch.no_grad():
            for i in idx:
                x = torch.stack([base[j][0] for j in range(i, min(i + batch_size, len(base)))])
                x = torch.stack([x, x.flip(-1)], dim=1).flatten(0, 1)  # image, mirror, image, mirror...
                feats.append(model.backbone(model.normalize(x.to(device))).to(torch.float16).cpu())
                images.append((x * 255).round().to(torch.uint8))
        self.images, self.feats = torch.cat(images), torch.cat(feats)
        if cache_file:
            Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
            torch.save({"key": key, "images": self.images, "feats": self.feats}, cache_file)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.feats[i], self.targets[i // 2]


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


@dataclass
class CLIMSCfg:
    evaluator: str = ""  # any model textseg loads (name); "" = offline, or the model of evaluator_weights
    evaluator_weights: str = ""  # ... or weights file / folder (a CLIP's, a LiT's model.safetensors ...); "A,B,C":
    # an ensemble of those models (textseg's option: the mean of their cosines, textseg.models.ensemble)
    background: str = "voc"  # voc | coco | FILE
    alpha: float = 10.0
    beta: float = 24.0
    gamma: float = 1.0
    delta: float = 0.2
    cbs_threshold: float | None = 0.26
    cbs_reference: str = "none"  # official: an absolute threshold; "blank" / "class": over a blank image's / the
    # foreground's own class score (clims.py)
    template: str = ""  # "" = "a photo of {}." (CLIP-like) / "{}" (offline), see default_template
    eval_size: int = 0  # 0 = the evaluator's own image size
    reg_over: str = "all"  # official: REG over every map; "present": over the present classes' maps only
    input_norm: str = "imagenet"  # official: ImageNet mean/std; "evaluator": the evaluator's own
    score: str = "cosine"  # official: cosine similarity; "softmax": probability over all prompts (clims.py)
    prompt_names: str = ""  # class=word overrides for the prompts; the presets set "person=player"


def _engine_defaults() -> TrainConfig:
    return TrainConfig(out_dir="runs/cam", steps=500, batch_size=8, lr=0.01, weight_decay=1e-4,
                       schedule="poly", poly_power=0.9)


@dataclass
class CAMTrainCfg:
    mode: str = "baseline"  # baseline | clims | baseline+clims
    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    backbone_weights: str = ""  # e.g. torchvision resnet50 ImageNet weights (ResNet-50 is random otherwise)
    output_stride: int = 16  # CAMConfig.output_stride of a new network (ours: tiny 8 / 4); with init: the init's
    init: str = ""  # CAM model to start from (CLIMS starts from the baseline's model.safetensors, as the paper)
    epochs: int = 0  # > 0: train.steps = (images // global batch) * epochs, the official max_step (presets)
    classifier_lr_mult: float = 10.0
    momentum: float = 0.9
    freeze_bn: bool = True  # keep batch-norm statistics (small CPU batches)
    freeze_backbone: bool = False  # train only the 1x1 classifier
    cache_features: bool = False  # with freeze_backbone: compute backbone features once (no augmentation
    #                               but mirroring); the fast CPU setting
    cache_file: str = ""  # reuse / store that feature cache here (checked against ids, crop, backbone)
    background_threshold: float = 0.15  # stored in the model: its default background threshold when segmenting
    threads: int = 0  # torch.set_num_threads per process; 0 = leave
    data: CAMDataCfg = field(default_factory=CAMDataCfg)
    clims: CLIMSCfg = field(default_factory=CLIMSCfg)
    train: TrainConfig = field(default_factory=_engine_defaults)


def preset_values(name: str, mode: str) -> dict[str, object]:
    """The official CLIMS recipe ``name`` (``voc`` / ``coco``, :data:`OFFICIAL_PRESETS`) for ``mode`` as
    dotted config keys: ``baseline`` gets the CAM stage's optimiser, a CLIMS mode the CLIMS stage's;
    both get the loss weights, CBS threshold, background list and prompts."""
    if name not in OFFICIAL_PRESETS:
        raise TextsegError(f"preset must be one of {', '.join(OFFICIAL_PRESETS)}, got {name!r}")
    stage = OFFICIAL_PRESETS[name]["clims" if "clims" in mode else "baseline"]
    clims = OFFICIAL_PRESETS[name]["clims"]
    alpha, beta, gamma, delta = clims["weights"]
    return {"train.lr": stage["lr"], "epochs": stage["epochs"], "train.batch_size": stage["batch_size"],
            **OFFICIAL_OPTIM, "data.crop_size": OFFICIAL_DATA["crop_size"], "data.scale": list(OFFICIAL_DATA["scale"]),
            "clims.alpha": alpha, "clims.beta": beta, "clims.gamma": gamma, "clims.delta": delta,
            "clims.cbs_threshold": clims["cbs_threshold"], "clims.background": name, "clims.reg_over": "all",
            "clims.input_norm": "imagenet", "clims.prompt_names": OFFICIAL_PROMPT_NAMES}


def preset_overrides(name: str, mode: str) -> list[str]:
    """:func:`preset_values` as ``key=value`` overrides for :func:`~textseg.train.config.load_config`."""
    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return str(v)

    return [f"{k}={fmt(v)}" for k, v in preset_values(name, mode).items()]


def with_preset(config: str | None, overrides: Sequence[str], preset: str | None) -> list[str]:
    """The overrides with ``preset``'s values in front (so ``--set`` wins); the preset's stage
    follows the ``mode`` that the config file and ``overrides`` give."""
    if not preset:
        return list(overrides)
    from textseg.train.config import load_config

    mode = load_config(CAMTrainCfg, config, overrides).mode
    return [*preset_overrides(preset, mode), *overrides]


def apply_preset(cfg: CAMTrainCfg, name: str) -> CAMTrainCfg:
    """Set ``cfg`` (in place, for its ``mode``) to the official recipe ``name``; returns ``cfg``."""
    for key, v in preset_values(name, cfg.mode).items():
        *path, leaf = key.split(".")
        obj = cfg
        for part in path:
            obj = getattr(obj, part)
        setattr(obj, leaf, tuple(v) if isinstance(v, list) else v)
    return cfg


def build_optimizer(model: CAMNet, cfg: CAMTrainCfg) -> torch.optim.SGD:
    """SGD over the backbone at ``train.lr`` and the classifier at ``classifier_lr_mult * train.lr``;
    the engine's schedule multiplies each group's ``initial_lr``."""
    lr = cfg.train.lr
    groups = [g for g in model.param_groups(lr, cfg.classifier_lr_mult) if g["params"]]
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.train.weight_decay)


def total_steps(cfg: CAMTrainCfg, n_images: int, world_size: int = 1) -> int:
    """``(n_images // global batch) * epochs`` when ``epochs`` is set (the official ``max_step``), else
    ``train.steps``."""
    if cfg.epochs > 0:
        return max(1, n_images // (cfg.train.batch_size * world_size)) * cfg.epochs
    return cfg.train.steps


def load_evaluator(name: str, weights: str = "") -> DualEncoder:
    """Any model textseg loads (``load_model``), frozen: ``name`` alone, ``weights`` (any checkpoint:
    CLIP, LiT from ``textseg train clip``, ...; with a ``name`` too it must be of that model), or
    neither: the offline model. Comma-separated ``weights`` (``"A,B,C"``): an
    :class:`~textseg.models.ensemble.EnsembleEvaluator` of those models (each with ``name``)."""
    from textseg.models.ensemble import EnsembleEvaluator
    from textseg.weights.load import load_model

    paths = [w.strip() for w in weights.split(",")] if weights else []
    if len(paths) > 1:
        if not all(paths):
            raise TextsegError(f"evaluator weights {weights!r}: an empty path in the list")
        model = EnsembleEvaluator([load_model(name=name or None, weights=w) for w in paths])
    else:
        model = load_model(name=name or None, weights=weights or None)
    return model.eval().requires_grad_(False)


def load_init(path: str) -> CAMNet:
    """The CAM network to start from: a native model file (a run's ``model.safetensors``) or a
    :func:`~textseg.wsss.cam.save_cam` file."""
    from textseg.wsss.pseudo_labels import load_cam_model

    return load_cam_model(path)


def resolve_classes(data: CAMDataCfg) -> list[str]:
    if data.classes:
        return read_class_list(data.classes)
    root = Path(data.root)
    cand = root / "classes.txt" if root.is_dir() else root.parent / "classes.txt"
    if cand.is_file():
        return read_class_list(cand)
    raise TextsegError("no class list: --set data.classes=FILE (or a comma-separated list)")


def set_bn_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


# ---------------------------------------------------------------------------------------- module
class CAMTrainModule(nn.Module):
    """``forward(batch) -> {"loss", "cls"?, "otm"?, "btm"?, "cbs"?, "reg"?}`` for the engine.

    ``batch``: ``(images, labels)`` (pixels in [0, 1]) or, with cached features, ``(images uint8,
    features, labels)``. The CLIMS loss (and its frozen evaluator) is held outside the registered
    submodules: it is neither trained, synchronised nor written into checkpoints."""

    def __init__(self, net: CAMNet, mode: str, clims: CLIMSLoss | None = None, freeze_bn: bool = True,
                 freeze_backbone: bool = False, cached: bool = False):
        super().__init__()
        self.net = net
        self.mode, self.freeze_bn, self.freeze_backbone, self.cached = mode, freeze_bn, freeze_backbone, cached
        self._clims = (clims,)  # a tuple: not a submodule

    def train(self, mode: bool = True) -> CAMTrainModule:
        super().train(mode)
        if mode and self.freeze_bn:
            set_bn_eval(self.net)
        if self.freeze_backbone:
            self.net.backbone.eval()
        return self

    def forward(self, batch) -> dict:
        if self.cached:
            images, feats, labels = batch
            images = images.float() / 255
            scores = self.net.classifier(feats.float())
        else:
            images, labels = batch
            scores = self.net.scores(self.net.normalize(images))
        out: dict[str, torch.Tensor] = {}
        loss = scores.sum() * 0.0
        if "baseline" in self.mode:
            out["cls"] = baseline_loss(scores.mean(dim=(2, 3)), labels)
            loss = loss + out["cls"]
        clims = self._clims[0]
        if clims is not None:
            parts = clims(torch.sigmoid(scores), images, labels)
            loss = loss + parts["loss"]
            out.update({k: parts[k] for k in ("otm", "btm", "cbs", "reg")})
        return {"loss": loss, **out}


# ---------------------------------------------------------------------------------------- recipe
def build_trainer(cfg: CAMTrainCfg, callbacks: Sequence[Callable[[Trainer], None]] = ()) -> Trainer:
    """Data, network, CLIMS loss and optimiser for ``cfg`` -> a :class:`Trainer` (resumed when
    ``train.resume`` finds a checkpoint)."""
    if cfg.mode not in MODES:
        raise TextsegError(f"mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    if cfg.cache_features and not cfg.freeze_backbone:
        raise TextsegError("cache_features needs freeze_backbone (features of a trained backbone change)")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    info = init_distributed(cfg.train.device)
    seed_everything(cfg.train.seed)  # same initial classifier on every rank

    class_names = resolve_classes(cfg.data)
    items = load_image_labels(cfg.data.root, cfg.data.labels or None, cfg.data.images or None)
    if cfg.data.split:
        from textseg.data.splits import split_ids

        keep = set(split_ids(cfg.data.root, cfg.data.split))
        items = [it for it in items if it.id in keep]
    dataset = CAMTrainDataset(items, class_names, cfg.data.crop_size, cfg.data.scale)
    if not any(int(t.sum() > 0) for t in dataset.targets):
        raise TextsegError("no training image holds any of the classes; check data.classes against the labels")

    if cfg.init:
        net = load_init(cfg.init)
        if [canonical(c) for c in net.class_names] != [canonical(c) for c in class_names]:
            raise TextsegError(f"{cfg.init}: its classes differ from the class list being trained")
    else:
        net = CAMNet(CAMConfig(class_names, cfg.backbone, cfg.pretrained, cfg.data.crop_size,
                               output_stride=cfg.output_stride))
        if cfg.backbone_weights:
            load_backbone_weights(net, cfg.backbone_weights)
    net.config.background_threshold = cfg.background_threshold
    net.default_background_threshold = cfg.background_threshold
    if cfg.freeze_backbone:
        net.backbone.requires_grad_(False)
    net.to(info.device)

    clims = None
    if "clims" in cfg.mode:
        c = cfg.clims
        evaluator = load_evaluator(c.evaluator, c.evaluator_weights).to(info.device)
        clims = CLIMSLoss(evaluator, class_names, c.background, CLIMSWeights(c.alpha, c.beta, c.gamma, c.delta),
                          c.cbs_threshold, c.template or None, c.eval_size or None, c.reg_over, c.input_norm,
                          c.prompt_names, c.score, c.cbs_reference).to(info.device)

    cfg = copy.deepcopy(cfg)
    cfg.train.steps = total_steps(cfg, len(dataset), info.world_size)
    if cfg.cache_features:
        dataset = FeatureCache(dataset, net, progress=cfg.train.progress and info.is_main,
                               cache_file=cfg.cache_file if info.is_main or info.world_size == 1 else None)
    random.seed(cfg.train.seed + info.rank)  # per-rank augmentation (a resume restores these states)
    np.random.seed(cfg.train.seed + info.rank)
    module = CAMTrainModule(net, cfg.mode, clims, cfg.freeze_bn, cfg.freeze_backbone, cfg.cache_features)
    return Trainer(cfg.train, module, dataset, optimizer=build_optimizer(net, cfg), config=cfg, callbacks=callbacks)


def train_cam(cfg: CAMTrainCfg, callbacks: Sequence[Callable[[Trainer], None]] = ()) -> dict:
    """Train (or resume) and write ``<train.out_dir>/model.safetensors`` (native, with its card);
    the engine writes ``config.yaml``, ``log.jsonl`` and ``checkpoints/``. Works alone or under
    ``torchrun``. Returns the engine's final metrics plus ``model`` (the file) and ``world_size``."""
    from textseg.weights.load import save_model

    trainer = build_trainer(cfg, callbacks)
    result = trainer.fit()
    path = Path(cfg.train.out_dir) / "model.safetensors"
    if trainer.info.is_main:
        save_model(trainer.module.net, path, {"source": "textseg train cam", "mode": cfg.mode, "steps": trainer.step})
    barrier()
    return {**result, "mode": cfg.mode, "world_size": trainer.info.world_size, "model": str(path)}
