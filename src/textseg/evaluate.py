"""Benchmark evaluation: a dataset, a predictor, one exact confusion matrix, a report.

>>> from textseg.data.benchmarks import build_dataset
>>> from textseg.evaluate import SegmenterPredictor, evaluate
>>> ds = build_dataset("voc", "/data/VOCdevkit")
>>> pred = SegmenterPredictor(model, ds, protocol="naclip")     # or SegmentCfg(...) options
>>> result = evaluate(ds, pred)                                 # sharded under torchrun
>>> result.report()["miou"]                                     # percent

A *predictor* is any callable ``sample -> H x W`` integer array of dataset class ids (a sample is
the dataset's ``{"image": PIL RGB, "mask", "id"}``);
:class:`SegmenterPredictor` runs the :class:`~textseg.segment.Segmenter` with the dataset's class
prompts, :class:`OraclePredictor` returns the ground truth (a self-check that must give 100.0).

Under ``torchrun`` (``torch.distributed`` initialised) each process evaluates images
``rank, rank + world, ...``; the confusion matrices are summed with ``all_reduce``, so the numbers
equal a single-process run exactly. Per-image problems (missing / mis-sized masks, unreadable
files, ids beyond the class list) are recorded in ``errors`` and the run goes on, unless
``strict=True``.
"""

from __future__ import annotations

import heapq
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from textseg.constants import IGNORE_INDEX
from textseg.data.base import SegDataset
from textseg.distributed import get_rank, get_world_size, is_dist
from textseg.errors import TextsegError
from textseg.metrics import ConfusionMatrix, SegMetrics
from textseg.pipeline import DEFAULT_DEPTH, DEFAULT_WORKERS, batch_or_each, chunks, prefetch

Predictor = Callable[[object], np.ndarray]


# ------------------------------------------------------------------------------------------------
# Protocol presets: the settings published training-free numbers were measured with
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Protocol:
    """Inference settings of one published evaluation (one method x one benchmark), equal to the
    method's repository config (``configs/cfg_<benchmark>.py`` over its segmentor's defaults).

    ``short_side`` / ``max_side``: mmseg ``Resize(scale=(max_side, short_side), keep_ratio=True)``.
    ``crop`` / ``stride``: ``slide_crop`` / ``slide_stride``; ``crop=0`` = the whole image in one pass.
    ``logit_scale`` is the factor the reference code multiplies cosine similarities by before the
    softmax; it becomes ``SegmentCfg.temperature = model.logit_scale_value / logit_scale``.
    ``threshold`` is their ``prob_thd`` (max class probability below it -> background).
    ``mode_options``: the dense mode's own per-benchmark settings (ResCLIP's ``temp_thd`` and
    RCS / SFR weights; PEARL's ``alpha_kk``), passed to ``SegmentCfg.mode_options``. ``propagation`` / ``tlp_grid``: a logit
    refinement (PEARL's ``"tlp"``, ``SegmentCfg.propagation``). ``area_threshold``: SCLIP's ``area_thd`` (``SegmentCfg.area_threshold``). ``pamr``: PAMR with ``pamr_iterations`` steps at ``pamr_dilations`` at the original
    image size. ``reference`` is the mIoU (percent) the reference code reports with OpenAI CLIP
    ViT-B/16 and ``source`` where that number is published (None: not published by the repository).
    """

    method: str
    benchmark: str
    short_side: int
    max_side: int = 2048
    crop: int = 224
    stride: int = 112
    threshold: float | None = None
    logit_scale: float = 40.0
    area_threshold: float | None = None
    pamr: bool = False
    pamr_iterations: int = 10
    pamr_dilations: tuple[int, ...] = (8, 16)
    templates: str = "imagenet"
    reference: float | None = None
    source: str = ""
    note: str = ""
    mode_options: dict = field(default_factory=dict)  # the dense mode's settings (SegmentCfg.mode_options)
    propagation: str | None = None  # a logit refinement (SegmentCfg.propagation: "tlp", PEARL's)
    tlp_grid: int = 80


_SCLIP = "github.com/wangf3014/SCLIP README 'Results' table and configs/cfg_*.py @ b56bd30"
_NACLIP = "github.com/sinahmr/NACLIP README 'Results' table (test_all.sh reduced naclip 5 on) and configs @ 0cac3a6"
_CLEARCLIP = ("github.com/mc-lan/ClearCLIP README results image (Table 2, CLIP ViT-B/16 + ClearCLIP) "
              "and configs/cfg_*.py @ ad68a40")
