"""GroupViT end to end: checkpoint formats detected by ``load_model``, the Segmenter and the CLI,
``textseg train groupvit`` on caption folders and tar shards, 2-process torchrun (gloo) training,
and learning to segment from captions alone (quick version of benchmarks/groupvit_synthetic.py)."""

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

from textseg.models.groupvit import GroupViT

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from synthetic_scenes import make_scenes  # noqa: E402
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


def test_zero_shot_eval_path_on_hand_made_groups(monkeypatch):
    """The benchmark's evaluation (soft group maps -> bilinear upsampling -> argmax group -> group
    labels from the text similarities) scores a hand-made perfect grouping high and a single group
    per image low, so a collapse is the model's, not the evaluation's."""
    import torch.nn.functional as F
    from groupvit_synthetic import evaluate_zero_shot, grouping_stats, small_model_cfg
    from synthetic_scenes import CLASSES

    scenes = make_scenes(12, seed=5)
    torch.manual_seed(0)
    model = small_model_cfg().build().eval()
    text = model.embed_texts(list(CLASSES), ("a photo of a {}.",))
    onehot = F.one_hot(torch.from_numpy(scenes.masks).long(), len(CLASSES)).permute(0, 3, 1, 2).float()
    true_maps = F.avg_pool2d(onehot, model.dense_stride)  # B x 6 x 8 x 8: class fractions per patch
    state = {"start": 0}

    def fake_intermediates(pixels):  # group c = the true region of class c, embedded as class c's text
        b, s = pixels.shape[0], state["start"]
        maps = state["maps"][s:s + b]
        state["start"] = (s + b) % len(scenes.masks)
        emb = text[None].expand(b, -1, -1)
        return {"group_embeds": emb, "image_embed": maps.mean((2, 3)) @ text, "group_maps": [maps],
                "grid": tuple(maps.shape[-2:])}

    monkeypatch.setattr(model, "forward_intermediates", fake_intermediates)
    state["maps"] = true_maps
    perfect = evaluate_zero_shot(model, scenes, batch_size=4)
    stats = grouping_stats(model, scenes, batch_size=4)
    # 8-pixel patches limit the boundary (thin star tips, cross arms): about 80 mIoU, not 100
    assert perfect["mIoU"] > 65 and perfect["iou"]["background"] > 90, perfect
    assert stats["oracle_mIoU"] > 65 and 2 <= stats["groups_per_image"] <= 3, stats
    state["maps"] = torch.zeros_like(true_maps)
    state["maps"][:, 0] = 1  # everything in one group
    collapsed = evaluate_zero_shot(model, scenes, batch_size=4)
    stats = grouping_stats(model, scenes, batch_size=4)
    assert collapsed["mIoU"] < 20 and stats["groups_per_image"] == 1 and stats["assign_entropy"] == 0


def test_learns_from_captions_alone_quick(tmp_path, capsys):
    """Quick version of benchmarks/groupvit_synthetic.py: the benchmark's small GroupViT trained for
    a few hundred steps on captioned scenes only (no masks, no labels). Against the same model at
    its random initialisation, on held-out scenes: the loss falls, the model names the objects in a
    scene (image level: from chance, about 0.33, to above 0.8) and the grouping keeps more than one
    group per image. Zero-shot segmentation mIoU is printed, not asserted: in this budget it is not
    reliably above the random initialisation (see the benchmark's notes: 4.1 against 3.6 at 400
    steps, 27.1 against 3.6 only at 900)."""
    from groupvit_synthetic import (
        background_names,
        evaluate_zero_shot,
        grouping_stats,
        presence_accuracy,
        small_model_cfg,
        train,
    )

    torch.set_num_threads(1)
    test = make_scenes(100, seed=4242, mention=1.0, palette="per_shape", captions="named_background")
    bg = background_names("named_background")
    torch.manual_seed(0)  # train() seeds the same way: this is the trained model before training
    random_model = small_model_cfg().build().eval()
    presence_before = presence_accuracy(random_model, test)

    model, _ = train(str(tmp_path / "quick"), steps=400, n_train=3000, batch_size=48, progress=False,
                     log_every=20, warmup=50)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "quick" / "log.jsonl").read_text().splitlines()
              if json.loads(line).get("kind") == "train"]
    presence_after = presence_accuracy(model, test)
    groups = grouping_stats(model, test)
    with capsys.disabled():
        print(f"\nquick GroupViT: presence {presence_before:.2f} -> {presence_after:.2f}; zero-shot mIoU "
              f"{evaluate_zero_shot(random_model, test, bg_names=bg)['mIoU']:.1f} -> "
              f"{evaluate_zero_shot(model, test, bg_names=bg)['mIoU']:.1f}; "
              f"{groups}")
    assert np.mean(losses[-3:]) < np.mean(losses[:2]) - 1.0, losses
    # seeded, one thread: deterministic on CPU
    assert presence_after >= max(0.8, presence_before + 0.3), (presence_before, presence_after)
    assert groups["groups_per_image"] >= 1.5, groups


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
