"""Helper for tests/test_evaluate.py (not collected): a tiny colour-seeing model, a synthetic folder
dataset, and ``main(root, out)`` that evaluates it (sharded when run under torchrun) and writes the
confusion matrix + report as JSON. Run as ``python eval_worker.py ROOT OUT`` or under torchrun."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from textseg.models.base import DualEncoder, PreprocessCfg

COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0)}


class ColourModel(DualEncoder):
    """Dense features = mean normalised RGB of each 8 x 8 cell; a colour word embeds to its RGB."""

    name = "colour"
    dense_stride = 8
    preprocess_cfg = PreprocessCfg(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor([[0.0, 0.0, 0.0], *COLOURS.values()]), requires_grad=False)

    def tokenize(self, texts):
        names = list(COLOURS)
        return torch.tensor([[1 + names.index(w) if w in names else 0 for w in t.split()][:1] or [0]
                             for t in texts])

    def encode_text(self, tokens, normalize=False):
        x = self.table[tokens[:, 0]]
        return F.normalize(x, dim=-1) if normalize else x

    def encode_dense(self, pixels, mode=None):
        return F.avg_pool2d(pixels, self.dense_stride)


def make_folder(root: Path, n: int = 6, seed: int = 0) -> Path:
    """Images of noisy colour blocks (borders off the 8-pixel grid) with their true masks."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    (root / "classes.txt").write_text("red\ngreen\nblue\n")
    rgb = np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230]], np.float64)
    for i in range(n):
        h, w = int(rng.integers(30, 50)), int(rng.integers(30, 60))
        mask = np.zeros((h, w), np.uint8)
        for _ in range(4):
            y, x = int(rng.integers(0, h - 5)), int(rng.integers(0, w - 5))
            mask[y : y + int(rng.integers(5, 25)), x : x + int(rng.integers(5, 25))] = rng.integers(0, 3)
        mask[: 2, : 3] = 255
        img = np.clip(rgb[mask.clip(0, 2)] + rng.normal(0, 60, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"im{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"im{i:02d}.png")
    return root


def main(root: str, out: str) -> None:
    import torch.distributed as dist

    from textseg.data.folder import FolderDataset
    from textseg.evaluate import SegmenterPredictor, evaluate

    torch.set_num_threads(1)
    world = 1
    if "WORLD_SIZE" in __import__("os").environ:
        dist.init_process_group("gloo")
        world = dist.get_world_size()
    ds = FolderDataset(root)
    pred = SegmenterPredictor(ColourModel(), ds, short_side=None, templates="none", slide=(16, 8))
    res = evaluate(ds, pred, progress=False, keep_worst=2)
    if world == 1 or dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"matrix": res.confusion.mat.tolist(), "report": res.report()}))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
