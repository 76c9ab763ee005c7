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

import json


def add_parser(sub) -> None:
    from textseg.train.config import add_config_args

    p = sub.add_parser("clip", help="contrastive image-text training (CLIP / LiT), retrieval + zero-shot eval")
    add_config_args(p)
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import yaml

    from textseg.train.clip import ClipRecipeConfig, train_clip
    from textseg.train.config import config_to_dict, load_config
    from textseg.train.dist import cleanup, is_main

    cfg = load_config(ClipRecipeConfig, args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    try:
        result = train_clip(cfg)
    finally:
        cleanup()
    if is_main():
        if args.json:
            print(json.dumps(result))
        else:
            print("final: " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in result.items()))
    return 0
