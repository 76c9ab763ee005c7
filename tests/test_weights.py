"""textseg.weights: read (every on-disk kind, wrappers, damaged files -> one line), detect (every
format), convert (key maps, no model built), the one strict check and its error format, the model
registry, presets (hash-checked, fetched only on request)."""

from __future__ import annotations

import ast
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from textseg.errors import CheckpointError
from textseg.models import registry
from textseg.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from textseg.weights import presets
from textseg.weights.convert import (
    Converted,
    groupvit_hf,
    hf_clip,
    lseg,
    native,
    open_clip,
    openai,
)
from textseg.weights.load import FORMATS, build_converted, convert_file, detect_format, load_model, save_model
from textseg.weights.read import CARD_KEY, RawCheckpoint, check_state_dict, read_checkpoint, sha256_file

SRC = Path(__file__).resolve().parents[1] / "src" / "textseg"


def tiny_clip(seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(CLIPConfig(embed_dim=16, vision=VisionConfig(image_size=32, layers=1, width=64, patch_size=16, heads=1),
                           text=TextConfig(width=64, heads=1, layers=1))).eval()


def openai_sd(model: CLIP) -> dict[str, torch.Tensor]:
    """textseg CLIP -> OpenAI key names, written out by hand: the text tower sits at the top level."""
    return {(k[len("text."):] if k.startswith("text.") else k): v.clone() for k, v in model.state_dict().items()}


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


# ----------------------------------------------------------------------------------------------
# read
# ----------------------------------------------------------------------------------------------


def test_read_each_kind(tmp_path):
    from clip_layouts import save_torchscript
    from safetensors.torch import save_file

    t = {"a.weight": torch.randn(3, 2), "b": torch.arange(4)}
    save_file(t, str(tmp_path / "x.safetensors"), metadata={"k": "v"})
    raw = read_checkpoint(tmp_path / "x.safetensors")
    assert raw.kind == "safetensors" and raw.metadata == {"k": "v"} and raw.card is None
    assert set(raw.tensors) == set(t) and torch.equal(raw.tensors["a.weight"], t["a.weight"])

    torch.save(t, tmp_path / "plain.pt")
    raw = read_checkpoint(tmp_path / "plain.pt")
    assert raw.kind == "torch" and torch.equal(raw.tensors["b"], t["b"]) and raw.extra == {}

    sd = openai_sd(tiny_clip())
    save_torchscript(sd, tmp_path / "jit.pt", extra_ints={"input_resolution": 32})
    raw = read_checkpoint(tmp_path / "jit.pt")
    assert raw.kind == "torchscript" and torch.equal(raw.tensors["visual.conv1.weight"], sd["visual.conv1.weight"])

    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"a.weight": t["a.weight"]}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({"b": t["b"]}, str(folder / "model-00002-of-00002.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "clip"}))
    raw = read_checkpoint(folder)
    assert raw.kind == "hf-folder" and raw.config == {"model_type": "clip"} and set(raw.tensors) == set(t)


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "model_state_dict"])
def test_read_unwraps_training_checkpoints(tmp_path, wrapper):
    t = {"module.x": torch.ones(2)}
    torch.save({wrapper: t, "epoch": 3, "name": "ViT-B-16"}, tmp_path / "c.pt")
    raw = read_checkpoint(tmp_path / "c.pt")
    assert list(raw.tensors) == ["module.x"] and raw.extra == {"epoch": 3, "name": "ViT-B-16"}


def test_damaged_files_one_line_errors(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "ok.safetensors"))
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.bin").write_bytes(b"")
    torch.save({"epoch": 1, "lr": 0.1}, tmp_path / "notensors.pt")
    (tmp_path / "badcfg").mkdir()
    save_file({"w": torch.ones(1)}, str(tmp_path / "badcfg" / "model.safetensors"))
    (tmp_path / "badcfg" / "config.json").write_text("{not json")
    cases = {"cut.safetensors": "truncated or corrupt", "cut.pt": "truncated", "empty.bin": "empty file",
             "notensors.pt": "holds no tensors", "missing.pt": "no such file", "badcfg": "not valid JSON"}
    for name, words in cases.items():
        with pytest.raises(CheckpointError) as err:
            read_checkpoint(tmp_path / name)
        assert words in one_line(err) and name in str(err.value)


