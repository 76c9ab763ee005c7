"""GroupViT end to end: checkpoint formats detected by ``load_model``, the Segmenter and the CLI,
``textseg train groupvit`` on caption folders and tar shards, 2-process torchrun (gloo) training,
and learning to segment from captions alone (quick version of benchmarks/groupvit_synthetic.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from textseg.models.groupvit import GroupViT

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from synthetic_scenes import make_scenes  # noqa: E402

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
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(port),
                        str(ROOT / "tests" / "groupvit_ddp_worker.py"), str(out)],
                       capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world_size"] == 2
    assert res["gather"]["loss_err"] < 1e-5 and res["gather"]["grad_err"] < 1e-5 and res["gather"]["grad_norm"] > 0
    losses = res["losses"]
    assert np.mean(losses[-3:]) < np.mean(losses[:2]) - 1.0, losses


@torch.no_grad()
def _retrieval_r1(model, scenes) -> float:
    """Held-out caption -> image top-1 accuracy (random: 1 / len(scenes))."""
    from groupvit_synthetic import SceneDataset

    ds = SceneDataset(scenes, model.preprocess_cfg.mean, model.preprocess_cfg.std)
    img = model.encode_image(ds.pixels(np.arange(len(ds))), normalize=True)
    txt = model.encode_text(model.tokenize(scenes.captions), normalize=True)
    return float(((txt @ img.t()).argmax(1) == torch.arange(len(ds))).float().mean())


def test_learns_from_captions_alone_quick(tmp_path):
    """Quick version of benchmarks/groupvit_synthetic.py: a tiny GroupViT trained for a few hundred
    steps on captioned scenes only (no masks, no labels) must beat its random initialisation on
    held-out scenes: the training loss falls and held-out captions retrieve their images several
    times above chance. (Segmentation needs longer training: the benchmark, about 25 minutes.)"""
    from groupvit_synthetic import presence_accuracy, small_model_cfg, train

    torch.set_num_threads(1)
    test = make_scenes(64, size=32, seed=4242, mention=1.0)
    torch.manual_seed(0)
    random_model = small_model_cfg(32).build().eval()
    before = _retrieval_r1(random_model, test)
    model, result = train(str(tmp_path / "quick"), steps=150, n_train=2400, batch_size=32, lr=1e-3,
                          progress=False, log_every=10, image_size=32, mention=1.0, warmup=40)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "quick" / "log.jsonl").read_text().splitlines()
              if json.loads(line).get("kind") == "train"]
    after = _retrieval_r1(model, test)
    assert np.mean(losses[-3:]) < np.mean(losses[:2]) - 1.0, losses
    # 64 held-out scenes: chance is 1/64; the run is deterministic on CPU (seeded, one thread)
    assert after >= 0.06 and after >= 3 * before, (before, after)
    assert 0.0 <= presence_accuracy(model, test) <= 1.0
