"""``textseg train groupvit``: GroupViT from image-text pairs (contrastive + multi-label loss).

    textseg train groupvit --set data.train=../shared/data/coco-mini --set data.train_split=train2017
    textseg train groupvit --set data.train='shards/{0000..0099}.tar' --set train.amp=bf16
    torchrun --nproc_per_node 8 -m textseg.cli train groupvit --config groupvit_gcc.yaml   # DDP

Every setting lives in :class:`textseg.train.groupvit.GroupViTRecipeConfig` (model / init / data /
loss / train sections); ``--config`` overrides its defaults from YAML, ``--set key.sub=value``
(repeatable) overrides both. The resolved config is saved as ``<train.out_dir>/config.yaml``; a
restarted run resumes from the newest checkpoint there (``--set train.resume=none`` to start over).
The trained weights are exported as ``<train.out_dir>/model.safetensors`` for
``textseg segment --weights``.
"""

from __future__ import annotations


def add_parser(sub) -> None:
    from textseg.commands.train import add_recipe_parser

    add_recipe_parser(sub, "groupvit", "GroupViT: text-supervised grouping (contrastive + multi-label noun loss)", run)


def run(args) -> int:
    from textseg.commands.train import run_recipe
    from textseg.train.groupvit import GroupViTRecipeConfig, train_groupvit

    return run_recipe(args, GroupViTRecipeConfig, train_groupvit)
