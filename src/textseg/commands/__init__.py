"""CLI subcommands; see :mod:`textseg.cli`. The arguments several commands share are declared here,
so every command spells them the same way (and imports nothing heavy at parser-building time)."""

LABELS_HELP = 'classes separated by ",", synonyms of one class by ";": "cat, dog; puppy, grass"'
LABELS_FILE_HELP = ('one class per line ("name: prompt; prompt", "," or ";" between synonyms; '
                    "the format of textseg/data/classnames/*.txt)")
TEMPLATES_HELP = ("prompt templates: imagenet (the 80 OpenAI prompts), simple (7), single (a photo of a {}.), "
                  "identity / none (the label as is), or one template with {}")


def add_label_arguments(group) -> None:
    """``--labels`` / ``--labels-file`` (read by :func:`textseg.text.load_labels`)."""
    group.add_argument("--labels", default=None, help=LABELS_HELP)
    group.add_argument("--labels-file", default=None, metavar="FILE", help=LABELS_FILE_HELP)


def add_templates_argument(group, default: str | None) -> None:
    """``--templates`` (:func:`textseg.prompts.resolve_templates`); ``default`` is the command's own."""
    shown = f" (default: {default})" if default else " (default: the protocol's, else imagenet)"
    group.add_argument("--templates", default=default, help=TEMPLATES_HELP + shown)


PRECISION_HELP = ("image-tower precision: auto (bf16 on CPUs with native bf16 / CUDA capability >= 8, fp16 on older "
                  "CUDA, else fp32), fp32, bf16, fp16; logits, softmax, thresholds and PAMR stay fp32 (default: fp32)")


def add_precision_argument(group) -> None:
    """``--precision`` (:func:`textseg.precision.resolve_precision`), the same on every command."""
    group.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16", "fp16"), help=PRECISION_HELP)
