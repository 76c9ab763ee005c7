"""Training engine: exact kill-and-resume, atomic weights_only checkpoints, schedules, config."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import Dataset

from textseg.errors import TextsegError
from textseg.train import checkpoint as ckpt_lib
from textseg.train.config import load_config, save_config
from textseg.train.engine import LRSchedule, ShardedSampler, TrainConfig, Trainer, seed_everything


class NoisyRegression(Dataset):
    """22 samples of y = w.x; every read adds noise from torch, numpy and python RNGs (augmentation)."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(22, 6, generator=g)
        self.y = self.x @ torch.linspace(-1, 1, 6)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        noise = 0.01 * torch.randn(6) + float(np.random.randn()) * 1e-3 + random.random() * 1e-3
        return self.x[i] + noise, self.y[i]


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(0.2), nn.Linear(16, 1))

    def forward(self, batch):
        x, y = batch
        loss = F.mse_loss(self.net(x).squeeze(1), y)
        return {"loss": loss, "abs_err": (self.net(x).squeeze(1) - y).abs().mean()}


@dataclass
class Cfg:
    name: str = "toy"
    train: TrainConfig = field(default_factory=TrainConfig)


def _cfg(out_dir, **kw) -> Cfg:
    base = dict(out_dir=str(out_dir), steps=10, batch_size=4, grad_accum=2, lr=0.02, warmup_steps=2,
                clip_grad=1.0, ema_decay=0.9, ckpt_every=3, keep_last=2, log_every=2, eval_every=5,
                progress=False, tensorboard=False, device="cpu", seed=3)
    base.update(kw)
    return Cfg(train=TrainConfig(**base))


def _trainer(cfg: Cfg, init_seed: int, callbacks=()) -> Trainer:
    seed_everything(init_seed)
    data = NoisyRegression()

    def evaluate(model, step):
        return {"val_loss": model((data.x, data.y))["loss"]}

    return Trainer(cfg.train, Regressor(), data, config=cfg, eval_fn=evaluate, callbacks=callbacks)


def test_kill_and_resume_is_bit_identical(tmp_path):
    full = _trainer(_cfg(tmp_path / "full"), init_seed=0)
    result = full.fit()
    assert result["step"] == 10 and "val_loss" in result

    class Crash(Exception):
        pass

    def crash_at_5(trainer):
        if trainer.step == 5:
            raise Crash  # steps 4-5 are lost; the last checkpoint is step 3

    with pytest.raises(Crash):
        _trainer(_cfg(tmp_path / "cut"), init_seed=0, callbacks=[crash_at_5]).fit()
    assert [p.name for p in ckpt_lib.list_checkpoints(tmp_path / "cut" / "checkpoints")] == ["step_00000003.pt"]

    seed_everything(1234)  # the new process starts from other RNG states and another init
    random.random(), np.random.rand(), torch.rand(3)
    resumed = _trainer(_cfg(tmp_path / "cut"), init_seed=99)
    assert resumed.step == 3 and resumed.epoch == 1  # 22 samples = 5 batches of 4 = 2.5 steps per epoch
    resumed.fit()

    for (k, a), b in zip(full.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(full.ema.module.state_dict().values(), resumed.ema.module.state_dict().values()):
        assert torch.equal(a, b)
    sa, sb = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for i in sa:
        assert torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"])
    assert full.optimizer.param_groups[0]["lr"] == resumed.optimizer.param_groups[0]["lr"]
    # Another model init without resume really differs (the comparison above can fail).
    fresh = _trainer(_cfg(tmp_path / "other", resume="none", steps=10), init_seed=99)
    fresh.fit()
    assert not torch.equal(fresh.module.net[0].weight, full.module.net[0].weight)

    # The run learned, and logged train + eval rows.
    rows = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert {"lr", "grad_norm", "samples_per_s", "abs_err"} <= set(train_rows[0])
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [5, 10]


def test_checkpoint_is_weights_only_and_atomic(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, steps=4, ckpt_every=2, keep_last=1, ema_decay=None)
    trainer = _trainer(cfg, 0)
    trainer.fit()
    files = ckpt_lib.list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in files] == ["step_00000004.pt"]  # keep_last=1 pruned step 2
    state = torch.load(files[0], weights_only=True)
    assert state["step"] == 4 and state["config"]["train"]["steps"] == 4 and state["config"]["name"] == "toy"
    assert set(state["rng"][0]) >= {"python_state", "numpy_keys", "torch", "cuda"}
    reloaded = load_config(Cfg, tmp_path / "config.yaml")
    assert reloaded == cfg

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        ckpt_lib.atomic_save({"a": 1}, tmp_path / "checkpoints" / "step_00000006.pt")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000004.pt"]
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TextsegError, match="cannot read checkpoint"):
        ckpt_lib.load_checkpoint(tmp_path / "bad.pt")


