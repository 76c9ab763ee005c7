"""The ``textseg`` command line: thin subcommands over the library.

Each subcommand lives in ``textseg.commands.<name>`` and exposes ``add_parser(subparsers)``, which
registers its parser and sets ``func`` (called with the parsed args; returns an exit code or None).
Heavy imports (torch, models) happen inside ``func`` so ``textseg --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from textseg import __version__
from textseg.commands import validate_options
from textseg.errors import TextsegError

COMMANDS = ("segment", "classify", "eval", "models", "convert", "export", "train", "cam", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textseg", description="Segment anything you can name.")
    parser.add_argument("--version", action="version", version=f"textseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"textseg.commands.{name}")
        except ModuleNotFoundError as e:  # a command not built yet in this checkout
            if e.name == f"textseg.commands.{name}":
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate_options(args)
        code = args.func(args)
    except TextsegError as e:
        print(f"textseg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
