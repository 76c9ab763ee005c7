"""Prompt templates for zero-shot classification and segmentation (each contains one ``{}``).

``IMAGENET_TEMPLATES`` are the 80 prompts OpenAI ensembled for ImageNet zero-shot classification
(CLIP paper; ``notebooks/Prompt_Engineering_for_ImageNet.ipynb`` in openai/CLIP), in OpenAI's order.
``SIMPLE_TEMPLATES`` is the 7-prompt subset from the same notebook; ``SINGLE_TEMPLATE`` the plain
``"a photo of a {}."`` and ``IDENTITY_TEMPLATE`` uses the label text as is.
"""

from __future__ import annotations

from collections.abc import Sequence

from textseg.errors import TextsegError

SINGLE_TEMPLATE = "a photo of a {}."
IDENTITY_TEMPLATE = "{}"

IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

SIMPLE_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "imagenet": IMAGENET_TEMPLATES,
    "simple": SIMPLE_TEMPLATES,
    "single": (SINGLE_TEMPLATE,),
    "identity": (IDENTITY_TEMPLATE,),
    "none": (IDENTITY_TEMPLATE,),  # alias of identity: the label as is
}


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """The one vocabulary of prompt templates (``--templates`` on every command, ``templates=`` in
    the API): a set name (``imagenet`` = the 80 OpenAI prompts, ``simple`` = their 7-prompt subset,
    ``single`` = ``"a photo of a {}."``, ``identity`` / ``none`` = the label as is), one literal
    template containing ``{}`` (``"a photo of a {}."``), or a sequence of such templates.

    There is no implicit default: every caller states its own (segment, eval and serve: ``imagenet``,
    classify: ``imagenet`` as OpenAI's zero-shot ImageNet, CLIP training: ``simple``); ``None`` is an
    error rather than a silent choice.
    """
    if templates is None:
        raise TextsegError("no prompt templates given: use imagenet, simple, single, identity or a text with {}")
    if isinstance(templates, str):
        if templates in TEMPLATE_SETS:
            return TEMPLATE_SETS[templates]
        if "{}" not in templates:
            raise TextsegError(f"unknown template set {templates!r}: use {', '.join(TEMPLATE_SETS)} "
                               "or a template with {} for the label")
        templates = (templates,)
    out = tuple(templates)
    if not out:
        raise TextsegError("no prompt templates given")
    for t in out:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise TextsegError(f"prompt template {t!r} must contain exactly one '{{}}' for the label")
        try:
            t.format("label")
        except (ValueError, IndexError, KeyError):
            raise TextsegError(f"prompt template {t!r} has stray braces: only one '{{}}' is allowed "
                               "(write a literal brace as '{{{{' or '}}}}')") from None
    return out
