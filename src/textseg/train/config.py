"""Typed training configs: small dataclasses, a YAML file over their defaults, ``--set`` overrides.

A recipe declares its config as nested dataclasses (every field with a default)::

    @dataclass
    class DataCfg:
        root: str = ""
        image_size: int = 224

    @dataclass
    class MyRecipeCfg:
        data: DataCfg = field(default_factory=DataCfg)
        train: TrainConfig = field(default_factory=TrainConfig)   # the engine's settings

    cfg = load_config(MyRecipeCfg, "exp.yaml", ["train.lr=3e-4", "data.image_size=128"])
    save_config(cfg, "runs/exp/config.yaml")                       # the resolved config

Precedence: dataclass defaults < YAML file < ``--set`` overrides (applied in order). Values are
parsed as YAML scalars/lists (``train.betas=[0.9,0.98]``, ``train.clip_grad=null``) and coerced
to the field's declared type; unknown keys and ill-typed values raise :class:`TextsegError`
naming the key, so a typo never silently trains the wrong thing.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from textseg.errors import TextsegError

T = TypeVar("T")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE.yaml`` and repeatable ``--set key.sub=value`` to a parser."""
    parser.add_argument("--config", default=None, help="YAML file overriding the recipe's defaults")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config value, dotted key (e.g. --set train.lr=3e-4); repeatable",
    )


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Build ``cls`` from its defaults, then the YAML file at ``path``, then ``key=value`` overrides."""
    data = config_to_dict(cls())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise TextsegError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise TextsegError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(loaded, dict):
            raise TextsegError(f"{path}: top level must be a mapping of config sections")
        _merge(data, loaded, "")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise TextsegError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node, parts = data, key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise TextsegError(f"unknown config key {'.'.join(parts[: i + 1])!r} (in --set {item})")
            node = node[part]
        if parts[-1] not in node:
            raise TextsegError(f"unknown config key {key.strip()!r}; known here: {', '.join(node)}")
        node[parts[-1]] = value
    return from_dict(cls, data)


def _merge(dst: dict, src: Mapping, prefix: str) -> None:
    for k, v in src.items():
        if k not in dst:
            raise TextsegError(f"unknown config key {prefix + str(k)!r}; known here: {', '.join(dst)}")
        if isinstance(dst[k], dict) and isinstance(v, Mapping):
            _merge(dst[k], v, f"{prefix}{k}.")
        else:
            dst[k] = v


def config_to_dict(cfg: Any) -> dict:
    """A dataclass instance -> nested dict of plain Python values (tuples become lists)."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def from_dict(cls: type[T], data: Mapping, prefix: str = "") -> T:
    """Nested dict -> dataclass ``cls``, coercing every value to its declared field type."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        kwargs[f.name] = _coerce(hints[f.name], data[f.name], prefix + f.name)
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TextsegError(f"unknown config key(s) {sorted(prefix + k for k in unknown)}")
    return cls(**kwargs)


def _coerce(tp, value, key: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise TextsegError(f"config key {key!r} must be a mapping, got {value!r}")
        return from_dict(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except TextsegError as e:
                errors.append(str(e))
        raise TextsegError(errors[0] if errors else f"config key {key!r}: bad value {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise TextsegError(f"config key {key!r} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise TextsegError(f"config key {key!r} needs {len(args)} values, got {value!r}")
            return tuple(_coerce(a, v, key) for a, v in zip(args, value))
        item = args[0] if args else Any
        out = [_coerce(item, v, key) for v in value]
        return tuple(out) if origin is tuple else out
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TextsegError(f"config key {key!r} must be true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise TextsegError(f"config key {key!r} must be a number, got {value!r}")
        if isinstance(value, str):
            try:
                value = float(value)  # YAML reads "1e-3" as a string
            except ValueError:
                raise TextsegError(f"config key {key!r} must be a number, got {value!r}") from None
        if tp is int:
            if float(value) != int(value):
                raise TextsegError(f"config key {key!r} must be an integer, got {value!r}")
            return int(value)
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise TextsegError(f"config key {key!r} must be a string, got {value!r}")
        return "" if value is None else str(value)
    return value


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (reload it with ``load_config(cls, path)``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
