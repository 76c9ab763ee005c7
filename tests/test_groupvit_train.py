"""GroupViT end to end: checkpoint formats detected by ``load_model``, the Segmenter and the CLI,
``textseg train groupvit`` on caption folders and tar shards, 2-process torchrun (gloo) training,
(learning to segment from captions alone: tests/test_groupvit_emergence.py)."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from textseg.data.synthetic import make_scenes
from textseg.models.groupvit import GroupViT

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from torchrun_util import run_torchrun  # noqa: E402

TINY = [
    "--set", "model.image_size=32", "--set", "model.patch_size=8", "--set", "model.width=32",
    "--set", "model.heads=2", "--set", "model.depths=[1,1,1]", "--set", "model.num_group_tokens=[4,2,0]",
    "--set", "model.num_output_groups=[4,2,0]", "--set", "model.text_width=32", "--set", "model.text_heads=2",
    "--set", "model.text_layers=1", "--set", "model.context_length=24", "--set", "model.embed_dim=16",
    "--set", "model.proj_hidden=32", "--set", "train.batch_size=4", "--set", "train.steps=2",
    "--set", "train.progress=false", "--set", "train.tensorboard=false",
]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """``textseg ARGS`` in this process -> (exit code, stdout, stderr)."""
    from textseg.cli import main

    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def caption_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("captions")
    (root / "images").mkdir()
    scenes = make_scenes(8, size=32, seed=1)
    with open(root / "captions.jsonl", "w") as f:
        for i, (img, cap) in enumerate(zip(scenes.images, scenes.captions)):
            Image.fromarray(img).save(root / "images" / f"{i}.png")
            f.write(json.dumps({"image": f"images/{i}.png", "captions": [cap, "a picture"]}) + "\n")
    return root


def test_cli_train_on_folder_and_tars_then_segment(caption_folder, tmp_path, capsys):
    from textseg.data.imagetext import write_tar_shard
    from textseg.weights.load import load_model

    out = tmp_path / "run"
    code, stdout, stderr = run_cli(capsys, "train", "groupvit", "--set", f"data.train={caption_folder}",
                                   "--set", f"train.out_dir={out}", *TINY, "--json")
    assert code == 0, stderr[-2000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["step"] == 2 and np.isfinite(result["loss"]) and "mlc" in result
    weights = Path(result["weights"])
    model = load_model(weights=weights)  # native safetensors + card, detected
    assert isinstance(model, GroupViT) and model.cfg.vision.num_group_tokens == (4, 2, 0)

    # webdataset-style tar shards
    samples = []
    for i, p in enumerate(sorted((caption_folder / "images").glob("*.png"))):
        samples.append((f"{i:04d}", p.read_bytes(), f"a red star number {i}"))
    write_tar_shard(tmp_path / "shard-0000.tar", samples[:4])
    write_tar_shard(tmp_path / "shard-0001.tar", samples[4:])
    code, stdout, stderr = run_cli(capsys, "train", "groupvit", "--set",
                                   f"data.train={tmp_path}/shard-{{0000..0001}}.tar",
                                   "--set", f"train.out_dir={tmp_path / 'run_tar'}", *TINY, "--json")
    assert code == 0, stderr[-2000:]
    assert json.loads(stdout.strip().splitlines()[-1])["step"] == 2

    # segment with the trained checkpoint through the shared Segmenter (CLI), format detected
    img = caption_folder / "images" / "0.png"
    code, stdout, stderr = run_cli(capsys, "segment", str(img), "--model", "groupvit", "--weights", str(weights),
                                   "--labels", "star,circle", "--short-side", "32", "--slide", "32", "16",
                                   "--threshold", "none", "--out", str(tmp_path / "seg"), "--json", "--no-progress")
    assert code == 0, stderr[-2000:]
    rec = json.loads(stdout.strip().splitlines()[-1])
    assert set(rec["fractions"]) == {"star", "circle"} and abs(sum(rec["fractions"].values()) - 1) < 1e-6
    code, _, stderr = run_cli(capsys, "segment", str(img), "--model", "groupvit", "--weights",
                              str(caption_folder / "captions.jsonl"), "--labels", "star", "--no-progress")
    assert code == 2 and "error" in stderr and "Traceback" not in stderr


def test_formats_detected_and_segmenter(tmp_path):
    from test_groupvit import make_hf, to_nvlabs

    from textseg.segment.segmenter import SegmentCfg, Segmenter
    from textseg.weights.load import load_model

    hf, _ = make_hf("64-8-0")
    hf.save_pretrained(tmp_path / "hf")  # config.json + model.safetensors
    a = load_model(weights=tmp_path / "hf")
    assert isinstance(a, GroupViT)
    torch.save({"model": to_nvlabs(a.state_dict())}, tmp_path / "group_vit_gcc_yfcc_30e-74d335e6.pth")
    b = load_model("groupvit", weights=tmp_path / "group_vit_gcc_yfcc_30e-74d335e6.pth")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a.encode_image(x), b.encode_image(x), atol=1e-5, rtol=0)
        for mode in a.dense_modes:
            dense = a.encode_dense(x, mode)
            assert dense.shape == (1, 64, 8, 8)
        maps = a.group_label_maps(x)
        assert [m.shape for m in maps] == [(1, 64, 64), (1, 64, 64)] and int(maps[1].max()) < 4

    image = (np.random.default_rng(0).random((80, 96, 3)) * 255).astype(np.uint8)
    seg = Segmenter(a, SegmentCfg(short_side=64, slide=(64, 32), templates="a photo of a {}.", threshold="auto"))
    res = seg.segment(image, ["cat", "dog", "grass"])
    assert res.label_map.shape == (80, 96)
    assert res.labels[-1] == "background"  # default_background_threshold (0.95) adds it


def test_torchrun_two_processes_gathered_features_and_loss_falls(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code, log = run_torchrun([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              "--master_addr", "127.0.0.1", "--master_port", str(port),
                              str(ROOT / "tests" / "groupvit_ddp_worker.py"), str(out)],
                             env=env, timeout=240, cwd=ROOT)
    assert code == 0, log[-3000:]
    res = json.loads(out.read_text())
    assert res["world_size"] == 2
    assert res["gather"]["loss_err"] < 1e-5 and res["gather"]["grad_err"] < 1e-5 and res["gather"]["grad_norm"] > 0
    losses = res["losses"]
    assert np.mean(losses[-3:]) < np.mean(losses[:2]) - 1.0, losses


def test_stop_resume_equals_uninterrupted_and_the_model_file_segments(caption_folder, tmp_path, capsys):
    from train_util import stop_resume_matches

    from textseg.train.config import load_config
    from textseg.train.groupvit import GroupViTRecipeConfig, build_trainer, train_groupvit

    sets = [s for s in TINY if s != "--set" and not s.startswith("train.steps")]

    def make_cfg(out):
        return load_config(GroupViTRecipeConfig, None, [*sets, f"data.train={caption_folder}", "train.steps=4",
                                                        "train.ckpt_every=1", "train.log_every=1",
                                                        "train.device=cpu", f"train.out_dir={out}"])

    weights = stop_resume_matches(build_trainer, train_groupvit, make_cfg, tmp_path, steps=4, stop_at=2)
    img = caption_folder / "images" / "0.png"
    code, stdout, stderr = run_cli(capsys, "segment", str(img), "--weights", str(weights), "--labels", "star,circle",
                                   "--short-side", "32", "--threshold", "none", "--out", str(tmp_path / "seg"),
                                   "--json", "--no-progress")
    assert code == 0, stderr[-2000:]
    assert set(json.loads(stdout.strip().splitlines()[-1])["fractions"]) == {"star", "circle"}
