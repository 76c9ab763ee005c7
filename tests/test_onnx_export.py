"""Issue 17: ONNX export of every dense family (tiny random models) and ONNX Runtime inside the
Segmenter: dense features equal PyTorch's (cosine >= 1 - 1e-4) at sizes other than the export's."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from textseg.errors import TextsegError  # noqa: E402
from textseg.export import export_onnx, load_onnx  # noqa: E402
from textseg.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig  # noqa: E402
from textseg.segment import SegmentCfg, Segmenter  # noqa: E402

SIZES = [(2, 3, 40, 56), (1, 3, 64, 48), (1, 3, 37, 83)]  # the export used another size


def tiny_vit() -> CLIP:
    torch.manual_seed(0)
    cfg = CLIPConfig(embed_dim=24, vision=VisionConfig(image_size=32, layers=2, width=32, patch_size=8, heads=2),
                     text=TextConfig(context_length=16, width=32, heads=2, layers=1))
    m = CLIP(cfg)
    with torch.no_grad():  # non-trivial biases / norms so a dropped tensor shows
        for n, p in m.named_parameters():
            if n.endswith("bias") or ".ln_" in n:
                p.add_(0.2 * torch.randn_like(p))
    return m.eval()


def tiny_rn() -> CLIP:
    torch.manual_seed(0)
    cfg = CLIPConfig(embed_dim=24, vision=VisionConfig(image_size=64, layers=(1, 1, 1, 1), width=8, heads=4),
                     text=TextConfig(context_length=16, width=32, heads=2, layers=1))
    return CLIP(cfg).eval()


def check(model, out_dir, mode, sizes=SIZES):
    card = export_onnx(model, out_dir, mode=mode)
    mode = mode or model.dense_modes[0]
    assert card["mode"] == mode and card["input"] == "pixels" and card["output"] == "dense"
    assert json.loads((out_dir / "onnx.json").read_text())["preprocess"]["mean"] == list(model.preprocess_cfg.mean)
    loaded = load_onnx(out_dir)
    for shape in sizes:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            ref = model.encode_dense(x, mode=mode).float()
        got = loaded.dense_runtime(x)
        assert got.shape == ref.shape, (shape, got.shape, ref.shape)
        cos = F.cosine_similarity(got.flatten(2), ref.flatten(2), dim=1)
        assert cos.min() >= 1 - 1e-4, (shape, cos.min())
    return loaded


@pytest.fixture(scope="module")
def vit_export(tmp_path_factory):
    model = tiny_vit()
    out = tmp_path_factory.mktemp("onnx") / "naclip"
    return model, out, check(model, out, "naclip")


def test_clip_vit_naclip_any_size_and_the_checkpoint_grid(vit_export):
    model, _, loaded = vit_export
    # the checkpoint's own grid (32 x 32 -> 4 x 4): sclip / naclip keep the table as is there
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model.encode_dense(x, mode="naclip")
    assert F.cosine_similarity(loaded.dense_runtime(x), ref, dim=1).min() >= 1 - 1e-4


@pytest.mark.parametrize("mode", ["clearclip", "sclip", "maskclip", "plain"])
def test_clip_vit_other_modes(tmp_path, mode):
    check(tiny_vit(), tmp_path / mode, mode, sizes=SIZES[:2])


def test_clip_resnet(tmp_path):
    check(tiny_rn(), tmp_path / "rn", "naclip", sizes=[(2, 3, 64, 96), (1, 3, 96, 64)])


def test_lseg_vit(tmp_path):
    from textseg.models.lseg import LSegConfig, build_lseg

    cfg = LSegConfig(backbone="vit", text_encoder="minilm", embed_dim=32, features=16,
                     text_cfg={"width": 32, "layers": 1, "heads": 2, "mlp": 64}, vit_patch=8, vit_width=32,
                     vit_layers=4, vit_heads=2, vit_image_size=32, vit_hooks=(0, 1, 2, 3),
                     vit_reassemble=(8, 16, 32, 32))
    torch.manual_seed(0)
    check(build_lseg(cfg, pretrained=False).eval(), tmp_path / "lseg", "plain", sizes=[(1, 3, 48, 64), (2, 3, 40, 40)])


@pytest.mark.skipif(not os.environ.get("TEXTSEG_SLOW_TESTS"), reason="about 3 min on 2 shared cores (the packaged "
                    "EfficientNet + MiniLM are exported and saved); set TEXTSEG_SLOW_TESTS=1")
def test_offline_model(tmp_path):
    from textseg.models.offline import build_offline_model

    torch.set_flush_denormal(True)
    try:
        check(build_offline_model(), tmp_path / "off", None, sizes=[(1, 3, 96, 128), (2, 3, 80, 64)])
    finally:
        torch.set_flush_denormal(False)


def test_segmenter_runs_the_onnx_graph(vit_export):
    model, out, _ = vit_export
    onnx_model = load_onnx(out)
    calls = []
    onnx_model.dense_runtime = _Counting(onnx_model.dense_runtime, calls)
    img = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    seg = Segmenter(onnx_model, SegmentCfg(short_side=None, templates="none", slide=(32, 16)))
    assert seg.mode == "naclip" and seg.precision == "fp32"
    res = seg.segment(img, "cat, dog, grass")
    ref = Segmenter(model, SegmentCfg(short_side=None, templates="none", slide=(32, 16))).segment(
        img, "cat, dog, grass")
    assert calls and (res.label_map == ref.label_map).mean() > 0.999
    assert torch.allclose(res.logits_lowres, ref.logits_lowres, atol=1e-3)
    with pytest.raises(TextsegError, match="exported for dense mode 'naclip'"):
        Segmenter(onnx_model, SegmentCfg(mode="sclip"))
    with pytest.raises(TextsegError, match="runs in fp32"):
        load_onnx(out, precision="bf16")


def test_cli_export_and_segment_onnx(tmp_path, vit_export, capsys):
    from PIL import Image

    from textseg.cli import main

    _, out, _ = vit_export
    Image.fromarray((np.random.default_rng(3).random((40, 48, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    assert main(["segment", str(tmp_path / "a.png"), "--labels", "cat, dog", "--onnx", str(out),
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    rec = json.loads((tmp_path / "o" / "a.json").read_text())
    assert rec["mode"] == "naclip" and rec["precision"] == "fp32" and rec["labels"][:2] == ["cat", "dog"]
    assert main(["segment", str(tmp_path / "a.png"), "--labels", "cat", "--onnx", str(tmp_path)]) == 2
    assert "not an ONNX export folder" in capsys.readouterr().err


class _Counting:
    def __init__(self, inner, calls):
        self.inner, self.calls, self.mode = inner, calls, inner.mode

    def __call__(self, x):
        self.calls.append(tuple(x.shape))
        return self.inner(x)


def test_groupvit_refused_with_one_line():
    from textseg.export import exportable

    class G(torch.nn.Module):
        name = "groupvit"

    with pytest.raises(TextsegError, match="groupvit cannot be exported"):
        exportable(G())


def test_text_mode_refused_with_one_line(tmp_path):
    """ResCLIP reads the labels inside its forward: no label-free graph to export."""
    cfg = CLIPConfig(embed_dim=16, vision=VisionConfig(image_size=32, layers=10, width=32, patch_size=8, heads=2),
                     text=TextConfig(context_length=16, width=32, heads=2, layers=1))
    model = CLIP(cfg).eval()
    assert "resclip" in model.text_modes
    with pytest.raises(TextsegError, match="no label-free dense graph"):
        export_onnx(model, tmp_path / "x", mode="resclip")