_CLEARCLIP_NOTE = ("ClearCLIP's configs/base_config.py ships model_type='vanilla'; the published numbers are "
                   "model_type='ClearCLIP' with ignore_residual=True (textseg's clearclip mode). It pads "
                   "crops to multiples of the patch size and runs in fp16")
_CLEARCLIP_NOREF = _CLEARCLIP_NOTE + "; the repository publishes no number for this benchmark"
_SCCLIP = ("arXiv 2411.15869 (SC-CLIP) Table 1, CLIP ViT-B/16 without post-processing (the repository README "
           "publishes none); settings github.com/SuleBai/SC-CLIP scclip_segmentor.py and configs/cfg_*.py @ 0417ba9")

_RESCLIP = ("github.com/yvhangyang/ResCLIP README figs/main_results_w.png / main_results_wo.png (NACLIP + ResCLIP, "
            "CLIP ViT-B/16, no post-processing) and configs/cfg_*.py @ 0e085f7")


def _res(benchmark: str, short: int, thd: float, rcs: tuple, sfr: tuple, crop: int = 224, threshold=None,
         reference=None) -> Protocol:
    """A ResCLIP preset: ``ResCLIPSegmentation`` defaults (slide 224/112, logit scale 40, no PAMR,
    arch ``wo_resi``, attention ``resclip``, std 5) and the config's temp_thd / RCS / SFR weights."""
    return Protocol("resclip", benchmark, short, crop=crop, threshold=threshold, reference=reference,
                    source=_RESCLIP, mode_options={"temp_thd": thd, "rcs_weights": rcs, "sfr_weights": sfr,
                                                   "delete_same_entity": True})


_PEARL = ("github.com/PGSmall/PEARL assets/results.png (PEARL, CLIP ViT-B/16, with its Laplacian propagation) "
          "and configs/cfg_*.py")


def _pearl(benchmark: str, short: int, crop: int = 224, threshold=None, grid: int = 80, reference=None,
           alpha_kk: float | None = None) -> Protocol:
    """A PEARL preset: ``PEARL`` (pearl_ovss.py) defaults (arch ``reduced``, attention ``pearl``, slide
    224/112, logit scale 40, TLP on with grid 80, alpha_kk 0.08) and the config's prob_thd / slide_crop /
    grid / alpha_kk (``mode_options``, :class:`~textseg.models.clip_dense.PEARLCfg`)."""
    return Protocol("pearl", benchmark, short, crop=crop, threshold=threshold, propagation="tlp", tlp_grid=grid,
                    reference=reference, source=_PEARL,
                    mode_options={} if alpha_kk is None else {"alpha_kk": alpha_kk})


