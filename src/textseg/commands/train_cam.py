"""``textseg train cam``: a CAM network from image-level labels (multi-label baseline and / or CLIMS).

    textseg train cam --set data.root=DATA --set data.classes=DATA/classes_voc21.txt --set train.out_dir=runs/base
    textseg train cam --preset voc --set mode=clims --set init=runs/base/model.safetensors ...
    torchrun --nproc_per_node 2 -m textseg.cli train cam --config cam.yaml                 # DDP

Every setting lives in :class:`textseg.train.cam.CAMTrainCfg`; ``--config`` overrides its defaults
from YAML, ``--preset voc|coco`` sets the official CLIMS recipe on top and ``--set key.sub=value``
(repeatable) wins over both. A restarted run resumes from the newest checkpoint in
``train.out_dir`` (``--set train.resume=none`` to start over). The run ends with
``<train.out_dir>/model.safetensors`` for ``textseg segment --weights`` and ``textseg cam make``.
"""

from __future__ import annotations


def add_parser(sub) -> None:
    from textseg.commands.train import add_recipe_parser

    p = add_recipe_parser(sub, "cam", "CAM network from image-level labels: multi-label baseline and/or CLIMS", run)
    p.add_argument("--preset", choices=("voc", "coco"), default=None,
                   help="the official CLIMS recipe for VOC or COCO (loss weights, CBS threshold, background list, "
                   "'player' prompt, SGD with 10x classifier lr and poly schedule, batch, epochs, crop) for the "
                   "config's mode; --set wins")


def run(args) -> int:
    from textseg.commands.train import run_recipe
    from textseg.train.cam import CAMTrainCfg, train_cam, with_preset

    args.overrides = with_preset(args.config, args.overrides, args.preset)
    return run_recipe(args, CAMTrainCfg, train_cam)
