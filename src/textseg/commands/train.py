"""``textseg train <recipe>``: one sub-subcommand per training recipe.

Each recipe lives in ``textseg.commands.train_<recipe>`` with ``add_parser(subparsers)``.
"""

from __future__ import annotations

import importlib

RECIPES = ("clip", "lseg", "groupvit")


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model (clip, lseg, groupvit); launch with torchrun for multi-GPU")
    recipes = p.add_subparsers(dest="recipe", metavar="RECIPE", required=True)
    for name in RECIPES:
        try:
            module = importlib.import_module(f"textseg.commands.train_{name}")
        except ModuleNotFoundError as e:
            if e.name == f"textseg.commands.train_{name}":
                continue
            raise
        module.add_parser(recipes)