# Benchmark keys follow textseg's dataset names (coco-stuff = COCO-Stuff164k).
PROTOCOLS: dict[str, dict[str, Protocol]] = {
    # SCLIP (arXiv 2312.01597; clip_segmentor.py defaults): slide 224/112, 80 ImageNet templates,
    # logit scale 40 unless noted, no PAMR (pamr_steps=0).
    "sclip": {
        "voc": Protocol("sclip", "voc", 336, threshold=0.1, logit_scale=65, area_threshold=0.1, reference=59.63,
                        source=_SCLIP),
        "voc20": Protocol("sclip", "voc20", 336, reference=81.54, source=_SCLIP),
        "context": Protocol("sclip", "context", 336, threshold=0.1, logit_scale=50, reference=31.74,
                            source=_SCLIP),
        "context59": Protocol("sclip", "context59", 336, reference=34.46, source=_SCLIP),
        "coco-object": Protocol("sclip", "coco-object", 336, threshold=0.1, logit_scale=50, reference=33.52,
                                source=_SCLIP),
        "coco-stuff": Protocol("sclip", "coco-stuff", 448, reference=22.77, source=_SCLIP),
        "ade": Protocol("sclip", "ade", 336, reference=16.45, source=_SCLIP),
        "cityscapes": Protocol("sclip", "cityscapes", 560, reference=32.34, source=_SCLIP),
    },
    # NACLIP (WACV 2025, arXiv 2404.08181; naclip.py defaults): slide 224/112 except VOC-21 / VOC-20
    # (slide_crop=0: whole image), logit scale 40, prob_thd 0.1 on the sets with background, PAMR
    # (10 steps, dilations 8/16, at the original size) on for the README numbers.
    "naclip": {
        "voc": Protocol("naclip", "voc", 336, crop=0, threshold=0.1, pamr=True, reference=64.07, source=_NACLIP),
        "context": Protocol("naclip", "context", 336, threshold=0.1, pamr=True, reference=34.99, source=_NACLIP),
        "coco-object": Protocol("naclip", "coco-object", 336, threshold=0.1, pamr=True, reference=36.19,
                                source=_NACLIP),
        "voc20": Protocol("naclip", "voc20", 336, crop=0, pamr=True, reference=83.03, source=_NACLIP),
        "cityscapes": Protocol("naclip", "cityscapes", 560, pamr=True, reference=38.27, source=_NACLIP),
        "context59": Protocol("naclip", "context59", 336, pamr=True, reference=38.35, source=_NACLIP),
        "ade": Protocol("naclip", "ade", 336, pamr=True, reference=19.05, source=_NACLIP),
        "coco-stuff": Protocol("naclip", "coco-stuff", 336, pamr=True, reference=25.69, source=_NACLIP),
    },
    # SC-CLIP (arXiv 2411.15869; SCCLIPForSegmentation defaults): slide 224/112, short side 336 (Cityscapes
    # 560), logit scale 40 unless noted, 80 ImageNet templates, no PAMR (pamr_steps=0 in every config).
    "sc-clip": {
        "voc": Protocol("sc-clip", "voc", 336, threshold=0.15, logit_scale=50, area_threshold=0.1, reference=64.6,
                        source=_SCCLIP),
        "context": Protocol("sc-clip", "context", 336, threshold=0.15, reference=36.8, source=_SCCLIP),
        "coco-object": Protocol("sc-clip", "coco-object", 336, threshold=0.35, logit_scale=55, reference=37.7,
                                source=_SCCLIP),
        "voc20": Protocol("sc-clip", "voc20", 336, reference=84.3, source=_SCCLIP),
        "context59": Protocol("sc-clip", "context59", 336, reference=40.1, source=_SCCLIP),
        "coco-stuff": Protocol("sc-clip", "coco-stuff", 336, reference=26.6, source=_SCCLIP),
        "cityscapes": Protocol("sc-clip", "cityscapes", 560, reference=41.0, source=_SCCLIP),
        "ade": Protocol("sc-clip", "ade", 336, reference=20.1, source=_SCCLIP),
    },
    # ResCLIP (CVPR 2025, arXiv 2411.15851; ResCLIPSegmentation defaults + configs/cfg_*.py): RCS + SFR on
    # NACLIP's last block; slide 224/112 except VOC-21 / VOC-20 (whole image); short side 336 (Cityscapes 560).
    "resclip": {
        "voc": _res("voc", 336, 0.50, (2.0, 0.3), (2.2, 0.7), crop=0, threshold=0.1, reference=61.1),
        "context": _res("context", 336, 0.30, (2.0, 0.3), (1.8, 0.7), threshold=0.1, reference=33.5),
        "coco-object": _res("coco-object", 336, 0.11, (2.0, 0.4), (1.8, 0.7), threshold=0.1, reference=35.0),
        "voc20": _res("voc20", 336, 0.10, (2.0, 0.6), (2.1, 0.6), crop=0, reference=86.0),
        "context59": _res("context59", 336, 0.25, (2.0, 0.4), (1.8, 0.7), reference=36.8),
        "coco-stuff": _res("coco-stuff", 336, 0.11, (2.0, 0.4), (1.8, 0.7), reference=24.7),
        "cityscapes": _res("cityscapes", 560, 0.10, (2.0, 0.2), (2.1, 0.6), reference=35.9),
        "ade": _res("ade", 336, 0.25, (2.0, 0.3), (2.1, 0.7), reference=18.0),
    },
    # PEARL (arXiv 2603.21528; pearl_ovss.py defaults + configs/cfg_*.py): Procrustes-aligned last block,
    # then its text-aware Laplacian propagation (TLP) at the original size; VOC-21 / VOC-20 whole image.
    "pearl": {
        "voc": _pearl("voc", 336, crop=0, threshold=0.1, reference=64.1),
        "context": _pearl("context", 336, threshold=0.1, reference=35.1),
        "coco-object": _pearl("coco-object", 336, threshold=0.1, reference=37.3),
        "voc20": _pearl("voc20", 336, crop=0, reference=86.9),
        "context59": _pearl("context59", 336, reference=38.6),
        "coco-stuff": _pearl("coco-stuff", 336, reference=26.3),
        "cityscapes": _pearl("cityscapes", 560, grid=224, reference=37.6, alpha_kk=0.3),
        "ade": _pearl("ade", 336, reference=19.4, alpha_kk=0.3),
    },
    # ClearCLIP (ECCV 2024, arXiv 2407.12442; clearclip_segmentor.py defaults): slide 448/224, short side
    # 448, logit scale 50, 80 ImageNet templates, no PAMR; Cityscapes slides 224/224.
    "clearclip": {
        "voc": Protocol("clearclip", "voc", 448, crop=448, stride=224, threshold=0.5, logit_scale=50,
                        source=_CLEARCLIP, note=_CLEARCLIP_NOREF),
        "context": Protocol("clearclip", "context", 448, crop=448, stride=224, threshold=0.15, logit_scale=50,
                            source=_CLEARCLIP, note=_CLEARCLIP_NOREF),
        "coco-object": Protocol("clearclip", "coco-object", 448, crop=448, stride=224, threshold=0.4,
                                logit_scale=50, source=_CLEARCLIP, note=_CLEARCLIP_NOREF),
        "voc20": Protocol("clearclip", "voc20", 448, crop=448, stride=224, logit_scale=50, reference=80.9,
                          source=_CLEARCLIP, note=_CLEARCLIP_NOTE),
        "context59": Protocol("clearclip", "context59", 448, crop=448, stride=224, logit_scale=50, reference=35.9,
                              source=_CLEARCLIP, note=_CLEARCLIP_NOTE),
        "coco-stuff": Protocol("clearclip", "coco-stuff", 448, crop=448, stride=224, logit_scale=50,
                               reference=23.9, source=_CLEARCLIP, note=_CLEARCLIP_NOTE),
        "ade": Protocol("clearclip", "ade", 448, crop=448, stride=224, logit_scale=50, reference=16.7,
                        source=_CLEARCLIP, note=_CLEARCLIP_NOTE),
        "cityscapes": Protocol("clearclip", "cityscapes", 448, crop=224, stride=224, logit_scale=50,
                               reference=30.0, source=_CLEARCLIP, note=_CLEARCLIP_NOTE),
    },
}
PROTOCOL_CAVEATS = (
    "The presets run the Segmenter at resolution='pixel', the references' inference (exact keep-ratio "
    "resize, exact crops, per-crop bilinear upsampling, pixel-canvas averaging, softmax / thresholds at the "
    "original size); differences that remain: textseg resizes the image with PIL and the model's "
    "interpolation (mmseg: cv2 bilinear), runs in float32 (ClearCLIP: fp16) and drops a crop's remainder "
    "beyond the patch grid (ClearCLIP pads it, which its presets never need), so a faithful CLIP "
    "re-implementation should land within a few tenths of a point of the reference, not bit-exactly on "
    "it. The references need OpenAI CLIP ViT-B/16 weights, which are not available in this environment: "
    "none of them has been reproduced here."
)


