"""Zero-shot image classification with any textseg model.

Labels are embedded through the model's prompt ensemble (default: the 80 OpenAI ImageNet templates)
and cached per model (:class:`textseg.text.TextEmbeddingCache`), so classifying many images against
the same labels costs one text pass. Image-level logits come from the model's own image-level
scoring, :meth:`~textseg.models.base.DualEncoder.image_logits` (``logit_scale * cos(image, text)``
for CLIP, GroupViT, LSeg and LiT; the ConSE bridge for the offline model), probabilities from a
softmax over the labels.

>>> from textseg.weights.load import load_model
>>> from textseg.classify import classify
>>> model = load_model("ViT-B/16")
>>> probs = classify(model, ["cat.jpg"], ["cat", "dog"])          # 1 x 2, rows sum to 1
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from textseg.errors import TextsegError
from textseg.models.base import DualEncoder

DEFAULT_TEMPLATES = "imagenet"


def check_labels(labels: Sequence[str]) -> list[str]:
    out = [str(x).strip() for x in labels]
    if not out or not any(out):
        raise TextsegError("no labels given (use --labels \"a,b,c\" or --labels-file FILE)")
    if any(not x for x in out):
        raise TextsegError("empty label in the label list")
    if len(set(out)) != len(out):
        dup = next(x for x in out if out.count(x) > 1)
        raise TextsegError(f"label {dup!r} is given twice")
    return out


def text_classifier(model: DualEncoder, labels: Sequence[str],
                    templates: str | Sequence[str] | None = DEFAULT_TEMPLATES) -> torch.Tensor:
    """``N x D`` label embeddings (prompt-ensembled, cached per model and template set)."""
    from textseg.text import TextEmbeddingCache

    labels = check_labels(labels)
    device = next(model.parameters()).device
    return TextEmbeddingCache.for_model(model).embed(labels, templates).to(device)


@torch.no_grad()
def image_logits(model: DualEncoder, pixels: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """``B x 3 x H x W`` preprocessed pixels, ``N x D`` classifier -> ``B x N`` logits."""
    return model.image_logits(model.encode_image(pixels), classifier)


@torch.no_grad()
def classify_batches(model: DualEncoder, images: Sequence, labels: Sequence[str],
                     templates: str | Sequence[str] | None = DEFAULT_TEMPLATES, batch_size: int = 16,
                     progress: bool = False):
    """Yield ``b x N`` probability tensors for consecutive batches of ``images`` (read lazily, so
    memory stays bounded for long lists); labels are embedded once."""
    from textseg.preprocess import preprocess

    classifier = text_classifier(model, labels, templates)
    if not len(images):
        raise TextsegError("no images to classify")
    device = classifier.device
    starts = range(0, len(images), batch_size)
    if progress and len(images) > batch_size:
        from tqdm import tqdm

        starts = tqdm(starts, desc="classify", unit="batch")
    for i in starts:
        pixels = torch.stack([preprocess(im, model.preprocess_cfg) for im in images[i : i + batch_size]])
        yield image_logits(model, pixels.to(device), classifier).float().softmax(dim=-1).cpu()


def classify(model: DualEncoder, images: Sequence, labels: Sequence[str],
             templates: str | Sequence[str] | None = DEFAULT_TEMPLATES, batch_size: int = 16) -> torch.Tensor:
    """Images (paths, PIL, arrays, tensors) -> ``B x N`` probabilities over ``labels`` (label order)."""
    return torch.cat(list(classify_batches(model, images, labels, templates, batch_size)))
