"""Run by tests/test_groupvit_train.py under ``torchrun --nproc_per_node 2`` (gloo, CPU).

1. Gathered features: each rank holds its half of a global batch; the multi-label and InfoNCE
   losses computed with ``all_gather_with_grad`` must average (over ranks) to the single-process
   loss of the whole batch, and the gradient reaching each rank's shard must be ``world_size``
   times the single-process gradient of that shard (DDP then averages parameter gradients).
2. Training: a tiny GroupViT trained with DDP on synthetic captioned scenes; rank 0 writes the
   loss curve and the gathered-feature check to ``argv[1]`` (JSON).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F


def check_gather() -> dict:
    from textseg.distributed import get_rank, get_world_size
    from textseg.train.groupvit import multi_label_loss
    from textseg.train.losses import info_nce

    rank, world = get_rank(), get_world_size()
    g = torch.Generator().manual_seed(0)
    b, k, d = 3, 2, 8
    img_all = F.normalize(torch.randn(world * b, d, generator=g), dim=-1)
    txt_all = F.normalize(torch.randn(world * b, k, d, generator=g), dim=-1)
    cap_all = F.normalize(torch.randn(world * b, d, generator=g), dim=-1)
    # single process, whole batch
    ref_img = img_all.clone().requires_grad_(True)
    ref = multi_label_loss(ref_img, txt_all, 5.0, gather=False) + info_nce(ref_img, cap_all, 5.0, gather=False)
    ref.backward()
    # this rank's shard, gathered
    mine = img_all[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    sl = slice(rank * b, (rank + 1) * b)
    loss = multi_label_loss(mine, txt_all[sl], 5.0) + info_nce(mine, cap_all[sl], 5.0, local_loss=True)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    return {
        "loss_err": abs(mean_loss.item() - ref.item()),
        "grad_err": (mine.grad - world * ref_img.grad[sl]).abs().max().item(),
        "grad_norm": mine.grad.norm().item(),
    }


def main(out_json: str) -> None:
    from textseg.data.synthetic import SceneDataset, make_scenes
    from textseg.distributed import init_distributed, is_main
    from textseg.train.engine import TrainConfig, Trainer, seed_everything
    from textseg.train.groupvit import GroupViTCollate, GroupViTModelCfg, GroupViTTrainModule

    torch.set_num_threads(1)
    info = init_distributed("cpu")
    gather = check_gather()
    seed_everything(0)
    model = GroupViTModelCfg(image_size=32, patch_size=8, width=32, heads=2, depths=[1, 1], num_group_tokens=[4, 0],
                             num_output_groups=[4, 0], text_width=32, text_heads=2, text_layers=1, context_length=24,
                             embed_dim=32, proj_hidden=64).build()
    ds = SceneDataset(make_scenes(64, size=32, seed=5), model.preprocess_cfg.mean, model.preprocess_cfg.std)
    out_dir = Path(out_json).parent / "run"
    cfg = TrainConfig(out_dir=str(out_dir), steps=30, batch_size=8, lr=3e-3, weight_decay=0.0, warmup_steps=3,
                      clip_grad=5.0, log_every=3, resume="none", progress=False, tensorboard=False, device="cpu")
    trainer = Trainer(cfg, GroupViTTrainModule(model), ds, collate_fn=GroupViTCollate(model.tokenize, k=2))
    trainer.fit()
    if is_main():
        losses = [r["loss"] for r in map(json.loads, (out_dir / "log.jsonl").read_text().splitlines())
                  if r.get("kind") == "train"]
        Path(out_json).write_text(json.dumps({"world_size": info.world_size, "gather": gather, "losses": losses}))


if __name__ == "__main__":
    main(sys.argv[1])
