"""Benchmark class-name files shipped with textseg (package data), read with the one label grammar.

Format (:mod:`textseg.text`, the same for every command): one class per line, in class-id order
(line ``i`` = id ``i``)::

    person; person in shirt; person in jeans                 <- prompts; display name = the first
    tvmonitor: television monitor; tv monitor; television    <- "display name:" then the prompts
    background: sky; wall; tree; grass; road                 <- background given by stuff words

``;`` or ``,`` separates prompts (synonyms), so files in the SCLIP / ClearCLIP / NACLIP style, which
separate them with ``,``, are read unchanged. A class scores the max over its prompts (those works'
convention). Blank lines and ``#`` comments are skipped.

The shipped files (``builtin_class_file(name)``, names in ``BUILTIN``) carry the prompts of SCLIP's
``configs/cls_*.txt`` (github wangf3014/SCLIP), also used by NACLIP and ClearCLIP, so the protocol
presets reproduce their numbers; display names are the benchmark's official names. Pass
``classes=<your file>`` to any reader (``--classes`` on the CLI) to override them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from textseg.errors import TextsegError
from textseg.text import LabelClass, parse_labels, read_labels_file


@dataclass(frozen=True)
class ClassList:
    """Class display names and, per class, the prompts (synonyms) a model scores it by."""

    names: list[str]
    prompts: list[list[str]]

    def __len__(self) -> int:
        return len(self.names)


BUILTIN = (
    "voc21", "voc20", "context60", "context59", "coco_object", "coco_stuff", "ade150", "cityscapes",
)


def class_list(classes: Sequence[LabelClass]) -> ClassList:
    """:class:`~textseg.text.LabelClass` items -> :class:`ClassList` (names, prompts)."""
    return ClassList([c.name for c in classes], [list(c.synonyms) for c in classes])


def read_class_file(path: str | Path) -> ClassList:
    """Read a class file -> :class:`ClassList` (:func:`textseg.text.read_labels_file`)."""
    if not Path(path).is_file():
        raise TextsegError(f"{path}: class-name file not found")
    return class_list(read_labels_file(path))


def builtin_class_file(name: str) -> Path:
    """Path of a shipped class-name file (``voc21``, ``context59``, ``ade150``, ...)."""
    if name not in BUILTIN:
        raise TextsegError(f"no built-in class list {name!r}; known: {', '.join(BUILTIN)}")
    return Path(str(resources.files(__name__).joinpath(f"{name}.txt")))


def load_classes(classes: str | Path | list | ClassList | None, default: str) -> ClassList:
    """Resolve a reader's ``classes`` argument: ``None`` -> the built-in ``default`` list; a built-in
    name or a path -> that file; a list of lines (``"name: a; b"``) or of prompt lists -> as given."""
    if isinstance(classes, ClassList):
        return classes
    if classes is None:
        return read_class_file(builtin_class_file(default))
    if isinstance(classes, (str, Path)):
        if isinstance(classes, str) and classes in BUILTIN:
            return read_class_file(builtin_class_file(classes))
        return read_class_file(classes)
    items = list(classes)
    parsed = parse_labels(items) if items else []
    if not items or len(parsed) != len(items):  # an empty item would shift every later class id
        raise TextsegError("class list must be non-empty and hold a name for every class")
    return class_list(parsed)
