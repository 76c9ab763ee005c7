"""Published protocols (SCLIP / NACLIP / ClearCLIP / SC-CLIP presets) and PAMR against the official repositories.

The expected values are transcribed here from the repositories, not read from textseg:
presets from ``configs/cfg_*.py`` over each segmentor's ``__init__`` defaults (wangf3014/SCLIP @ b56bd30
``clip_segmentor.py``, sinahmr/NACLIP @ 0cac3a6 ``naclip.py``, mc-lan/ClearCLIP @ ad68a40
``clearclip_segmentor.py``, SuleBai/SC-CLIP @ 0417ba9 ``scclip_segmentor.py``), PAMR from NACLIP's ``pamr.py`` and NACLIP's ``predict``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from textseg.cli import main as cli
from textseg.data.folder import FolderDataset
from textseg.errors import TextsegError
from textseg.evaluate import PROTOCOLS, SegmenterPredictor, get_protocol
from textseg.segment import SegmentCfg, Segmenter
from textseg.segment.pamr import pamr

sys.path.insert(0, str(Path(__file__).parent))
from eval_worker import ColourModel, make_folder  # noqa: E402
from seg_tiny import TinyColourModel  # noqa: E402

# ------------------------------------------------------------------------------------------------
# The repositories' configs. Segmentor defaults:
#   SCLIP     prob_thd=0.0 logit_scale=40 slide_stride=112 slide_crop=224 area_thd=None pamr_steps=0
#   NACLIP    prob_thd=0.0 logit_scale=40 slide_stride=112 slide_crop=224 pamr_steps=10 (test_all.sh "on")
#             pamr_stride=(8, 16)
#   ClearCLIP prob_thd=0.0 logit_scale=50 slide_stride=224 slide_crop=448
#   SC-CLIP   prob_thd=0.0 logit_scale=40 slide_stride=112 slide_crop=224 area_thd=None pamr_steps=0
#   ResCLIP   prob_thd=0.0 logit_scale=40 slide_stride=112 slide_crop=224 area_thd=None pamr_steps=0
# Columns: short side (Resize scale=(2048, S)), crop (0 = whole image), stride, prob_thd, logit_scale,
# area_thd, PAMR steps (0 = off), PAMR dilations, README mIoU.
# ------------------------------------------------------------------------------------------------
SCLIP = {  # configs/cfg_<name>.py; README 'Results'
    "voc": (336, 224, 112, 0.1, 65, 0.1, 0, None, 59.63),  # cfg_voc21: logit_scale 65, prob_thd .1, area_thd .1
    "voc20": (336, 224, 112, 0.0, 40, None, 0, None, 81.54),
    "context": (336, 224, 112, 0.1, 50, None, 0, None, 31.74),  # cfg_context60
    "context59": (336, 224, 112, 0.0, 40, None, 0, None, 34.46),
    "coco-object": (336, 224, 112, 0.1, 50, None, 0, None, 33.52),
    "coco-stuff": (448, 224, 112, 0.0, 40, None, 0, None, 22.77),  # cfg_coco_stuff164k
    "ade": (336, 224, 112, 0.0, 40, None, 0, None, 16.45),
    "cityscapes": (560, 224, 112, 0.0, 40, None, 0, None, 32.34),
}
NACLIP = {  # configs/cfg_<name>.py; README 'Results'
    "voc": (336, 0, 112, 0.1, 40, None, 10, (8, 16), 64.07),  # cfg_voc21: prob_thd .1, slide_crop=0
    "voc20": (336, 0, 112, 0.0, 40, None, 10, (8, 16), 83.03),  # slide_crop=0
    "context": (336, 224, 112, 0.1, 40, None, 10, (8, 16), 34.99),
    "context59": (336, 224, 112, 0.0, 40, None, 10, (8, 16), 38.35),
    "coco-object": (336, 224, 112, 0.1, 40, None, 10, (8, 16), 36.19),
    "coco-stuff": (336, 224, 112, 0.0, 40, None, 10, (8, 16), 25.69),
    "ade": (336, 224, 112, 0.0, 40, None, 10, (8, 16), 19.05),
    "cityscapes": (560, 224, 112, 0.0, 40, None, 10, (8, 16), 38.27),
}
CLEARCLIP = {  # configs/cfg_<name>.py; README results image (Table 2, CLIP ViT-B/16 + ClearCLIP)
    "voc": (448, 448, 224, 0.5, 50, None, 0, None, None),
    "voc20": (448, 448, 224, 0.0, 50, None, 0, None, 80.9),
    "context": (448, 448, 224, 0.15, 50, None, 0, None, None),
    "context59": (448, 448, 224, 0.0, 50, None, 0, None, 35.9),
    "coco-object": (448, 448, 224, 0.4, 50, None, 0, None, None),
    "coco-stuff": (448, 448, 224, 0.0, 50, None, 0, None, 23.9),
    "ade": (448, 448, 224, 0.0, 50, None, 0, None, 16.7),
    "cityscapes": (448, 224, 224, 0.0, 50, None, 0, None, 30.0),  # slide_crop=224 (stride default 224)
}
SCCLIP = {  # SuleBai/SC-CLIP @ 0417ba9 configs/cfg_<name>.py; arXiv 2411.15869 Table 1 (the README has no table)
    "voc": (336, 224, 112, 0.15, 50, 0.1, 0, None, 64.6),  # cfg_voc21: area_thd .1, logit_scale 50, prob_thd .15
    "voc20": (336, 224, 112, 0.0, 40, None, 0, None, 84.3),
    "context": (336, 224, 112, 0.15, 40, None, 0, None, 36.8),  # cfg_context60: prob_thd .15
    "context59": (336, 224, 112, 0.0, 40, None, 0, None, 40.1),
    "coco-object": (336, 224, 112, 0.35, 55, None, 0, None, 37.7),  # logit_scale 55, prob_thd .35
    "coco-stuff": (336, 224, 112, 0.0, 40, None, 0, None, 26.6),  # cfg_coco_stuff164k: 336, not SCLIP's 448
    "ade": (336, 224, 112, 0.0, 40, None, 0, None, 20.1),
    "cityscapes": (560, 224, 112, 0.0, 40, None, 0, None, 41.0),
}
RESCLIP = {  # yvhangyang/ResCLIP @ 0e085f7 configs/cfg_<name>.py; README figs/main_results_w(o).png (NACLIP + ResCLIP)
    "voc": (336, 0, 112, 0.1, 40, None, 0, None, 61.1),  # cfg_voc21: slide_crop=0, prob_thd .1
    "voc20": (336, 0, 112, 0.0, 40, None, 0, None, 86.0),
    "context": (336, 224, 112, 0.1, 40, None, 0, None, 33.5),
    "context59": (336, 224, 112, 0.0, 40, None, 0, None, 36.8),
    "coco-object": (336, 224, 112, 0.1, 40, None, 0, None, 35.0),
    "coco-stuff": (336, 224, 112, 0.0, 40, None, 0, None, 24.7),
    "ade": (336, 224, 112, 0.0, 40, None, 0, None, 18.0),
    "cityscapes": (560, 224, 112, 0.0, 40, None, 0, None, 35.9),
}
RESCLIP_OPTIONS = {  # temp_thd, attn_rcs_weights, attn_sfr_weights (delete_same_entity=True in every config)
    "voc": (0.50, (2.0, 0.3), (2.2, 0.7)), "context": (0.30, (2.0, 0.3), (1.8, 0.7)),
    "coco-object": (0.11, (2.0, 0.4), (1.8, 0.7)), "voc20": (0.10, (2.0, 0.6), (2.1, 0.6)),
    "context59": (0.25, (2.0, 0.4), (1.8, 0.7)), "coco-stuff": (0.11, (2.0, 0.4), (1.8, 0.7)),
    "cityscapes": (0.10, (2.0, 0.2), (2.1, 0.6)), "ade": (0.25, (2.0, 0.3), (2.1, 0.7)),
}
PEARL = {  # PGSmall/PEARL configs/cfg_<name>.py; assets/results.png (PEARL, with its TLP)
    "voc": (336, 0, 112, 0.1, 40, None, 0, None, 64.1),  # cfg_voc21: slide_crop=0, prob_thd .1
    "voc20": (336, 0, 112, 0.0, 40, None, 0, None, 86.9),  # slide_crop=0
    "context": (336, 224, 112, 0.1, 40, None, 0, None, 35.1),
    "context59": (336, 224, 112, 0.0, 40, None, 0, None, 38.6),
    "coco-object": (336, 224, 112, 0.1, 40, None, 0, None, 37.3),
    "coco-stuff": (336, 224, 112, 0.0, 40, None, 0, None, 26.3),
    "ade": (336, 224, 112, 0.0, 40, None, 0, None, 19.4),  # alpha_kk .3
    "cityscapes": (560, 224, 112, 0.0, 40, None, 0, None, 37.6),  # alpha_kk .3, grid 224
}
PEARL_OPTIONS = {"ade": {"alpha_kk": 0.3}, "cityscapes": {"alpha_kk": 0.3}}  # the configs' alpha_kk
PEARL_GRID = {"cityscapes": 224}  # TLP grid (PEARL default 80; use_prop "on" everywhere)
REPOS = {"sclip": SCLIP, "naclip": NACLIP, "clearclip": CLEARCLIP, "sc-clip": SCCLIP, "resclip": RESCLIP,
         "pearl": PEARL}


def test_presets_equal_the_repository_configs():
    assert set(PROTOCOLS) == set(REPOS)
    for method, table in REPOS.items():
        assert set(PROTOCOLS[method]) == set(table), method
        for bench, (short, crop, stride, thd, scale, area, steps, dil, ref) in table.items():
            p = get_protocol(method, bench)
            got = (p.short_side, p.max_side, p.crop, p.stride, p.threshold or 0.0, p.logit_scale,
                   p.area_threshold, p.pamr, p.templates, p.reference)
            want = (short, 2048, crop, stride, thd, scale, area, steps > 0, "imagenet", ref)
            assert got == want, (method, bench)
            if steps:
                assert (p.pamr_iterations, tuple(p.pamr_dilations)) == (steps, dil), (method, bench)
            assert p.method == method and p.benchmark == bench and p.source
            if method == "resclip":
                thd_t, rcs, sfr = RESCLIP_OPTIONS[bench]
                assert p.mode_options == {"temp_thd": thd_t, "rcs_weights": rcs, "sfr_weights": sfr,
                                          "delete_same_entity": True}, bench
            elif method == "pearl":  # configs/cfg_ade20k.py, cfg_city_scapes.py: alpha_kk=0.3; else 0.08
                assert p.mode_options == PEARL_OPTIONS.get(bench, {}), bench
            else:
                assert p.mode_options == {}, (method, bench)
            if method == "pearl":
                assert (p.propagation, p.tlp_grid) == ("tlp", PEARL_GRID.get(bench, 80)), bench
            else:
                assert p.propagation is None, (method, bench)


def test_whole_image_presets_reach_the_segmenter(tmp_path):
    ds = FolderDataset(make_folder(tmp_path / "set", n=1))
    ds.name = "voc20"
    cfg = SegmenterPredictor(ColourModel(), ds, protocol="naclip").cfg
    assert (cfg.slide, cfg.short_side, cfg.pamr, cfg.pamr_iterations, cfg.pamr_dilations, cfg.pamr_resolution) == (
        None, 336, True, 10, (8, 16), "original")
    cfg = SegmenterPredictor(ColourModel(), ds, protocol="clearclip").cfg
    assert (cfg.slide, cfg.short_side, cfg.pamr) == ((448, 224), 448, False)
    assert cfg.temperature == pytest.approx(100.0 / 50)
    cfg = SegmenterPredictor(ColourModel(), ds, protocol="pearl").cfg
    assert (cfg.slide, cfg.propagation, cfg.tlp_grid, cfg.pamr) == (None, "tlp", 80, False)


# ------------------------------------------------------------------------------------------------
# PAMR: NACLIP pamr.py (LocalAffinity / LocalAffinityCopy / LocalStDev / LocalAffinityAbs / PAMR)
# ------------------------------------------------------------------------------------------------
def _shift_kernels(kind: str) -> torch.Tensor:
    if kind == "std":  # LocalStDev: the 9 positions of the 3 x 3 window
        w = torch.zeros(9, 1, 3, 3)
        for n in range(9):
            w[n, 0, n // 3, n % 3] = 1
        return w
    w = torch.zeros(8, 1, 3, 3)
    cells = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]
    for n, (i, j) in enumerate(cells):
        if kind == "aff":  # LocalAffinity: centre 1, neighbour -1
            w[n, 0, 1, 1] = 1
            w[n, 0, i, j] = -1
        else:  # LocalAffinityCopy
            w[n, 0, i, j] = 1
    return w


def _local(x: torch.Tensor, kernel: torch.Tensor, dilations) -> torch.Tensor:
    b, k, h, w = x.shape
    x = x.view(b * k, 1, h, w)
    out = torch.empty((k * b, len(dilations) * kernel.size(0), h, w))
    for i, d in enumerate(dilations):
        x_pad = F.pad(x, [d] * 4, mode="replicate")
        out[:, kernel.size(0) * i : (i + 1) * kernel.size(0)] = F.conv2d(x_pad, kernel, dilation=d)
    return out.view(b, k, -1, h, w)


def naclip_pamr(x: torch.Tensor, mask: torch.Tensor, num_iter: int = 10, dilations=(8, 16)) -> torch.Tensor:
    mask = F.interpolate(mask, size=x.size()[-2:], mode="bilinear", align_corners=True)
    x_std = _local(x, _shift_kernels("std"), dilations).std(2, keepdim=True)
    x = -_local(x, _shift_kernels("aff"), dilations).abs() / (1e-8 + 0.1 * x_std)
    x = F.softmax(x.mean(1, keepdim=True), 2)
    for _ in range(num_iter):
        mask = (_local(mask, _shift_kernels("copy"), dilations) * x).sum(2)
    return mask


@pytest.mark.parametrize("mask_hw", [(37, 45), (9, 12)])  # full resolution; low resolution (resized first)
def test_pamr_equals_naclip_pamr(mask_hw):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 37, 45, generator=g)
    image[..., 18:, 20:] += 1.5  # an edge
    mask = torch.randn(1, 5, *mask_hw, generator=g)
    ours = pamr(image, mask, iterations=10, dilations=(8, 16))
    torch.testing.assert_close(ours, naclip_pamr(image, mask), atol=1e-5, rtol=0)


def test_segmenter_pamr_is_naclips_by_default():
    """NACLIP predict: logits -> bilinear to the original size; the network input (normalised) ->
    bilinear to the original size; PAMR(10, (8, 16)) there. Defaults of SegmentCfg are these."""
    cfg = SegmentCfg()
    assert (cfg.pamr_iterations, tuple(cfg.pamr_dilations), cfg.pamr_resolution) == (10, (8, 16), "original")
    rng = np.random.default_rng(0)
    img = np.repeat(np.repeat(rng.integers(0, 256, (5, 7, 3)), 8, 0), 8, 1).astype(np.uint8)  # 40 x 56
    img = (img.astype(np.int64) + rng.integers(-20, 20, img.shape)).clip(0, 255).astype(np.uint8)
    labels = "red, green, blue, yellow"
    base = dict(short_side=None, templates=("a {}.",), threshold=None)
    plain = Segmenter(TinyColourModel(), SegmentCfg(**base)).segment(img, labels)
    refined = Segmenter(TinyColourModel(), SegmentCfg(**base, pamr=True)).segment(img, labels)
    x = torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255
    x = (x - 0.5) / 0.5  # TinyColourModel's mean / std
    logits = F.interpolate(plain.logits_lowres[None], size=(40, 56), mode="bilinear", align_corners=False)
    want = naclip_pamr(x, logits)[0]
    torch.testing.assert_close(refined.logits_lowres, want, atol=1e-5, rtol=1e-5)  # logits of size ~30
    assert np.array_equal(refined.label_map, want.argmax(0).numpy())
    # the cheaper variant stays available by name, and a bad name is one clear error
    canvas = Segmenter(TinyColourModel(), SegmentCfg(**base, pamr=True, pamr_resolution="canvas")).segment(img, labels)
    assert canvas.logits_lowres.shape == (4, 40 // 4, 56 // 4)  # the input downsampled by pamr_stride
    with pytest.raises(TextsegError, match="pamr_resolution must be one of"):
        Segmenter(TinyColourModel(), SegmentCfg(pamr=True, pamr_resolution="half"))


# ------------------------------------------------------------------------------------------------
# `textseg eval --protocol clearclip:voc` end to end on a tiny CLIP checkpoint
# ------------------------------------------------------------------------------------------------
def test_cli_clearclip_protocol_with_a_clip_checkpoint(tmp_path, capsys):
    from seg_tiny import save_tiny_clip

    save_tiny_clip(tmp_path / "tiny.safetensors")
    root = make_folder(tmp_path / "set", n=2)
    out = tmp_path / "r.json"
    code = cli(["eval", "--dataset", "folder", "--root", str(root), "--weights", str(tmp_path / "tiny.safetensors"),
                "--protocol", "clearclip:voc", "--short-side", "64", "--templates", "none", "--no-progress",
                "--out", str(out)])
    assert code == 0
    assert "warning" not in capsys.readouterr().err
    rep = json.loads(out.read_text())
    seg, proto = rep["config"]["segment"], rep["config"]["protocol"]
    assert rep["images"] == 2 and 0 <= rep["miou"] <= 100 and rep["config"]["model"] == "clip"
    assert seg["mode"] == "clearclip" and seg["slide"] == [448, 224] and seg["pamr"] is False
    assert seg["temperature"] == pytest.approx((1 / 0.07) / 50, rel=1e-4)  # logits = 50 x cosine
    assert proto["method"] == "clearclip" and proto["threshold"] == 0.5 and proto["reference"] is None


@pytest.fixture(scope="module")
def deep_clip_weights(tmp_path_factory):
    """A tiny 12-block CLIP checkpoint (sc-clip reads blocks 3..10)."""
    from textseg.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
    from textseg.weights.load import save_model

    torch.manual_seed(0)
    model = CLIP(CLIPConfig(embed_dim=16, vision=VisionConfig(image_size=48, layers=12, width=32, patch_size=8,
                                                               heads=2),
                            text=TextConfig(context_length=16, width=32, heads=2, layers=1)))
    path = tmp_path_factory.mktemp("deep") / "tiny12.safetensors"
    save_model(model, path, {"source": "test"})
    return path


def _cli_eval_protocol(tmp_path, capsys, weights, protocol: str):
    """`textseg eval --protocol PROTOCOL` on a 2-image folder set; returns (report, segment cfg, protocol)."""
    root = make_folder(tmp_path / "set", n=2)
    out = tmp_path / "r.json"
    code = cli(["eval", "--dataset", "folder", "--root", str(root), "--weights", str(weights),
                "--protocol", protocol, "--short-side", "64", "--templates", "none", "--no-progress",
                "--out", str(out)])
    assert code == 0
    assert "warning" not in capsys.readouterr().err
    rep = json.loads(out.read_text())
    return rep, rep["config"]["segment"], rep["config"]["protocol"]


def _cli_segment_mode(tmp_path, capsys, weights, mode: str, out):
    """`textseg segment --mode MODE` on a random 70 x 50 image; asserts the mask size and the record's mode."""
    from PIL import Image

    img = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)).save(img)
    code = cli(["segment", str(img), "--labels", "cat, dog; puppy, grass", "--weights", str(weights),
                "--mode", mode, "--short-side", "64", "--templates", "none", "--out", str(out), "--json"])
    assert code == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert Image.open(rec["mask"]).size == (70, 50)
    assert json.loads((out / "x.json").read_text())["mode"] == mode