def test_rng_state_roundtrip():
    seed_everything(5)
    state = ckpt_lib.capture_rng_state()
    a = (random.random(), float(np.random.rand()), torch.rand(2))
    seed_everything(6)
    ckpt_lib.restore_rng_state(state)
    b = (random.random(), float(np.random.rand()), torch.rand(2))
    assert a[:2] == b[:2] and torch.equal(a[2], b[2])


def test_schedules():
    cos = LRSchedule(total_steps=12, warmup_steps=2, kind="cosine", min_ratio=0.1)
    assert [cos(0), cos(1)] == [0.5, 1.0]
    assert cos(2) == pytest.approx(1.0) and cos(7) == pytest.approx(0.55) and cos(12) == pytest.approx(0.1)
    poly = LRSchedule(total_steps=10, kind="poly", power=2.0)
    assert poly(5) == pytest.approx(0.25) and poly(10) == 0.0
    assert LRSchedule(10, 0, "constant")(9) == 1.0
    with pytest.raises(TextsegError):
        LRSchedule(10, kind="step")


def test_sharded_sampler_partitions_and_resumes():
    samplers = [ShardedSampler(11, rank=r, world_size=2, seed=1) for r in range(2)]
    for s in samplers:
        s.set_epoch(3)
    a, b = list(samplers[0]), list(samplers[1])
    assert len(a) == len(b) == 5 and not set(a) & set(b)
    samplers[0].set_epoch(3, start=2)
    assert list(samplers[0]) == a[2:]
    samplers[0].set_epoch(4)
    assert list(samplers[0]) != a


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "exp", "train": {"lr": "1e-3", "steps": 7}}))
    cfg = load_config(Cfg, path, ["train.batch_size=16", "train.betas=[0.8, 0.9]", "train.clip_grad=null",
                                  "train.lr=3e-4", "train.amp=bf16"])
    assert cfg.name == "exp" and cfg.train.steps == 7 and cfg.train.batch_size == 16
    assert cfg.train.lr == 3e-4 and cfg.train.betas == (0.8, 0.9) and cfg.train.clip_grad is None
    assert cfg.train.amp == "bf16" and cfg.train.warmup_steps == 0
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(Cfg, tmp_path / "resolved.yaml") == cfg
    for bad, msg in [("train.lrr=1", "unknown config key 'train.lrr'"), ("train.steps=1.5", "integer"),
                     ("train.shuffle=3", "true/false"), ("nope", "key=value"), ("name.x=1", "unknown")]:
        with pytest.raises(TextsegError, match=msg):
            load_config(Cfg, None, [bad])
    path.write_text("train:\n  warmup: 3\n")
    with pytest.raises(TextsegError, match="train.warmup"):
        load_config(Cfg, path)


def test_amp_bf16_on_cpu_and_fp16_refused(tmp_path):
    cfg = _cfg(tmp_path, steps=2, amp="bf16", ema_decay=None, ckpt_every=0, eval_every=0)
    assert torch.isfinite(torch.tensor(_trainer(cfg, 0).fit()["loss"]))
    with pytest.raises(TextsegError, match="fp16 needs a GPU"):
        _trainer(_cfg(tmp_path / "b", amp="fp16"), 0)


def test_resume_with_more_steps_follows_the_new_schedule(tmp_path):
    _trainer(_cfg(tmp_path, steps=4, warmup_steps=0, ema_decay=None), 0).fit()
    longer = _trainer(_cfg(tmp_path, steps=8, warmup_steps=0, ema_decay=None), 0)
    assert longer.step == 4
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(0.02 * LRSchedule(8)(4))


@pytest.mark.parametrize("recipe", ["clip", "lseg", "groupvit"])
def test_recipe_help_shows_config_and_set_and_no_mirrored_flags(recipe, capsys):
    """Every training recipe is driven by ``--config FILE --set a.b=c`` only: its help lists those
    and the recipe-wide switches, never a flag mirroring a config field."""
    import re

    from textseg.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", recipe, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    flags = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", text))
    assert {"--config", "--set"} <= flags
    assert flags <= {"--config", "--set", "--print-config", "--json", "--help"}, flags


def test_cached_computes_once_per_key_and_only_with_a_cache_dir(tmp_path):
    from textseg.train.checkpoint import cached, file_stamp

    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.arange(3.0)}

    first = cached(tmp_path, "feat", ["lite0", 32], compute)
    again = cached(tmp_path, "feat", ["lite0", 32], compute)  # from the file
    assert len(calls) == 1 and torch.equal(first["x"], again["x"]) and len(list(tmp_path.glob("feat-*.pt"))) == 1
    cached(tmp_path, "feat", ["lite0", 16], compute)  # another key: computed and kept apart
    assert len(calls) == 2 and len(list(tmp_path.glob("feat-*.pt"))) == 2
    cached("", "feat", ["lite0", 32], compute)  # no cache dir: always computed, nothing written
    assert len(calls) == 3
    f = tmp_path / "a.txt"
    f.write_text("abc")
    assert file_stamp(f)[0] == 3 and file_stamp(tmp_path / "missing") == (-1, -1)
