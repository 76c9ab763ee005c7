"""``textseg segment``: label maps, overlays and JSON for images and any words.

    textseg segment photo.jpg --labels "cat, dog; puppy, grass" --out out/
    textseg segment photos/ --labels-file classes.txt --weights ViT-B-16.pt --slide 224 112 --json

Per image it writes ``<out>/<stem>_mask.png`` (palette PNG, value = label index, 255 = unlabelled;
16-bit when there are more than 255 labels), ``<stem>_overlay.png`` (input size, legend) and
``<stem>.json`` (:meth:`SegmentResult.to_record`, the web app's record, plus the files, model and
mode). Labels follow the one label grammar (:mod:`textseg.text`): commas separate labels, ``;``
separates synonyms of one label. With ``--json`` one object per image per line goes to stdout:
``{"image", "labels", "fractions", "mask", "overlay", "seconds"}`` (``{"image", "error"}`` for an
image that failed). A bad image is reported and the others are still processed (exit code 1).

Images are decoded, resized and normalised by ``--decode-workers`` background threads at most
``--prefetch`` ahead, ``--batch-images`` at a time go through the model (same-size crops share tower
passes) and the files are written by a background thread, in input order (:mod:`textseg.pipeline`);
a failed write stops the run with one error line (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from textseg.commands import (
    add_label_arguments,
    add_pipeline_arguments,
    add_precision_argument,
    add_templates_argument,
    threshold_type,
)

DEFAULT_MAX_MEGAPIXELS = 100.0


def add_parser(sub) -> None:
    p = sub.add_parser("segment", help="segment images into any labels (label map, overlay, JSON)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    lab = p.add_argument_group("labels")
    add_label_arguments(lab)
    add_templates_argument(lab, "imagenet")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, help="model name or preset (default: the offline model)")
    m.add_argument("--weights", default=None, help="checkpoint file or folder (any supported format)")
    m.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    m.add_argument("--mode", default=None, help="dense mode of the model (CLIP: sc-clip (default), resclip, naclip, pearl, clearclip, sclip, maskclip, plain)")
    add_precision_argument(m)
    m.add_argument("--onnx", default=None, metavar="DIR",
                   help="run the image tower from an ONNX export folder (textseg export) with onnxruntime")
    s = p.add_argument_group("inference")
    s.add_argument("--short-side", type=int, default=None, metavar="S",
                   help="resize the short side to S (0 = keep; default: the model's own, 448 for most)")
    s.add_argument("--slide", type=int, nargs=2, default=None, metavar=("CROP", "STRIDE"),
                   help="sliding-window inference (default: the whole image at once)")
    s.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the flipped image and average (default: the model's own; offline v2: on)")
    s.add_argument("--threshold", type=threshold_type, default="auto",
                   help="pixels whose best probability is below T become background (number, auto, none)")
    s.add_argument("--bg-words", default="", help='extra background words, e.g. "sky,wall,floor"')
    s.add_argument("--min-area", type=float, default=0.0, help="drop labels covering less than this fraction")
    s.add_argument("--temperature", type=float, default=1.0, help="divide logits by T before softmax")
    s.add_argument("--pamr", action=argparse.BooleanOptionalAction, default=None,
                   help="refine with PAMR (pixel-adaptive mask refinement; default: the model's own, "
                   "the offline v2 model's edge refinement)")
    s.add_argument("--max-megapixels", type=float, default=DEFAULT_MAX_MEGAPIXELS,
                   help=f"refuse images larger than this (default {DEFAULT_MAX_MEGAPIXELS:g} MP)")
    add_pipeline_arguments(s)
    o = p.add_argument_group("output")
    o.add_argument("--out", default="out/segment", help="output folder (default out/segment)")
    o.add_argument("--json", action="store_true", help="print one JSON object per image per line")
    o.add_argument("--no-legend", action="store_true", help="overlay without legend")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _out_stem(path: Path, used: set[str]) -> str:
    stem, k = path.stem or "image", 1
    name = stem
    while name in used:
        name = f"{stem}_{k}"
        k += 1
    used.add(name)
    return name


def run(args) -> int:
    from tqdm import tqdm

    from textseg.errors import TextsegError
    from textseg.io import list_images
    from textseg.prompts import resolve_templates
    from textseg.text import load_labels

    classes = load_labels(args.labels, args.labels_file)  # label errors first, before any model loads
    templates = resolve_templates(args.templates)
    paths = list_images(args.images)
    for given in map(Path, args.images):
        if given.is_dir() and not any(p.parent == given for p in paths):
            print(f"textseg segment: warning: no images in {given}", file=sys.stderr)
    if not paths:
        raise TextsegError("no images to segment")

    from textseg.io import load_image, save_image, write_text
    from textseg.pipeline import BackgroundWriter, batch_or_each, chunks, prefetch
    from textseg.segment import SegmentCfg, Segmenter
    from textseg.weights.load import load_model

    if args.onnx:
        if args.weights or args.model:
            raise TextsegError("--onnx DIR holds its own weights; drop --model / --weights")
        from textseg.export import load_onnx

        model = load_onnx(args.onnx, device=args.device, precision=args.precision)
    else:
        model = load_model(args.model, args.weights, device=args.device, precision=args.precision,
                           cast_weights=args.cast_weights)
    cfg = SegmentCfg(
        mode=args.mode,
        short_side="auto" if args.short_side is None else (args.short_side or None),
        slide=tuple(args.slide) if args.slide else None,
        flip="auto" if args.flip is None else args.flip,
        templates=templates,
        temperature=args.temperature,
        threshold=args.threshold,
        background_words=tuple(w.strip() for w in args.bg_words.split(",") if w.strip()),
        min_area=args.min_area,
        pamr="auto" if args.pamr is None else args.pamr,
    )
    seg = Segmenter(model, cfg)
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise TextsegError(f"--out {out_dir}: is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TextsegError(f"--out {out_dir}: cannot create the folder ({e.strerror or e})") from None
    used: set[str] = set()
    failed = 0
    bar = tqdm(total=len(paths), unit="img", file=sys.stderr, disable=args.no_progress or len(paths) < 2)
    model_name = getattr(model, "name", type(model).__name__)

    def prepare(path: Path):  # background threads: decode, resize, normalise, crop
        image = load_image(path, max_pixels=args.max_megapixels * 1e6)
        return image, seg.prepare(image)

    def write(path: Path, image, res, stem: str, t0: float) -> None:  # the writer thread
        t1 = time.perf_counter()
        mask_path, ov_path = out_dir / f"{stem}_mask.png", out_dir / f"{stem}_overlay.png"
        save_image(res.mask_image(), mask_path, optimize=False)
        save_image(res.overlay(image, legend=not args.no_legend), ov_path)
        res.timings["write"] = time.perf_counter() - t1
        seconds = time.perf_counter() - t0
        files = {"image": str(path), "mask": str(mask_path), "overlay": str(ov_path), "seconds": round(seconds, 4)}
        detail = dict(files, **res.to_record(), model=model_name, mode=seg.mode)
        write_text(out_dir / f"{stem}.json", json.dumps(detail, indent=1, ensure_ascii=False) + "\n")
        if args.json:  # the short form: image, labels, fractions, files, seconds
            line = {k: detail[k] for k in ("image", "labels", "fractions", "mask", "overlay", "seconds")}
            print(json.dumps(line, ensure_ascii=False), flush=True)
        else:
            top = sorted(((f, n) for n, f in res.fractions.items() if f > 0), reverse=True)[:6]
            shares = ", ".join(f"{n} {100 * f:.1f}%" for f, n in top)
            bar.write(f"{path}: {shares} -> {ov_path} ({seconds:.2f} s)")
        bar.update(1)

    def report(path: Path, e: TextsegError) -> None:  # in the writer thread too: stdout stays in order
        bar.write(f"textseg segment: error: {e}", file=sys.stderr)
        if args.json:
            print(json.dumps({"image": str(path), "error": str(e)}), flush=True)
        bar.update(1)

    stream = prefetch(paths, prepare, workers=args.decode_workers, depth=args.prefetch)
    with BackgroundWriter(max_pending=max(1, args.prefetch), workers=0 if args.decode_workers == 0 else 1) as writer:
        for group in chunks(stream, args.batch_images):
            t0 = time.perf_counter()
            ready = [value[1] for _, value, error in group if error is None]  # (image, prepared)
            done = iter(batch_or_each(lambda preps: seg.segment_batch(preps, classes), ready))
            for path, value, error in group:  # outputs and errors in the order of the images
                res = error if error is not None else next(done)
                if isinstance(res, TextsegError):
                    failed += 1
                    writer.submit(report, path, res)
                    continue
                writer.submit(write, path, value[0], res, _out_stem(path, used), t0, what=f"the outputs of {path}")
    bar.close()
    if failed:
        print(f"textseg segment: {failed} of {len(paths)} images failed", file=sys.stderr)
        return 1
    return 0