def test_cli_sc_clip_protocol_with_a_clip_checkpoint(tmp_path, capsys, deep_clip_weights):
    rep, seg, proto = _cli_eval_protocol(tmp_path, capsys, deep_clip_weights, "sc-clip:voc")
    assert rep["images"] == 2 and 0 <= rep["miou"] <= 100
    assert seg["mode"] == "sc-clip" and seg["slide"] == [224, 112] and seg["pamr"] is False
    assert seg["threshold"] is None and seg["area_threshold"] == 0.1  # the folder set has no background class
    assert seg["temperature"] == pytest.approx((1 / 0.07) / 50, rel=1e-4)  # logits = 50 x cosine
    assert proto["method"] == "sc-clip" and proto["threshold"] == 0.15 and proto["reference"] == 64.6


def test_cli_segment_sc_clip(tmp_path, capsys, deep_clip_weights):
    _cli_segment_mode(tmp_path, capsys, deep_clip_weights, "sc-clip", tmp_path / "out")


def test_cli_resclip_protocol_and_segment(tmp_path, capsys, deep_clip_weights):
    """`textseg eval --protocol resclip:voc` (its per-benchmark options reach the segmenter) and
    `textseg segment --mode resclip` run end to end on a 12-block tiny checkpoint."""
    rep, seg, proto = _cli_eval_protocol(tmp_path, capsys, deep_clip_weights, "resclip:voc")
    assert rep["images"] == 2 and 0 <= rep["miou"] <= 100 and not rep["errors"]
    assert seg["mode"] == "resclip" and seg["slide"] is None and seg["pamr"] is False
    assert seg["mode_options"]["temp_thd"] == 0.5 and list(seg["mode_options"]["sfr_weights"]) == [2.2, 0.7]
    assert seg["temperature"] == pytest.approx((1 / 0.07) / 40, rel=1e-4)
    assert proto["method"] == "resclip" and proto["reference"] == 61.1
    _cli_segment_mode(tmp_path, capsys, deep_clip_weights, "resclip", tmp_path / "o")


