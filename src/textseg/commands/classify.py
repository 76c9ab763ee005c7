"""``textseg classify IMAGE... --labels "a,b,c"``: zero-shot classification, top-k per image.

With ``--json`` each image gives one line ``{"image": ..., "labels": [...], "probs": [...]}``
(class names and probabilities in class order, full float precision). Labels follow the one
label grammar of :mod:`textseg.text` (a class with synonyms scores the max over them). Images are
read batch by batch (bounded memory); an unreadable image stops the run with a one-line error."""

from __future__ import annotations

import json
import sys

from textseg.commands import add_label_arguments, add_precision_argument, add_templates_argument


def add_parser(sub) -> None:
    p = sub.add_parser("classify", help="zero-shot classification of images against text labels",
                       description="Zero-shot classification: which of the given labels fits each image best.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    add_label_arguments(p)
    add_templates_argument(p, "imagenet")  # the 80-prompt ensemble, as OpenAI's zero-shot ImageNet
    p.add_argument("--weights", metavar="W", help="checkpoint file or folder (format detected)")
    p.add_argument("--model", metavar="M", help="model name (see `textseg models`); default: offline")
    p.add_argument("--top-k", type=int, default=5, help="labels shown per image (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per image per line")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--device", default="cpu")
    add_precision_argument(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from textseg.errors import TextsegError
    from textseg.prompts import resolve_templates
    from textseg.text import load_labels

    classes = load_labels(args.labels, args.labels_file)
    labels = [c.name for c in classes]
    templates = resolve_templates(args.templates)
    from textseg.io import list_images, load_image

    paths = list_images(args.images)
    if not paths:
        raise TextsegError("no images found")
    if len(paths) == 1:
        load_image(paths[0])  # fail on a bad image before loading the model

    from textseg.weights.load import load_model
    from textseg.zeroshot import classify_batches

    model = load_model(name=args.model, weights=args.weights, device=args.device, precision=args.precision,
                       cast_weights=args.cast_weights)
    done = 0
    for probs in classify_batches(model, paths, classes, templates, args.batch_size, progress=True):
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
