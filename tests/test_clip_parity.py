"""Parity with transformers' CLIPModel for checkpoints written in the HF, OpenAI (state dict,
safetensors, TorchScript archive) and OpenCLIP layouts: embeddings to 1e-4, probabilities to 1e-5,
at two sizes and two patch sizes."""

from __future__ import annotations

import json

import pytest
import torch
from clip_layouts import hf_to_openai, random_hf_clip, save_torchscript
from safetensors.torch import save_file

from textseg.models.clip import CLIP
from textseg.weights.load import load_model, read_checkpoint, save_model

pytest.importorskip("transformers")

# OpenAI / OpenCLIP files do not record head counts: heads = width / 64 there, so widths are multiples of 64.
SMALL = dict(vision=dict(hidden_size=128, intermediate_size=200, num_hidden_layers=2, num_attention_heads=2,
                         image_size=32, patch_size=8),
             text=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1),
             projection_dim=40)
LARGER = dict(vision=dict(hidden_size=192, intermediate_size=768, num_hidden_layers=3, num_attention_heads=3,
                          image_size=48, patch_size=16),
              text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=2),
              projection_dim=32)
GELU = dict(vision=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                        image_size=32, patch_size=16, hidden_act="gelu"),
            text=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
                      hidden_act="gelu"),
            projection_dim=24)
SPECS = {"small": (SMALL, 3), "larger": (LARGER, 7), "gelu": (GELU, 5)}
TEXTS = ["a photo of a cat", "a dog", "an émoji 🐱 and 東京", "x " * 100]


@pytest.fixture(scope="module")
def reference(request):
    spec, seed = SPECS[request.param]
    hf = random_hf_clip(spec["vision"], spec["text"], spec["projection_dim"], seed=seed)
    size = spec["vision"]["image_size"]
    torch.manual_seed(11)
    pixels = torch.randn(3, 3, size, size)
    from textseg.models.tokenizer import tokenize

    tokens = tokenize(TEXTS)
    with torch.no_grad():
        img = hf.get_image_features(pixel_values=pixels)
        txt = hf.get_text_features(input_ids=tokens)
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        probs = hf(input_ids=tokens, pixel_values=pixels).logits_per_image.softmax(dim=-1)
    return dict(name=request.param, hf=hf, pixels=pixels, tokens=tokens, img=img, txt=txt, probs=probs)


def _check(model: CLIP, ref) -> None:
    assert isinstance(model, CLIP) and not model.training
    with torch.no_grad():
        img = model.encode_image(ref["pixels"])
        txt = model.encode_text(ref["tokens"])
        logits, _ = model(ref["pixels"], ref["tokens"])
    assert img.abs().mean() > 0.05 and txt.abs().mean() > 0.05  # non-trivial outputs
    torch.testing.assert_close(img, ref["img"], atol=1e-4, rtol=0)
    torch.testing.assert_close(txt, ref["txt"], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits.softmax(-1), ref["probs"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("reference", ["small", "larger", "gelu"], indirect=True)
def test_hf_folder(reference, tmp_path):
    reference["hf"].save_pretrained(tmp_path / "hf")
    size = reference["pixels"].shape[-1]
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": size, "width": size}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 0.5]}))
    model = load_model(weights=tmp_path / "hf")
    assert model.preprocess_cfg.std == (0.25, 0.5, 0.5) and model.preprocess_cfg.image_size == size
    assert model.cfg.vision.patch_size == reference["hf"].config.vision_config.patch_size
    _check(model, reference)


@pytest.mark.parametrize("reference", ["small", "larger"], indirect=True)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_openai_layouts(reference, tmp_path):
    sd = hf_to_openai(reference["hf"].state_dict())
    torch.save(sd, tmp_path / "openai.pt")
    _check(load_model(weights=tmp_path / "openai.pt"), reference)
    if reference["name"] == "small":  # QuickGELU as OpenAI: safetensors and TorchScript archive too
        save_file(sd, str(tmp_path / "openai.safetensors"))
        _check(load_model(weights=tmp_path / "openai.safetensors"), reference)
        half = {k: v.half() for k, v in sd.items()}  # OpenAI archives are fp16
        save_torchscript(half, tmp_path / "jit.pt", {"input_resolution": 32, "context_length": 77,
                                                     "vocab_size": 49408})
        raw = read_checkpoint(tmp_path / "jit.pt")
        assert raw.kind == "torchscript" and raw.tensors["visual.proj"].dtype == torch.float16
        model = load_model(weights=tmp_path / "jit.pt")
        for k, v in model.state_dict().items():  # exactly the fp16 values, upcast
            expect = half.get(k.removeprefix("text."), half.get(k))
            torch.testing.assert_close(v, expect.float(), atol=0, rtol=0)


@pytest.mark.parametrize("reference", ["small", "gelu"], indirect=True)
def test_open_clip_layout(reference, tmp_path):
    sd = hf_to_openai(reference["hf"].state_dict())
    act = reference["hf"].config.vision_config.hidden_act
    name = "epoch_3.pt" if act == "gelu" else "epoch_3-quickgelu.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in sd.items()}},
               tmp_path / name)
    raw = read_checkpoint(tmp_path / name)
    assert raw.extra["epoch"] == 3
    _check(load_model(weights=tmp_path / name), reference)


@pytest.mark.parametrize("reference", ["larger"], indirect=True)
def test_native_roundtrip(reference, tmp_path):
    reference["hf"].save_pretrained(tmp_path / "hf")
    model = load_model(weights=tmp_path / "hf")
    card = save_model(model, tmp_path / "m.safetensors", {"source": "test"})
    assert card["architecture"] == "clip" and len(card["sha256"]) == 64
    assert card["preprocess"]["image_size"] == reference["pixels"].shape[-1]
    again = load_model(weights=tmp_path / "m.safetensors")
    assert again.card["source"] == "test"
    _check(again, reference)


def test_torchscript_reader_refuses_code(tmp_path):
    """A TorchScript-looking archive whose pickle names any other global is refused, not run."""
    import pickle
    import zipfile

    from textseg.errors import CheckpointError

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps(Evil(), protocol=2))
        z.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("evil/code/__torch__.py", "")
    with pytest.raises(CheckpointError, match="refusing to load global"):
        load_model(weights=tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("reference", ["small"], indirect=True)
def test_position_interpolation_matches_hf(reference, tmp_path):
    """Other input sizes: bicubic position-embedding interpolation as HF's interpolate_pos_encoding."""
    reference["hf"].save_pretrained(tmp_path / "hf")
    model = load_model(weights=tmp_path / "hf")
    pixels = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = reference["hf"].get_image_features(pixel_values=pixels, interpolate_pos_encoding=True)
        ref = getattr(ref, "pooler_output", ref)
        ours = model.encode_image(pixels)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
