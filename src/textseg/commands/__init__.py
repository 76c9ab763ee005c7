"""CLI subcommands; see :mod:`textseg.cli`."""
