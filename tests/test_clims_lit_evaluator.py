"""A LiT checkpoint from ``textseg train clip`` as the CLIMS evaluator and the probe's evaluator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_clims import make_synthetic

from textseg.cli import main as cli_main
from textseg.errors import TextsegError
from textseg.models.lit import LiTConfig, LiTModel
from textseg.train.cam import CAMTrainCfg, CLIMSCfg, build_trainer, load_evaluator
from textseg.train.config import load_config
from textseg.weights.load import save_model


def _tiny_minilm():
    """A 1-layer, 32-wide MiniLM with the real tokenizer: the LiT's text tower at test size (the
    packaged 22M-parameter tower would make the checkpoint 110 MB)."""
    from textseg.models import minilm as mm

    tower = mm.MiniLM(mm.BertCfg(width=32, layers=1, heads=2, mlp=64))
    tower.tokenizer = mm.load_tokenizer(mm.model_dir(), tower.cfg.max_tokens)
    return tower.eval()


def test_lit_checkpoint_is_the_clims_evaluator_and_the_probes(tmp_path, monkeypatch):
    import textseg.models.lit as lit_mod

    monkeypatch.setattr(lit_mod, "minilm", _tiny_minilm)  # every LiT built here, saved or loaded
    torch.manual_seed(0)
    lit = LiTModel(LiTConfig(embed_dim=16, pretrained=False)).eval()
    with torch.no_grad():
        lit.image_proj.weight.normal_()  # heads unlike a fresh model's: the loaded ones must be these
        lit.text_proj.weight.normal_()
    weights = tmp_path / "lit" / "model.safetensors"
    save_model(lit, weights, {"source": "textseg train clip"})

    # textseg train cam with clims.evaluator_weights (the default evaluator name): CLIMS judges with
    # this LiT, frozen, its own heads; a step runs.
    assert CLIMSCfg().evaluator == ""
    data = make_synthetic(tmp_path / "data", n=8, size=48)
    cfg = load_config(CAMTrainCfg, None, [
        f"data.root={data}", "backbone=tiny", "pretrained=false", "mode=clims", f"clims.evaluator_weights={weights}",
        "clims.eval_size=32", "data.crop_size=48", "train.batch_size=4", "train.steps=1", "train.device=cpu",
        f"train.out_dir={tmp_path / 'run'}", "train.progress=false", "train.tensorboard=false", "train.resume=none"])
    trainer = build_trainer(cfg)
    ev = trainer.module._clims[0].evaluator
    assert isinstance(ev, LiTModel) and not ev.training
    assert not any(p.requires_grad for p in ev.parameters())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ev.encode_image(x), lit.encode_image(x), atol=1e-5)
        assert torch.allclose(ev.embed_texts(["a photo of red."]), lit.embed_texts(["a photo of red."]), atol=1e-5)
    out = trainer.fit()
    assert np.isfinite(out["loss"]) and {"otm", "btm", "cbs", "reg"} <= set(out)
    with pytest.raises(TextsegError, match="lit"):  # naming another model is refused in one line
        load_evaluator("offline", str(weights))

    # textseg cam probe --weights: the LiT, CLIP's template, every (image, present class) pair.
    pairs = sum(len(set(np.unique(np.asarray(Image.open(m)))) - {0}) for m in (data / "masks").glob("*.png"))
    res_file = tmp_path / "probe.json"
    assert cli_main(["cam", "probe", str(data), "--weights", str(weights), "--size", "64", "--json",
                     str(res_file)]) == 0
    res = json.loads(res_file.read_text())
    assert res["evaluator"] == str(weights) and res["template"] == "a photo of {}." and res["size"] == 64
    assert res["pairs"] == pairs > 0 and 0 <= res["fg_vs_bg_accuracy"] <= 100
