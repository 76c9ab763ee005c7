"""The co-occurrence scene generator and the evaluator probe command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from textseg.data.cooccurrence import (
    BACKGROUNDS,
    CLASSES,
    GROUND,
    NEUTRAL,
    OBJECTS,
    PAIRS,
    SAND,
    make_scenes,
    masked_views,
    write_scene_folder,
)
from textseg.errors import TextsegError
from textseg.models.base import DualEncoder, PreprocessCfg


def test_scenes_pair_objects_with_their_background_and_name_both(tmp_path):
    scenes = make_scenes(200, size=64, seed=0)
    paired = total = bg_only = 0
    for sc in scenes:
        present = {CLASSES[k] for k in np.unique(sc.mask) if k}
        assert present == set(sc.labels)
        bgs = {BACKGROUNDS[m - 1] for m in np.unique(sc.context) if m}
        assert set(sc.captions[1].split(", ")) == set(sc.labels) | bgs  # every object and background named
        bg_only += not sc.labels and bool(bgs)
        for c in sc.labels:
            total += 1
            paired += PAIRS[c] in bgs
    assert 0.75 < paired / total < 0.95  # the pair appears together in most images of the class
    assert bg_only > 5  # backgrounds also appear alone
    a, b = make_scenes(3, 64, seed=5), make_scenes(3, 64, seed=5)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    root = write_scene_folder(scenes[:4], tmp_path / "s")
    assert len(json.loads((root / "labels.json").read_text())) == 4
    assert (root / "background_wrong.txt").read_text().splitlines()[0] == "boat: rails"
    from textseg.wsss.clims import load_background

    words, applies = load_background(root / "background_all.txt", list(OBJECTS))
    assert words == ["water", "rails", "sky", "grass"] and applies.all()  # every word for every class
    words, applies = load_background(root / "background.txt", list(OBJECTS))
    assert applies.sum() == 4 and applies[OBJECTS.index("plane"), words.index("sky")]
    blank = [s for s in make_scenes(60, 64, seed=0, p_blank=0.3) if s.captions[1] == GROUND]
    assert 8 < len(blank) < 30  # the evaluator corpus's blank "ground" scenes: nothing in them
    assert all(not s.labels and not s.mask.any() and not s.context.any() for s in blank)
    # part captions (the benchmark's evaluator corpus): one "a photo of OBJECT." per object of a scene
    # that holds more than the object; "all" also names each background alone
    for mode in ("objects", "all"):
        parts = make_scenes(40, 64, seed=0, part_captions=mode)
        for sc, plain in zip(parts, make_scenes(40, 64, seed=0)):
            assert sc.captions[:2] == plain.captions  # the same scenes, the same full captions
            named = sc.captions[1].split(", ")
            want = (named if mode == "all" else sc.labels) if len(named) > 1 else []
            assert sorted(sc.captions[2:]) == sorted(f"a photo of {w}." for w in want)
        assert any(len(sc.captions) > 2 for sc in parts)
    with pytest.raises(TextsegError, match="part_captions"):
        make_scenes(2, 64, part_captions="some")
    # ground="sand": the same scenes (labels, masks, captions) on a ground far from the ImageNet mean colour
    for sand, plain in zip(make_scenes(20, 64, seed=1, ground="sand"), make_scenes(20, 64, seed=1)):
        assert np.array_equal(sand.mask, plain.mask) and sand.captions == plain.captions
        free = (sand.mask == 0) & (sand.context == 0)
        if free.any():
            assert np.abs(sand.image[free].mean(0) - SAND).max() < 6
            assert np.abs(plain.image[free].mean(0) - NEUTRAL).max() < 6
    with pytest.raises(TextsegError, match="ground"):
        make_scenes(2, 64, ground="snow")


def _pair_stats(scenes):
    paired = total = bg_only = beside = 0
    for sc in scenes:
        bgs = {BACKGROUNDS[m - 1] for m in np.unique(sc.context) if m}
        bg_only += not sc.labels and bool(bgs)
        beside += bool(sc.labels) and bool(bgs - {PAIRS[c] for c in sc.labels})
        for c in sc.labels:
            total += 1
            paired += PAIRS[c] in bgs
    return paired / total, bg_only, beside


def test_scene_distribution_knobs_the_benchmark_sets(tmp_path, monkeypatch):
    """p_pair = 1: every object on its own background; backgrounds still appear alone (p_empty) and beside
    other classes (p_extra); the benchmark's --train-p-* flags reach make_scenes for train and held-out."""
    import importlib.util
    from pathlib import Path

    always = make_scenes(300, 48, seed=0, p_pair=1.0, p_empty=0.03)
    frac, bg_only, beside = _pair_stats(always)
    # measured: 0.997 (one two-object scene of 300 with a third, extra ground background: make_scene splits
    # the bottom band in two halves only, so the extra one paints over the cow's grass), 9, 33
    assert frac > 0.99 and 3 <= bg_only <= 20 and beside > 10
    frac, bg_only, beside = _pair_stats(make_scenes(300, 48, seed=0))  # the defaults
    assert 0.78 < frac < 0.92 and bg_only > 15  # measured: 0.85, 27
    _, none_alone, _ = _pair_stats(make_scenes(300, 48, seed=0, p_pair=1.0, p_empty=0.0))
    assert none_alone == 0
    spec = importlib.util.spec_from_file_location(
        "clims_cooccurrence", Path(__file__).parents[1] / "benchmarks" / "clims_cooccurrence.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []

    def fake_make_scenes(n, size, seed=0, **kw):
        calls.append((n, seed, kw))
        if len(calls) == 2:
            raise KeyboardInterrupt  # stop before the evaluator
        return make_scenes(2, 48, seed=seed)

    monkeypatch.setattr(bench, "make_scenes", fake_make_scenes)
    monkeypatch.setattr("sys.argv", ["x", "--out", str(tmp_path / "run"), "--train", "7", "--val", "5",
                                     "--train-p-pair", "1.0", "--train-p-empty", "0.03", "--train-p-extra", "0.2"])
    with pytest.raises(KeyboardInterrupt):
        bench.main()
    want = {"p_pair": 1.0, "p_empty": 0.03, "p_extra": 0.2, "ground": "neutral"}
    assert calls == [(7, 1000, want), (5, 2000, want)]  # train and held-out: the same distribution


def test_masked_views_are_what_clims_feeds_the_evaluator():
    from textseg.constants import IMAGENET_MEAN, IMAGENET_STD, OPENAI_MEAN, OPENAI_STD

    scenes = [s for s in make_scenes(30, 64, seed=1) if s.labels]
    views = masked_views(scenes, p=1.0, seed=0, strength=(1.0, 1.0), blank=1.0)
    assert len(views) == sum(1 + 2 * len(s.labels) for s in scenes)  # one blank, two views per object
    it = iter(views)
    em, es = np.asarray(OPENAI_MEAN), np.asarray(OPENAI_STD)
    for sc in scenes:
        blank = next(it)
        assert blank.captions[1] == GROUND and np.abs(blank.image - em * 255).max() <= 1  # x * 0: the mean
        z = (sc.image / 255 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
        for c in sc.labels:
            m = sc.mask == CLASSES.index(c)
            fg, bg = next(it), next(it)
            assert fg.captions == [f"a photo of {c}.", c] and fg.labels == [c]  # the object word alone
            seen = (fg.image / 255 - em) / es  # what the evaluator, normalised its own way, sees
            ok = m[..., None] & (fg.image < 255) & (fg.image > 0)  # saturated channels clip at 0 / 255
            assert ok.any() and np.abs(seen[ok] - z[ok]).max() < 0.05
            assert np.abs(seen[~m]).max() < 0.05
            rest = set(bg.captions[1].split(", "))
            assert c not in rest and rest == ({*sc.labels, *sc.captions[1].split(", ")} - {c} or {GROUND})
            assert not (bg.mask == CLASSES.index(c)).any() and np.abs((bg.image / 255 - em) / es)[m].max() < 0.05
    assert masked_views(scenes, p=0.0) == []


# ----------------------------------------------------------------- a short CLIMS run on the scenes
class SceneColourEvaluator(DualEncoder):
    """A hand-written image-text model that knows the words of boat/train scenes by colour: the image
    embedding is the mean over pixels (in [0, 1]) of a red-hull, yellow-body, blue-water and
    brown-ballast indicator plus a constant; each word is one axis. It is differentiable in the pixels,
    as CLIMS needs, and tells an object from its co-occurring background."""

    name = "scene-colour"
    preprocess_cfg = PreprocessCfg(image_size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    AXES = {"boat": 0, "train": 1, "water": 2, "rails": 3}

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # embed_texts' device lookup

    def encode_image(self, pixels, normalize=False):
        r, g, b = pixels.unbind(1)
        # positively homogeneous (no offsets): a map at strength a on the water shows a x the water, so
        # a faint spill onto it is seen, as a CLIP sees a dimmed region (thresholded indicators were blind
        # to a spill below their offset, and CLIMS then spread onto the water on some seeds)
        feats = [F.relu(r - 1.5 * g - 1.5 * b), F.relu(torch.minimum(r, g) - 3 * b), F.relu(b - 1.5 * r - 0.5 * g),
                 10 * F.relu(torch.minimum(r - g, g - b) - 0.3 * (r - b))]
        e = torch.stack([f.mean(dim=(1, 2)) for f in feats], dim=1)
        return torch.cat([e, torch.full_like(e[:, :1], 0.02)], dim=1)

    def embed_texts(self, texts, templates=("{}",)):
        out = torch.zeros(len(texts), 5)
        for i, t in enumerate(texts):
            out[i, self.AXES.get(t.removeprefix("a photo of ").rstrip("."), 4)] = 1.0
        return out


def test_short_clims_run_lowers_cooccurring_background_activation(tmp_path, monkeypatch):
    """Boats on water, trains on rails (85 % of the time): the plain CAM fires on the water and rails;
    CLIMS (official loss weights, from the same baseline, same steps) with an evaluator that knows
    the words must cut that false activation. Measured: 10.8 % -> 2.1 % here, with 1 or 2 threads; with
    the scene / run seeds offset by 10, 20, 30, 40: 11.0 -> 2.1, 8.0 -> 0.9, 11.6 -> 0.3, 12.9 -> 8.4 (worst
    ratio 0.65); asserted: a cut of at least 30 %, the issue's goal."""
    import textseg.train.cam as cam_recipe
    from textseg.data.cooccurrence import evaluate_scene_cams
    from textseg.train.cam import CAMTrainCfg, train_cam
    from textseg.train.config import load_config
    from textseg.wsss.pseudo_labels import load_cam_model

    def scenes(n, seed):
        keep = [s for s in make_scenes(4 * n, size=48, seed=seed) if set(s.labels) <= {"boat", "train"}]
        return keep[:n]

    train = write_scene_folder(scenes(48, 0), tmp_path / "train")
    val = write_scene_folder(scenes(16, 1), tmp_path / "val")
    monkeypatch.setattr(cam_recipe, "load_evaluator", lambda name, weights="": SceneColourEvaluator())
    common = ["train.progress=false", "train.tensorboard=false", "train.device=cpu", "train.resume=none",
              "train.eval_every=0", f"data.root={train}", "backbone=tiny", "pretrained=false", "freeze_bn=false",
              "data.crop_size=48", "train.batch_size=16", "threads=2"]

    def run(name, steps, lr, *extra):
        out = tmp_path / name
        train_cam(load_config(CAMTrainCfg, None, [*common, f"train.out_dir={out}", f"train.steps={steps}",
                                                  f"train.lr={lr}", *extra]))
        return evaluate_scene_cams(load_cam_model(out / "model.safetensors"), val, scales=(1.0,))

    run("base", 50, 0.05, "train.seed=0")
    init = f"init={tmp_path / 'base' / 'model.safetensors'}"
    cam = run("cam", 20, 0.05, init, "train.seed=1")
    clims = run("clims", 20, 0.005, init, "train.seed=1", "mode=clims", "clims.input_norm=evaluator",
                f"clims.background={train / 'background.txt'}", "clims.cbs_threshold=0.26")
    assert cam["bg_false_activation"] > 5
    assert clims["bg_false_activation"] < 0.7 * cam["bg_false_activation"]
    for score in (cam, clims):  # the per-class IoU at the chosen threshold averages to the mIoU
        assert abs(np.nanmean(list(score["class_iou"].values())) - score["miou"]) < 0.05
        assert 0 <= score["ground_activation"] <= 100


def test_scene_figure_grid_size_cells_and_atomic_write(tmp_path):
    from PIL import Image

    from textseg.data.cooccurrence import scene_figure
    from textseg.errors import TextsegError

    h, w, scale, gap = 6, 8, 3, 4
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(2)]
    gt = [np.zeros((h, w), np.uint8), np.full((h, w), 2, np.uint8)]
    path = tmp_path / "fig" / "f.png"
    out = scene_figure(path, images, {"ground truth": gt, "cam": gt}, scale=scale, gap=gap)
    assert out == path and sorted(p.name for p in path.parent.iterdir()) == ["f.png"]  # no temp file left
    fig = np.asarray(Image.open(path).convert("RGB"))
    assert fig.shape[1] == 3 * (w * scale + gap) + gap and fig.shape[0] > 2 * h * scale
    # The image column is the image upscaled by nearest neighbour; find its top-left cell by content.
    cell = np.repeat(np.repeat(images[0], scale, 0), scale, 1)
    ys = [y for y in range(fig.shape[0] - h * scale) if (fig[y, gap] == cell[0, 0]).all()
          and (fig[y : y + h * scale, gap : gap + w * scale] == cell).all()]
    assert len(ys) == 1
    y0 = ys[0]
    # Background (0) is untinted: the ground-truth cell of scene 0 is the image itself (bar no borders).
    x1 = gap + (w * scale + gap)
    assert (fig[y0 : y0 + h * scale, x1 : x1 + w * scale] == cell).all()
    y1 = y0 + h * scale + gap  # scene 1 is all class 2: its ground-truth cell is tinted, unlike its image cell
    assert (fig[y1 : y1 + h * scale, gap : gap + w * scale] == np.repeat(np.repeat(images[1], scale, 0), scale, 1)).all()
    assert (fig[y1 : y1 + h * scale, x1 : x1 + w * scale] != fig[y1 : y1 + h * scale, gap : gap + w * scale]).any()
    with pytest.raises(TextsegError):
        scene_figure(tmp_path / "bad.png", images, {"gt": gt[:1]})
    assert not (tmp_path / "bad.png").exists()


def test_map_calibration_cam_resolution_map_and_batch_summed_cbs(tmp_path):
    """benchmarks/clims_cooccurrence.py's map_calibration: ``gt_cam`` is the object mask at the CAM's
    resolution (at stride 1 exactly the mask), ``by_class``'s third number weighs CBS as the official sum
    over a batch's pairs (linear in ``batch_pairs``, its slope gamma x that class's per-pair CBS), and the
    empty map's cosine is the blank image's."""
    import importlib.util
    from pathlib import Path

    from textseg.wsss.clims import CLIMSLoss

    spec = importlib.util.spec_from_file_location(
        "clims_cooccurrence", Path(__file__).parents[1] / "benchmarks" / "clims_cooccurrence.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    scenes = [s for s in make_scenes(60, size=32, seed=5) if s.labels == ["boat"]][:5]
    val = write_scene_folder(scenes, tmp_path / "val")
    (tmp_path / "bg.txt").write_text("boat: water\ntrain: rails\n")
    ev = SceneColourEvaluator()
    kw = {"cbs_threshold": None, "weights": (10.0, 24.0, 2.0, 0.2)}
    one = bench.map_calibration(val, ev, tmp_path / "bg.txt", cam_stride=1, batch_pairs=1.0, **kw)
    five = bench.map_calibration(val, ev, tmp_path / "bg.txt", cam_stride=8, batch_pairs=5.0, **kw)
    assert len(scenes) == 5 and one["pairs"] == 5 and set(one["gt"]["by_class"]) == {"boat"}
    assert one["gt_cam"]["s_fg"] == pytest.approx(one["gt"]["s_fg"], abs=1e-4)
    assert one["gt_cam"]["loss"] == pytest.approx(one["gt"]["loss"], abs=2e-3)
    assert abs(five["gt_cam"]["s_fg"] - five["gt"]["s_fg"]) > 1e-3  # 4 x 4 maps blur the boat
    for name in ("gt", "empty", "gt_plus_bg"):  # boat only: the class's per-pair CBS is the row's
        s_fg, s_bg, lb = one[name]["by_class"]["boat"]
        assert (s_fg, s_bg) == (pytest.approx(one[name]["s_fg"], abs=1e-3), pytest.approx(one[name]["s_bg"], abs=1e-3))
        assert lb == pytest.approx(one[name]["loss"], abs=2e-3)  # one pair a batch: the per-pair loss
        slope = (five[name]["by_class"]["boat"][2] - lb) / 4
        assert slope == pytest.approx(2.0 * one[name]["cbs"], abs=2e-3)
    # the object's map grown onto its own water costs CBS; the exact boat much less
    assert one["gt_plus_bg"]["cbs"] > one["gt"]["cbs"] + 0.05
    loss = CLIMSLoss(ev, list(OBJECTS), tmp_path / "bg.txt", cbs_threshold=None)
    blank = loss.similarity(torch.zeros(1, 3, 32, 32), loss.class_text)[0]
    assert one["empty"]["by_class"]["boat"][0] == pytest.approx(float(blank[OBJECTS.index("boat")]), abs=1e-3)
