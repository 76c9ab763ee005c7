"""The official lang-seg checkpoints (isl-org/lang-seg): ``demo_e200.ckpt`` and the few-shot ones.

They are PyTorch Lightning checkpoints whose ``state_dict`` holds the ``LSegNet`` under ``net.``:

* ``net.pretrained.model.*``: a timm ViT (``vit_large_patch16_384`` for the demo and the ``l16``
  few-shot models, ``vit_base_patch32_384`` for the B/32 ones): ``cls_token``, ``pos_embed``,
  ``patch_embed.proj``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, and the
  unused final ``norm`` and ImageNet ``head``;
* ``net.pretrained.act_postprocess{1..4}``: DPT reassemble ``Sequential``s: ``0.project.0`` (readout
  projection), ``3`` (1x1 conv), ``4`` (resampling conv / transposed conv; level 3 of /16 has none);
* ``net.scratch.layer{1..4}_rn``, ``net.scratch.refinenet{1..4}.{out_conv,resConfUnit{1,2}.{conv,bn}{1,2}}``,
  ``net.scratch.head1`` (1x1 conv to 512), optionally ``net.scratch.head_block.depthwise.depthwise``;
* ``net.clip_pretrained.*``: the whole OpenAI CLIP ViT-B/32 whose text tower is LSeg's frozen text
  encoder (its ``visual.*`` and ``logit_scale`` are not used by LSeg and are dropped by name).

The official temperature is the constant ``1/0.07`` (a tensor, not a parameter, so it is not in the
file); the logit-scale parameter is set to ``log(1/0.07)``. The mapping below is exact: every key of
the file is either mapped or explicitly dropped, and the model's key set must be matched in full.
The ResNet-101 few-shot variant (``net.pretrained.layer1`` ...) is recognised and refused with a
clear message.

Reading stays safe: :func:`textseg.weights.read.read_checkpoint` uses ``torch.load(weights_only=True)``.
A Lightning file whose extra entries (``hyper_parameters``) need classes that are not plain containers
fails there; ``textseg convert --trust-checkpoint demo_e200.ckpt lseg.safetensors`` then unpickles it
once (explicitly trusted) and writes native safetensors that load safely from then on.
"""

from __future__ import annotations

import math
import re

import torch

from textseg.errors import CheckpointError
from textseg.models.lseg import LSEG_HOOKS, LSegConfig
from textseg.weights.convert import Converted, floats

NAME = "lseg_official"

def _strip(key: str) -> str:
    for prefix in ("module.", "net."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def detect(raw) -> bool:
    keys = {_strip(k) for k in raw.tensors}
    return "scratch.head1.weight" in keys and ("scratch.refinenet1.out_conv.weight" in keys)


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := rx.match(k))})


def infer_config(t: dict[str, torch.Tensor]) -> LSegConfig:
    """The :class:`LSegConfig` of an (already prefix-stripped) official state dict, from shapes."""
    if "pretrained.layer1.0.weight" in t or any(k.startswith("pretrained.layer1.") for k in t):
        raise CheckpointError("this is the ResNet-101 lang-seg variant (net.pretrained.layer1 ...), which textseg "
                              "does not support; use the ViT checkpoints (demo_e200.ckpt, *_l16 / *_b32 few-shot)")
    if "pretrained.model.pos_embed" not in t:
        raise CheckpointError("lang-seg checkpoint without a ViT (net.pretrained.model.pos_embed) is not supported")
    pos, patch_w = t["pretrained.model.pos_embed"], t["pretrained.model.patch_embed.proj.weight"]
    width, patch = pos.shape[-1], patch_w.shape[-1]
    layers = _count(t, r"pretrained\.model\.blocks\.(\d+)\.")
    if layers not in LSEG_HOOKS:
        raise CheckpointError(f"lang-seg ViT with {layers} blocks: no known hook layout (12 or 24 blocks)")
    grid = math.isqrt(pos.shape[1] - 1)
    reassemble = tuple(int(t[f"pretrained.act_postprocess{i}.3.weight"].shape[0]) for i in range(1, 5))
    if "pretrained.act_postprocess1.0.project.0.weight" in t:
        readout = "project"
    else:
        raise CheckpointError("lang-seg ViT readout 'ignore'/'add' checkpoints are not supported (no project layer)")
    if "scratch.head_block.depthwise.depthwise.weight" in t:
        raise CheckpointError("lang-seg checkpoint with a spatial-regularisation head_block: its arch_option "
                              "(bottleneck / depthwise) and block_depth are not recorded in the weights")
    tw = t["clip_pretrained.ln_final.weight"].shape[0]
    text_cfg = {
        "context_length": int(t["clip_pretrained.positional_embedding"].shape[0]),
        "vocab_size": int(t["clip_pretrained.token_embedding.weight"].shape[0]),
        "width": int(tw), "heads": int(tw) // 64,
        "layers": _count(t, r"clip_pretrained\.transformer\.resblocks\.(\d+)\."),
    }
    embed_dim = int(t["scratch.head1.weight"].shape[0])
    if int(t["clip_pretrained.text_projection"].shape[1]) != embed_dim:
        raise CheckpointError("lang-seg checkpoint: head1 width differs from the CLIP text projection")
    return LSegConfig(
        backbone="vit", text_encoder="clip", embed_dim=embed_dim, features=int(t["scratch.layer1_rn.weight"].shape[0]),
        block="none", block_depth=0, logit_scale_init=1 / 0.07, decoder_bn="scratch.refinenet1.resConfUnit1.bn1.weight"
        in t, vit_patch=int(patch), vit_width=int(width), vit_layers=layers, vit_heads=int(width) // 64,
        vit_image_size=grid * int(patch), vit_hooks=LSEG_HOOKS[layers], vit_reassemble=reassemble, readout=readout,
        text_cfg=text_cfg, image_size=480, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
    )


