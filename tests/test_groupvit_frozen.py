"""GroupViT on the offline default's frozen towers (``model.backbone=lite0``, ``model.text_backbone=
minilm``): the cached-feature training path of ``textseg train groupvit`` learns (its loss falls),
leaves both towers untouched, and its model file reloads and segments from pixels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from textseg.data.synthetic import make_scenes

FROZEN = ["model.image_size=128", "model.patch_size=32", "model.backbone=lite0", "model.text_backbone=minilm",
          "model.width=32", "model.heads=2", "model.depths=[1,1,1]", "model.num_group_tokens=[4,2,0]",
          "model.num_output_groups=[4,2,0]", "model.embed_dim=16", "model.proj_hidden=32",
          "model.drop_path_rate=0.0", "data.augment=none", "loss.template=a photo of a {}.",
          "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=0", "train.weight_decay=0.0",
          "train.log_every=1", "train.eval_every=0", "train.progress=false", "train.tensorboard=false",
          "train.resume=none", "train.device=cpu"]


@pytest.fixture(scope="module")
def scene_folders(tmp_path_factory) -> tuple[Path, Path]:
    """Two caption folders of synthetic scenes (6 + 2 images), captions naming their objects."""
    roots = []
    for name, n, seed in (("a", 6, 1), ("b", 2, 2)):
        root = tmp_path_factory.mktemp(name)
        (root / "images").mkdir()
        scenes = make_scenes(n, size=128, seed=seed)
        with open(root / "captions.jsonl", "w") as f:
            for i, (img, cap) in enumerate(zip(scenes.images, scenes.captions)):
                Image.fromarray(img).save(root / "images" / f"{i}.png")
                f.write(json.dumps({"image": f"images/{i}.png", "captions": [cap]}) + "\n")
        roots.append(root)
    return roots[0], roots[1]


@pytest.mark.parametrize("variant", ["pure", "faithful"])
def test_frozen_towers_cached_training_learns_and_reloads(scene_folders, tmp_path, variant):
    from textseg.train.config import load_config
    from textseg.train.groupvit import GroupViTRecipeConfig, JoinedCaptions, build_trainer
    from textseg.weights.load import load_model

    torch.set_num_threads(1)
    a, b = scene_folders
    cfg = load_config(GroupViTRecipeConfig, None, [
        *FROZEN, f"model.variant={variant}", f"data.train={a}", f"data.more_train=[{b}]",
        f"data.feature_cache={tmp_path / 'features'}", "train.steps=25", f"train.out_dir={tmp_path / 'run'}"])
    trainer = build_trainer(cfg)
    assert isinstance(trainer.dataset, JoinedCaptions) and len(trainer.dataset) == 8  # both folders
    assert trainer.dataset[0]["image"].shape == (1280, 4, 4)  # cached Lite0 features, not pixels
    assert len(list((tmp_path / "features").glob("groupvit-*.pt"))) == 2
    model = trainer.module.model
    towers = {k: v.clone() for k, v in model.state_dict().items()
              if k.startswith(("visual.patch_embed.backbone.", "text.encoder."))}
    assert towers and not any(p.requires_grad for n, p in model.named_parameters()
                              if n.startswith(("visual.patch_embed.backbone.", "text.encoder.")))
    trainer.fit()
    losses = [e["loss"] for e in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines())
              if e["kind"] == "train"]
    assert len(losses) == 25
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, (first, last)  # it learns from the cached features
    trained = trainer.final_module().model
    for k, v in trained.state_dict().items():
        if k in towers:
            assert torch.equal(v, towers[k]), k  # frozen towers untouched
    path = trainer.save_model(trained, {"source": "test"})
    loaded = load_model(weights=str(path))
    assert loaded.cfg.vision.backbone == "lite0" and loaded.cfg.text_backbone == "minilm"
    pixels = torch.randn(1, 3, 128, 128)
    text = loaded.encode_text(loaded.tokenize(["a photo of a circle.", "a photo of a square."]))
    trained.eval()
    want = trained.segment_official(pixels, trained.encode_text(trained.tokenize(
        ["a photo of a circle.", "a photo of a square."])), background_threshold=0.95)
    got = loaded.segment_official(pixels, text, background_threshold=0.95)
    assert got.shape == (1, 3, 128, 128) and torch.allclose(got, want, atol=1e-5)
