"""GroupViT's official segmentation inference in every path: ``GroupViT.segment_official``, the
Segmenter (whole image and mmseg sliding windows, with and without the background rule, resized
back to the original shape), ``textseg segment``, ``textseg eval`` and the web app, each against an
independent transcription of NVlabs' ``GroupViTSegInference`` + mmseg's inference
(tests/groupvit_official_ref.py) on a tiny random GroupViT."""

from __future__ import annotations

import base64
import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from groupvit_official_ref import mmseg_inference, to_textseg_order
from PIL import Image

from textseg.cli import main as cli
from textseg.models.clip import TextConfig
from textseg.models.groupvit import GroupViT, GroupViTCfg, GroupViTVisionCfg
from textseg.preprocess import normalize, resize_to_tensor
from textseg.segment.segmenter import SegmentCfg, Segmenter

NAMES = ["cat", "dog", "grass", "sky", "car", "tree", "road"]  # 7 > 5: the image-level top-5 drops two
TEMPLATE = "a photo of a {}."


def tiny_groupvit(seed: int = 7) -> GroupViT:
    """A random GroupViT whose grouping is not degenerate: perturbed weights and sharpened
    assignment logits, so the final groups split the image and the labels depend on the top-5."""
    torch.manual_seed(seed)
    v = GroupViTVisionCfg(image_size=32, patch_size=8, width=64, heads=2, depths=(1, 1, 1),
                          num_group_tokens=(8, 4, 0), num_output_groups=(8, 4, 0))
    m = GroupViT(GroupViTCfg(vision=v, text=TextConfig(context_length=16, width=32, heads=2, layers=1),
                             embed_dim=16, proj_hidden=32))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for stage in m.visual.stages:
            if stage.grouping is not None:
                stage.grouping.assign.q_proj.weight.mul_(10.0)
                stage.grouping.assign.k_proj.weight.mul_(10.0)
        m.logit_scale.fill_(math.log(10.0))
    return m.eval()