_VIT_BLOCK = {"norm1.": "norm1.", "attn.qkv.": "qkv.", "attn.proj.": "proj.", "norm2.": "norm2.",
              "mlp.fc1.": "fc1.", "mlp.fc2.": "fc2."}
_DROP = (re.compile(r"pretrained\.model\.(norm|head|fc_norm|pre_logits)\."),
         re.compile(r"clip_pretrained\.(visual\.|logit_scale$|input_resolution$|context_length$|vocab_size$)"))


def map_keys(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official (prefix-stripped) names -> :class:`~textseg.models.lseg.LSeg` names. Unknown keys
    raise; the explicitly unused ones (:data:`_DROP`) are left out."""
    out: dict[str, torch.Tensor] = {}
    for key, v in t.items():
        if any(rx.match(key) for rx in _DROP):
            continue
        new = None
        if key.startswith("pretrained.model."):
            rest = key[len("pretrained.model."):]
            if rest in ("cls_token", "pos_embed"):
                new = f"image_encoder.vit.{rest}"
            elif rest.startswith("patch_embed.proj."):
                new = "image_encoder.vit.patch_embed." + rest[len("patch_embed.proj."):]
            elif m := re.match(r"blocks\.(\d+)\.(.*)", rest):
                for old, repl in _VIT_BLOCK.items():
                    if m.group(2).startswith(old):
                        new = f"image_encoder.vit.blocks.{m.group(1)}.{repl}{m.group(2)[len(old):]}"
        elif m := re.match(r"pretrained\.act_postprocess(\d)\.(0\.project\.0|3|4)\.(weight|bias)$", key):
            part = {"0.project.0": "readout_proj", "3": "proj", "4": "resample"}[m.group(2)]
            new = f"image_encoder.reassemble.{int(m.group(1)) - 1}.{part}.{m.group(3)}"
        elif m := re.match(r"scratch\.layer(\d)_rn\.weight$", key):
            new = f"decoder.layer_rn.{int(m.group(1)) - 1}.weight"
        elif m := re.match(r"scratch\.refinenet(\d)\.(.*)", key):
            rest = m.group(2).replace("resConfUnit1.", "rcu1.").replace("resConfUnit2.", "rcu2.")
            new = f"decoder.fusion.{int(m.group(1)) - 1}.{rest}"
        elif key.startswith("scratch.head1."):
            new = "decoder.head." + key[len("scratch.head1."):]
        elif key.startswith("scratch.head_block.depthwise.depthwise."):
            new = "head_block.conv." + key[len("scratch.head_block.depthwise.depthwise."):]
        elif key.startswith("clip_pretrained."):
            new = "text_encoder." + key[len("clip_pretrained."):]
        if new is None:
            raise CheckpointError(f"unexpected key {key!r} in a lang-seg checkpoint")
        out[new] = v
    return out


def convert(raw) -> Converted:
    t = {_strip(k): v for k, v in raw.tensors.items()}
    cfg = infer_config(t)
    state = map_keys(t)
    state["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return Converted("lseg", cfg.to_dict(), floats(state), card={"format": "lang-seg", "source": str(raw.path)})