def get_protocol(name: str, dataset: str) -> Protocol:
    """The preset of method ``name`` (``sc-clip``, ``resclip``, ``pearl``, ``sclip``, ``naclip``, ``clearclip``) for
    benchmark ``dataset``.

    ``name`` may carry the benchmark as ``"naclip:voc"``: e.g. a folder dataset holding a VOC-21
    view borrows the VOC preset."""
    if ":" in name:
        name, dataset = name.split(":", 1)
    if name not in PROTOCOLS:
        raise TextsegError(f"unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    table = PROTOCOLS[name]
    if dataset not in table:
        raise TextsegError(f"protocol {name!r} has no preset for dataset {dataset!r}; it covers "
                           f"{', '.join(table)} (borrow one with --protocol {name}:BENCHMARK)")
    return table[dataset]


# ------------------------------------------------------------------------------------------------
# Predictors
# ------------------------------------------------------------------------------------------------
class OraclePredictor:
    """Returns the ground truth (ignore pixels -> class 0): the metric and readers' self-check."""

    config = {"model": "oracle"}

    def __call__(self, sample: dict) -> np.ndarray:
        out = sample["mask"].copy()
        out[out == IGNORE_INDEX] = 0
        return out


def has_background(dataset: SegDataset) -> bool:
    return any(n.lower() == "background" for n in dataset.class_names)


class SegmenterPredictor:
    """Dense zero-shot segmentation of dataset images with the dataset's class prompts.

    ``protocol`` (``"sc-clip"`` / ``"sclip"`` / ``"naclip"`` / ``"clearclip"``) fills the settings of :func:`get_protocol` for the
    dataset's benchmark; keyword ``overrides`` (``short_side``, ``slide=(crop, stride)``,
    ``threshold``, ``pamr``, ``mode``, ``templates``, ``temperature``, ...) replace single fields of
    the resulting :class:`~textseg.segment.SegmentCfg`.
    """

    def __init__(self, model, dataset: SegDataset, protocol: str | None = None, **overrides):
        from textseg.segment import SegmentCfg, Segmenter
        from textseg.text import LabelClass

        kw: dict = {}
        self.protocol = None
        self.warnings: list[str] = []
        if protocol is not None:
            p = get_protocol(protocol, dataset.name)
            self.protocol = p
            kw = dict(short_side=p.short_side, max_side=p.max_side, slide=(p.crop, p.stride) if p.crop else None,
                      threshold=p.threshold, area_threshold=p.area_threshold, pamr=p.pamr, pamr_iterations=p.pamr_iterations,
                      pamr_dilations=tuple(p.pamr_dilations), pamr_resolution="original", templates=p.templates,
                      resolution="pixel", mode_options=dict(p.mode_options), propagation=p.propagation,
                      tlp_grid=p.tlp_grid,
                      temperature=float(model.logit_scale_value.detach()) / p.logit_scale)
            modes = tuple(getattr(model, "dense_modes", ()) or ())
            if p.method in modes:
                kw["mode"] = p.method
            elif overrides.get("mode") is None:
                self.warnings.append(
                    f"model {getattr(model, 'name', '?')!r} has no {p.method!r} dense mode (it has "
                    f"{', '.join(modes) or 'none'}); the protocol's reference mIoU {p.reference} does not apply"
                )
        kw.update({k: v for k, v in overrides.items() if v is not None})
        kw.setdefault("threshold", "auto")
        if not has_background(dataset):  # nothing a below-threshold pixel could become
            if overrides.get("threshold"):
                raise TextsegError(f"--threshold needs a 'background' class; {dataset.name} has none")
            kw["threshold"] = None
        self.cfg = SegmentCfg(**kw)
        self.segmenter = Segmenter(model, self.cfg)
        self.labels = [LabelClass(n, tuple(p)) for n, p in zip(dataset.class_names, dataset.class_prompts)]
        self.num_classes = dataset.num_classes
        thr = self.cfg.threshold
        pm = self.segmenter.pamr_in_force()  # the PAMR in force (pamr="auto": the model's own, e.g. offline v2)
        self.config = {"segment": {**asdict(self.cfg), "threshold_value": getattr(
                           model, "default_background_threshold", None) if thr == "auto" else thr,
                           "pamr_in_force": asdict(pm) if pm else None},
                       "protocol": asdict(self.protocol) if self.protocol else None, "warnings": self.warnings}

    def _label_map(self, res) -> np.ndarray:
        if len(res.labels) != self.num_classes:  # an appended background class: cannot be scored
            raise TextsegError("the segmenter added a background label the dataset does not have")
        return res.label_map

    def __call__(self, sample: dict) -> np.ndarray:
        return self._label_map(self.segmenter.segment(sample["image"], self.labels))

    def prepare(self, sample: dict):
        """The CPU half (decode, resize, normalise, crop; :meth:`Segmenter.prepare`), run by
        :func:`evaluate`'s background workers."""
        return self.segmenter.prepare(sample["image"])

    def encode_batch(self, prepared: list) -> list:
        """The image tower over several prepared images (same-size crops batched): each image's
        cached features (:meth:`Segmenter.encode_prepared`); :func:`evaluate` runs it in its own
        thread and :meth:`finish` in the finisher thread, one group behind."""
        return self.segmenter.encode_prepared(prepared)

    def finish(self, sample: dict, prepared, views) -> np.ndarray:
        """The label map of one image from its :meth:`encode_batch` features (logits, upsampling,
        argmax): the same map as ``self(sample)``."""
        self.segmenter.set_encoded(prepared, views)
        return self._label_map(self.segmenter.predict(self.labels))



# ------------------------------------------------------------------------------------------------
# The evaluation loop
# ------------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    """What :func:`evaluate` returns (identical on every rank after the reduction)."""

    dataset: SegDataset
    confusion: ConfusionMatrix
    images: int
    errors: list[dict]
    seconds: float
    worst: list[tuple[float, str]] = field(default_factory=list)  # (per-image mIoU, id), worst first
    config: dict = field(default_factory=dict)

    def metrics(self, average: str = "union") -> SegMetrics:
        return self.confusion.compute(average)

    def report(self) -> dict:
        """The JSON report: ``miou`` / ``per_class_iou`` / accuracies in percent."""
        m = self.metrics()
        d = m.to_dict(self.dataset.class_names)
        miou_gt = self.metrics("gt").miou
        return {
            "dataset": self.dataset.name,
            "miou": d["miou"],
            "miou_gt_classes": None if math.isnan(miou_gt) else round(100 * miou_gt, 4),
            "miou_average": "classes present in ground truth or predictions (union > 0)",
            "pixel_accuracy": d["pixel_accuracy"],
            "mean_accuracy": d["mean_accuracy"],
            "fw_iou": d["fw_iou"],
            "per_class_iou": d["per_class_iou"],
            "images": self.images,
            "errors": self.errors,
            "worst": [{"id": i, "miou": round(100 * s, 4)} for s, i in self.worst],
            "seconds": round(self.seconds, 3),
            "config": {**self.config, "versions": versions()},
        }


def versions() -> dict:
    import textseg

    return {"textseg": textseg.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _dist():
    import torch.distributed as dist

    return (dist, get_rank(), get_world_size()) if is_dist() else (None, 0, 1)


def image_miou(counts: torch.Tensor) -> float:
    """mIoU (union convention) of one image's confusion matrix; NaN when it has no valid pixel."""
    m = counts.double()
    tp, union = m.diag(), m.sum(0) + m.sum(1) - m.diag()
    keep = union > 0
    return float((tp[keep] / union[keep]).mean()) if bool(keep.any()) else float("nan")


def evaluate(
    dataset: SegDataset,
    predictor: Predictor,
    limit: int | None = None,
    strict: bool = False,
    progress: bool = True,
    keep_worst: int = 0,
    on_worst: Callable[[str, object, np.ndarray, np.ndarray], None] | None = None,
    workers: int = DEFAULT_WORKERS,
    prefetch_depth: int = DEFAULT_DEPTH,
    batch: int = 4,
) -> EvalResult:
    """Run ``predictor`` over ``dataset`` (the first ``limit`` images) and accumulate one exact
    confusion matrix, sharded over ``torch.distributed`` ranks when initialised.

    ``keep_worst``: remember the K images with the lowest per-image mIoU; ``on_worst(id, image,
    pred, mask)`` is then called (on the rank that evaluated it) for each of the global worst K.

    The pipeline (:mod:`textseg.pipeline`): samples are read -- and, for a predictor with a
    ``prepare(sample)`` method (:class:`SegmenterPredictor`), decoded, resized and normalised -- by
    ``workers`` background threads at most ``prefetch_depth`` images ahead (``workers=0``: in this
    thread); a predictor with ``encode_batch(prepared)`` and ``finish(sample, prepared, encoded)``
    (:class:`SegmenterPredictor`) gets ``batch`` images at a time through the tower in this thread
    (same-size crops share tower passes) and the rest in a finisher thread, one group behind; a plain
    callable runs whole in the finisher. The numbers do not depend on these settings.
    """
    dist, rank, world = _dist()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    indices = range(rank, n, world)
    cm = ConfusionMatrix(dataset.num_classes, dataset.ignore_index)
    errors: list[dict] = []
    worst: list[tuple[float, int, str, object]] = []  # max-heap on score via negation
    done = 0
    t0 = time.perf_counter()
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(indices), desc=f"eval {dataset.name}", unit="img", file=sys.stderr,
                   dynamic_ncols=True)
    prepare = getattr(predictor, "prepare", None)
    encode, finish = getattr(predictor, "encode_batch", None), getattr(predictor, "finish", None)
    split = encode is not None and finish is not None

    def load(i: int):  # background workers: read the sample, prepare the image for the model
        sample = dataset[i]
        return sample, (prepare(sample) if prepare is not None else None)

    def tower(group: list) -> tuple[list, dict]:  # this thread: a group's batched forward
        loaded = [(i, v) for i, v, e in group if e is None]
        if split:  # the image tower only; the rest runs in the finisher thread
            out = batch_or_each(lambda g: encode([p for _, p in g]), [v for _, v in loaded])
        else:  # a plain callable predictor: all of it in the finisher thread
            out = [None] * len(loaded)
        return group, dict(zip((i for i, _ in loaded), out))

    def score(item: tuple[list, dict]) -> list:  # the finisher: logits, upsampling, argmax, counts
        group, encoded = item
        scored = []
        for i, value, error in group:
            sid = dataset.ids[i]
            try:
                if error is not None:
                    raise error
                sample, pred = value[0], encoded[i]
                if isinstance(pred, TextsegError):
                    raise pred
                pred = finish(sample, value[1], pred) if split else predictor(sample)
                pred = np.asarray(pred)
                if pred.shape != sample["mask"].shape:
                    raise TextsegError(f"{sid}: prediction is {pred.shape}, mask is {sample['mask'].shape}")
                counts = ConfusionMatrix.counts(torch.from_numpy(pred.astype(np.int64)),
                                                torch.from_numpy(sample["mask"]), cm.num_classes, cm.ignore_index)
            except TextsegError as e:
                msg = str(e) if str(e).startswith(sid) else f"{sid}: {e}"
                scored.append((i, sid, None, None, None, msg))
            else:
                scored.append((i, sid, sample, pred, counts, None))
        return scored

    # Three overlapping stages: read + prepare (``workers`` threads, ``prefetch_depth`` images ahead),
    # the tower (this thread) and the finisher (one thread, one group behind the tower; ``workers=0``:
    # all in this thread).
    groups = (tower(g) for g in chunks(prefetch(indices, load, workers=workers, depth=prefetch_depth), batch))
    for _, scored, _ in prefetch(groups, score, workers=min(1, workers), depth=2):
        for i, sid, sample, pred, counts, msg in scored:
            if msg is not None:
                if strict:
                    raise TextsegError(f"{msg} (--strict: stopping)") from None
                errors.append({"id": sid, "error": msg})
            else:
                cm.merge(counts)
                done += 1
                if keep_worst > 0:
                    score_i = image_miou(counts)
                    if not math.isnan(score_i):
                        item = (-score_i, i, sid, (sample["image"], pred, sample["mask"]) if on_worst else None)
                        if len(worst) < keep_worst:
                            heapq.heappush(worst, item)
                        elif item > worst[0]:
                            heapq.heapreplace(worst, item)
            if bar is not None:
                bar.update(1)
                miou = cm.compute().miou
                bar.set_postfix(mIoU=f"{100 * miou:.2f}" if not math.isnan(miou) else "-", errors=len(errors))
    if bar is not None:
        bar.close()
    local_worst = [(-s, sid) for s, _, sid, _ in worst]
    if dist is not None and world > 1:
        cm.all_reduce()
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (done, errors, local_worst))
        done = sum(g[0] for g in gathered)
        order = {sid: k for k, sid in enumerate(dataset.ids)}
        errors = sorted((e for g in gathered for e in g[1]), key=lambda e: order.get(e["id"], -1))
        all_worst = [w for g in gathered for w in g[2]]
    else:
        all_worst = local_worst
    global_worst = sorted(all_worst)[:keep_worst] if keep_worst > 0 else []
    if on_worst is not None and global_worst:
        chosen = {sid for _, sid in global_worst}
        for _, _, sid, payload in worst:
            if sid in chosen and payload is not None:
                on_worst(sid, *payload)
    seconds = time.perf_counter() - t0
    if dist is not None and world > 1:
        t = torch.tensor([seconds], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        seconds = float(t.item())
    config = dict(getattr(predictor, "config", {}) or {})
    config["world_size"] = world
    config["threads_per_process"] = torch.get_num_threads()
    config["pipeline"] = {"decode_workers": workers, "prefetch": prefetch_depth, "batch_images": batch}
    return EvalResult(dataset, cm, done, errors, seconds, global_worst, config)


def format_table(result: EvalResult, top: int | None = None) -> str:
    """Per-class IoU sorted best first, then mIoU / accuracies, as a plain-text table."""
    m = result.metrics()
    rows = [(n, v) for n, v in zip(result.dataset.class_names, m.iou)]
    rows.sort(key=lambda r: (-1.0 if math.isnan(r[1]) else r[1]), reverse=True)
    width = max(8, *(len(n) for n, _ in rows))
    lines = [f"{'class':<{width}}  IoU (%)", f"{'-' * width}  -------"]
    for n, v in rows[:top] if top else rows:
        lines.append(f"{n:<{width}}  {'  n/a' if math.isnan(v) else f'{100 * v:7.2f}'}")
    lines.append(f"{'-' * width}  -------")

    def pct(x: float) -> str:
        return "n/a" if math.isnan(x) else f"{100 * x:.2f}"

    lines.append(f"{'mIoU':<{width}}  {pct(m.miou):>7}   ({result.images} images, {len(result.errors)} errors, "
                 f"{result.seconds:.1f} s)")
    lines.append(f"pixel accuracy {pct(m.pixel_accuracy)}  mean accuracy {pct(m.mean_accuracy)}  "
                 f"fwIoU {pct(m.fw_iou)}  mIoU over GT classes {pct(result.metrics('gt').miou)}")
    return "\n".join(lines)


def save_worst(out_dir: str | Path, class_names: list[str]) -> Callable:
    """An ``on_worst`` callback writing, per image, ``<id>_pred.png`` and ``<id>_gt.png`` (palette
    PNGs whose pixel values are class ids, 255 = ignore) and ``<id>_overlay.jpg`` (ground truth left,
    prediction right). ``/`` in ids (Cityscapes) becomes ``__``."""
    from PIL import Image

    from textseg import viz
    from textseg.io import save_image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def write(sid: str, image, pred: np.ndarray, mask: np.ndarray) -> None:
        stem = sid.replace("/", "__")
        viz.save_label_map(out / f"{stem}_pred.png", pred, class_names)
        viz.save_label_map(out / f"{stem}_gt.png", mask, class_names)
        left = viz.overlay(image, mask, class_names)
        right = viz.overlay(image, pred, class_names)
        both = Image.new("RGB", (left.width * 2, left.height))
        both.paste(left, (0, 0))
        both.paste(right, (left.width, 0))
        save_image(both, out / f"{stem}_overlay.jpg", quality=90)

    return write


def run_benchmark(dataset: str, root: str | Path, *, split: str | None = None, masks: str | None = None,
                  classes: str | None = None, model: str | None = None, weights: str | None = None,
                  device: str | None = None, limit: int | None = None, strict: bool = False,
                  progress: bool = True, keep_worst: int = 5, dump_worst: str | Path | None = None,
                  precision: str | None = None, workers: int = DEFAULT_WORKERS, prefetch_depth: int = DEFAULT_DEPTH,
                  batch: int = 4, cast_weights: bool = False, **options) -> tuple[EvalResult, dict, list[str]]:
    """``textseg eval`` as a function: read the benchmark, load the model (``model="oracle"``: the
    ground truth as prediction), run :func:`evaluate` (sharded when ``torch.distributed`` is
    initialised) -> ``(result, report, warnings)``. ``options`` go to :class:`SegmenterPredictor`
    (``protocol``, ``mode``, ``slide``, ``short_side``, ``threshold``, ``pamr``, ``templates``);
    ``dump_worst`` writes the ``keep_worst`` worst images there (:func:`save_worst`); ``precision``
    goes to ``load_model`` (the image tower's, :mod:`textseg.precision`; reported in the config);
    ``workers`` / ``prefetch_depth`` / ``batch``: the pipeline of :func:`evaluate`; ``cast_weights``:
    ``load_model``'s."""
    from textseg.data.benchmarks import build_dataset

    data = build_dataset(dataset, root, split=split, masks=masks, classes=classes)
    if limit is not None and limit < 1:
        raise TextsegError("--limit must be >= 1")
    warnings: list[str] = []
    if model == "oracle":
        if weights:
            raise TextsegError("--model oracle takes no --weights")
        predictor = OraclePredictor()
    else:
        from textseg.weights.load import load_model

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        net = load_model(model, weights, device=device, precision=precision, cast_weights=cast_weights)
        predictor = SegmenterPredictor(net, data, **options)
        predictor.config.update(model=getattr(net, "name", type(net).__name__), weights=weights, device=str(device),
                                precision=predictor.segmenter.precision, cast_weights=bool(cast_weights))
        warnings = list(predictor.warnings)
    on_worst = save_worst(dump_worst, data.class_names) if dump_worst is not None else None
    result = evaluate(data, predictor, limit=limit, strict=strict, progress=progress, keep_worst=keep_worst,
                      on_worst=on_worst, workers=workers, prefetch_depth=prefetch_depth, batch=batch)
    report = result.report()
    report["config"].update(dataset=dataset, root=str(root), split=split, masks=masks, classes=classes, limit=limit)
    return result, report, warnings

