"""CLIP recipe end to end on a tiny CLIP: zero-shot accuracy and retrieval rise with training, a
locked tower stays bit-identical, and ``textseg train clip`` runs from YAML + --set and resumes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from textseg.cli import main
from textseg.data.imagetext import CaptionDataset, TarShardDataset, read_captions, write_tar_shard
from textseg.preprocess import Preprocess
from textseg.train.clip import ClipRecipeConfig, build_trainer, tower_features
from textseg.train.config import load_config

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
          "white": (250, 250, 250), "black": (5, 5, 5)}


def _make_folder(root, n_per_class: int, seed: int):
    """Captioned 32x32 images: a coloured block at a random place on grey noise."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    classes = [f"{c} block" for c in COLORS]
    lines, labels = [], {}
    for ci, name in enumerate(classes):
        color = COLORS[name.split()[0]]
        for j in range(n_per_class):
            img = rng.integers(90, 160, (32, 32, 3)).astype(np.uint8)
            y0, x0 = rng.integers(0, 16, size=2)
            img[y0 : y0 + 16, x0 : x0 + 16] = color
            key = f"{ci}_{j}"
            Image.fromarray(img).save(root / "images" / f"{key}.png")
            lines.append(json.dumps({"image": f"images/{key}.png",
                                     "captions": [f"a {name}", f"the {name.replace('block', 'square')}"]}))
            labels[key] = [name]
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    (root / "labels.json").write_text(json.dumps(labels))
    (root / "classes.txt").write_text("background\n" + "\n".join(classes) + "\n")
    return root


TINY = [
    "model.arch=clip", "model.lock_image=false", "model.lock_text=false",
    "model.clip.embed_dim=32", "model.clip.vision.image_size=32", "model.clip.vision.layers=2",
    "model.clip.vision.width=64", "model.clip.vision.patch_size=8", "model.clip.text.context_length=16",
    "model.clip.text.width=64", "model.clip.text.heads=2", "model.clip.text.layers=2",
    "eval.templates=identity", "train.batch_size=12", "train.lr=2e-3", "train.weight_decay=0.01",
    "train.warmup_steps=5", "train.log_every=10", "train.progress=false", "train.tensorboard=false",
    "train.device=cpu", "train.resume=none",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("blocks")
    return _make_folder(root / "train", 6, 0), _make_folder(root / "val", 3, 1)


def test_tiny_clip_learns_zero_shot_and_retrieval(folders, tmp_path):
    train, val = folders
    cfg = load_config(ClipRecipeConfig, None, TINY + [
        f"data.train={train}", f"data.val={val}", f"train.out_dir={tmp_path}", "train.steps=30", "train.eval_every=0",
    ])
    trainer = build_trainer(cfg)
    before = trainer.evaluate()
    after = trainer.fit()
    chance = 100 / 6
    assert before["zeroshot_top1"] < 2.5 * chance
    assert after["zeroshot_top1"] >= 50 and after["zeroshot_top1"] > before["zeroshot_top1"] + 25
    assert after["t2i_R@5"] > before["t2i_R@5"] + 40 and after["i2t_R@5"] > before["i2t_R@5"] + 40
    assert after["loss"] < 1.5 and after["logit_scale"] <= 100


def test_locked_image_tower_stays_fixed_with_tar_shards(folders, tmp_path):
    train, _ = folders
    records = read_captions(train / "captions.jsonl")
    for k in range(2):  # the same data as webdataset shards
        write_tar_shard(tmp_path / f"shard-{k}.tar",
                        [(r.key, r.image.read_bytes(), r.captions[0]) for r in records[k::2]])
    cfg = load_config(ClipRecipeConfig, None, TINY + [
        f"data.train={tmp_path}/shard-{{0..1}}.tar", f"train.out_dir={tmp_path}", "train.steps=3",
        "model.lock_image=true",
        "loss.local_loss=true",
    ])
    trainer = build_trainer(cfg)
    assert isinstance(trainer.dataset, TarShardDataset)
    visual0 = {k: v.clone() for k, v in trainer.module.model.visual.state_dict().items()}
    text0 = trainer.module.model.text.token_embedding.weight.clone()
    trainer.fit()
    for k, v in trainer.module.model.visual.state_dict().items():
        assert torch.equal(v, visual0[k]), k
    assert not torch.equal(trainer.module.model.text.token_embedding.weight, text0)


def test_lock_logit_scale_keeps_the_initial_scale(folders, tmp_path):
    """``model.lock_logit_scale``: the scale stays at ``model.clip.init_logit_scale`` (log 100, real CLIP's
    cap) while it moves when learnable (default)."""
    train, val = folders
    scales = {}
    for lock in (False, True):
        cfg = load_config(ClipRecipeConfig, None, TINY + [
            f"data.train={train}", f"data.val={val}", f"train.out_dir={tmp_path}/{lock}", "train.steps=10",
            "train.eval_every=0", f"model.clip.init_logit_scale={math.log(100)}", f"model.lock_logit_scale={lock}",
        ])
        trainer = build_trainer(cfg)
        assert np.isfinite(trainer.fit()["loss"])
        scales[lock] = float(trainer.module.model.logit_scale)
    assert scales[True] == pytest.approx(math.log(100), abs=1e-6)
    assert abs(scales[False] - math.log(100)) > 1e-3


def test_cli_train_clip_yaml_set_and_resume(folders, tmp_path, capsys):
    train, _ = folders
    cfg_file = tmp_path / "tiny.yaml"
    overrides = dict(item.split("=", 1) for item in TINY)
    cfg_file.write_text(yaml.safe_dump({"train": {"steps": 2, "ckpt_every": 1}, "data": {"train": str(train)}}))
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}") if k != "train.resume"]
    out = tmp_path / "run"
    argv = ["train", "clip", "--config", str(cfg_file), "--set", f"train.out_dir={out}", "--json", *sets]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 2 and np.isfinite(result["loss"])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["steps"] == 2 and saved["model"]["clip"]["vision"]["width"] == 64
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001.pt", "step_00000002.pt"]
    # Rerun with more steps: resumes from step 2 (auto) and continues to 3.
    assert main(argv + ["--set", "train.steps=3"]) == 0
    captured = capsys.readouterr().out
    assert "resumed from" in captured and json.loads(captured.strip().splitlines()[-1])["step"] == 3
    assert main(["train", "clip", "--set", "train.stepz=3"]) == 2
    assert "unknown config key 'train.stepz'" in capsys.readouterr().err


