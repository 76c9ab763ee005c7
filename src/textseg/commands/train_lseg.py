"""``textseg train lseg``: supervised LSeg training with a frozen text encoder.

    textseg train lseg --set data.roots=[../shared/data/camvid] --set model.light=true \\
        --set train.epochs=10 --set train.batch_size=8 --set data.crop=[352,480] --set train.out_dir=runs/lseg
    torchrun --nproc_per_node 4 -m textseg.cli train lseg --config lseg.yaml   # DDP

Every setting lives in :class:`textseg.train.lseg.LSegTrainConfig` (data / model / train
sections); ``--config`` overrides its defaults from YAML, ``--set key.sub=value`` (repeatable)
overrides both. Several ``data.roots`` are concatenated, each image scored against its own
dataset's labels. A restarted run resumes from the newest checkpoint in ``train.out_dir`` at the
same step (``--set train.resume=none`` to start over); the trained model is written as
``<train.out_dir>/model.safetensors`` for ``textseg segment --weights``.
"""

from __future__ import annotations


def add_parser(sub) -> None:
    from textseg.commands.train import add_recipe_parser

    add_recipe_parser(sub, "lseg", "train LSeg (dense features vs frozen label embeddings)", run)


def run(args) -> int:
    from textseg.commands.train import run_recipe
    from textseg.train import lseg

    return run_recipe(args, lseg.LSegTrainConfig, lseg.train)
