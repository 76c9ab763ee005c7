"""``textseg train clip``: contrastive image-text training (CLIP from scratch, or LiT on locked towers).

    textseg train clip --config lit.yaml --set data.train=../shared/data/coco-mini \\
        --set data.train_split=train2017 --set data.val=../shared/data/coco-mini --set data.val_split=val2017
    torchrun --nproc_per_node 8 -m textseg.cli train clip --config clip_b16.yaml      # DDP

Every setting lives in :class:`textseg.train.clip.ClipRecipeConfig` (model / data / loss / eval /
train sections); ``--config`` overrides its defaults from YAML, ``--set key.sub=value`` (repeatable)
overrides both. The resolved config is saved as ``<train.out_dir>/config.yaml``; a restarted run
resumes from the newest checkpoint there (``--set train.resume=none`` to start over).
"""

from __future__ import annotations


def add_parser(sub) -> None:
    from textseg.commands.train import add_recipe_parser

    add_recipe_parser(sub, "clip", "contrastive image-text training (CLIP / LiT), retrieval + zero-shot eval", run)


def run(args) -> int:
    from textseg.commands.train import run_recipe
    from textseg.train.clip import ClipRecipeConfig, train_clip

    return run_recipe(args, ClipRecipeConfig, train_clip)
