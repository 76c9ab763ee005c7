"""The offline v2 default: the ConSE bridge + the learned dense head (assets/offline_heads.*).

Pins: the packaged head file loads strictly (and a wrong one is one clear error); a label's score is,
by hand, the larger of the bridge's mass and the head's gated probability; "person" beats "dog" on
photos of people; the build script runs on a tiny caption folder and its output changes the scores
and the text-cache key.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from textseg.errors import CheckpointError
from textseg.examples import example_path
from textseg.models.offline import ASSETS, HEADS, NUM_CLASSES, OfflineCfg, OfflineModel, build_offline_model
from textseg.models.registry import PACKAGED
from textseg.weights.load import load_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model() -> OfflineModel:
    return build_offline_model()


def _pixels(img: Image.Image, short: int = 448) -> torch.Tensor:
    w, h = img.size
    s = short / min(w, h)
    img = img.convert("RGB").resize((max(32, round(w * s / 32) * 32), max(32, round(h * s / 32) * 32)), Image.BICUBIC)
    x = torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1)[None] / 255
    return (x - 0.5) / 0.5


def test_head_file_loads_strictly(model, tmp_path):
    from safetensors.torch import load_file, save_file

    file = load_file(str(ASSETS / f"{HEADS}.safetensors"))
    # the file's tensors are exactly the head's parameters (+ the vocabulary embeddings), loaded as they are
    own = dict(model.head.state_dict())
    assert set(file) == set(own) | {"vocab_embeddings", "vocab_trust", "class_prior"}
    assert file["vocab_trust"].shape == file["vocab_embeddings"].shape[:1]
    # the photos' mean class probabilities (OfflineCfg.prior_lift): a distribution, loaded as it is
    assert file["class_prior"].shape == (NUM_CLASSES,) and float(file["class_prior"].min()) >= 0
    assert abs(float(file["class_prior"].sum()) - 1) < 1e-4
    torch.testing.assert_close(model.class_prior, file["class_prior"] / file["class_prior"].sum())
    assert float(file["vocab_trust"].min()) >= 0 and float(file["vocab_trust"].max()) <= 1
    for k, v in own.items():
        torch.testing.assert_close(v, file[k].float(), rtol=0, atol=0)
    card = json.loads((ASSETS / f"{HEADS}.json").read_text())
    assert card["made_by"] == "scripts/build_offline_heads.py" and "licences" in card and card["data"]["images"] > 0
    assert len(card["vocabulary"]) == file["vocab_embeddings"].shape[0] and "person" in card["vocabulary"]
    # wrong files: one clear CheckpointError each
    for name, change in (("unexpected", lambda t: {**t, "extra": torch.zeros(1)}),
                         ("missing", lambda t: {k: v for k, v in t.items() if k != "bias"}),
                         ("shape", lambda t: {**t, "bias": torch.zeros(2)}),
                         ("vocab_trust", lambda t: {k: v for k, v in t.items() if k != "vocab_trust"}),
                         ("vocab_trust", lambda t: {**t, "vocab_trust": torch.ones(3)}),
                         ("class_prior", lambda t: {**t, "class_prior": torch.ones(3)})):
        save_file(change(dict(file)), str(tmp_path / f"{HEADS}.safetensors"))
        with pytest.raises(CheckpointError, match=name):
            OfflineModel(heads_dir=tmp_path)
    # a head built before the class prior (none in the file) loads, with the bridge's uniform prior
    save_file({k: v for k, v in file.items() if k != "class_prior"}, str(tmp_path / f"{HEADS}.safetensors"))
    old = OfflineModel(heads_dir=tmp_path)
    torch.testing.assert_close(old.class_prior, torch.full((NUM_CLASSES,), 1 / NUM_CLASSES))
    (tmp_path / f"{HEADS}.safetensors").write_bytes(b"broken")
    with pytest.raises(CheckpointError, match="unreadable"):
        OfflineModel(heads_dir=tmp_path)
    shutil.rmtree(tmp_path)
    with pytest.raises(CheckpointError, match="offline-bridge"):
        OfflineModel(heads_dir=tmp_path)


def test_default_is_v2_and_bridge_only_keeps_its_name():
    assert {"offline", "offline-bridge"} <= set(PACKAGED)
    v1 = load_model("offline-bridge")
    assert v1.head is None and v1.name == "offline-bridge"
    assert v1.embed_texts(["cat"]).shape == (1, NUM_CLASSES + 1)
    # v1 keeps the background scale it was tuned and reported with; v2 has its own (train2017-calibrated)
    assert v1.cfg.background_scale == 0.4 and OfflineCfg().background_scale == 0.3
    # the bridge-side debiasing is an option (it lost VOC-21 on val2017), off in v1 and v2
    assert v1.cfg.bridge_contrast == 0 and OfflineCfg().bridge_contrast == 0
    # the photo-prior lift is v2's (capped: it only lifts); v1 has no head file, so no prior, and keeps it off
    assert OfflineCfg().prior_lift == 1.0 and OfflineCfg().prior_lift_max == 1.0 and v1.cfg.prior_lift == 0
    assert OfflineModel.from_config_dict(v1.config_dict()).cfg == v1.cfg  # a saved v1 reloads as v1


def test_scores_by_hand(model):
    """score = max(bridge mass / max(1, sum w) ** 0.5 / min(prior_lift_max, rel) ** prior_lift, head_weight * gate * sigmoid(e^s cos + b) * (1 - 0.5 *
    the largest (1 - gate) x raw bridge mass of another label));
    background = 0.3 * (1 - max(claimed ImageNet mass, best head probability)) + 0.05."""
    labels = ["cat", "person", "quantum chromodynamics", "background"]
    x = _pixels(Image.open(example_path("chelsea")), 224)
    with torch.no_grad():
        got = model.scores(model.encode_dense(x), model.embed_texts(labels))[0]
        feats = model.features(x).float()
        fc = model.image.classifier
        logits = torch.nn.functional.conv2d(feats, fc.weight[:, :, None, None], fc.bias)
        logits = torch.nn.functional.avg_pool2d(logits, 3, stride=1, padding=1, count_include_pad=False)
        probs = (logits + logits.mean(dim=(-2, -1), keepdim=True).log_softmax(1)).softmax(1)[0]  # 1000 x h x w
        w = model.bridge(model.text.embed(labels))[:, :NUM_CLASSES]  # the bridge rows (pinned in test_offline)
        bridge = torch.einsum("chw,nc->nhw", probs, w) / w.sum(1).clamp_min(1).sqrt()[:, None, None]
        prior, size = model.class_prior, w.sum(1)  # prior_lift: / (mass under the photo prior / under a uniform one)
        rel = ((w @ prior) / (size * prior.mean())).clamp(1e-3, model.cfg.prior_lift_max)
        rel = torch.where(size > 0, rel, torch.ones_like(rel))
        bridge = bridge / (rel ** model.cfg.prior_lift)[:, None, None]
        hd = model.head
        f = hd.image_proj.weight[:, :, 0, 0] @ feats[0].flatten(1) + hd.image_proj.bias[:, None]
        f = f / f.norm(dim=0, keepdim=True)
        emb = model.text.embed(labels)
        t = emb @ hd.text_proj.weight.t()
        t = t / t.norm(dim=1, keepdim=True)
        from safetensors.torch import load_file

        file = load_file(str(ASSETS / f"{HEADS}.safetensors"))  # the vocabulary and its trust, as shipped
        vocab = file["vocab_embeddings"].float()
        known, nearest = (emb @ (vocab / vocab.norm(dim=1, keepdim=True)).t()).max(dim=1)
        gate = ((known - model.cfg.head_gate_low) / (model.cfg.head_gate_high - model.cfg.head_gate_low)).clamp(0, 1)
        gate = gate * file["vocab_trust"][nearest]  # the nearest caption word's held-out trust
        gate[3] = 0  # "background" is never a head label
        head = torch.sigmoid(hd.logit_scale.exp() * (t @ f) + hd.bias) * gate[:, None] * model.cfg.head_weight
        raw = (torch.einsum("chw,nc->nhw", probs, w.clamp(0, 1)).clamp(0, 1) * (1 - gate)[:, None, None]).flatten(1)
        for i in range(3):  # the other non-background labels' bridge-kept mass damps label i's head
            others = [j for j in range(3) if j != i]
            head[i] = head[i] * (1 - 0.5 * raw[others].max(0).values).clamp_min(0)
        want = torch.maximum(bridge.flatten(1), head)
        claim = torch.maximum((w[:3].max(0).values.clamp(0, 1) @ probs.flatten(1)), head[:3].max(0).values)
        want[3] = 0.3 * (1 - claim).clamp_min(0) + 0.05
    torch.testing.assert_close(got.flatten(1), want, atol=1e-5, rtol=1e-4)
    assert gate[2] < gate[1]  # a word the captions never name leans on the bridge


def test_bridge_contrast_drops_weak_diffuse_labels_only(model):
    """bridge_contrast=1: a label the bridge scores weakly everywhere (0.03 at every cell, like "sign
    symbol" in a street scene) loses that level; strong local evidence (0.6 on half the map) keeps its
    map; a weak but peaked label keeps its peak less its mean. 0 (the default): the raw masses."""
    probs = torch.zeros(1, NUM_CLASSES, 4, 4)
    probs[0, 0] = 0.03  # diffuse, weak
    probs[0, 1, :, :2] = 0.6  # strong, local (mean 0.3 >= 2 x bridge_contrast_cap)
    probs[0, 2, 0, 0] = 0.2  # weak overall (mean 0.0125 < cap), one peak
    probs[0, 3] = 1 - probs[0, :3].sum(0)
    rows = torch.zeros(3, NUM_CLASSES + 1)
    rows[0, 0] = rows[1, 1] = rows[2, 2] = 1
    cfg0 = model.cfg
    try:
        model.cfg = replace(cfg0, prior_lift=0.0)  # the raw masses (no photo-prior lift)
        before = model.scores(probs, rows)[0]
        model.cfg = replace(cfg0, bridge_contrast=1.0, prior_lift=0.0)
        on = model.scores(probs, rows)[0]
        image_level = model.scores(probs.mean(dim=(-2, -1)), rows)[0]
    finally:
        model.cfg = cfg0
    torch.testing.assert_close(before, probs[0, :3])  # off: the raw masses
    assert on[0].max() < 1e-6  # the diffuse label is gone
    torch.testing.assert_close(on[1], before[1])  # strong evidence untouched
    torch.testing.assert_close(on[2], (before[2] - 0.0125).clamp_min(0))
    assert on[2, 0, 0] > 0.18  # the peak stays
    torch.testing.assert_close(image_level, probs[0, :3].mean(dim=(-2, -1)))  # image-level scores: no map, no change


def test_prior_lift_by_hand(model):
    """prior_lift=1: a bridge label's score is divided by rel = (w . prior) / (sum w x mean prior), its mass
    under the shipped photo prior relative to a uniform one, clamped to at most prior_lift_max (1: a label
    whose classes the photos rarely show is lifted, a common one kept); 0: unchanged. With the shipped prior
    "cat" and "dining table" are rare, "person" (its clothes) is not; the background row is never lifted."""
    prior = model.class_prior
    order = prior.argsort()
    rare, common = order[:2].tolist(), order[-2:].tolist()
    probs = torch.zeros(1, NUM_CLASSES, 2, 2)
    probs[0, rare[0]] = 0.2
    probs[0, common[0]] = 0.3
    probs[0, order[500]] = 0.5
    rows = torch.zeros(3, NUM_CLASSES + 1)
    rows[0, rare] = 1
    rows[1, common] = 1
    rows[2, NUM_CLASSES] = 1  # background
    cfg0 = model.cfg
    try:
        model.cfg = replace(cfg0, prior_lift=0.0)
        off = model.scores(probs, rows)[0]
        model.cfg = replace(cfg0, prior_lift=1.0, prior_lift_max=1.0)
        on = model.scores(probs, rows)[0]
        model.cfg = replace(cfg0, prior_lift=1.0, prior_lift_max=1e9)
        both = model.scores(probs, rows)[0]
    finally:
        model.cfg = cfg0
    rel = torch.stack([prior[rare].sum(), prior[common].sum()]) / (2 * prior.mean())
    assert rel[0] < 0.1 and rel[1] > 1
    torch.testing.assert_close(off[:2], torch.stack([probs[0, rare[0]], probs[0, common[0]]]) / 2 ** 0.5)
    torch.testing.assert_close(on[0], off[0] / rel[0])  # lifted
    torch.testing.assert_close(on[1], off[1])  # a common label is not lowered at prior_lift_max 1
    torch.testing.assert_close(both[1], off[1] / rel[1])  # ... and is without the cap
    torch.testing.assert_close(on[2], off[2])  # background: the unclaimed mass, as before
    w = model.embed_texts(["cat", "dining table", "person"])[:, :NUM_CLASSES]
    rel = (w @ prior) / (w.sum(1) * prior.mean())
    assert rel[0] < 0.5 and rel[1] < 0.5 and rel[2] > 1, rel


def test_packaged_photo_cat_beats_person_and_dog(model):
    with torch.no_grad():
        s = model.scores(model.encode_dense(_pixels(Image.open(example_path("chelsea")))),
                         model.embed_texts(["cat", "person", "dog"]))[0]
    h, w = s.shape[-2:]
    centre = s[:, h // 4: 3 * h // 4, w // 4: 3 * w // 4].mean(dim=(1, 2))
    assert centre[0] > centre[1] and centre[0] > centre[2], centre


def test_person_beats_dog_on_photos_of_people(model, coco_mini):
    """COCO-MINI train2017 photos with people and no dog: over the person pixels "person" scores above "dog"
    (the bridge-only model scores people only through their clothes)."""
    meta = json.loads((coco_mini / "images_meta.json").read_text())
    labels = json.loads((coco_mini / "labels.json").read_text())
    ids = [m["image"] for m in sorted(meta, key=lambda m: m["image"]) if m["split"] == "val2017"
           and "person" in labels.get(m["image"], []) and "dog" not in labels.get(m["image"], [])][:4]
    assert ids
    names = [n for n in (coco_mini / "classes_voc21.txt").read_text().split("\n") if n.strip()]
    person = names.index("person")
    text = model.embed_texts(["person", "dog", "background"])
    wins, hit = [], []
    for i in ids:
        img = Image.open(coco_mini / "images" / f"{i}.jpg")
        with torch.no_grad():
            z = model.dense_logits(model.encode_dense(_pixels(img)), text)
        mask = torch.from_numpy(np.array(Image.open(coco_mini / "masks_voc21" / f"{i}.png")).astype(np.int64))
        z = torch.nn.functional.interpolate(z, size=mask.shape, mode="bilinear", align_corners=False)[0]
        sel = mask == person
        wins.append(bool(z[0][sel].mean() > z[1][sel].mean()))
        hit.append(float((z.argmax(0)[sel] == 0).float().mean()))
    assert all(wins), (ids, wins)
    assert sum(hit) / len(hit) > 0.3, hit  # "person" takes most of the person pixels


def test_build_script_tiny_run_changes_the_scores(model, tmp_path):
    data = tmp_path / "captions"
    (data / "images").mkdir(parents=True)
    caps = {"chelsea": ["a cat sits by a wall", "a tabby cat", "the cat looks up"],
            "coffee": ["a cup of coffee on a table", "coffee in a white cup", "a mug of coffee"]}
    with open(data / "captions.jsonl", "w") as fh:
        for name, c in caps.items():
            shutil.copy(example_path(name), data / "images" / f"{name}.jpg")
            fh.write(json.dumps({"image": f"images/{name}.jpg", "captions": c}) + "\n")
    mod = _build_module()
    out = tmp_path / "heads"
    card = mod.main(["--flickr", str(data), "--coco", str(tmp_path / "none"), "--out", str(out), "--limit", "2",
                     "--epochs", "3", "--trust-epochs", "2", "--short-side", "160"])
    assert {"cat", "coffee", "cup"} <= set(card["vocabulary"]) and card["data"]["images"] == 2
    assert len(card["vocab_trust"]) == len(card["vocabulary"]) and all(0 <= v <= 1 for v in card["vocab_trust"])
    tiny = OfflineModel(heads_dir=out)  # loads strictly
    assert tiny.fingerprint != model.fingerprint
    x = _pixels(Image.open(example_path("chelsea")), 224)
    labels = ["cat", "cup", "background"]
    # two photos cannot out-rank the bridge on held-out folds (trust ~0: the bridge speaks), so the head's
    # own effect is compared with the trust factor off in both models
    untrusted = OfflineModel(OfflineCfg(head_trust=False))
    tiny.cfg = replace(tiny.cfg, head_trust=False)
    with torch.no_grad():
        a = untrusted.scores(untrusted.encode_dense(x), untrusted.embed_texts(labels))
        b = tiny.scores(tiny.encode_dense(x), tiny.embed_texts(labels))
    assert (a - b).abs().max() > 1e-3


def _build_module():
    spec = importlib.util.spec_from_file_location("build_offline_heads", ROOT / "scripts" / "build_offline_heads.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_trust_average_precision_by_hand():
    """The per-word trust ranks held-out images by image-level AP: the mean, over the positives, of the
    precision at each positive's rank (written out here); a word without positives or negatives has none."""
    mod = _build_module()
    g = torch.Generator().manual_seed(0)
    score = torch.rand(9, 3, generator=g)
    target = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1],
                           [0, 0, 1], [1, 0, 1]])
    got = mod.average_precision(score, target)
    order = sorted(range(9), key=lambda i: -float(score[i, 0]))
    hits, precs = 0, []
    for rank, i in enumerate(order, start=1):
        if target[i, 0]:
            hits += 1
            precs.append(hits / rank)
    assert abs(float(got[0]) - sum(precs) / len(precs)) < 1e-6
    assert torch.isnan(got[1]) and torch.isnan(got[2])  # no positive / no negative
    # a perfect ranking has AP 1
    assert float(mod.average_precision(target[:, :1].float(), target[:, :1])[0]) == 1.0


