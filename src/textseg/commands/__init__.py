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


def threshold_type(text: str):
    """``--threshold``: a number in [0, 1], ``auto``, or ``none`` / ``off`` (= 0)."""
    import argparse
    import math

    if text.lower() in ("none", "off"):
        return 0.0
    if text.lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"threshold must be a number in [0, 1], 'auto' or 'none', got {text!r}") from None
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise argparse.ArgumentTypeError(f"threshold must be in [0, 1], got {text}")
    return value


# Commands where ``--short-side 0`` means "keep the image's scale".
_SHORT_SIDE_ZERO_KEEPS = ("segment",)


def _check_device(name: str) -> None:
    import torch

    from textseg.errors import TextsegError

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise TextsegError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TextsegError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TextsegError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise TextsegError(f"--device {name}: MPS is not available on this machine (use --device cpu)")
    elif dev.type != "cpu":
        raise TextsegError(f"--device {name}: unsupported device type {dev.type!r} (cpu, cuda, mps)")


def validate_options(args) -> None:
    """The one check of every numeric (and device) option any command has, by its name, run by
    :func:`textseg.cli.main` before the command: a bad value is one :class:`TextsegError` line
    (exit code 2), never garbage output or a traceback. Options a command lacks are skipped."""
    import math

    from textseg.errors import TextsegError

    def get(name):
        return getattr(args, name, None)

    def finite(name, flag, value):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TextsegError(f"{flag} must be a finite number, got {value}")

    def at_least(name, low, flag=None):
        value = get(name)
        flag = flag or "--" + name.replace("_", "-")
        if value is not None:
            finite(name, flag, value)
            if value < low:
                raise TextsegError(f"{flag} must be >= {low}, got {value}")

    def positive(name):
        value = get(name)
        flag = "--" + name.replace("_", "-")
        if value is not None:
            finite(name, flag, value)
            if not value > 0:
                raise TextsegError(f"{flag} must be positive, got {value}")

    slide = get("slide")
    if slide is not None:
        crop, stride = slide
        if not (stride > 0 and crop >= stride):
            raise TextsegError(f"--slide CROP STRIDE needs CROP >= STRIDE > 0 (crops must overlap or touch), "
                               f"got {crop} {stride}")
    short = get("short_side")
    if short is not None:
        keeps = args.command in _SHORT_SIDE_ZERO_KEEPS
        if short < (0 if keeps else 1):
            raise TextsegError(f"--short-side must be {'>= 0 (0 = keep)' if keeps else '> 0'}, got {short}")
    threshold = get("threshold")
    if isinstance(threshold, float) and not (math.isfinite(threshold) and 0 <= threshold <= 1):
        raise TextsegError(f"--threshold must be in [0, 1], got {threshold}")
    for name in ("temperature", "max_megapixels", "timeout", "max_upload_mb"):
        positive(name)
    failed = get("max_failed")
    if failed is not None and not (math.isfinite(failed) and 0 <= failed <= 1):
        raise TextsegError(f"--max-failed is a fraction in [0, 1], got {failed}")
    area = get("min_area")
    if area is not None and not (math.isfinite(area) and 0 <= area < 1):
        raise TextsegError(f"--min-area is a fraction of the image in [0, 1), got {area}")
    at_least("decode_workers", 0)
    at_least("prefetch", 1)
    at_least("batch_images", 1)
    at_least("batch", 0)
    at_least("batch_wait_ms", 0)
    for name in ("workers", "max_queue", "max_pixels", "max_labels", "max_prompts", "top_k", "batch_size", "limit"):
        at_least(name, 1)
    if get("threads") is not None and args.command != "cam":  # cam: 0 = torch's default
        at_least("threads", 1)
    at_least("long_side", 0)  # cam: 0 = as is
    port = get("port")
    if port is not None and not 1 <= port <= 65535:
        raise TextsegError(f"--port must be in 1-65535, got {port}")
    if get("device"):
        _check_device(args.device)


PRECISION_HELP = ("image-tower precision: auto (bf16 on CPUs with native bf16 / CUDA capability >= 8, fp16 on older "
                  "CUDA, else fp32), fp32, bf16, fp16; logits, softmax, thresholds and PAMR stay fp32 (default: fp32)")


def add_precision_argument(group) -> None:
    """``--precision`` (:func:`textseg.precision.resolve_precision`), the same on every command."""
    group.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16", "fp16"), help=PRECISION_HELP)
    group.add_argument("--cast-weights", action="store_true",
                       help="with bf16 / fp16: convert the image tower's weights once instead of casting them in "
                       "every forward (autocast); faster on CPU")


def add_pipeline_arguments(group) -> None:
    """``--decode-workers`` / ``--prefetch`` / ``--batch-images`` (:mod:`textseg.pipeline`): segment and eval."""
    from textseg.pipeline import DEFAULT_DEPTH, DEFAULT_WORKERS

    group.add_argument("--decode-workers", type=int, default=DEFAULT_WORKERS, metavar="N",
                       help="background threads decoding, resizing and normalising the next images while the "
                       f"model runs (0 = none: all in the main thread; default {DEFAULT_WORKERS})")
    group.add_argument("--prefetch", type=int, default=DEFAULT_DEPTH, metavar="N",
                       help=f"images prepared ahead of the model at most (the memory bound; default {DEFAULT_DEPTH})")
    group.add_argument("--batch-images", type=int, default=4, metavar="N",
                       help="images handed to the model together: their same-size crops share image-tower "
                       "passes (of SegmentCfg.batch_size = 4 crops); default 4")