class Hyper:  # a class torch.load(weights_only=True) refuses, as Lightning's hyper_parameters
    def __init__(self, lr):
        self.lr = lr


def test_trusted_read_only_when_asked(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": Hyper(0.1)}, tmp_path / "l.ckpt")
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(tmp_path / "l.ckpt")
    assert "safe torch checkpoint" in one_line(err)
    raw = read_checkpoint(tmp_path / "l.ckpt", trust=True)
    assert torch.equal(raw.tensors["w"], torch.ones(2))


def test_sha256_file(tmp_path):
    data = bytes(range(256)) * 5000  # several read chunks
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk=4096) == hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------
# detect
# ----------------------------------------------------------------------------------------------


def _raw(tensors, **kw) -> RawCheckpoint:
    return RawCheckpoint(tensors=tensors, **kw)


def test_detect_each_format(tmp_path):
    from test_classify_fidelity import tiny_groupvit
    from test_groupvit import to_nvlabs
    from test_lseg import official_state

    model = tiny_clip()
    save_model(model, tmp_path / "n.safetensors")
    hf = tiny_groupvit()
    gv = build_converted(groupvit_hf.convert_hf(hf.config.to_dict(), hf.state_dict()))
    sd = openai_sd(model)
    cases = {
        "native": read_checkpoint(tmp_path / "n.safetensors"),
        "openai": _raw(sd),
        "open_clip": _raw({"module." + k: v for k, v in sd.items()}, extra={"epoch": 1}),
        "groupvit_hf": _raw(hf.state_dict(), config=hf.config.to_dict()),
        "groupvit_nvlabs": _raw(to_nvlabs(gv.state_dict())),
        "lseg_official": _raw({"net." + k: v for k, v in official_state().items()}),
    }
    from clip_layouts import random_hf_clip

    hf_clip_model = random_hf_clip(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=1, image_size=32, patch_size=16),
                                   dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=1), 16)
    cases["hf_clip"] = _raw(hf_clip_model.state_dict(), config={"model_type": "clip"})
    assert {m.NAME for m in FORMATS} == set(cases)
    for name, raw in cases.items():
        assert detect_format(raw).NAME == name
        assert [m.NAME for m in FORMATS if m.detect(raw)][0] == name  # first in order wins
    with pytest.raises(CheckpointError) as err:
        detect_format(_raw({"foo.weight": torch.ones(1)}, path=Path("x.pt")))
    assert "not a checkpoint of a supported model" in one_line(err) and "foo.weight" in str(err.value)


# ----------------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------------


def test_openai_convert_key_map_and_config():
    model = tiny_clip(3)
    sd = openai_sd(model)
    sd["input_resolution"] = torch.tensor(32)  # TorchScript's integer entries are dropped
    out = openai.convert(_raw(sd))
    assert isinstance(out, Converted) and out.architecture == "clip" and out.preprocess is None
    assert out.config == model.cfg.to_dict()
    assert set(out.state_dict) == set(model.state_dict())
    assert torch.equal(out.state_dict["text.token_embedding.weight"], sd["token_embedding.weight"])
    assert torch.equal(out.state_dict["visual.conv1.weight"], sd["visual.conv1.weight"])


def test_hf_clip_convert_fuses_qkv_and_transposes_projections():
    from clip_layouts import random_hf_clip

    hf = random_hf_clip(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1,
                             image_size=32, patch_size=16),
                        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1), 16)
    sd = hf.state_dict()
    out = hf_clip.convert(_raw(sd, config=hf.config.to_dict()))
    p = "vision_model.encoder.layers.0.self_attn."
    want = torch.cat([sd[p + "q_proj.weight"], sd[p + "k_proj.weight"], sd[p + "v_proj.weight"]])
    assert torch.equal(out.state_dict["visual.transformer.resblocks.0.attn.in_proj_weight"], want)
    assert torch.equal(out.state_dict["visual.proj"], sd["visual_projection.weight"].t())
    assert torch.equal(out.state_dict["text.text_projection"], sd["text_projection.weight"].t())
    assert not any("position_ids" in k for k in out.state_dict)
    assert out.config["vision"]["width"] == 64 and out.config["embed_dim"] == 16
    with pytest.raises(CheckpointError, match="unexpected tensor 'vision_model.extra'"):
        hf_clip.convert(_raw({**sd, "vision_model.extra": torch.ones(1)}))


