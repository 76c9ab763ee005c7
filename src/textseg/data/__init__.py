"""Datasets: segmentation benchmarks, image-text pairs, image-level labels.

``DATASETS`` (the benchmark names :func:`textseg.data.benchmarks.build_dataset` accepts) lives here,
import-light, so that the command line can list the choices without importing torch."""

DATASETS = ("voc", "voc20", "context", "context59", "coco-object", "coco-stuff", "ade", "cityscapes", "folder")
