"""Example photos shipped with textseg (CC0, from scikit-image's sample data).

``python -m textseg.examples chelsea`` prints the path of ``chelsea.jpg`` (a tabby cat, CC0 by
Stefan van der Walt); ``coffee`` is a cup of coffee (CC0 by Rachel Michetti).
"""

from __future__ import annotations

import sys
from pathlib import Path

from textseg.errors import TextsegError

ASSETS = Path(__file__).resolve().parent / "assets"
EXAMPLES = {"chelsea": "chelsea.jpg", "coffee": "coffee.jpg"}


def example_path(name: str) -> Path:
    if name not in EXAMPLES:
        raise TextsegError(f"unknown example {name!r}; available: {', '.join(EXAMPLES)}")
    return ASSETS / EXAMPLES[name]


if __name__ == "__main__":
    print(example_path(sys.argv[1] if len(sys.argv) > 1 else "chelsea"))
