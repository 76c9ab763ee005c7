"""encode_image / encode_text speed: textseg CLIP vs transformers CLIPModel on the same weights.

Builds a random CLIP of a real shape (default ViT-B/16) in transformers, saves it with
``save_pretrained`` and loads it into textseg through ``load_model`` (so both run identical
weights; outputs are checked to agree first), then times both, interleaved, in one process.

    .venv/bin/python benchmarks/bench_clip.py [--arch ViT-B/16] [--batch 8] [--texts 64] [--repeats 5]

Prints median seconds and the ratio transformers / textseg (> 1: textseg is faster).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

ARCHS = {  # vision width/layers/patch/image, text width/layers, embed
    "ViT-B/32": (768, 12, 32, 224, 512, 12, 512),
    "ViT-B/16": (768, 12, 16, 224, 512, 12, 512),
    "ViT-L/14": (1024, 24, 14, 224, 768, 12, 768),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ViT-B/16", choices=list(ARCHS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--texts", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import CLIPConfig, CLIPModel

    from textseg.models.tokenizer import tokenize
    from textseg.weights.load import load_model

    vw, vl, patch, size, tw, tl, embed = ARCHS[args.arch]
    cfg = CLIPConfig(
        vision_config=dict(hidden_size=vw, intermediate_size=4 * vw, num_hidden_layers=vl, num_attention_heads=vw // 64,
                           patch_size=patch, image_size=size),
        text_config=dict(hidden_size=tw, intermediate_size=4 * tw, num_hidden_layers=tl, num_attention_heads=tw // 64),
        projection_dim=embed)
    torch.manual_seed(0)
    hf = CLIPModel(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_model(weights=d)
    pixels = torch.randn(args.batch, 3, size, size)
    tokens = tokenize([f"a photo of a number {i} thing" for i in range(args.texts)])

    runs = {
        "encode_image": (lambda: ours.encode_image(pixels),
                         lambda: hf.get_image_features(pixel_values=pixels)),
        "encode_text": (lambda: ours.encode_text(tokens),
                        lambda: hf.get_text_features(input_ids=tokens)),
    }
    print(f"{args.arch}: image batch {args.batch} @ {size}px, {args.texts} texts, {args.threads} threads, "
          f"median of {args.repeats}, torch {torch.__version__}, hf attn={hf.config._attn_implementation}")
    with torch.inference_mode():
        for name, (f_ours, f_hf) in runs.items():
            a, b = f_ours(), f_hf()
            b = getattr(b, "pooler_output", b)
            assert torch.allclose(a, b, atol=1e-3), f"{name}: outputs differ by {(a - b).abs().max():.2e}"
            t_ours, t_hf = [], []
            for _ in range(args.repeats):  # interleaved so load changes hit both
                t0 = time.perf_counter()
                f_ours()
                t_ours.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                f_hf()
                t_hf.append(time.perf_counter() - t0)
            mo, mh = statistics.median(t_ours), statistics.median(t_hf)
            print(f"{name:<13} textseg {mo:8.4f}s   transformers {mh:8.4f}s   ratio (hf/textseg) {mh / mo:5.2f}x")


if __name__ == "__main__":
    main()