def sclip_postprocess(logits: torch.Tensor, prob_thd: float, area_thd: float) -> torch.Tensor:
    """SCLIP clip_segmentor.py postprocess_result (one query per class, class 0 = background); the
    logits are already multiplied by the logit scale."""
    seg_logits = logits.softmax(0)
    num_cls = seg_logits.shape[0]
    predictions = F.one_hot(seg_logits.argmax(0), num_cls).to(seg_logits.dtype)
    area_pred = predictions[:, :, 1:].sum((0, 1), keepdim=True)
    area_pred = (area_pred > area_thd * area_pred.sum()).to(seg_logits.dtype)
    seg_logits[1:] *= area_pred.transpose(0, -1)
    seg_pred = seg_logits.argmax(0, keepdim=True)
    seg_pred[seg_logits.max(0, keepdim=True)[0] < prob_thd] = 0
    return seg_pred[0]


def test_area_threshold_is_sclips():
    img = np.zeros((40, 56, 3), np.uint8)
    img[:, :24] = (230, 20, 20)
    img[:, 24:] = (20, 200, 20)
    img[:8, 48:] = (230, 230, 20)  # yellow: 64 of 2240 pixels, under 10% of the non-background prediction
    img[16:24, 8:16] = (128, 128, 128)  # grey: closest to no colour word
    labels = "background, red, green, yellow"
    # one cell per pixel: the canvas is the image, so textseg's canvas-level threshold and SCLIP's
    # full-resolution one see the same numbers
    base = dict(short_side=None, templates=("a {}.",), temperature=0.05)
    plain = Segmenter(TinyColourModel(cell=1), SegmentCfg(**base, threshold=None)).segment(img, labels)
    res = Segmenter(TinyColourModel(cell=1), SegmentCfg(**base, threshold=0.5, area_threshold=0.1)).segment(img, labels)
    want = sclip_postprocess(plain.logits_lowres.clone(), 0.5, 0.1).numpy()
    assert (plain.label_map == 3).any() and not (want == 3).any()  # yellow was there and is dropped
    assert np.array_equal(res.label_map, want) and res.dropped == ["yellow"]
    p = get_protocol("sclip", "voc")
    assert p.area_threshold == 0.1
