"""Before / after picture of the offline default model on the demo photo (docs/offline_v2.png).

Left: ``offline-bridge`` (the v1 default, the ConSE bridge alone); right: ``offline`` (v2: bridge +
the learned dense head). Both segment the same photo with the same labels through the Segmenter.

    python scripts/offline_v2_figure.py [--image PATH] [--labels "cat,wall,floor,background"] [--out docs/offline_v2.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from textseg.examples import example_path  # noqa: E402
from textseg.segment import Segmenter  # noqa: E402
from textseg.weights.load import load_model  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default=str(example_path("chelsea")))
    p.add_argument("--labels", default="cat,wall,floor,background")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "offline_v2.png")
    p.add_argument("--width", type=int, default=320, help="width of each panel")
    a = p.parse_args(argv)
    img = Image.open(a.image).convert("RGB")
    panels = []
    for name in ("offline-bridge", "offline"):
        res = Segmenter(load_model(name)).segment(img, a.labels)
        ov = res.overlay(img)
        ov = ov.resize((a.width, round(ov.height * a.width / ov.width)), Image.LANCZOS)
        title = {"offline-bridge": "before: offline-bridge (v1)", "offline": "after: offline (v2)"}[name]
        canvas = Image.new("RGB", (ov.width, ov.height + 18), "white")
        canvas.paste(ov, (0, 18))
        ImageDraw.Draw(canvas).text((4, 3), title, fill="black")
        panels.append(canvas)
    out = Image.new("RGB", (sum(q.width for q in panels) + 6, max(q.height for q in panels)), "white")
    x = 0
    for q in panels:
        out.paste(q, (x, 0))
        x += q.width + 6
    a.out.parent.mkdir(parents=True, exist_ok=True)
    out.convert("P", palette=Image.ADAPTIVE, colors=128).save(a.out, optimize=True)
    print(f"{a.out} ({a.out.stat().st_size // 1024} KiB)")
    return a.out


if __name__ == "__main__":
    main()
