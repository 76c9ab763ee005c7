"""Speed of dense segmentation vs the bare image encoder and vs transformers' CLIPSeg, same run.

    .venv/bin/python benchmarks/bench_segment.py [--repeats 5] [--mode sc-clip,naclip | all] [--threads 2]

A ViT-B/16-sized CLIP (random weights) segments a 448 x 600 photo into 21 labels whose text
embeddings are already cached (whole-image inference, short side 448): ``Segmenter.set_image`` +
``predict`` (resize, dense features, logits, upsampling to 448 x 600, argmax) is timed against

1. the bare ``encode_image`` forward pass of the same model on the same 448 x 600 tensor
   (target: ratio <= 1.15; each ``--mode`` is timed, ``all`` = every CLIP dense mode: a mode that
   reads several blocks, as sc-clip, is expected to cost more; a text mode, resclip, runs its image
   forward in ``predict`` once the labels are known: two passes of the last block, the attention of
   four earlier blocks, a PAMR of the first-pass logits at the input size and the N x N semantic
   prior), and
2. transformers' ``CLIPSegForImageSegmentation`` (random init, configured as the published
   rd64-refined model: ViT-B/16, reduce_dim 64, complex decoder; 352 px input) on the same image
   with 21 prompts the standard way (the image batched once per prompt, as its processor does;
   prompt embeddings precomputed, i.e. cached as well), upsampled to 448 x 600 and argmaxed
   (target: textseg >= 2x faster).

Times are medians over ``--repeats`` interleaved runs after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

VOC = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
       "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def clipseg_runner(image, mean: torch.Tensor, std: torch.Tensor, out_hw: tuple[int, int], n_prompts: int = len(VOC),
                   precision: str = "fp32"):
    """transformers' CLIPSeg configured as the published CIDAS/clipseg-rd64-refined (ViT-B/16 backbone,
    reduce_dim 64, complex transposed-convolution decoder, 352 px input; random init here), segmenting
    ``image`` into ``n_prompts`` prompts its standard way (the image batched once per prompt, prompt
    embeddings precomputed), upsampled to ``out_hw`` and argmaxed; ``precision`` bf16: under
    ``torch.autocast`` (also used by benchmarks/bench_precision.py)."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    torch.manual_seed(0)
    cfg = CLIPSegConfig(vision_config={"patch_size": 16}, use_complex_transposed_convolution=True)
    clipseg = CLIPSegForImageSegmentation(cfg).eval()
    ids = torch.randint(1, 49000, (n_prompts, 8))
    with torch.no_grad():
        cond = clipseg.get_conditional_embeddings(batch_size=n_prompts, input_ids=ids)

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
            x = F.interpolate(x, size=(352, 352), mode="bilinear", align_corners=False)
            x = ((x - mean) / std).expand(n_prompts, -1, -1, -1)
            logits = clipseg(pixel_values=x, conditional_embeddings=cond).logits.float()  # N x 352 x 352
            up = F.interpolate(logits[None], size=out_hw, mode="bilinear", align_corners=False)[0]
            return up.argmax(0)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mode", default="sc-clip", help="dense mode(s), comma-separated, or 'all'")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-clipseg", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from textseg.examples import example_path
    from textseg.models.clip import CLIP, CLIPConfig
    from textseg.segment import SegmentCfg, Segmenter

    image = Image.open(example_path("chelsea")).convert("RGB").resize((600, 448), Image.BICUBIC)
    model = CLIP(CLIPConfig()).eval()  # ViT-B/16 shapes, random weights
    modes = list(model.dense_modes) if args.mode == "all" else args.mode.split(",")
    segs = {}
    for mode in modes:
        segs[mode] = Segmenter(model, SegmentCfg(mode=mode, short_side=448, templates="none", threshold=None))
        segs[mode].set_image(image)
        segs[mode].predict(list(VOC))  # fills the text cache: the 21 labels are "cached" from here on
    mean = torch.tensor(model.preprocess_cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.preprocess_cfg.std).view(1, 3, 1, 1)
    pixels = (torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255 - mean) / std

    def bare():
        with torch.no_grad():
            model.encode_image(pixels)

    def dense(seg):
        def run():
            seg.set_image(image)
            res = seg.predict(list(VOC))
            assert res.label_map.shape == (448, 600)
        return run

    runners = {"bare encode_image 448x600": bare}
    for mode, seg in segs.items():
        runners[f"textseg segment ({mode}, 21 cached labels)"] = dense(seg)

    if not args.no_clipseg:
        runners["transformers CLIPSeg (352 px, 21 prompts)"] = clipseg_runner(image, mean, std, (448, 600))

    for fn in runners.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.repeats):
        for name, fn in runners.items():
            times[name].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:48s} {1000 * v:9.1f} ms  (runs: {', '.join(f'{1000 * t:.0f}' for t in times[k])})")
    names = list(runners)
    bare_t = med[names[0]]
    for i, mode in enumerate(modes, start=1):
        ratio = med[names[i]] / bare_t
        print(f"segment ({mode}) / bare encoder = {ratio:.3f}  (target <= 1.15: {'PASS' if ratio <= 1.15 else 'FAIL'})")
    if len(names) > len(modes) + 1:
        speed = med[names[-1]] / med[names[1]]
        print(f"CLIPSeg / textseg segment ({modes[0]}) = {speed:.2f}x (target >= 2: {'PASS' if speed >= 2 else 'FAIL'})")


if __name__ == "__main__":
    main()
