"""Zero-shot image classification with any textseg model (``textseg.classify``, ``textseg classify``).

Labels follow the one label grammar (:mod:`textseg.text`: ``"cat, dog; puppy"``, a labels file, or a
list); each synonym is embedded through the model's prompt ensemble (default: the 80 OpenAI ImageNet
templates, as OpenAI's zero-shot ImageNet evaluation; any spec of
:func:`textseg.prompts.resolve_templates`) and cached per model
(:class:`textseg.text.TextEmbeddingCache`), so classifying many images against the same labels costs
one text pass. Image-level logits come from the model's own image-level scoring,
:meth:`~textseg.models.base.DualEncoder.image_logits` (``logit_scale * cos(image, text)`` for CLIP,
GroupViT, LSeg and LiT; the ConSE bridge for the offline model); a class with several synonyms
scores the max over them (as the Segmenter does per pixel); probabilities are a softmax over the
classes.

>>> import textseg
>>> model = textseg.load_model("ViT-B/16")
>>> probs = textseg.classify(model, ["cat.jpg"], "cat, dog; puppy")   # 1 x 2, rows sum to 1
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from textseg.errors import TextsegError
from textseg.models.base import DualEncoder
from textseg.precision import autocast, resolve_precision, to_float32
from textseg.preprocess import preprocess
from textseg.text import LabelClass, TextEmbeddingCache, parse_labels

DEFAULT_TEMPLATES = "imagenet"
Labels = str | Sequence[str | Sequence[str] | LabelClass]


def text_classifier(model: DualEncoder, labels: Labels,
                    templates: str | Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
    """``S x D`` embeddings of every synonym of ``labels`` in class order (prompt-ensembled, cached per
    model and template set); ``S`` = the number of classes when each has one synonym."""
    texts = [s for c in parse_labels(labels) for s in c.synonyms]
    device = next(model.parameters()).device
    return TextEmbeddingCache.for_model(model).embed(texts, templates).to(device)


def class_max(logits: torch.Tensor, classes: Sequence[LabelClass]) -> torch.Tensor:
    """``B x S`` per-synonym logits (synonyms in class order) -> ``B x C``: the max over each class's."""
    sizes = [len(c.synonyms) for c in classes]
    if len(sizes) == logits.shape[-1]:
        return logits
    return torch.stack([part.amax(dim=-1) for part in logits.split(sizes, dim=-1)], dim=-1)


@torch.no_grad()
def image_logits(model: DualEncoder, pixels: torch.Tensor, classifier: torch.Tensor,
                 precision: str | None = None) -> torch.Tensor:
    """``B x 3 x H x W`` preprocessed pixels, ``N x D`` classifier -> ``B x N`` float32 logits. The image
    tower runs at ``precision`` (None: the model's ``inference_precision``, else fp32); the scoring is
    float32."""
    wanted = precision if precision is not None else getattr(model, "inference_precision", None)
    resolved = resolve_precision(wanted, pixels.device)
    with autocast(resolved, pixels.device):
        image = to_float32(model.encode_image(pixels))
    return model.image_logits(image, classifier.float()).float()


@torch.no_grad()
def classify_batches(model: DualEncoder, images: Sequence, labels: Labels,
                     templates: str | Sequence[str] = DEFAULT_TEMPLATES, batch_size: int = 16,
                     progress: bool = False, precision: str | None = None):
    """Yield ``b x C`` probability tensors for consecutive batches of ``images`` (read lazily, so
    memory stays bounded for long lists); labels are embedded once."""
    classes = parse_labels(labels)
    classifier = text_classifier(model, classes, templates)
    if not len(images):
        raise TextsegError("no images to classify")
    device = classifier.device
    starts = range(0, len(images), batch_size)
    if progress and len(images) > batch_size:
        from tqdm import tqdm

        starts = tqdm(starts, desc="classify", unit="batch")
    for i in starts:
        pixels = torch.stack([preprocess(im, model.preprocess_cfg) for im in images[i : i + batch_size]])
        logits = class_max(image_logits(model, pixels.to(device), classifier, precision), classes)
        yield logits.softmax(dim=-1).cpu()


def classify(model: DualEncoder, images: Sequence, labels: Labels,
             templates: str | Sequence[str] = DEFAULT_TEMPLATES, batch_size: int = 16) -> torch.Tensor:
    """Images (paths, PIL, arrays, tensors) -> ``B x C`` probabilities over the classes of ``labels``
    (class order; names: ``[c.name for c in parse_labels(labels)]``)."""
    return torch.cat(list(classify_batches(model, images, labels, templates, batch_size)))