def test_lit_heads_on_cached_frozen_towers(folders, tmp_path):
    """LiT: pretrained EfficientNet-Lite + MiniLM locked, features cached to disk, only the heads train."""
    train, val = folders
    sets = [f"data.train={train}", f"data.val={val}", "model.arch=lit", "model.embed_dim=64",
            f"model.feature_cache={tmp_path}/cache", "eval.templates=identity", "train.batch_size=12",
            "train.steps=25", "train.lr=3e-3", "train.warmup_steps=2", "train.progress=false",
            "train.tensorboard=false", "train.device=cpu", "train.resume=none", f"train.out_dir={tmp_path}/run"]
    trainer = build_trainer(load_config(ClipRecipeConfig, None, sets))
    assert len(list((tmp_path / "cache").glob("lit-*.pt"))) == 2  # train and val features
    towers = {k: v.clone() for k, v in trainer.module.model.image.state_dict().items()}
    before = trainer.evaluate()
    after = trainer.fit()
    assert after["zeroshot_top1"] > before["zeroshot_top1"] + 20 and after["t2i_R@5"] > before["t2i_R@5"] + 20
    assert all(torch.equal(v, towers[k]) for k, v in trainer.module.model.image.state_dict().items())
    # A later run reads the cache (the towers are not run: a broken image tower would fail otherwise).
    train_ds = CaptionDataset(train, transform=Preprocess(trainer.module.model.preprocess_cfg))
    trainer.module.model.image_features = None
    img, txt, owner = tower_features(trainer.module.model, train_ds, 16, torch.device("cpu"), f"{tmp_path}/cache")
    torch.testing.assert_close(img, trainer.dataset.image_feats)
    torch.testing.assert_close(txt, trainer.dataset.text_feats)


@pytest.mark.parametrize("arch", ["clip", "lit"])
def test_stop_resume_equals_uninterrupted_and_the_model_file_classifies(arch, folders, tmp_path, capsys):
    """Full CLIP and LiT (locked packaged towers, cached features, only the heads in checkpoints):
    stop + resume = uninterrupted, then ``textseg classify --weights OUT/model.safetensors``."""
    from train_util import stop_resume_matches

    from textseg.train.clip import train_clip
    from textseg.weights.load import load_model

    train, _ = folders
    if arch == "clip":
        sets = [s for s in TINY if not s.startswith("train.resume")]
    else:
        sets = ["model.arch=lit", "model.embed_dim=16", f"model.feature_cache={tmp_path}/cache",
                "train.batch_size=12", "train.lr=3e-3", "train.progress=false", "train.tensorboard=false",
                "train.device=cpu"]

    def make_cfg(out):
        return load_config(ClipRecipeConfig, None, [*sets, f"data.train={train}", "train.steps=6", "train.ckpt_every=2",
                                                    "train.log_every=1", f"train.out_dir={out}"])

    weights = stop_resume_matches(build_trainer, train_clip, make_cfg, tmp_path, steps=6, stop_at=3)
    ckpt = torch.load(tmp_path / "part" / "checkpoints" / "step_00000006.pt", weights_only=True)
    if arch == "lit":  # only the heads and the scale: the towers are the packaged ones
        assert sorted(ckpt["model"]) == ["model.image_proj.weight", "model.logit_scale", "model.text_proj.weight"]
    model = load_model(weights=weights)
    assert model.name == arch
    capsys.readouterr()
    image = sorted((train / "images").iterdir())[0]
    assert main(["classify", str(image), "--weights", str(weights), "--labels", "red block,green block,blue block",
                 "--json"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.dumps(rec).count("block") >= 3
