"""A tiny, fully known DualEncoder for segmentation tests: it "sees" colour.

Dense features are the mean normalised RGB of each ``cell x cell`` patch; the text tower embeds a
few colour words onto the matching RGB directions (other words get small seeded vectors), so
"red" lights up red pixels. ``encode_text`` calls and prompts are counted.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F

from textseg.models.base import DualEncoder, PreprocessCfg

COLOURS = {
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "white": (1.0, 1.0, 1.0),
    "black": (-1.0, -1.0, -1.0),
    "yellow": (1.0, 1.0, -1.0),
}
VOCAB = 4096


def word_id(word: str) -> int:
    return 1 + zlib.crc32(word.encode()) % (VOCAB - 1)


class TinyColourModel(DualEncoder):
    name = "tiny-colour"
    dense_modes = ("plain", "blur")

    def __init__(self, cell: int = 8):
        super().__init__()
        self.dense_stride = cell
        self.preprocess_cfg = PreprocessCfg(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        g = torch.Generator().manual_seed(0)
        emb = 0.3 * torch.randn(VOCAB, 3, generator=g)
        emb[0] = 0
        for word, vec in COLOURS.items():
            emb[word_id(word)] = 4 * torch.tensor(vec)
        self.word_emb = torch.nn.Parameter(emb)
        self.text_calls = 0
        self.prompts_seen: list[str] = []
        self.dense_calls = 0

    def tokenize(self, texts):
        self.prompts_seen.extend(texts)
        ids = [[word_id(w) for w in t.lower().replace(".", " ").split()][:16] for t in texts]
        out = torch.zeros(len(texts), 16, dtype=torch.long)
        for i, row in enumerate(ids):
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out

    def encode_text(self, tokens, normalize=False):
        self.text_calls += 1
        x = self.word_emb[tokens].sum(dim=1)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_image(self, pixels, normalize=False):
        x = pixels.mean(dim=(2, 3))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_dense(self, pixels, mode=None):
        self.dense_calls += 1
        c = self.dense_stride
        x = F.avg_pool2d(pixels, c, c)
        if mode == "blur":
            x = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
        return x


def save_tiny_clip(path) -> None:
    """A tiny random CLIP ViT (seed 0; 32 px, patch 8, 2 blocks) saved as a native checkpoint at
    ``path``, for end-to-end CLI tests of the CLIP dense modes and protocols."""
    from textseg.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
    from textseg.weights.load import save_model

    torch.manual_seed(0)
    model = CLIP(CLIPConfig(embed_dim=16, vision=VisionConfig(image_size=32, layers=2, width=32, patch_size=8,
                                                               heads=2),
                            text=TextConfig(context_length=16, width=32, heads=2, layers=1)))
    save_model(model, path, {"source": "test"})
