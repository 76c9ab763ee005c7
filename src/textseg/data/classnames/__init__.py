"""Benchmark class-name files shipped with textseg (package data) and the class-file format.

Format: one class per line, in class-id order (line ``i`` = id ``i``)::

    person; person in shirt; person in jeans                 <- prompts; display name = the first
    tvmonitor: television monitor; tv monitor; television    <- "display name:" then the prompts
    background: sky; wall; tree; grass; road                 <- background given by stuff words

``;`` separates prompts (synonyms); files in the SCLIP / ClearCLIP / NACLIP style, which separate
them with ``,``, are read unchanged (a line without ``;`` is split on ``,``). A class scores the max
over its prompts (those works' convention). Blank lines and ``#`` comments are skipped.

The shipped files (``builtin_class_file(name)``, names in ``BUILTIN``) carry the prompts of SCLIP's
``configs/cls_*.txt`` (github wangf3014/SCLIP), also used by NACLIP and ClearCLIP, so the protocol
presets reproduce their numbers; display names are the benchmark's official names. Pass
``classes=<your file>`` to any reader (``--classes`` on the CLI) to override them.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from textseg.errors import TextsegError


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


def parse_class_line(line: str) -> tuple[str, list[str]]:
    """``"tvmonitor: tv monitor; television"`` -> ``("tvmonitor", ["tv monitor", "television"])``;
    ``"person, person in shirt"`` -> ``("person", ["person", "person in shirt"])``."""
    name = None
    if ":" in line:
        name, line = (x.strip() for x in line.split(":", 1))
    sep = ";" if ";" in line else ","
    prompts = [n.strip() for n in line.split(sep) if n.strip()]
    if not prompts:
        prompts = [name] if name else []
    return (name or (prompts[0] if prompts else "")), prompts


def read_class_file(path: str | Path) -> ClassList:
    """Read a class file -> :class:`ClassList`."""
    path = Path(path)
    if not path.is_file():
        raise TextsegError(f"{path}: class-name file not found")
    classes = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        classes.append(parse_class_line(line))
    if not classes:
        raise TextsegError(f"{path}: class-name file holds no classes")
    return ClassList([n for n, _ in classes], [p for _, p in classes])


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
    out = [parse_class_line(c) if isinstance(c, str) else (str(c[0]), [str(x) for x in c]) for c in classes]
    if not out or any(not p for _, p in out):
        raise TextsegError("class list must be non-empty and hold a name for every class")
    return ClassList([n for n, _ in out], [p for _, p in out])
