"""``textseg train <recipe>``: one sub-subcommand per training recipe.

Each recipe lives in ``textseg.commands.train_<recipe>`` with ``add_parser(subparsers)``.
"""

from __future__ import annotations

import importlib

RECIPES = ("clip", "lseg", "groupvit", "cam")


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model (clip, lseg, groupvit, cam); launch with torchrun for multi-GPU")
    recipes = p.add_subparsers(dest="recipe", metavar="RECIPE", required=True)
    for name in RECIPES:
        try:
            module = importlib.import_module(f"textseg.commands.train_{name}")
        except ModuleNotFoundError as e:
            if e.name == f"textseg.commands.train_{name}":
                continue
            raise
        module.add_parser(recipes)


def add_recipe_parser(recipes, name: str, help: str, func):
    """The parser every config-driven recipe shares: ``--config``, ``--set``, ``--print-config``, ``--json``."""
    from textseg.train.config import add_config_args

    p = recipes.add_parser(name, help=help)
    add_config_args(p)
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    p.set_defaults(func=func)
    return p


def run_recipe(args, config_cls, train_fn) -> int:
    """Resolve the recipe's config, train (process group cleaned up after), print final metrics on rank 0."""
    import json

    import yaml

    from textseg.distributed import cleanup, is_main
    from textseg.train.config import config_to_dict, load_config

    cfg = load_config(config_cls, args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    try:
        result = train_fn(cfg)
        main = is_main()  # asked before cleanup(): without a process group every rank is "main"
    finally:
        cleanup()
    if main:
        if args.json:
            print(json.dumps(result))
        else:
            print("final: " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in result.items()))
    return 0
