"""Class activation map (CAM) networks for weakly supervised segmentation (CAM baseline, CLIMS).

A backbone turns ``B x 3 x H x W`` pixels (normalised with the network's ``mean``/``std``) into a
``B x C x H/s x W/s`` feature map (``s`` = :attr:`CAMNet.stride`: :attr:`CAMConfig.output_stride`, 16 by
default for every backbone); a bias-free
1x1 convolution turns it into ``B x K x h x w`` class scores, one map per class. Three views of that
one map:

* :meth:`CAMNet.classify`   ``B x K`` image logits: the 1x1 classifier of the globally pooled features
  (equal to pooling the maps, the classifier is linear): the multi-label CAM *baseline* trains these.
* :meth:`CAMNet.forward`    ``B x K x h x w`` **sigmoid** activation maps with no pooling, what CLIMS
  trains (Xie et al., CVPR 2022): the maps themselves are judged by an image-text evaluator.
* :meth:`CAMNet.cam`        ``B x K x h x w`` ReLU'd raw scores for inference (``textseg cam make``).

Backbones (:class:`CAMConfig.backbone`):

* ``"resnet50"``: ResNet-50 as in the paper (torchvision/IRN key layout: ``conv1``, ``bn1``,
  ``layer1..4``; last stage at stride 1 so the maps have stride 16). Own implementation, random
  initialisation unless a state dict is given (:func:`resnet50_state_from_torchvision`).
* ``"efficientnet_lite0"`` (``lite1``, ``lite2``): the offline default model's ImageNet-pretrained
  EfficientNet-Lite (:mod:`textseg.models.efficientnet`), last stride-2 stage turned to stride 1 so the
  maps have stride 16. This is the CPU option.
* ``"tiny"``: four strided convolutions (stride 16); for tests and smoke runs only.

:attr:`CAMConfig.output_stride` (textseg's option; default 16, the official and every checkpoint's):
``tiny`` takes 16, 8 or 4, ``efficientnet_lite*`` 16 or 8, ``resnet50`` 16 only. A smaller stride turns
the last downsampling layer(s) to stride 1 and dilates the layers after them (DeepLab's way): the
weights and the receptive field stay the same and the maps get 2x (4x) denser, e.g. a 96 px image
gives 12 x 12 maps at stride 8 instead of 6 x 6.

As a segmentation model (``textseg segment --weights RUN/model.safetensors --labels ...``) a CAM
network is a :class:`~textseg.models.base.DualEncoder` with a **fixed vocabulary**: its trained class
names (and ``background``). :meth:`CAMNet.embed_texts` maps each label to its class (one-hot; an
unknown label is an error naming the known classes), :meth:`CAMNet.encode_dense` gives the ReLU'd
maps of every class, each divided by its maximum over the image (as ``textseg cam make``), and
:meth:`CAMNet.background_logits` makes a pixel background when every map is below the threshold
(``--threshold``; ``auto`` = :attr:`CAMConfig.background_threshold`), the rule of ``textseg cam eval``
and ``textseg cam labels``.

Checkpoints: the native textseg format (``save_model``; what ``textseg train cam`` writes, loaded by
``--weights``) or the older one-file format whose metadata carries the :class:`CAMConfig` as JSON
(:func:`save_cam` / :func:`load_cam`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from textseg.constants import IMAGENET_MEAN, IMAGENET_STD
from textseg.data.image_labels import canonical
from textseg.errors import CheckpointError, TextsegError
from textseg.models.base import DualEncoder, Intermediates, PreprocessCfg, blocks_to_run, resolve_indices
from textseg.weights.read import check_state_dict

BACKBONES = ("resnet50", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "tiny")


@dataclass
class CAMConfig:
    """Everything needed to rebuild a CAM network (stored in its checkpoint)."""

    class_names: list[str] = field(default_factory=list)  # foreground classes, no "background"
    backbone: str = "efficientnet_lite0"
    pretrained: bool = True  # EfficientNet-Lite: load the installed ImageNet weights
    image_size: int = 320  # training crop / default inference size
    background_threshold: float = 0.15  # segmenting: background where every normalised map is below it
    output_stride: int = 16  # maps at 1/stride of the input; ours: tiny 8 / 4, efficientnet 8 (module docstring)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ----------------------------------------------------------------------------------------- ResNet-50
class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 residual block with 4x expansion."""

    def __init__(self, cin: int, width: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """ResNet-50 trunk, ``B x 3 x H x W`` -> ``B x 2048 x H/16 x W/16`` (``strides`` of layer1..4
    default to (1, 2, 2, 1) as in IRN/CLIMS; pass (1, 2, 2, 2) for the classic stride 32)."""

    out_channels = 2048

    def __init__(self, strides: tuple[int, int, int, int] = (1, 2, 2, 1)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, layers = 64, []
        for width, depth, stride in zip((64, 128, 256, 512), (3, 4, 6, 3), strides):
            blocks = [Bottleneck(cin, width, stride)]
            blocks += [Bottleneck(width * 4, width) for _ in range(depth - 1)]
            layers.append(nn.Sequential(*blocks))
            cin = width * 4
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.stride = 4 * strides[0] * strides[1] * strides[2] * strides[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each block: each block starts as identity
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False) -> Intermediates:
        """The :class:`~textseg.models.base.Intermediates` contract over layer1..layer4 (strides 4,
        8, 16, 16 by default): ``final`` is layer4's output. ``norm`` is ignored; NCHW only."""
        if output_fmt != "NCHW":
            raise ValueError(f"ResNet50 gives NCHW maps only, not {output_fmt!r}")
        take = resolve_indices(indices, 4)
        stop = blocks_to_run(take, 4, intermediates_only)
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        feats = []
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)[:stop]):
            x = layer(x)
            if i in take:
                feats.append(x)
        return Intermediates(feats, (x.shape[-2], x.shape[-1]), final=None if intermediates_only else x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_intermediates(x, indices=[]).final


def resnet50_state_from_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision / timm ``resnet50`` state dict -> :class:`ResNet50` keys (drops ``fc.*``)."""
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


# ---------------------------------------------------------------------------------------------- tiny
class TinyBackbone(nn.Module):
    """Four stride-2 3x3 conv + BN + ReLU layers (32 -> 64 channels), stride 16. Tests only.

    ``output_stride`` 8 (4): the last (two) layer(s) run at stride 1 and the layers after the first
    of them dilate by 2 (4) instead, so weights and receptive field (31 px) are unchanged."""

    out_channels = 64
    STRIDES = (4, 8, 16)

    def __init__(self, output_stride: int = 16):
        super().__init__()
        if output_stride not in self.STRIDES:
            raise TextsegError(f"tiny backbone: output_stride must be 4, 8 or 16, got {output_stride}")
        self.stride = int(output_stride)
        chans = (3, 32, 32, 64, 64)
        layers, reduction, dilation = [], 1, 1
        for a, b in zip(chans[:-1], chans[1:]):
            stride = 2 if reduction < output_stride else 1
            conv = nn.Conv2d(a, b, 3, stride, padding=dilation, dilation=dilation, bias=False)
            layers.append(nn.Sequential(conv, nn.BatchNorm2d(b), nn.ReLU(inplace=True)))
            reduction, dilation = reduction * stride, dilation * (2 // stride)
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


# ----------------------------------------------------------------------------------- EfficientNet
class EfficientNetBackbone(nn.Module):
    """The offline default's EfficientNet-Lite trunk at output stride 16 -> ``B x 1280 x H/16 x W/16``.

    The last stride-2 depthwise convolution is set to stride 1 (pretrained weights unchanged), the
    usual way to get denser maps from a classification network (DeepLab's output stride 16).
    """

    def __init__(self, variant: str = "efficientnet_lite0", pretrained: bool = True, output_stride: int = 16):
        super().__init__()
        from textseg.models import efficientnet

        if output_stride not in (8, 16):
            raise TextsegError(f"{variant} backbone: output_stride must be 8 or 16, got {output_stride}")
        self.net = efficientnet.efficientnet_lite(variant.replace("efficientnet_", ""), pretrained=pretrained)
        self.net.set_output_stride(output_stride)
        self.net.classifier = nn.Identity()  # the ImageNet head is not part of the trunk
        self.out_channels = self.net.num_features
        self.stride = int(output_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)


# -------------------------------------------------------------------------------------------- CAM
class CAMNet(DualEncoder):
    """Backbone + bias-free 1x1 classifier; see the module docstring for the three views and the
    fixed-vocabulary segmentation interface."""

    name = "cam"
    dense_modes = ("cam",)
    segment_resolution = "canvas"  # its own background rule (background_logits) runs on the canvas

    def __init__(self, config: CAMConfig, backbone: nn.Module | None = None):
        super().__init__()
        if config.num_classes < 1:
            raise TextsegError("a CAM network needs at least one foreground class")
        if config.backbone not in BACKBONES:
            raise TextsegError(f"unknown CAM backbone {config.backbone!r}; choose one of {', '.join(BACKBONES)}")
        self.config = config
        if backbone is None:
            if config.backbone == "resnet50":
                if config.output_stride != 16:
                    raise TextsegError(f"resnet50 backbone: output_stride must be 16, got {config.output_stride}")
                backbone = ResNet50()
            elif config.backbone == "tiny":
                backbone = TinyBackbone(config.output_stride)
            else:
                backbone = EfficientNetBackbone(config.backbone, config.pretrained, config.output_stride)
        self.backbone = backbone
        self.classifier = nn.Conv2d(backbone.out_channels, config.num_classes, 1, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.01)
        efficient = config.backbone.startswith("efficientnet")
        self.mean, self.std = ((0.5,) * 3, (0.5,) * 3) if efficient else (IMAGENET_MEAN, IMAGENET_STD)
        self.preprocess_cfg = PreprocessCfg(config.image_size, self.mean, self.std, "bilinear")
        self.dense_stride = int(backbone.stride)
        self.default_background_threshold = config.background_threshold

    @classmethod
    def from_config_dict(cls, d: dict) -> CAMNet:
        """A network of that shape with random weights (``pretrained`` off: the weights follow)."""
        return cls(CAMConfig(**{**d, "pretrained": False}))

    def config_dict(self) -> dict:
        return asdict(self.config)

    @property
    def class_names(self) -> list[str]:
        return list(self.config.class_names)

    @property
    def stride(self) -> int:
        return int(self.backbone.stride)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` pixels in [0, 1] -> the network's input normalisation."""
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        return (images - mean) / std

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Raw class score maps ``B x K x h x w`` (before any squashing)."""
        return self.classifier(self.backbone(x))

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        """CLIMS maps: ``sigmoid(scores)``, ``B x K x h x w`` in (0, 1)."""
        return torch.sigmoid(self.scores(x))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-label image logits ``B x K``: classifier of the average-pooled features."""
        feats = self.backbone(x).mean(dim=(2, 3), keepdim=True)
        return self.classifier(feats).flatten(1)

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        """Inference CAMs ``B x K x h x w``: ``relu(scores)`` (normalise per class afterwards)."""
        return F.relu(self.scores(x))

    # ------------------------------------------------------- fixed-vocabulary segmentation model
    @property
    def vocabulary(self) -> list[str]:
        """The labels this network segments: its classes, then ``background``."""
        return [*self.class_names, "background"]

    def tokenize(self, texts) -> torch.Tensor:
        """``N`` labels -> ``N`` vocabulary indices (the network has no text encoder: a label must be
        one of its classes or ``background``)."""
        index = {canonical(c): i for i, c in enumerate(self.vocabulary)}
        unknown = [t for t in texts if canonical(t) not in index]
        if unknown:
            raise TextsegError(f"this CAM network knows only the classes it was trained on: "
                               f"{', '.join(self.vocabulary)}; got {', '.join(map(repr, unknown))}")
        return torch.tensor([index[canonical(t)] for t in texts], dtype=torch.long)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Vocabulary indices -> ``N x (K + 1)`` one-hot rows (column ``K``: background)."""
        return F.one_hot(tokens, len(self.vocabulary)).float().to(self.classifier.weight.device)

    @torch.no_grad()
    def embed_texts(self, texts, templates=("{}",)) -> torch.Tensor:
        """``N`` labels -> one-hot rows; ``templates`` are ignored (no text encoder)."""
        return self.encode_text(self.tokenize(texts))

    def image_logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``B x (K + 1)`` class probabilities, one-hot label rows -> ``B x N``: each label's
        probability (no cosine, no scale)."""
        return image @ text.to(image.dtype).t()

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``B x (K + 1)`` image-level class probabilities (the multi-label head; background 0)."""
        probs = torch.sigmoid(self.classify(pixels))
        return F.pad(probs, (0, 1))

    def encode_dense(self, pixels: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """``B x (K + 1) x h x w``: ``relu(scores)`` of each class divided by its maximum over the
        image (+1e-5, as ``textseg cam make``), then a background channel of -1 (below every
        threshold: background comes from :meth:`background_logits`)."""
        cam = self.cam(pixels)
        cam = cam / (cam.flatten(2).amax(dim=2)[..., None, None] + 1e-5)
        return torch.cat([cam, cam.new_full((cam.shape[0], 1, *cam.shape[2:]), -1.0)], dim=1)

    def dense_logits(self, dense: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Each label's normalised map (no cosine, no scale): ``B x N x h x w``."""
        return torch.einsum("bdhw,nd->bnhw", dense, text.to(dense.dtype))

    def background_logits(self, logits: torch.Tensor, threshold: float) -> torch.Tensor:
        """The background score: the threshold itself, so a pixel is background exactly when every
        label's normalised map is below it (``textseg cam eval``'s rule)."""
        return logits.new_full((1, *logits.shape[1:]), float(threshold))

    def param_groups(self, lr: float, classifier_lr_mult: float = 10.0) -> list[dict]:
        """Backbone at ``lr``, the new classifier at ``classifier_lr_mult * lr`` (as IRN/CLIMS)."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        return [
            {"params": backbone, "lr": lr, "initial_lr": lr},
            {"params": list(self.classifier.parameters()), "lr": lr * classifier_lr_mult,
             "initial_lr": lr * classifier_lr_mult},
        ]


def build_cam(config: CAMConfig) -> CAMNet:
    return CAMNet(config)


def load_backbone_weights(model: CAMNet, path: str | Path) -> CAMNet:
    """Load ImageNet (or any) weights into ``model.backbone`` strictly: a safetensors file or a
    ``torch.load(weights_only=True)`` state dict, e.g. torchvision's ``resnet50`` (``fc.*`` and a
    ``module.`` prefix are dropped)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such backbone weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
    except Exception as e:  # many reader errors
        raise CheckpointError(f"{path}: cannot read backbone weights ({e})") from None
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if isinstance(model.backbone, ResNet50):
        state = resnet50_state_from_torchvision(state)
    elif isinstance(model.backbone, EfficientNetBackbone):
        from textseg.models.efficientnet import map_efficientnet_pytorch_keys

        if any(k.startswith("_blocks.") for k in state):
            state = map_efficientnet_pytorch_keys(state)
        state = {f"net.{k}": v for k, v in state.items() if not k.startswith("classifier.")}
    check_state_dict(model.backbone, state, f"{path}: {model.config.backbone} backbone")
    return model


def save_cam(model: CAMNet, path: str | Path, extra: dict | None = None) -> Path:
    """Write ``model`` as safetensors with its :class:`CAMConfig` (and ``extra``) in the metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": "textseg-cam", "config": json.dumps(asdict(model.config))}
    if extra:
        meta["extra"] = json.dumps(extra)
    save_file(state, str(path), metadata=meta)
    return path


def load_cam(path: str | Path, device: str | torch.device = "cpu") -> CAMNet:
    """Rebuild a :class:`CAMNet` saved by :func:`save_cam` (strict key match)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such CAM checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except Exception as e:  # safetensors raises several types for bad files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != "textseg-cam":
        raise CheckpointError(f"{path}: not a textseg CAM checkpoint (train one with `textseg train cam`)")
    cfg = CAMConfig(**json.loads(meta["config"]))
    cfg.pretrained = False  # the weights come from the checkpoint
    model = CAMNet(cfg)
    check_state_dict(model, state, f"{path}: CAM network")
    return model.to(device)
