"""``textseg classify IMAGE... --labels "a,b,c"``: zero-shot classification, top-k per image.

With ``--json`` each image gives one line ``{"image": ..., "labels": [...], "probs": [...]}``
(probabilities in label order, full float precision). Images are read batch by batch (bounded
memory); an unreadable image stops the run with a one-line error."""

from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("classify", help="zero-shot classification of images against text labels",
                       description="Zero-shot classification: which of the given labels fits each image best.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--labels", help='comma-separated labels, e.g. "cat,dog,a red car"')
    src.add_argument("--labels-file", metavar="FILE", help="text file with one label per line")
    p.add_argument("--template", default=None,
                   help='prompt template with {} for the label ("{}" = the label as is); '
                        "default: the 80 OpenAI ImageNet templates; also: imagenet, simple")
    p.add_argument("--weights", metavar="W", help="checkpoint file or folder (format detected)")
    p.add_argument("--model", metavar="M", help="model name (see `textseg models`); default: offline")
    p.add_argument("--top-k", type=int, default=5, help="labels shown per image (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per image per line")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def read_labels(args) -> list[str]:
    from pathlib import Path

    from textseg.classify import check_labels
    from textseg.errors import TextsegError

    if args.labels_file:
        try:
            text = Path(args.labels_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TextsegError(f"cannot read labels file {args.labels_file}: {e}") from None
        labels = [ln.strip() for ln in text.splitlines() if ln.strip()]
    else:
        labels = [x.strip() for x in args.labels.split(",") if x.strip()]
    return check_labels(labels)


def run(args) -> int:
    from textseg.errors import TextsegError

    labels = read_labels(args)
    if args.top_k < 1 or args.batch_size < 1:
        raise TextsegError("--top-k and --batch-size must be at least 1")
    from textseg.io import list_images, load_image

    paths = list_images(args.images)
    if not paths:
        raise TextsegError("no images found")
    if len(paths) == 1:
        load_image(paths[0])  # fail on a bad image before loading the model

    from textseg.classify import DEFAULT_TEMPLATES, classify_batches
    from textseg.weights.load import load_model

    model = load_model(name=args.model, weights=args.weights, device=args.device)
    templates = args.template if args.template is not None else DEFAULT_TEMPLATES
    done = 0
    for probs in classify_batches(model, paths, labels, templates, args.batch_size, progress=True):
        for path, row in zip(paths[done:], probs.tolist()):
            if args.json:
                print(json.dumps({"image": str(path), "labels": labels, "probs": row}))
                continue
            order = sorted(range(len(labels)), key=lambda i: -row[i])[: args.top_k]
            width = max(len(labels[i]) for i in order)
            print(str(path))
            for i in order:
                print(f"  {labels[i]:<{width}}  {row[i]:7.2%}")
        done += len(probs)
        sys.stdout.flush()
    return 0