def make_image(h: int = 48, w: int = 64, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.normal(128, 50, (h, w, 3))
    img[: h // 2, : w // 2] += 90
    img[h // 2 :, w // 2 :, 0] -= 90
    return img.clip(0, 255).astype(np.uint8)


def pixels_of(model, img: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    mean = torch.tensor(model.preprocess_cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.preprocess_cfg.std).view(1, 3, 1, 1)
    return (x - mean) / std


def class_text(model, names=NAMES) -> torch.Tensor:
    """NVlabs ``build_text_embedding`` with one template: the normalised projected text."""
    with torch.no_grad():
        return F.normalize(model.encode_text(model.tokenize([TEMPLATE.format(n) for n in names])), dim=-1)


def official_labels(seg_logit: torch.Tensor, with_bg: bool) -> np.ndarray:
    """mmseg ``simple_test``: softmax then argmax, in textseg's label order (background last)."""
    return to_textseg_order(seg_logit.softmax(1), with_bg).argmax(1)[0].numpy()


@pytest.fixture(scope="module")
def model():
    return tiny_groupvit()


def test_segment_official_equals_nvlabs_encode_decode(model):
    img = pixels_of(model, make_image())
    text = class_text(model)
    for thr in (None, 0.95):
        ref = mmseg_inference(model, img, text, with_bg=thr is not None, bg_thresh=thr or 0.95)
        got = model.segment_official(img, text, background_threshold=thr)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    # rescaled to another shape after the scores (mmseg whole_inference(rescale=True))
    ref = mmseg_inference(model, img, text, with_bg=True, ori_shape=(37, 71))
    torch.testing.assert_close(model.segment_official(img, text, size=(37, 71), background_threshold=0.95), ref,
                               atol=1e-5, rtol=0)
    # the image-level top-5 matters on this image (top-7 = no mask gives other labels)
    no_mask = mmseg_inference(model, img, text, with_bg=False, k=7)
    assert (no_mask.argmax(1) != mmseg_inference(model, img, text, with_bg=False).argmax(1)).any()


@pytest.mark.parametrize("slide", [None, (32, 16)], ids=["whole", "slide"])
@pytest.mark.parametrize("threshold", [None, 0.95], ids=["no-bg", "bg"])
def test_segmenter_equals_official(model, slide, threshold):
    image = make_image()
    ref = mmseg_inference(model, pixels_of(model, image), class_text(model), with_bg=threshold is not None,
                          bg_thresh=threshold or 0.95, slide=slide)
    seg = Segmenter(model, SegmentCfg(short_side=None, slide=slide, templates=(TEMPLATE,), threshold=threshold))
    assert seg.mode == "official"  # GroupViT's default dense mode
    res = seg.segment(image, NAMES)
    assert res.labels == NAMES + (["background"] if threshold is not None else [])
    expected = to_textseg_order(ref, threshold is not None)[0]
    torch.testing.assert_close(res.logits, expected, atol=1e-5, rtol=0)  # per-pixel class scores
    torch.testing.assert_close(res.probs, expected.softmax(0), atol=1e-5, rtol=0)  # mmseg's output
    labels = official_labels(ref, threshold is not None)
    np.testing.assert_array_equal(res.label_map, labels)
    assert len(np.unique(labels)) >= 2
    # the old path (patch-level argmax group, no top-5, probability threshold) gives other labels
    old = Segmenter(model, SegmentCfg(mode="groups", short_side=None, slide=slide, templates=(TEMPLATE,),
                                      threshold=threshold)).segment(image, NAMES)
    assert (old.label_map != labels).any()


def test_background_rule_is_min_of_threshold_and_best_group(model):
    """NVlabs: ``bg_thresh = min(0.95, group_affinity_mat.max())``: on this random model no group
    reaches 0.95, yet the most confident group's pixels stay foreground."""
    image = make_image()
    img, text = pixels_of(model, image), class_text(model)
    ref = mmseg_inference(model, img, text, with_bg=True)
    labels = official_labels(ref, True)
    assert (labels != len(NAMES)).any() and (labels == len(NAMES)).any()
    feats = model.official_features(img)
    probs = model.official_group_probs(feats, text)
    assert float(probs.max()) < 0.95  # a plain "best < 0.95" rule would make every pixel background
    res = Segmenter(model, SegmentCfg(short_side=None, templates=(TEMPLATE,), threshold=0.95)).segment(image, NAMES)
    np.testing.assert_array_equal(res.label_map, labels)


def test_segmenter_resize_and_rescale_to_original(model):
    """Short side 32 on a 48 x 64 image: mmcv's keep-ratio size 32 x 43, slide 32 / 16 there, the
    averaged scores bilinearly resized to 48 x 64 before the argmax (mmseg rescale=True)."""
    image = make_image()
    seg = Segmenter(model, SegmentCfg(short_side=32, slide=(32, 16), templates=(TEMPLATE,), threshold=0.95))
    res = seg.segment(image, NAMES)
    size = (32, int(64 * 32 / 48 + 0.5))
    assert size == (32, 43) and tuple(res.logits_lowres.shape[-2:]) == size
    pcfg = model.preprocess_cfg  # textseg's resampling (not under test)
    pixels = normalize(resize_to_tensor(Image.fromarray(image), size, pcfg.interpolation), pcfg.mean, pcfg.std)
    ref = mmseg_inference(model, pixels, class_text(model), with_bg=True, slide=(32, 16), ori_shape=(48, 64))
    torch.testing.assert_close(res.logits, to_textseg_order(ref, True)[0], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(res.label_map, official_labels(ref, True))


def test_segmenter_background_label_is_not_scored_as_text(model):
    """A 'background' label with a threshold is NVlabs' ``with_bg``: its channel is the rule, its
    name is not a class of the softmax / top-5; at its position in the labels."""
    image = make_image()
    ref = mmseg_inference(model, pixels_of(model, image), class_text(model), with_bg=True)
    res = Segmenter(model, SegmentCfg(short_side=None, templates=(TEMPLATE,), threshold=0.95)).segment(
        image, ["background", *NAMES])
    assert res.labels == ["background", *NAMES] and res.background_index == 0
    np.testing.assert_array_equal(res.label_map, ref.softmax(1).argmax(1)[0].numpy())


@pytest.fixture()
def checkpoint(tmp_path, model):
    from textseg.weights.load import save_model

    path = tmp_path / "groupvit.safetensors"
    save_model(model, path, {"source": "test"})
    return path


def test_cli_segment_is_official(tmp_path, model, checkpoint, capsys):
    image = make_image()
    Image.fromarray(image).save(tmp_path / "im.png")
    ref = mmseg_inference(model, pixels_of(model, image), class_text(model), with_bg=True, slide=(32, 16))
    code = cli(["segment", str(tmp_path / "im.png"), "--weights", str(checkpoint), "--labels", ",".join(NAMES),
                "--short-side", "0", "--slide", "32", "16", "--templates", TEMPLATE, "--threshold", "0.95",
                "--out", str(tmp_path / "out"), "--json", "--no-progress"])
    assert code == 0, capsys.readouterr().err[-2000:]
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["labels"] == [*NAMES, "background"]
    mask = np.asarray(Image.open(rec["mask"]))
    np.testing.assert_array_equal(mask, official_labels(ref, True))


def test_cli_eval_is_official(tmp_path, model, checkpoint, capsys):
    """A folder dataset whose ground truth IS the official prediction: mIoU 100 and pixel accuracy
    100 only when ``textseg eval`` runs the official inference (the patch-level path scores lower)."""
    from textseg.data.folder import FolderDataset
    from textseg.evaluate import SegmenterPredictor, evaluate

    root = tmp_path / "set"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(["background", *NAMES]) + "\n")
    text = class_text(model)
    for i in range(2):
        image = make_image(seed=1 + i)
        ref = mmseg_inference(model, pixels_of(model, image), text, with_bg=True, slide=(32, 16))
        Image.fromarray(image).save(root / "images" / f"im{i}.png")
        Image.fromarray(ref.argmax(1)[0].numpy().astype(np.uint8)).save(root / "masks" / f"im{i}.png")
    out = tmp_path / "r.json"
    code = cli(["eval", "--dataset", "folder", "--root", str(root), "--weights", str(checkpoint),
                "--short-side", "48", "--slide", "32", "16", "--templates", TEMPLATE, "--threshold", "0.95",
                "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err[-2000:]
    rep = json.loads(out.read_text())
    assert rep["images"] == 2
    assert rep["pixel_accuracy"] == 100.0 and rep["miou"] == 100.0
    ds = FolderDataset(root)
    old = SegmenterPredictor(model, ds, mode="groups", short_side=48, slide=(32, 16), templates=(TEMPLATE,),
                             threshold=0.95)
    assert evaluate(ds, old, progress=False).report()["pixel_accuracy"] < 100.0


def test_serve_segment_is_official(model):
    pytest.importorskip("fastapi")
    from dataclasses import replace

    from fastapi.testclient import TestClient

    from textseg.serve.app import create_app

    image = make_image()
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    ref = mmseg_inference(model, pixels_of(model, image), class_text(model), with_bg=True)
    app = create_app(model)
    service = app.state.service
    service.base_cfg = replace(service.base_cfg, short_side=None, templates=(TEMPLATE,))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        modes = client.get("/v1/models").json()["current"]["modes"]
        assert modes[0] == "official"
        r = client.post("/v1/segment", data={"labels": ",".join(NAMES), "threshold": "0.95", "return_mask": "true"},
                        files={"image": ("x.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "official" and [x["name"] for x in body["legend"]] == [*NAMES, "background"]
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))))
    np.testing.assert_array_equal(mask, official_labels(ref, True))
