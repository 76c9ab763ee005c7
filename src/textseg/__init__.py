"""textseg: segment anything you can name.

>>> import textseg
>>> model = textseg.load_model()                       # offline default; "ViT-B/16" for OpenAI CLIP
>>> seg = textseg.Segmenter(model, textseg.SegmentCfg())
>>> res = seg.segment("photo.jpg", "cat, sofa; couch")  # SegmentResult: label_map, labels, fractions
>>> probs = textseg.classify(model, ["photo.jpg"], "cat, dog")

>>> textseg.MODELS                                    # the model registry: architecture -> builder
>>> textseg.build_model("clip", config)                # random weights of that shape

The names below are imported on first use (PEP 562 ``__getattr__``), so ``import textseg`` and
``textseg --help`` do not pay for torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "textseg.weights.load",
    "save_model": "textseg.weights.load",
    "available_names": "textseg.weights.load",
    "MODELS": "textseg.models.registry",
    "build_model": "textseg.models.registry",
    "Segmenter": "textseg.segment.segmenter",
    "SegmentCfg": "textseg.segment.segmenter",
    "SegmentResult": "textseg.segment.segmenter",
    "classify": "textseg.zeroshot",
    "parse_labels": "textseg.text",
    "read_labels_file": "textseg.text",
    "resolve_templates": "textseg.prompts",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'textseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
