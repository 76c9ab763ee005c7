"""The offline model's ConSE bridge ("offline-bridge", the v1 default; the v2 default adds a learned dense
head, tests/test_offline_heads.py): bridge known cases, interface shapes, real photos, real data quality."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from textseg.errors import CheckpointError
from textseg.examples import example_path
from textseg.models.offline import NUM_CLASSES, OfflineCfg, OfflineModel, build_offline_model

DOMESTIC_CATS = [281, 282, 283, 284, 285]
CARS = [436, 468, 511, 609, 627, 656, 661, 717, 751, 817]  # beach wagon, cab, convertible, jeep, ...
WORN_BY_PEOPLE = [834, 610, 608, 841, 474]  # suit, jersey, jean, sweatshirt, cardigan


@pytest.fixture(scope="module")
def model() -> OfflineModel:
    return build_offline_model(heads=False)


def _pixels(model, name: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    im = Image.open(example_path(name)).convert("RGB")
    if size is not None:
        im = im.resize(size, Image.BICUBIC)
    x = torch.tensor(np.asarray(im), dtype=torch.float32).permute(2, 0, 1)[None] / 255
    return (x - 0.5) / 0.5


def test_bridge_known_cases(model):
    w = model.embed_texts(["kitty", "automobile", "person", "quantum chromodynamics"])
    assert w.shape == (4, NUM_CLASSES + 1)
    kitty, auto, person, unrelated = w[:, :NUM_CLASSES]
    # "kitty" reaches the domestic-cat classes, and they are its strongest ones
    assert kitty[DOMESTIC_CATS].min() > 0.5
    assert set(kitty.topk(5).indices.tolist()) == set(DOMESTIC_CATS)
    assert kitty[[151, 207, 291]].max() < 0.1  # not dogs, not lions
    # "automobile" reaches the car classes
    assert auto[CARS].min() > 0.5 and auto[[404, 779, 820]].max() < 0.5  # not airliner / bus / locomotive
    # "person" reaches the classes of what people wear / where they appear
    assert person[WORN_BY_PEOPLE].min() > 0.5 and person[DOMESTIC_CATS].max() < 0.1
    # a label with no related class: low weight everywhere instead of a random class
    assert unrelated.max() < 0.1 and unrelated.sum() < 0.5
    assert (w[:, NUM_CLASSES] == 0).all()
    bg = model.embed_texts(["background"])[0]
    assert bg[NUM_CLASSES] == 1 and bg[:NUM_CLASSES].sum() == 0


def test_interface_shapes_and_probabilities(model):
    x = torch.randn(2, 3, 96, 128)
    dense = model.encode_dense(x)
    s = model.dense_stride
    assert dense.shape == (2, NUM_CLASSES, 96 // s, 128 // s)
    torch.testing.assert_close(dense.sum(1), torch.ones(2, 96 // s, 128 // s))
    text = model.embed_texts(["cat", "car", "background"])
    logits = model.dense_logits(dense, text)
    assert logits.shape == (2, 3, 96 // s, 128 // s) and torch.isfinite(logits).all()
    scores = model.scores(dense, text)
    # a label's score is (at most) the ImageNet mass its bridge row claims: within [0, 1]
    assert scores.min() >= 0 and scores[:, :2].max() <= 1 + 1e-5
    # "background" is background_scale * (the mass no label claims) + background_floor, by hand
    claimed = text[:2, :NUM_CLASSES].amax(0).clamp(0, 1)
    rest = (1 - torch.einsum("bchw,c->bhw", dense, claimed)).clamp_min(0)
    cfg = model.cfg
    torch.testing.assert_close(scores[:, 2], cfg.background_scale * rest + cfg.background_floor)
    assert model.preprocess_cfg.mean == (0.5, 0.5, 0.5) and model.preprocess_cfg.std == (0.5, 0.5, 0.5)
    # encode_text on tokens == embed_texts on strings
    torch.testing.assert_close(model.encode_text(model.tokenize(["cat", "car"])), text[:2], atol=1e-5, rtol=1e-4)


def test_classifies_real_photos(model):
    labels = ["cat", "cup of coffee", "car", "person"]
    tokens = model.tokenize(labels)
    for name, want in (("chelsea", "cat"), ("coffee", "cup of coffee")):
        logits, _ = model(_pixels(model, name, (224, 224)), tokens)
        assert labels[logits[0].argmax()] == want, (name, logits)


def test_dense_map_localises_the_cat(model):
    """On chelsea.jpg (a cat in front of a wall) "cat" wins where the cat is, "background" at the edges."""
    x = _pixels(model, "chelsea")
    with torch.no_grad():
        z = model.dense_logits(model.encode_dense(x), model.embed_texts(["cat", "car", "background"]))[0]
    pred = z.argmax(0)
    h, w = pred.shape
    centre = pred[h // 4: 3 * h // 4, w // 4: 3 * w // 4]
    assert (centre == 0).float().mean() > 0.5
    assert (pred == 1).float().mean() < 0.05


def test_missing_bridge_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="bridge"):
        OfflineModel(bridge_dir=tmp_path)


def test_text_cache_key_covers_bridge_and_settings(model, tmp_path):
    import shutil
    from dataclasses import replace

    from safetensors.torch import load_file, save_file

    from textseg.models.offline import ASSETS, BRIDGE
    from textseg.text import model_fingerprint

    for ext in ("safetensors", "json"):
        shutil.copy(ASSETS / f"{BRIDGE}.{ext}", tmp_path / f"{BRIDGE}.{ext}")
    same = OfflineModel(OfflineCfg(heads=False), bridge_dir=tmp_path)
    assert model_fingerprint(same) == model_fingerprint(model)
    path = tmp_path / f"{BRIDGE}.safetensors"
    t = load_file(str(path))
    t["weight_value"] = t["weight_value"] * 0.5  # another bridge
    save_file(t, str(path))
    assert model_fingerprint(OfflineModel(OfflineCfg(heads=False), bridge_dir=tmp_path)) != model_fingerprint(model)
    path.write_bytes(path.read_bytes()[:100])  # a broken bridge: one clear error
    with pytest.raises(CheckpointError, match="bridge"):
        OfflineModel(bridge_dir=tmp_path)
    same.cfg = replace(same.cfg, match_top=same.cfg.match_top + 1)  # another text-side setting
    assert model_fingerprint(same) != model_fingerprint(model)


def test_bridge_card_says_how_it_was_made(model):
    card = model.card
    assert card["made_by"] == "scripts/build_offline_bridge.py"
    assert len(card["imagenet_classes"]) == NUM_CLASSES and card["imagenet_classes"][967] == "espresso"
    assert {"wordnet", "curated", "text_encoder"} <= set(card["inputs"])


def test_quality_on_real_coco_images(model, coco_mini):
    """A few COCO-MINI val2017 photos, VOC-21 view: the model must beat trivial predictions clearly."""
    from textseg.metrics import ConfusionMatrix

    meta = json.loads((coco_mini / "images_meta.json").read_text())
    ids = sorted(m["image"] for m in meta if m["split"] == "val2017")[:6]
    names = [n for n in (coco_mini / "classes_voc21.txt").read_text().split("\n") if n.strip()]
    text = model.embed_texts(["background", *names[1:]])
    cm, cm_bg = ConfusionMatrix(len(names)), ConfusionMatrix(len(names))
    for i in ids:
        img = Image.open(coco_mini / "images" / f"{i}.jpg").convert("RGB")
        w, h = img.size
        s = 320 / min(w, h)
        img = img.resize((round(w * s / 16) * 16, round(h * s / 16) * 16), Image.BICUBIC)
        x = (torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1)[None] / 255 - 0.5) / 0.5
        mask = torch.from_numpy(np.array(Image.open(coco_mini / "masks_voc21" / f"{i}.png")).astype(np.int64))
        with torch.no_grad():
            z = model.dense_logits(model.encode_dense(x), text)
        z = torch.nn.functional.interpolate(z, size=mask.shape, mode="bilinear", align_corners=False)[0]
        cm.update(z.argmax(0), mask)
        cm_bg.update(torch.zeros_like(mask), mask)
    got, trivial = cm.compute(), cm_bg.compute()
    assert got.miou > 0.17, got.iou  # measured 0.212 (the full val2017 half: see benchmarks/offline_quality.py)
    assert got.miou > trivial.miou + 0.08, (got.miou, trivial.miou)
    assert got.iou[0] > 0.6  # background (the unclaimed ImageNet mass) is mostly right
