"""Show what GroupViT groups: one colour overlay per grouping stage (the official demo's
"all_groups" view), plus the stages side by side.

    .venv/bin/python scripts/groupvit_groups.py photo.jpg --weights runs/groupvit/model.safetensors --out out/groups
    # -> out/groups/photo_stage0.png (64 groups), photo_stage1.png (8 groups), photo_groups.png

Any GroupViT checkpoint works (NVlabs .pth, Hugging Face folder, native safetensors). The image is
resized to ``--short-side`` (default: the model's training size) and cropped to multiples of the
patch size; groups are coloured with a fixed palette (group i of stage s always has the same colour).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from textseg.errors import TextsegError
from textseg.io import load_image


def group_overlays(model, image: Image.Image, short_side: int | None = None, alpha: float = 0.55) -> list[Image.Image]:
    """``image`` -> one RGB overlay per grouping stage (group colours blended over the photo)."""
    from textseg.viz import palette

    p = model.cfg.vision.patch_size
    short = short_side or model.preprocess_cfg.image_size
    s = short / min(image.size)
    w, h = max(p, round(image.width * s) // p * p), max(p, round(image.height * s) // p * p)
    img = image.resize((w, h), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    mean = torch.tensor(model.preprocess_cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.preprocess_cfg.std).view(1, 3, 1, 1)
    maps = model.group_label_maps((x - mean) / std)
    base = np.asarray(img, dtype=np.float32)
    out = []
    for m in maps:
        groups = m[0].numpy()
        colours = palette(int(groups.max()) + 1)  # group i always gets colour i
        blend = (1 - alpha) * base + alpha * colours[groups].astype(np.float32)
        out.append(Image.fromarray(blend.clip(0, 255).astype(np.uint8)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("images", nargs="+")
    ap.add_argument("--weights", required=True, help="a GroupViT checkpoint (any supported format)")
    ap.add_argument("--short-side", type=int, default=None)
    ap.add_argument("--out", default="out/groups")
    args = ap.parse_args(argv)
    from textseg.models.groupvit import GroupViT
    from textseg.weights.load import load_model

    try:
        model = load_model(weights=args.weights)
        if not isinstance(model, GroupViT):
            raise TextsegError(f"{args.weights}: is a {model.name!r} checkpoint, not a GroupViT")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for path in args.images:
            overlays = group_overlays(model, load_image(path), args.short_side)
            stem = Path(path).stem
            for i, ov in enumerate(overlays):
                ov.save(out / f"{stem}_stage{i}.png")
            strip = Image.new("RGB", (sum(o.width for o in overlays), overlays[0].height))
            for i, ov in enumerate(overlays):
                strip.paste(ov, (i * ov.width, 0))
            strip.save(out / f"{stem}_groups.png")
            print(out / f"{stem}_groups.png")
    except TextsegError as e:
        print(f"groupvit_groups: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