def test_implied_stuff_targets():
    """A caption naming a scene word of IMPLIED (beach) gives its stuff word (sky) the soft target, never
    lowering a named one; an image naming none keeps 0; implied_target=0 is the plain caption targets."""
    mod = _build_module()
    pairs = [(Path(f"{i}.jpg"), caps) for i, caps in enumerate((
        ["a dog runs on the beach", "a dog on the sand"] * 3,
        ["a dog under a blue sky", "the sky over a dog", "a dog and the sky"] * 2,
        ["a dog on a sofa", "a dog sleeps on a sofa"] * 3))]
    vocab, y = mod.caption_targets(pairs, 1, 100, implied_target=0.5)
    sky = vocab.index("sky")
    assert y[:, sky].tolist() == [0.5, 1.0, 0.0]
    vocab0, y0 = mod.caption_targets(pairs, 1, 100, implied_target=0.0)
    assert vocab0 == vocab and y0[0, sky] == 0 and torch.equal(y0[1:], y[1:])


def test_build_output_stride_16_features_and_cache_check(tmp_path):
    """``--output-stride 16`` trains on the dilated trunk's maps (twice as many rows and columns as
    stride 32: what OfflineCfg(output_stride=16) scores at run time), the card says which, and a
    feature cache of the other stride is refused, not silently reused."""
    data = tmp_path / "captions"
    (data / "images").mkdir(parents=True)
    with open(data / "captions.jsonl", "w") as fh:
        for name, c in {"chelsea": ["a cat by a wall"] * 3, "coffee": ["a cup of coffee"] * 3}.items():
            shutil.copy(example_path(name), data / "images" / f"{name}.jpg")
            fh.write(json.dumps({"image": f"images/{name}.jpg", "captions": c}) + "\n")
    mod = _build_module()
    pairs = mod.read_pairs(data, None, 2)
    f32 = mod.image_features(pairs, 160)
    f16 = mod.image_features(pairs, 160, output_stride=16)
    for a, b in zip(f32, f16):
        assert tuple(b.shape[-2:]) == (2 * a.shape[-2], 2 * a.shape[-1]) and b.shape[0] == a.shape[0] == 1280
    cache = tmp_path / "feats.pt"
    common = ["--flickr", str(data), "--coco", str(tmp_path / "none"), "--limit", "2", "--epochs", "1",
              "--trust-folds", "0", "--short-side", "160", "--feature-cache", str(cache)]
    card = mod.main([*common, "--out", str(tmp_path / "h16"), "--output-stride", "16"])
    assert "stride-16" in card["recipe"]["features"] and "--output-stride 16" in card["command"]
    OfflineModel(OfflineCfg(output_stride=16), heads_dir=tmp_path / "h16")  # loads strictly
    with pytest.raises(SystemExit, match="output-stride"):
        mod.main([*common, "--out", str(tmp_path / "h32")])  # the stride-16 cache with stride 32
