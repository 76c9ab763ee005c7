"""The caption folder of the LiT evaluator for ``EVALUATOR=lit bash scripts/clims_coco_mini.sh``.

COCO-MINI's train2017 images + every flickr8k-1k photo (5 captions each) as ``splits/train.txt``;
COCO-MINI's val2017 images as ``splits/val.txt`` (only for the evaluator's own retrieval / zero-shot
report: the evaluator never trains on them). Writes ``OUT/captions.jsonl`` (absolute image paths,
nothing copied) and links COCO-MINI's ``labels.json`` / ``classes.txt`` for the zero-shot report.

    python scripts/lit_caption_mix.py ../shared/data/coco-mini ../shared/data/flickr8k-1k runs/lit_mix
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from textseg.data.imagetext import read_captions
from textseg.data.splits import split_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("coco", help="COCO-MINI folder (captions.jsonl, images_meta.json)")
    ap.add_argument("extra", nargs="+", help="further caption folders, all for training (flickr8k-1k)")
    ap.add_argument("out", help="folder to write")
    args = ap.parse_args()
    coco, out = Path(args.coco).resolve(), Path(args.out)
    val = set(split_ids(coco, "val2017"))
    rows, ids = [], {"train": [], "val": []}
    for src in (coco, *(Path(e).resolve() for e in args.extra)):
        for r in read_captions(src / "captions.jsonl"):
            ids["val" if src == coco and r.key in val else "train"].append(r.key)
            rows.append({"image": str(r.image), "captions": r.captions})
    (out / "splits").mkdir(parents=True, exist_ok=True)
    (out / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, keys in ids.items():
        (out / "splits" / f"{name}.txt").write_text("\n".join(keys) + "\n")
    for f in ("labels.json", "classes.txt"):
        if not (out / f).exists():
            os.symlink(coco / f, out / f)
    print(f"{out}: {len(ids['train'])} training images, {len(ids['val'])} held-out (val2017)")


if __name__ == "__main__":
    main()
