"""Zero-shot classification API and the classify / models / convert commands, including bad input:
unreadable image, empty labels, checkpoint of another model, truncated files -> one-line error,
exit code 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from textseg.cli import main
from textseg.examples import example_path
from textseg.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from textseg.preprocess import preprocess
from textseg.prompts import IMAGENET_TEMPLATES
from textseg.weights.load import load_model, save_model
from textseg.zeroshot import classify, text_classifier

CAT, COFFEE = str(example_path("chelsea")), str(example_path("coffee"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    cfg = CLIPConfig(embed_dim=16, vision=VisionConfig(image_size=32, layers=1, width=32, patch_size=16, heads=2),
                     text=TextConfig(width=32, heads=2, layers=1))
    model = CLIP(cfg).eval()
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_model(model, path, {"source": "random test model"})
    return path


def test_classify_api_matches_hand_computation(tiny):
    model = load_model(weights=tiny)
    labels = ["cat", "coffee cup", "tree"]
    probs = classify(model, [CAT, COFFEE], labels)
    assert probs.shape == (2, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    with torch.no_grad():
        tok = model.tokenize([t.format(x) for x in labels for t in IMAGENET_TEMPLATES])
        txt = F.normalize(model.encode_text(tok), dim=-1).view(3, 80, -1).mean(1)
        txt = F.normalize(txt, dim=-1)
        img = F.normalize(model.encode_image(torch.stack([preprocess(CAT, model.preprocess_cfg),
                                                          preprocess(COFFEE, model.preprocess_cfg)])), dim=-1)
        expect = (model.logit_scale.exp() * img @ txt.t()).softmax(-1)
    torch.testing.assert_close(probs, expect, atol=1e-5, rtol=0)
    torch.testing.assert_close(text_classifier(model, labels), txt, atol=1e-6, rtol=0)
    single = classify(model, [CAT], labels, templates="{}")
    assert not torch.allclose(single, probs[:1])


def test_cli_json_and_table(tiny, capsys, tmp_path):
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("cat\n\ncoffee cup\ntree\n")
    assert main(["classify", CAT, COFFEE, "--labels-file", str(labels_file), "--weights", str(tiny), "--json",
                 "--templates", "{}"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    rows = [json.loads(x) for x in lines]
    assert rows[0]["image"] == CAT and rows[0]["labels"] == ["cat", "coffee cup", "tree"]
    assert abs(sum(rows[0]["probs"]) - 1) < 1e-6
    model = load_model(weights=tiny)
    expect = classify(model, [CAT, COFFEE], ["cat", "coffee cup", "tree"], templates="{}")[0].tolist()
    assert rows[0]["probs"] == expect  # full precision, label order
    assert any(len(repr(p)) > 12 for p in rows[0]["probs"])
    assert main(["classify", CAT, "--labels", "cat,tree", "--weights", str(tiny), "--top-k", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == CAT and len(out) == 2 and "%" in out[1]


def test_cli_default_offline_model(capsys):
    assert main(["classify", CAT, COFFEE, "--labels", "cat,coffee cup", "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert rows[0]["probs"][0] > 0.5 and rows[1]["probs"][1] > 0.5


def test_models_and_convert(tiny, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTSEG_CACHE", str(tmp_path / "cache"))
    assert main(["models", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    names = [p["name"] for p in info["presets"]]
    assert names == ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16", "ViT-L/14",
                     "ViT-L/14@336px"]
    assert all(p["cached"] is None and p["sha256"] in p["url"] for p in info["presets"])
    assert info["named"][0]["name"] == "offline" and "openai" in info["formats"]
    fake = tmp_path / "cache" / "clip" / "RN50.pt"
    fake.parent.mkdir(parents=True)
    fake.write_bytes(b"not the real file")
    assert main(["models"]) == 0
    assert f"cached: {fake}" in capsys.readouterr().out
    # a cached file with the wrong hash is refused with a clear message
    assert main(["classify", CAT, "--labels", "a,b", "--model", "RN50"]) == 2
    assert "SHA-256 does not match" in capsys.readouterr().err
    # offline: a clear error saying where to put the file (no network needed to fail)
    with pytest.raises(Exception, match=r"download https://openaipublic.*ViT-B-16.pt and put it at .*ViT-B-16.pt"):
        load_model("ViT-B-16", download=False)
    out = tmp_path / "conv.safetensors"
    assert main(["convert", str(tiny), str(out)]) == 0
    card = json.loads((tmp_path / "conv.safetensors.json").read_text())
    assert card["architecture"] == "clip" and card["source_format"] == "native" and len(card["source_sha256"]) == 64


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "textseg.cli", *args], capture_output=True, text=True)


def test_bad_inputs_one_line_errors(tiny, tmp_path, capsys):
    bad_img = tmp_path / "broken.jpg"
    bad_img.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    other = tmp_path / "resnet_classifier.pt"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).state_dict(), other)
    data = tiny.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    torch.save({"visual.proj": torch.zeros(2, 2)}, tmp_path / "full.pt")
    cut_pt = tmp_path / "cut.pt"
    cut_pt.write_bytes((tmp_path / "full.pt").read_bytes()[:300])
    cases = [
        (["classify", str(bad_img), "--labels", "a,b", "--weights", str(tiny)], "cannot read image"),
        (["classify", str(tmp_path / "missing.png"), "--labels", "a,b"], "no such file"),
        (["classify", CAT, "--labels", " , ", "--weights", str(tiny)], "no labels"),
        (["classify", CAT, "--labels", "a,b", "--weights", str(other)], "not a checkpoint of a supported model"),
        (["classify", CAT, "--labels", "a,b", "--weights", str(tiny), "--model", "lseg"], "not 'lseg'"),
        (["classify", CAT, "--labels", "a,b", "--weights", str(truncated)], "truncated"),
        (["classify", CAT, "--labels", "a,b", "--weights", str(cut_pt)], "truncated"),
        (["convert", str(truncated), str(tmp_path / "o.safetensors")], "truncated"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)
    proc = _cli("classify", CAT, "--labels", "a,b", "--weights", str(truncated))  # the real process too
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_convert_trust_checkpoint_only_when_asked(tmp_path, capsys, monkeypatch):
    """When the safe TorchScript reader cannot read an archive, convert refuses unless
    --trust-checkpoint is given (then torch.jit.load extracts the weights once)."""
    from clip_layouts import save_torchscript

    from textseg.errors import CheckpointError
    from textseg.weights import torchscript
    from textseg.weights.convert import openai

    torch.manual_seed(0)
    cfg = CLIPConfig(embed_dim=16, vision=VisionConfig(image_size=32, layers=1, width=64, patch_size=16),
                     text=TextConfig(width=64, heads=1, layers=1))
    model = CLIP(cfg).eval()
    sd = {(k[5:] if k.startswith("text.") else k): v for k, v in model.state_dict().items()}
    assert openai.is_openai_layout(sd)
    save_torchscript(sd, tmp_path / "jit.pt")

    def unreadable(path):
        raise CheckpointError(f"{path}: cannot read the TorchScript archive's tensors safely (simulated)")

    monkeypatch.setattr(torchscript, "read_torchscript_tensors", unreadable)
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(tmp_path / "jit.pt"), str(out)]) == 2
    assert "safely" in capsys.readouterr().err and not out.exists()
    assert main(["convert", str(tmp_path / "jit.pt"), str(out), "--trust-checkpoint"]) == 0
    loaded = load_model(weights=out)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(x), model.encode_image(x))
