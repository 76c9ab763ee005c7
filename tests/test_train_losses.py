"""InfoNCE against hand-computed values, and the gathered loss over 2 gloo processes against one
process holding the whole batch (loss, feature and DDP parameter gradients, engine steps)."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from textseg.train.losses import ClipLoss, LogitScale, info_nce


def test_info_nce_hand_computed():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    # logits = 2 * img @ txt.T = [[1.2, 0], [1.6, 2]]
    e = math.exp
    i2t = -math.log(e(1.2) / (e(1.2) + e(0))) - math.log(e(2) / (e(1.6) + e(2)))
    t2i = -math.log(e(1.2) / (e(1.2) + e(1.6))) - math.log(e(2) / (e(0) + e(2)))
    expected = (i2t / 2 + t2i / 2) / 2
    assert info_nce(img, txt, 2.0).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.4541, abs=1e-4)  # (0.2633 + 0.5130 + 0.9130 + 0.1269) / 4
    assert ClipLoss()(img, txt, torch.tensor(2.0)).item() == pytest.approx(expected, rel=1e-6)


def test_logit_scale_clamped_at_100():
    s = LogitScale(init=1 / 0.07)
    assert s().item() == pytest.approx(1 / 0.07, rel=1e-5)
    big = LogitScale(init=500.0)
    value = big()
    assert value.item() == pytest.approx(100.0, rel=1e-5)
    value.backward()
    assert big.log_scale.grad.item() == 0.0  # no push beyond the clamp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


N, D_IN, D = 8, 5, 4


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D_IN, generator=g), torch.randn(N, D_IN, generator=g)


class _Towers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.img, self.txt, self.scale = nn.Linear(D_IN, D), nn.Linear(D_IN, D), LogitScale()

    def forward(self, batch):
        x, t = batch
        return F.normalize(self.img(x), dim=-1), F.normalize(self.txt(t), dim=-1), self.scale()


class _ClipModule(_Towers):
    def forward(self, batch):
        a, b, s = super().forward(batch)
        return {"loss": info_nce(a, b, s, local_loss=True)}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from textseg.distributed import cleanup, get_rank, get_world_size, init_distributed
    from textseg.train.dist import all_gather_with_grad
    from textseg.train.engine import TrainConfig, Trainer

    info = init_distributed("cpu")
    assert (info.rank, info.world_size, get_rank(), get_world_size()) == (rank, world, rank, world)
    x, t = _data()
    sl = slice(rank * N // world, (rank + 1) * N // world)
    results = {"gathered": all_gather_with_grad(torch.full((2,), float(rank)))}
    for local in (False, True):
        model = nn.parallel.DistributedDataParallel(_Towers())
        feats_i, feats_t, scale = model((x[sl], t[sl]))
        feats_i.retain_grad()
        feats_t.retain_grad()
        loss = info_nce(feats_i, feats_t, scale, local_loss=local)
        loss.backward()
        results[f"loss_{local}"] = loss.detach()
        results[f"gi_{local}"] = feats_i.grad
        results[f"gt_{local}"] = feats_t.grad
        results[f"params_{local}"] = {n: p.grad for n, p in model.module.named_parameters()}
    cfg = TrainConfig(out_dir=f"{out_dir}/engine", steps=3, batch_size=N // world, lr=0.05, shuffle=True,
                      log_every=1, progress=False, tensorboard=False, resume="none", device="cpu")
    trainer = Trainer(cfg, _ClipModule(), TensorDataset(x, t))
    trainer.fit()
    results["engine"] = {k: v.detach().clone() for k, v in trainer.module.state_dict().items()}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    cleanup()


def test_gathered_loss_and_grads_match_single_process(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    assert ranks[0]["gathered"].tolist() == [0.0, 0.0, 1.0, 1.0]

    x, t = _data()
    for local in (False, True):
        ref = _Towers()
        fi, ft, scale = ref((x, t))
        fi.retain_grad()
        ft.retain_grad()
        loss = info_nce(fi, ft, scale)
        loss.backward()
        if local:  # each rank holds its share; their mean is the global loss
            got = sum(r[f"loss_{local}"] for r in ranks) / world
        else:
            got = ranks[0][f"loss_{local}"]
            torch.testing.assert_close(ranks[1][f"loss_{local}"], got)
        torch.testing.assert_close(got, loss.detach(), rtol=1e-5, atol=1e-6)
        # Feature gradients: each rank's shard receives world x its share of d(loss)/d(features).
        gi = torch.cat([r[f"gi_{local}"] for r in ranks]) / world
        gt = torch.cat([r[f"gt_{local}"] for r in ranks]) / world
        torch.testing.assert_close(gi, fi.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gt, ft.grad, rtol=1e-5, atol=1e-7)
        # DDP-averaged parameter gradients equal the single-process gradients on the whole batch.
        for name, p in ref.named_parameters():
            for r in ranks:
                torch.testing.assert_close(r[f"params_{local}"][name], p.grad, rtol=1e-5, atol=1e-7)

    # 3 engine steps on 2 ranks x 4 samples equal 3 steps of one process on batches of 8.
    from textseg.train.engine import TrainConfig, Trainer

    cfg = TrainConfig(out_dir=str(tmp_path / "single"), steps=3, batch_size=N, lr=0.05, shuffle=True,
                      log_every=1, progress=False, tensorboard=False, resume="none", device="cpu")
    single = Trainer(cfg, _ClipModule(), TensorDataset(x, t))
    single.fit()
    for k, v in single.module.state_dict().items():
        torch.testing.assert_close(ranks[0]["engine"][k], v, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ranks[1]["engine"][k], v, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "engine" / "checkpoints" / "step_00000003.pt").is_file()
