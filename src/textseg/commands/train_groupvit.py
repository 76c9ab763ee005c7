"""``textseg train groupvit``: GroupViT from image-text pairs (contrastive + multi-label loss).

    textseg train groupvit --set data.train=../shared/data/coco-mini --set data.train_split=train2017
    textseg train groupvit --set data.train='shards/{0000..0099}.tar' --set train.amp=bf16
    torchrun --nproc_per_node 8 -m textseg.cli train groupvit --config groupvit_gcc.yaml   # DDP

Every setting lives in :class:`textseg.train.groupvit.GroupViTRecipeConfig` (model / init / data /
loss / train sections); ``--config`` overrides its defaults from YAML, ``--set key.sub=value``
(repeatable) overrides both. The resolved config is saved as ``<train.out_dir>/config.yaml``; a
restarted run resumes from the newest checkpoint there (``--set train.resume=none`` to start over).
The trained weights are exported as ``<train.out_dir>/groupvit.safetensors`` for
``textseg segment --weights``.
"""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    from textseg.train.config import add_config_args

    p = sub.add_parser("groupvit", help="GroupViT: text-supervised grouping (contrastive + multi-label noun loss)")
    add_config_args(p)
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import yaml

    from textseg.train.config import config_to_dict, load_config
    from textseg.train.dist import cleanup, is_main
    from textseg.train.groupvit import GroupViTRecipeConfig, train_groupvit

    cfg = load_config(GroupViTRecipeConfig, args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    try:
        result = train_groupvit(cfg)
    finally:
        cleanup()
    if is_main():
        if args.json:
            print(json.dumps(result))
        else:
            print("final: " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in result.items()))
    return 0
