"""ModifiedResNet CLIP: the complete OpenAI RN50 / RN50x4 key sets and shapes (every key, nothing
left over), parameter counts of the released models, strict loading errors, and a seeded golden
output regression.

The expected key sets are generated here from the architecture as OpenAI's ``model.py`` names it
(stem ``conv1..3``/``bn1..3``, ``layerN.i.conv1..3``/``bn1..3``, ``downsample.0/1`` on the first
block of each stage, ``attnpool.{positional_embedding,q,k,v,c_proj}``, the text tower at the top
level), independently of textseg's modules. Parameter counts are those printed by OpenAI's notebook.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from textseg.errors import CheckpointError
from textseg.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from textseg.weights.convert import openai
from textseg.weights.load import load_model

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def openai_keys(layers, width, embed_dim, image_size, text_width, text_layers=12, jit=False) -> dict:
    """OpenAI RN-CLIP state-dict key -> shape."""
    keys: dict[str, tuple] = {}

    def bn(prefix, c):
        for leaf in BN:
            keys[f"{prefix}.{leaf}"] = () if leaf == "num_batches_tracked" else (c,)

    v = "visual"
    keys[f"{v}.conv1.weight"] = (width // 2, 3, 3, 3)
    bn(f"{v}.bn1", width // 2)
    keys[f"{v}.conv2.weight"] = (width // 2, width // 2, 3, 3)
    bn(f"{v}.bn2", width // 2)
    keys[f"{v}.conv3.weight"] = (width, width // 2, 3, 3)
    bn(f"{v}.bn3", width)
    inplanes = width
    for s, n in enumerate(layers):
        planes = width * 2**s
        for b in range(n):
            p = f"{v}.layer{s + 1}.{b}"
            keys[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            bn(f"{p}.bn1", planes)
            keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            keys[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            bn(f"{p}.bn3", planes * 4)
            if b == 0:
                keys[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    c = width * 32
    keys[f"{v}.attnpool.positional_embedding"] = ((image_size // 32) ** 2 + 1, c)
    for proj in ("q_proj", "k_proj", "v_proj"):
        keys[f"{v}.attnpool.{proj}.weight"] = (c, c)
        keys[f"{v}.attnpool.{proj}.bias"] = (c,)
    keys[f"{v}.attnpool.c_proj.weight"] = (embed_dim, c)
    keys[f"{v}.attnpool.c_proj.bias"] = (embed_dim,)
    tw = text_width
    keys["token_embedding.weight"] = (49408, tw)
    keys["positional_embedding"] = (77, tw)
    for i in range(text_layers):
        p = f"transformer.resblocks.{i}"
        keys.update({f"{p}.attn.in_proj_weight": (3 * tw, tw), f"{p}.attn.in_proj_bias": (3 * tw,),
                     f"{p}.attn.out_proj.weight": (tw, tw), f"{p}.attn.out_proj.bias": (tw,),
                     f"{p}.ln_1.weight": (tw,), f"{p}.ln_1.bias": (tw,),
                     f"{p}.mlp.c_fc.weight": (4 * tw, tw), f"{p}.mlp.c_fc.bias": (4 * tw,),
                     f"{p}.mlp.c_proj.weight": (tw, 4 * tw), f"{p}.mlp.c_proj.bias": (tw,),
                     f"{p}.ln_2.weight": (tw,), f"{p}.ln_2.bias": (tw,)})
    keys.update({"ln_final.weight": (tw,), "ln_final.bias": (tw,), "text_projection": (tw, embed_dim),
                 "logit_scale": ()})
    if jit:
        keys.update({"input_resolution": (), "context_length": (), "vocab_size": ()})
    return keys


RN50 = dict(layers=(3, 4, 6, 3), width=64, embed_dim=1024, image_size=224, text_width=512)
RN50X4 = dict(layers=(4, 6, 10, 6), width=80, embed_dim=640, image_size=288, text_width=640)


def _meta_state(spec: dict) -> dict:
    return {k: torch.empty(s, device="meta") for k, s in openai_keys(**spec, jit=True).items()}


@pytest.mark.parametrize("spec,heads", [(RN50, 8), (RN50X4, 10)], ids=["RN50", "RN50x4"])
def test_complete_openai_key_sets(spec, heads):
    sd = _meta_state(spec)
    cfg = openai.config_from_state(sd)  # inferred from shapes, as OpenAI's build_model
    assert cfg.vision.layers == spec["layers"] and cfg.vision.width == spec["width"]
    assert cfg.vision.image_size == spec["image_size"] and cfg.embed_dim == spec["embed_dim"]
    assert cfg.text.heads == heads and cfg.text.layers == 12 and cfg.vision.num_heads == spec["width"] // 2
    with torch.device("meta"):
        model = CLIP(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in openai.to_native(openai.clean_state(sd)).items()}
    assert set(ours) == set(theirs), (sorted(set(ours) - set(theirs))[:5], sorted(set(theirs) - set(ours))[:5])
    assert ours == theirs


@pytest.mark.parametrize("spec,count", [
    (dict(embed_dim=1024, vision=VisionConfig(224, (3, 4, 6, 3), 64), text=TextConfig()), 102_007_137),
    (dict(embed_dim=512, vision=VisionConfig(224, (3, 4, 23, 3), 64), text=TextConfig()), 119_688_033),
    (dict(embed_dim=640, vision=VisionConfig(288, (4, 6, 10, 6), 80),
          text=TextConfig(width=640, heads=10)), 178_300_601),
    (dict(embed_dim=512, vision=VisionConfig(224, 12, 768, 32), text=TextConfig()), 151_277_313),
    (dict(embed_dim=768, vision=VisionConfig(224, 24, 1024, 14), text=TextConfig(width=768, heads=12)), 427_616_513),
    (dict(embed_dim=768, vision=VisionConfig(336, 24, 1024, 14), text=TextConfig(width=768, heads=12)), 427_944_193),
], ids=["RN50", "RN101", "RN50x4", "ViT-B/32", "ViT-L/14", "ViT-L/14@336px"])
def test_parameter_counts_of_released_models(spec, count):
    with torch.device("meta"):
        model = CLIP(CLIPConfig(**spec))
    assert sum(p.numel() for p in model.parameters()) == count


TINY = dict(layers=(1, 2, 1, 1), width=16, embed_dim=32, image_size=64, text_width=64, text_layers=1)


def _tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in sorted(openai_keys(**TINY).items()):
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            out[k] = 0.5 + torch.rand(shape, generator=g)
        elif k == "logit_scale":
            out[k] = torch.tensor(2.0)
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
            out[k] = torch.randn(shape, generator=g) / fan_in**0.5
    return out


def test_strict_loading_names_missing_and_unexpected(tmp_path):
    sd = _tiny_state()
    save_file(sd, str(tmp_path / "ok.safetensors"))
    model = load_model(weights=tmp_path / "ok.safetensors")
    assert model.cfg.vision.layers == (1, 2, 1, 1)
    missing = {k: v for k, v in sd.items() if k != "visual.layer2.1.bn2.running_var"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing \(visual\.layer2\.1\.bn2\.running_var\)"):
        load_model(weights=tmp_path / "missing.safetensors")
    extra = {**sd, "visual.layer9.0.conv1.weight": torch.zeros(1)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected \(visual\.layer9\.0\.conv1\.weight\)"):
        load_model(weights=tmp_path / "extra.safetensors")
    bad = {**sd, "visual.attnpool.c_proj.bias": torch.zeros(31)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="shape"):
        load_model(weights=tmp_path / "bad.safetensors")


# Golden values: recorded once from this seeded model and input; a change means the ResNet forward changed.
GOLDEN_IMG = [1.767826, -2.547963, -0.818719, 4.284893, 4.809489, -2.224368]
GOLDEN_TXT = [0.029056, 1.460855, -1.431158, -0.819562, 0.416932, -3.181283]


def test_golden_output(tmp_path):
    save_file(_tiny_state(seed=1), str(tmp_path / "rn.safetensors"))
    model = load_model(weights=tmp_path / "rn.safetensors")
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        img = model.encode_image(pixels)
        txt = model.encode_text(model.tokenize(["a photo of a cat", "golden"]))
    torch.testing.assert_close(img[0, :6], torch.tensor(GOLDEN_IMG), atol=1e-5, rtol=0)
    torch.testing.assert_close(txt[1, :6], torch.tensor(GOLDEN_TXT), atol=1e-5, rtol=0)


def _reference_resnet(sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """OpenAI's ModifiedResNet forward written functionally over the OpenAI state dict (eval-mode BN,
    attention pool through ``F.multi_head_attention_forward`` as openai/CLIP does)."""
    import torch.nn.functional as F

    def bn(p, t):
        return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                            False, 0.0, 1e-5)

    v = "visual"
    x = F.relu(bn(f"{v}.bn1", F.conv2d(x, sd[f"{v}.conv1.weight"], stride=2, padding=1)))
    x = F.relu(bn(f"{v}.bn2", F.conv2d(x, sd[f"{v}.conv2.weight"], padding=1)))
    x = F.relu(bn(f"{v}.bn3", F.conv2d(x, sd[f"{v}.conv3.weight"], padding=1)))
    x = F.avg_pool2d(x, 2)
    for s, n in enumerate(TINY["layers"]):
        for b in range(n):
            p = f"{v}.layer{s + 1}.{b}"
            stride = 2 if (s > 0 and b == 0) else 1
            y = F.relu(bn(f"{p}.bn1", F.conv2d(x, sd[f"{p}.conv1.weight"])))
            y = F.relu(bn(f"{p}.bn2", F.conv2d(y, sd[f"{p}.conv2.weight"], padding=1)))
            y = F.avg_pool2d(y, stride) if stride > 1 else y
            y = bn(f"{p}.bn3", F.conv2d(y, sd[f"{p}.conv3.weight"]))
            if f"{p}.downsample.0.weight" in sd:
                idt = F.avg_pool2d(x, stride) if stride > 1 else x
                idt = bn(f"{p}.downsample.1", F.conv2d(idt, sd[f"{p}.downsample.0.weight"]))
            else:
                idt = x
            x = F.relu(y + idt)
    a = f"{v}.attnpool"
    x = x.flatten(2).permute(2, 0, 1)  # HW x B x C
    x = torch.cat([x.mean(dim=0, keepdim=True), x]) + sd[f"{a}.positional_embedding"][:, None, :]
    out, _ = F.multi_head_attention_forward(
        query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=heads,
        q_proj_weight=sd[f"{a}.q_proj.weight"], k_proj_weight=sd[f"{a}.k_proj.weight"],
        v_proj_weight=sd[f"{a}.v_proj.weight"], in_proj_weight=None,
        in_proj_bias=torch.cat([sd[f"{a}.q_proj.bias"], sd[f"{a}.k_proj.bias"], sd[f"{a}.v_proj.bias"]]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=sd[f"{a}.c_proj.weight"],
        out_proj_bias=sd[f"{a}.c_proj.bias"], use_separate_proj_weight=True, training=False, need_weights=False)
    return out[0]


def test_resnet_matches_functional_reference(tmp_path):
    sd = _tiny_state(seed=1)
    save_file(sd, str(tmp_path / "rn.safetensors"))
    model = load_model(weights=tmp_path / "rn.safetensors")
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model.encode_image(pixels)
        ref = _reference_resnet(sd, pixels, heads=TINY["width"] * 32 // 64)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)


class _OpenAIStyle(torch.nn.Module):
    """A traced module tree with OpenAI's attribute names (text tower at the top level), as the
    official TorchScript archives have, with real layers (BatchNorm buffers included)."""

    def __init__(self, model: CLIP):
        super().__init__()
        self.visual = model.visual
        self.token_embedding = model.text.token_embedding
        self.positional_embedding = model.text.positional_embedding
        self.transformer = model.text.transformer
        self.ln_final = model.text.ln_final
        self.text_projection = model.text.text_projection
        self.logit_scale = model.logit_scale
        self.register_buffer("input_resolution", torch.tensor(64))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels) * self.logit_scale.exp()


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_traced_openai_archive_reads_without_code(tmp_path):
    sd = _tiny_state(seed=3)
    save_file(sd, str(tmp_path / "rn.safetensors"))
    model = load_model(weights=tmp_path / "rn.safetensors")
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        traced = torch.jit.trace(_OpenAIStyle(model).eval(), pixels)
    traced.save(str(tmp_path / "RN-tiny.pt"))
    again = load_model(weights=tmp_path / "RN-tiny.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(pixels), model.encode_image(pixels))