def test_open_clip_convert_strips_module_and_picks_activation():
    sd = openai_sd(tiny_clip())
    wrapped = {"module." + k: v for k, v in sd.items()}
    assert open_clip.convert(_raw(wrapped, extra={"name": "ViT-B-16"})).config["vision"]["act"] == "gelu"
    assert open_clip.convert(_raw(wrapped, extra={"name": "ViT-B-16-quickgelu"})).config["text"]["act"] == "quick_gelu"
    assert open_clip.convert(_raw(wrapped), act="quick_gelu").config["vision"]["act"] == "quick_gelu"
    assert set(open_clip.convert(_raw(wrapped)).state_dict) == set(tiny_clip().state_dict())


def test_lseg_convert_sets_the_official_temperature():
    from test_lseg import official_state

    out = lseg.convert(_raw({"net." + k: v for k, v in official_state().items()}, path=Path("demo.ckpt")))
    assert out.architecture == "lseg" and out.card == {"format": "lang-seg", "source": "demo.ckpt"}
    assert math.isclose(float(out.state_dict["logit_scale"]), math.log(1 / 0.07), rel_tol=1e-6)
    assert not any(k.startswith("text_encoder.visual.") for k in out.state_dict)  # CLIP's image side dropped


def test_converters_build_no_model():
    """Converters are pure (checkpoint -> architecture, config, state dict): none strict-loads,
    builds from the registry or instantiates a model class."""
    for module in FORMATS:
        text = Path(module.__file__).read_text()
        tree = ast.parse(text)
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert not imported & {"CLIP", "GroupViT", "LSeg", "OfflineModel", "build_lseg", "check_state_dict",
                               "registry", "build_model"}, module.NAME
        assert "load_state_dict" not in text, module.NAME


def test_native_card_round_trip(tmp_path):
    model = tiny_clip(1)
    card = save_model(model, tmp_path / "m.safetensors", {"source": "unit"})
    assert json.loads((tmp_path / "m.safetensors.json").read_text()) == card
    assert card["sha256"] == sha256_file(tmp_path / "m.safetensors")
    raw = read_checkpoint(tmp_path / "m.safetensors")
    assert json.loads(raw.metadata[CARD_KEY])["source"] == "unit"
    out = native.convert(raw)
    assert (out.architecture, out.config) == ("clip", model.cfg.to_dict())
    back = load_model(weights=tmp_path / "m.safetensors")
    assert back.card["source"] == "unit" and not back.training
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


# ----------------------------------------------------------------------------------------------
# the one strict check
# ----------------------------------------------------------------------------------------------


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 3)
        self.b = nn.Linear(3, 1)


