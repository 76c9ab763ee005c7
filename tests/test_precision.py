"""Issue 17: ``--precision auto|fp32|bf16|fp16`` -- detection from CPU flags / CUDA capability, the image
tower under autocast, everything after it in float32, and the reports (JSON record, /v1/models, CLI)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from textseg import precision as P
from textseg.errors import TextsegError
from textseg.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from textseg.segment import SegmentCfg, Segmenter
from textseg.weights.load import load_model, save_model

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse sse2 avx2 avx512f {extra}
bogomips\t: 4000.00

processor\t: 1
flags\t\t: fpu vme sse sse2 avx2 avx512f {extra}
"""


def tiny_clip(seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    cfg = CLIPConfig(embed_dim=24, vision=VisionConfig(image_size=32, layers=2, width=32, patch_size=8, heads=2),
                     text=TextConfig(context_length=16, width=32, heads=2, layers=1))
    return CLIP(cfg).eval()


@pytest.mark.parametrize("extra,native", [("avx512_bf16 avx512_vnni", True), ("amx_bf16 amx_tile", True),
                                          ("avx512_vnni", False), ("", False)])
def test_cpu_bf16_detection_reads_the_flags(tmp_path, monkeypatch, extra, native):
    f = tmp_path / "cpuinfo"
    f.write_text(CPUINFO.format(extra=extra))
    flags = P.cpu_flags(f)
    assert ("avx512f" in flags) and (("avx512_bf16" in flags) == ("avx512_bf16" in extra))
    assert P.cpu_has_native_bf16(flags) is native
    assert P.cpu_flags(tmp_path / "absent") == set()  # not Linux: no flags, so no guess (fp32)
    monkeypatch.setattr(P, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": flags)
    assert P.resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")


@pytest.mark.parametrize("cap,expect", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"), ((6, 1), "fp16")])
def test_cuda_auto_by_capability(monkeypatch, cap, expect):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    assert P.resolve_precision("auto", "cuda") == expect
    assert P.resolve_precision("fp32", "cuda") == "fp32" and P.resolve_precision(None, "cuda") == "fp32"


def test_bad_precision_is_one_clear_error():
    with pytest.raises(TextsegError, match="precision must be one of auto, fp32, bf16, fp16"):
        P.resolve_precision("int8", "cpu")
    with pytest.raises(TextsegError, match="precision must be one of"):
        load_model(precision="half")


class _Spy(torch.nn.Module):
    """Wraps a model's encode_dense / dense_logits to see the autocast state and the dtypes."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.seen: dict = {}

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def encode_dense(self, x, mode=None):
        self.seen["autocast"] = torch.is_autocast_enabled("cpu")
        self.seen["autocast_dtype"] = torch.get_autocast_dtype("cpu")
        out = self.inner.encode_dense(x, mode=mode)
        self.seen["tower_dtype"] = out.dtype
        return out

    def dense_logits(self, dense, text):
        self.seen["dense_dtype"], self.seen["text_dtype"] = dense.dtype, text.dtype
        self.seen["logits_autocast"] = torch.is_autocast_enabled("cpu")
        return self.inner.dense_logits(dense, text)


@pytest.mark.parametrize("resolution", ["pixel", "canvas"])
def test_bf16_runs_the_tower_only_and_scores_in_fp32(resolution):
    model = tiny_clip()
    img = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    spy = _Spy(model)
    cfg = SegmentCfg(short_side=None, threshold=0.3, templates="none", precision="bf16", resolution=resolution,
                     pamr=True, pamr_iterations=2)
    res = Segmenter(spy, cfg).segment(img, "cat, dog; puppy, grass")
    s = spy.seen
    assert s["autocast"] and s["autocast_dtype"] == torch.bfloat16 and s["tower_dtype"] == torch.bfloat16
    assert s["dense_dtype"] == torch.float32 and s["text_dtype"] == torch.float32 and not s["logits_autocast"]
    assert res.logits_lowres.dtype == torch.float32 and res.precision == "bf16"
    assert res.to_record()["precision"] == "bf16"
    # the features the Segmenter caches = the tower under torch.autocast(bf16), cast to float32
    seg = Segmenter(model, cfg)
    seg.set_image(img)
    x = seg._image_input
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model.encode_dense(x, mode="naclip")
    assert want.dtype == torch.bfloat16
    assert torch.equal(seg._views[0].feats, want.float())
    # and fp32 (the default) is the plain forward
    seg32 = Segmenter(model, SegmentCfg(short_side=None, templates="none", resolution=resolution))
    seg32.set_image(img)
    assert seg32.precision == "fp32"
    with torch.no_grad():
        ref = model.encode_dense(x, mode="naclip")
    assert torch.equal(seg32._views[0].feats, ref)
    cos = F.cosine_similarity(seg._views[0].feats, ref, dim=1)
    assert cos.min() > 0.99  # bf16 features are close, not equal
    assert not torch.equal(seg._views[0].feats, ref)


def test_load_model_precision_is_the_segmenter_default(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_model(tiny_clip(), path)
    model = load_model(weights=path, precision="bf16")
    assert model.inference_precision == "bf16"
    assert Segmenter(model, SegmentCfg(templates="none")).precision == "bf16"
    assert Segmenter(model, SegmentCfg(templates="none", precision="fp32")).precision == "fp32"  # cfg wins
    assert load_model(weights=path).inference_precision == "fp32"


def test_classify_tower_in_bf16_probs_in_fp32(monkeypatch):
    from textseg.zeroshot import classify

    model = tiny_clip()
    seen = {}
    orig = model.encode_image

    def spy(x, normalize=False):
        seen["dtype"] = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        return orig(x, normalize)

    monkeypatch.setattr(model, "encode_image", spy)
    img = (np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8)
    p32 = classify(model, [img], "cat, dog, car", templates="none")
    assert seen["dtype"] is None
    model.inference_precision = "bf16"
    p16 = classify(model, [img], "cat, dog, car", templates="none")
    assert seen["dtype"] == torch.bfloat16 and p16.dtype == torch.float32
    assert torch.allclose(p16.sum(-1), torch.ones(1)) and (p16 - p32).abs().max() < 0.05


def test_cli_and_server_report_precision(tmp_path, capsys):
    from textseg.cli import main

    path = tmp_path / "tiny.safetensors"
    save_model(tiny_clip(), path)
    Image.fromarray((np.random.default_rng(2).random((40, 48, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    code = main(["segment", str(tmp_path / "a.png"), "--labels", "cat, dog", "--weights", str(path),
                 "--out", str(tmp_path / "out"), "--precision", "bf16", "--no-progress"])
    assert code == 0
    rec = json.loads((tmp_path / "out" / "a.json").read_text())
    assert rec["precision"] == "bf16"
    with pytest.raises(SystemExit):  # argparse refuses an unknown precision
        main(["segment", str(tmp_path / "a.png"), "--labels", "cat", "--precision", "int4"])
    capsys.readouterr()

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from textseg.serve.app import create_app

    with TestClient(create_app(tiny_clip(), precision="bf16"), base_url="http://127.0.0.1") as c:
        cur = c.get("/v1/models").json()["current"]
    assert cur["precision"] == "bf16" and cur["cpu_native_bf16"] == P.cpu_has_native_bf16()


def test_cast_weights_converts_the_image_tower_once_and_keeps_text_fp32(tmp_path):
    import copy

    path = tmp_path / "tiny.safetensors"
    save_model(tiny_clip(), path)
    ref = load_model(weights=path)
    model = load_model(weights=path, precision="bf16", cast_weights=True)
    assert model.inference_cast == "weights" and P.describe(model)["cast"] == "weights"
    assert {p.dtype for p in model.visual.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.text.parameters()} == {torch.float32} and model.logit_scale.dtype == torch.float32
    torch.testing.assert_close(model.embed_texts(["cat", "dog"]), ref.embed_texts(["cat", "dog"]), rtol=0, atol=0)
    img = (np.random.default_rng(1).random((40, 56, 3)) * 255).astype(np.uint8)
    seg = Segmenter(model, SegmentCfg(short_side=None, templates="none", threshold=None))
    res = seg.segment(img, "cat, dog, grass")
    assert seg.precision == "bf16" and res.logits_lowres.dtype == torch.float32
    # the transcription: the fp32 tower's weights rounded to bf16 once, run under autocast, output to float32
    want_model = copy.deepcopy(ref)
    want_model.visual.to(torch.bfloat16)
    x = seg._image_input
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = want_model.encode_dense(x.to(torch.bfloat16), mode="naclip").float()
    assert torch.equal(seg._views[0].feats, want)
    with torch.no_grad():
        full = ref.encode_dense(x, mode="naclip")
    assert F.cosine_similarity(want, full, dim=1).min() > 0.99
    with pytest.raises(TextsegError, match="fp32 needs the model loaded without it"):
        Segmenter(model, SegmentCfg(precision="fp32"))
    assert load_model(weights=path, precision="fp32", cast_weights=True).visual.conv1.weight.dtype == torch.float32


def test_cast_weights_runs_the_offline_model():
    model = load_model(precision="bf16", cast_weights=True)
    kept = [model.image.stem, model.image.blocks[0], model.image.classifier]  # float32 at every precision
    assert {p.dtype for m in kept for p in m.parameters()} == {torch.float32}
    fp32 = load_model(precision="fp32")  # never rounded through bf16 on the way
    assert all(torch.equal(a, b) for a, b in zip(model.image.stem.parameters(), fp32.image.stem.parameters()))
    assert torch.equal(model.image.classifier.weight, fp32.image.classifier.weight)
    rest = [p for m in [*model.image.blocks[1:], model.image.head] for p in m.parameters()]
    assert {p.dtype for p in rest} == {torch.bfloat16}
    img = (np.random.default_rng(2).random((96, 128, 3)) * 255).astype(np.uint8)
    res = Segmenter(model, SegmentCfg(short_side=96)).segment(img, "cat, dog, grass, sky")
    assert res.precision == "bf16" and res.label_map.shape == (96, 128)


def test_offline_stem_and_first_block_stay_float32_under_bf16():
    """The Lite tower's first layers run in float32 under autocast (their rounding is inherited by every
    later layer): their outputs equal fp32's exactly, later blocks run in bf16; the classifier's logits are
    float32 too (its 1000-way softmax decides the label map)."""
    from textseg.models.efficientnet import efficientnet_lite

    net = efficientnet_lite("lite0").fuse()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = net.blocks[0](net.stem(x))
        assert net.stage_ends[0] == 0  # stage 0 is block 0 alone
        net.set_float32_prefix(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            first, second = net.forward_intermediates(x, indices=[0, 1], intermediates_only=True).intermediates
            assert net.forward_features(x).dtype == torch.bfloat16
        assert first.dtype == torch.float32 and torch.equal(first, ref)
        assert second.dtype == torch.bfloat16
        net.set_float32_prefix(-1)  # off: everything under autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert net.forward_intermediates(x, indices=[0], intermediates_only=True).intermediates[0].dtype == torch.bfloat16
    model = load_model(precision="bf16")
    feats = torch.randn(1, 1280, 3, 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model._classify(feats)
    fc = model.image.classifier
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, F.conv2d(feats, fc.weight[:, :, None, None], fc.bias), atol=1e-5)
