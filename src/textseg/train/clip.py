"""CLIP contrastive training recipe (``textseg train clip``): CLIP from scratch, or LiT with locked towers.

Two architectures (``model.arch``):

* ``lit`` (default): :class:`~textseg.models.lit.LiTModel`, the offline model's pretrained
  EfficientNet-Lite + MiniLM towers with learned projection heads. ``lock_image`` / ``lock_text``
  freeze the towers (LiT = locked image tower); with both locked and ``cache_features``, the tower
  features of every image and caption are computed once and only the heads train (seconds on CPU).
* ``clip``: :class:`~textseg.models.clip.CLIP` built from ``model.clip`` (a ``CLIPConfig``:
  ``model.clip.vision.width=768`` ...), ``lock_image`` freezes ``visual``, ``lock_text`` ``text``.

Loss: symmetric InfoNCE over the global batch (features gathered across ranks with gradient,
``loss.local_loss`` = open_clip's local-loss memory trick), logit scale learnable and clamped at 100 (``model.lock_logit_scale``: fixed at its initial value).
The run ends with ``<train.out_dir>/model.safetensors`` (CLIP or LiT, native format) for
``textseg segment/classify --weights``. Evaluation (every ``train.eval_every`` steps and at the end): image->text and text->image
retrieval R@1/5/10 on ``data.val`` and, when ``eval.zeroshot`` and the folder has ``labels.json``
+ ``classes.txt``, zero-shot multi-label classification (top-1 / top-5 hit rate).

    cfg = load_config(ClipRecipeConfig, "lit.yaml", ["train.steps=200"])
    result = train_clip(cfg)   # {"step": 200, "loss": ..., "i2t_R@1": ..., ...}
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from textseg.data.imagetext import CaptionDataset, ImageTextCollate, TarShardDataset, pick_caption
from textseg.distributed import print0
from textseg.errors import TextsegError
from textseg.models.clip import CLIPConfig
from textseg.preprocess import Preprocess
from textseg.prompts import resolve_templates
from textseg.train.checkpoint import cached, file_stamp
from textseg.train.engine import TrainConfig, Trainer, seed_everything
from textseg.train.losses import MAX_LOGIT_SCALE, ClipLoss


@dataclass
class ModelSection:
    arch: str = "lit"  # lit | clip
    image_variant: str = "lite0"  # lit: EfficientNet-Lite variant
    embed_dim: int = 256  # lit: projection size
    clip: CLIPConfig = field(default_factory=CLIPConfig)  # clip: architecture
    lock_image: bool = True
    lock_text: bool = True
    # textseg's option (default off = CLIP's learnable scale): keep the logit scale at its initial value
    # (``model.clip.init_logit_scale``, e.g. ``4.60517`` = log 100, real CLIP's cap) for the whole run
    lock_logit_scale: bool = False
    cache_features: bool = True  # lit with both towers locked: precompute tower features
    feature_cache: str = ""  # folder to keep those features between runs ("" = recompute each run)


@dataclass
class DataSection:
    train: str = ""  # folder with a caption file, or tar shards ("shards/{0000..0099}.tar", globs)
    captions: str = "captions.jsonl"  # folder sources: JSONL or CSV relative to the folder
    train_split: str = ""  # e.g. train2017 (splits/<name>.txt or images_meta.json)
    val: str = ""  # folder for evaluation ("" = no evaluation)
    val_split: str = ""
    shuffle_buffer: int = 1000  # tar shards


@dataclass
class LossSection:
    local_loss: bool = False


@dataclass
class EvalSection:
    retrieval: bool = True
    zeroshot: bool = True  # needs labels.json + classes.txt in data.val
    templates: str = "simple"  # prompt set for zero-shot (see textseg.prompts)
    batch_size: int = 64


@dataclass
class ClipRecipeConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    eval: EvalSection = field(default_factory=EvalSection)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/clip", lr=1e-3, weight_decay=0.1))


# ------------------------------------------------------------------------------------------ model
def image_tower(model: nn.Module) -> nn.Module:
    """The image tower of a CLIP (``visual``) or LiT (``image``) model."""
    return model.visual if hasattr(model, "visual") else model.image


def build_model(cfg: ModelSection) -> nn.Module:
    """The dual encoder to train, towers frozen as configured."""
    if cfg.arch == "lit":
        from textseg.models.lit import LiTConfig, LiTModel

        model = LiTModel(LiTConfig(image_variant=cfg.image_variant, embed_dim=cfg.embed_dim))
    elif cfg.arch == "clip":
        from textseg.models.clip import CLIP

        model = CLIP(cfg.clip)
    else:
        raise TextsegError(f"model.arch must be 'lit' or 'clip', got {cfg.arch!r}")
    if cfg.lock_image:
        image_tower(model).requires_grad_(False)
    if cfg.lock_text:
        model.text.requires_grad_(False)
    if cfg.lock_logit_scale:
        model.logit_scale.requires_grad_(False)
    return model


def clamped_scale(log_scale: torch.Tensor) -> torch.Tensor:
    """``exp(log_scale)`` clamped at 100 (no gradient beyond the clamp)."""
    return log_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()


class ClipTrainModule(nn.Module):
    """The training module the engine runs: batch -> symmetric InfoNCE.

    Batches hold ``image`` (pixels) or ``image_feat`` (cached tower features), and ``text``
    (tokens) or ``text_feat``. Frozen towers stay in eval mode (BatchNorm statistics untouched).
    """

    def __init__(self, model: nn.Module, lock_image: bool, lock_text: bool, local_loss: bool = False):
        super().__init__()
        self.model, self.lock_image, self.lock_text = model, lock_image, lock_text
        self.loss = ClipLoss(local_loss=local_loss)
        # LiT's locked towers are the packaged pretrained ones, rebuilt identically: not checkpointed
        # (a locked CLIP tower is random-initialised, so it is kept).
        if getattr(model, "name", "") == "lit":
            self.checkpoint_skip = tuple(p for p, locked in (("model.image.", lock_image),
                                                             ("model.text.", lock_text)) if locked)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.lock_image:
            image_tower(self.model).eval()
        if self.lock_text:
            self.model.text.eval()
        return self

    def forward(self, batch: dict) -> dict:
        m = self.model
        img = m.project_image(batch["image_feat"]) if "image_feat" in batch else m.encode_image(batch["image"])
        txt = m.project_text(batch["text_feat"]) if "text_feat" in batch else m.encode_text(batch["text"])
        scale = clamped_scale(m.logit_scale)
        loss = self.loss(F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1), scale)
        return {"loss": loss, "logit_scale": scale.detach()}


# ------------------------------------------------------------------------------------------- data
# The model's own preprocessing (OpenAI-identical resize + centre crop); name kept for recipes importing it.
ImageTransform = Preprocess


class CachedPairs(Dataset):
    """Precomputed tower features: one sample per image, one of its captions per epoch (seeded)."""

    def __init__(self, image_feats: torch.Tensor, text_feats: torch.Tensor, owner: Sequence[int], seed: int = 0):
        self.image_feats, self.text_feats, self.seed, self.epoch = image_feats, text_feats, seed, 0
        self.captions_of: list[list[int]] = [[] for _ in range(len(image_feats))]
        for t, i in enumerate(owner):
            self.captions_of[i].append(t)

    def __len__(self) -> int:
        return len(self.image_feats)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict:
        caps = self.captions_of[i]
        c = caps[pick_caption(self.seed, self.epoch, i, len(caps))]
        return {"image_feat": self.image_feats[i], "text_feat": self.text_feats[c]}


@torch.no_grad()
def _batched(fn: Callable[[torch.Tensor], torch.Tensor], items: list, batch_size: int,
             to_tensor: Callable[[list], torch.Tensor], device: torch.device) -> torch.Tensor:
    out = [fn(to_tensor(items[s : s + batch_size]).to(device)).float().cpu()
           for s in range(0, len(items), batch_size)]
    return torch.cat(out) if out else torch.empty(0)


def tower_features(model: nn.Module, ds: CaptionDataset, batch_size: int, device: torch.device,
                   cache_dir: str = ""):
    """(image tower features ``N x C``, caption tower features ``M x C'``, caption owner list).

    With ``cache_dir``, kept in ``<cache_dir>/lit-<hash>.pt`` keyed by the towers, the image size and
    the dataset's image files (path, size, mtime) and captions, and reused by later runs."""
    texts, owner = ds.texts()

    def compute() -> dict:
        img = _batched(model.image_features, list(range(len(ds))), batch_size,
                       lambda idx: torch.stack([ds.load(i) for i in idx]), device)
        txt = _batched(model.text_features, texts, batch_size, model.tokenize, device)
        return {"image": img, "text": txt, "owner": torch.tensor(owner)}

    key = [model.cfg.image_variant, model.preprocess_cfg.image_size,
           [(str(r.image), file_stamp(r.image), r.captions) for r in ds.records]]
    saved = cached(cache_dir, "lit", key, compute)
    return saved["image"], saved["text"], saved["owner"].tolist()


# ------------------------------------------------------------------------------------------- eval
def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, owner: Sequence[int],
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image<->text retrieval recall (%) from L2-normalised ``N x D`` images and ``M x D`` captions
    (caption j describes image ``owner[j]``). text->image: the caption's image is in the top k;
    image->text: any of the image's captions is in the top k."""
    owner_t = torch.as_tensor(owner)
    sim = image_emb @ text_emb.t()  # N x M
    # text -> image: rank of the true image among N
    true_t2i = sim[owner_t, torch.arange(len(owner_t))]
    rank_t2i = (sim > true_t2i[None]).sum(0)  # M
    # image -> text: best rank among its captions
    order = sim.argsort(dim=1, descending=True)  # N x M
    hit = owner_t[order] == torch.arange(sim.shape[0])[:, None]  # N x M
    rank_i2t = hit.float().argmax(dim=1)
    out = {}
    for k in ks:
        out[f"t2i_R@{k}"] = 100.0 * (rank_t2i < k).float().mean().item()
        out[f"i2t_R@{k}"] = 100.0 * (rank_i2t < k).float().mean().item()
    return out


def zeroshot_metrics(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Multi-label zero-shot classification: ``labels`` is an ``N x C`` bool matrix of the classes
    present; top-k hit = the fraction of images whose k best classes include a present one (%)."""
    order = (image_emb @ class_emb.t()).argsort(dim=1, descending=True)
    hits = labels.gather(1, order)
    return {f"zeroshot_top{k}": 100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in (1, 5)}


class ClipEvaluator:
    """Retrieval (and zero-shot) evaluation of a dual encoder on a caption folder.

    With ``cached`` tower features (locked LiT towers) only the heads run at each evaluation.
    """

    def __init__(self, ds: CaptionDataset, cfg: EvalSection, model: nn.Module, device: torch.device,
                 cached: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.ds, self.cfg, self.device = ds, cfg, device
        self.texts, self.owner = ds.texts()
        self.cached = cached
        self.class_names: list[str] = []
        labels_file, classes_file = ds.root / "labels.json", ds.root / "classes.txt"
        if cfg.zeroshot and labels_file.is_file() and classes_file.is_file():
            names = [c.strip() for c in classes_file.read_text().splitlines() if c.strip()]
            self.class_names = [c for c in names if c != "background"]
            per_image = json.loads(labels_file.read_text())
            index = {c: j for j, c in enumerate(self.class_names)}
            self.labels = torch.zeros(len(ds), len(self.class_names), dtype=torch.bool)
            for i, rec in enumerate(ds.records):
                for name in per_image.get(rec.key, []):
                    if name in index:
                        self.labels[i, index[name]] = True
            self.labels_keep = self.labels.any(dim=1)  # images with at least one known class
            self.templates = resolve_templates(cfg.templates)
            self.prompts = [t.format(c) for c in self.class_names for t in self.templates]
            self.prompt_feats = (_batched(model.text_features, self.prompts, cfg.batch_size, model.tokenize, device)
                                 if cached is not None else None)

    def _images(self, model) -> torch.Tensor:
        if self.cached is not None:
            return model.project_image(self.cached[0].to(self.device), normalize=True).float().cpu()
        return _batched(lambda x: model.encode_image(x, normalize=True), list(range(len(self.ds))),
                        self.cfg.batch_size, lambda idx: torch.stack([self.ds.load(i) for i in idx]), self.device)

    def _texts(self, model, texts: list[str], feats: torch.Tensor | None) -> torch.Tensor:
        if feats is not None:
            return model.project_text(feats.to(self.device), normalize=True).float().cpu()
        return _batched(lambda t: model.encode_text(t, normalize=True), texts, self.cfg.batch_size,
                        model.tokenize, self.device)

    @torch.no_grad()
    def __call__(self, model: nn.Module, step: int = 0) -> dict[str, float]:
        model = getattr(model, "model", model)  # the training module wraps the dual encoder
        img = self._images(model)
        out: dict[str, float] = {}
        if self.cfg.retrieval:
            txt = self._texts(model, self.texts, self.cached[1] if self.cached is not None else None)
            out.update(retrieval_metrics(img, txt, self.owner))
        if self.class_names:
            cls = self._texts(model, self.prompts, self.prompt_feats)
            cls = F.normalize(cls.view(len(self.class_names), len(self.templates), -1).mean(1), dim=-1)
            keep = self.labels_keep
            out.update(zeroshot_metrics(img[keep], cls, self.labels[keep]))
        return out


# ------------------------------------------------------------------------------------------ recipe
def build_trainer(cfg: ClipRecipeConfig) -> Trainer:
    """Model, data, evaluator and engine for ``cfg`` (call ``.fit()`` on the result)."""
    from textseg.distributed import init_distributed

    d = cfg.data
    if not d.train:
        raise TextsegError("set data.train to a caption folder or tar shards (--set data.train=PATH)")
    use_cache = cfg.model.arch == "lit" and cfg.model.lock_image and cfg.model.lock_text and cfg.model.cache_features
    is_tar = d.train.endswith(".tar") or ".tar," in d.train
    if is_tar and use_cache:
        raise TextsegError("model.cache_features needs a caption folder, not tar shards; set it false")
    # Data first (bad paths fail fast); the transform is the model's preprocessing, set below.
    if is_tar:
        train_ds = TarShardDataset(d.train, None, shuffle=cfg.train.shuffle, shuffle_buffer=d.shuffle_buffer,
                                   seed=cfg.train.seed)
    else:
        train_ds = CaptionDataset(d.train, d.captions, d.train_split or None, None, seed=cfg.train.seed)
    val_ds = CaptionDataset(d.val, d.captions, d.val_split or None, None, caption="first") if d.val else None

    info = init_distributed(cfg.train.device)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model).to(info.device)
    for ds in (train_ds, val_ds):
        if ds is not None:
            ds.transform = Preprocess(model.preprocess_cfg)
    dataset, collate = train_ds, ImageTextCollate(model.tokenize)
    if use_cache:
        print0(f"caching tower features of {len(train_ds)} training images ...")
        img, txt, owner = tower_features(model, train_ds, cfg.eval.batch_size, info.device, cfg.model.feature_cache)
        dataset, collate = CachedPairs(img, txt, owner, seed=cfg.train.seed), None
    evaluator = None
    if val_ds is not None:
        cached = None
        if use_cache:
            img, txt, _ = tower_features(model, val_ds, cfg.eval.batch_size, info.device, cfg.model.feature_cache)
            cached = (img, txt)
        evaluator = ClipEvaluator(val_ds, cfg.eval, model, info.device, cached)
    module = ClipTrainModule(model, cfg.model.lock_image, cfg.model.lock_text, cfg.loss.local_loss)
    return Trainer(cfg.train, module, dataset, collate_fn=collate, eval_fn=evaluator, config=cfg)


def train_clip(cfg: ClipRecipeConfig) -> dict[str, float]:
    """Build and run, then write the dual encoder as ``<out_dir>/model.safetensors`` (native format,
    loadable with ``--weights``); returns the final train metrics merged with the last evaluation."""
    trainer = build_trainer(cfg)
    result = trainer.fit()
    path = trainer.save_model(trainer.final_module().model, {"source": "textseg train clip"})
    return {**result, "weights": str(path)}