def test_strict_check_error_format():
    m = Two()
    state = {k: torch.zeros_like(v) for k, v in m.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        check_state_dict(m, {k: v for k, v in state.items() if k != "b.bias"}, "f.pt")
    assert one_line(err) == "f.pt: keys do not match the model: 1 missing (b.bias)"
    with pytest.raises(CheckpointError) as err:
        check_state_dict(m, {**state, "c.weight": torch.ones(1)}, "f.pt")
    assert one_line(err) == "f.pt: keys do not match the model: 1 unexpected (c.weight)"
    extra = {f"x{i}": torch.ones(1) for i in range(7)}
    with pytest.raises(CheckpointError) as err:
        check_state_dict(m, {**{k: v for k, v in state.items() if k.startswith("a.")}, **extra}, "f.pt")
    assert one_line(err) == ("f.pt: keys do not match the model: 2 missing (b.bias, b.weight); "
                             "7 unexpected (x0, x1, x2, x3, x4, ...)")
    with pytest.raises(CheckpointError) as err:
        check_state_dict(m, {**state, "a.weight": torch.zeros(3, 5), "b.bias": torch.zeros(2)}, "f.pt")
    assert one_line(err) == ("f.pt: 2 shape mismatches (a.weight: file (3, 5) vs model (3, 2), "
                             "b.bias: file (2,) vs model (1,))")
    check_state_dict(m, {k: v.double() + 1 for k, v in state.items()}, "f.pt")  # loads, cast to float32
    assert m.a.weight.dtype == torch.float32 and torch.equal(m.a.weight, torch.ones(3, 2))


def test_every_loader_uses_the_one_strict_check():
    """No second copy of the key-set check in weights/ or models/ (``strict=False`` + own message)."""
    for folder in ("weights", "models", "wsss"):
        for path in (SRC / folder).rglob("*.py"):
            assert "strict=False" not in path.read_text(), path


def test_strict_errors_through_load_model(tmp_path):
    from safetensors.torch import load_file, save_file

    save_model(tiny_clip(), tmp_path / "m.safetensors")
    state = load_file(str(tmp_path / "m.safetensors"))
    meta = {CARD_KEY: read_checkpoint(tmp_path / "m.safetensors").metadata[CARD_KEY]}
    del state["logit_scale"]
    save_file(state, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError) as err:
        load_model(weights=tmp_path / "bad.safetensors")
    assert "keys do not match the model: 1 missing (logit_scale)" in one_line(err)
    assert "bad.safetensors" in str(err.value)


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------


def test_registry_unknown_architecture_and_invalid_config(tmp_path):
    with pytest.raises(CheckpointError) as err:
        registry.build_model("vit-huge-9000", {})
    assert one_line(err) == f"unknown model architecture 'vit-huge-9000' (known: {', '.join(registry.MODELS)})"
    with pytest.raises(CheckpointError, match="invalid clip config"):
        registry.build_model("clip", {"vision": {}})  # no embed_dim
    card = {"format": "textseg", "architecture": "nope", "config": {}}
    from safetensors.torch import save_file

    save_file({"w": torch.ones(1)}, str(tmp_path / "u.safetensors"), metadata={CARD_KEY: json.dumps(card)})
    with pytest.raises(CheckpointError) as err:
        load_model(weights=tmp_path / "u.safetensors")
    assert "unknown model architecture 'nope'" in one_line(err) and "u.safetensors" in str(err.value)


def test_no_string_registries():
    assert all(callable(b) and not isinstance(b, str) for b in registry.MODELS.values())
    assert isinstance(FORMATS, tuple) and all(callable(m.detect) and callable(m.convert) for m in FORMATS)
    for path in [*(SRC / "weights").rglob("*.py"), SRC / "models" / "registry.py"]:
        assert "importlib" not in path.read_text(), path
    assert set(registry.PACKAGED) <= set(registry.MODELS) and registry.DEFAULT_MODEL in registry.PACKAGED


def test_convert_file_library_path(tmp_path):
    """``textseg convert``'s logic lives in the library: file -> native card with its source hash."""
    sd = openai_sd(tiny_clip(2))
    torch.save(sd, tmp_path / "clip.pt")
    card = convert_file(tmp_path / "clip.pt", tmp_path / "c.safetensors", model="clip")
    assert card["source_format"] == "openai" and card["source_sha256"] == sha256_file(tmp_path / "clip.pt")
    with pytest.raises(CheckpointError, match="is a 'clip' checkpoint, not 'lseg'"):
        convert_file(tmp_path / "clip.pt", tmp_path / "d.safetensors", model="lseg")
    assert not (tmp_path / "d.safetensors").exists()


# ----------------------------------------------------------------------------------------------
# presets: hash-checked, downloaded only on request
# ----------------------------------------------------------------------------------------------


def test_presets_find_and_refuse(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTSEG_CACHE", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    p = presets.find("ViT-B-16")
    assert p is presets.find("ViT-B/16") is presets.find("vit-b-16.pt") and presets.find("nope") is None
    assert p.url.endswith(f"/{p.sha256}/ViT-B-16.pt")

    def no_network(*a, **k):
        raise AssertionError("download attempted")

    monkeypatch.setattr(presets.urllib.request, "urlopen", no_network)
    with pytest.raises(CheckpointError) as err:
        load_model("ViT-B/16", download=False)
    assert p.url in one_line(err)
    bad = presets.cache_dir() / p.filename
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not the published file")
    with pytest.raises(CheckpointError) as err:
        presets.fetch(p)
    assert "SHA-256 does not match" in one_line(err)
