"""Experiment configs: Python files with ``get_config() -> ml_collections.ConfigDict`` plus dotted overrides.

A config is a file path (``configs/digits_cnn.py``) or the name of a config shipped in the package
(``digits_cnn``: ``lepton_jax/configs/digits_cnn.py``, so it works from a pip install with no checkout), optionally
followed by ``:ARG``. A config file is the single source of truth for hyper-parameters; the resolved config (after
overrides) is saved beside every run. Overrides look like ``--config.optim.lr=3e-4`` and must name an existing key;
values are parsed as Python literals and must match the type already in the config (ints widen to floats).
"""

from __future__ import annotations

import ast
import importlib.util
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ml_collections

from lepton_jax.errors import ConfigError

OVERRIDE_PREFIX = "--config."
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def packaged_configs() -> list[str]:
    """Names of the configs shipped in the package (``lepton_jax/configs/<name>.py``)."""
    return sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.py") if not p.name.startswith("_"))


def resolve_config(spec: str | Path) -> tuple[Path, str | None]:
    """A config argument -> (file, ``get_config`` argument or None). ``spec`` is a path (``configs/x.py``,
    ``configs/x.py:arg``) or a packaged config's name (``x``, ``x:arg``); an existing file wins over a name."""
    path, arg = split_config_arg(spec)
    if path.is_file():
        return path, arg
    name, _, name_arg = str(spec).partition(":")
    name = name.removesuffix(".py")
    if name.isidentifier():
        packaged = PACKAGED_CONFIGS / f"{name}.py"
        if packaged.is_file():
            return packaged, name_arg or None
    raise ConfigError(f"config {str(spec)!r} is neither a config file nor a packaged config; pass a path "
                      f"(configs/<name>.py) or one of: {', '.join(packaged_configs())}")


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Loads ``get_config()`` from a config file or packaged config name (see :func:`resolve_config`) and applies
    ``key=value`` overrides (without the prefix).

    ``file.py:arg`` / ``name:arg`` (big_vision style) calls ``get_config(arg)``: one file, several named variants."""
    path, arg = resolve_config(path)
    spec = importlib.util.spec_from_file_location(f"lepton_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a config file is user code: report where it broke
        raise ConfigError(f"config file {path} failed to load: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} must define get_config() returning an ml_collections.ConfigDict")
    try:
        config = module.get_config() if arg is None else module.get_config(arg)
    except TypeError as e:
        if arg is not None and "positional argument" in str(e):
            raise ConfigError(f"config file {path} takes no argument, got {path}:{arg}") from e
        raise
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"get_config() in {path} returned {type(config).__name__}, expected a ConfigDict")
    for item in overrides:
        apply_override(config, item, source=str(path))
    return config


def split_config_arg(path: str | Path) -> tuple[Path, str | None]:
    """``configs/x.py:arg`` -> (``configs/x.py``, ``"arg"``); a plain path -> (path, None)."""
    text = str(path)
    head, sep, tail = text.rpartition(".py:")
    if sep and tail and "/" not in tail:
        return Path(head + ".py"), tail
    return Path(text), None


def sibling_config(config_file: str | Path, name: str) -> ml_collections.ConfigDict:
    """``get_config()`` of ``name`` (e.g. ``"digits_cnn"``) in the same folder as ``config_file``: how one config
    file starts from another (``config = sibling_config(__file__, "digits_cnn")``)."""
    return load_config(Path(config_file).with_name(f"{name.removesuffix('.py')}.py"))


def split_override_args(argv: Iterable[str]) -> tuple[list[str], list[str]]:
    """Separates ``--config.a.b=v`` / ``--config.a.b v`` arguments from the rest of a command line."""
    rest, overrides = [], []
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(OVERRIDE_PREFIX):
            body = arg[len(OVERRIDE_PREFIX) :]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise ConfigError(f"override {arg} has no value; write {arg}=VALUE")
                body = f"{body}={argv[i + 1]}"
                i += 1
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def apply_override(config: ml_collections.ConfigDict, item: str, source: str = "config") -> None:
    """Sets one ``a.b.c=value`` override, checking that the key exists and the type matches."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    *parents, leaf = key.split(".")
    node = config
    for depth, part in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(parents[:depth]) or "<top level>"
            raise ConfigError(f"unknown config key {key!r} in {source}: no {part!r} under {where}; "
                              f"known: {_known(node)}")
        node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ConfigError(f"unknown config key {key!r} in {source}; known keys there: {_known(node)}")
    current = node[leaf]
    value = _coerce(_parse_literal(raw), current, key)
    try:
        node[leaf] = value
    except TypeError as e:
        raise ConfigError(f"override {key}={raw!r}: expected {type(current).__name__}, got "
                          f"{type(value).__name__}") from e


def _known(node: Any) -> str:
    return ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else "(not a section)"


def _parse_literal(raw: str) -> Any:
    lowered = raw.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _coerce(value: Any, current: Any, key: str) -> Any:
    """Matches an override's parsed value to the type of the value it replaces."""
    if current is None or value is None:
        return value
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(current, float) and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    elif isinstance(current, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif isinstance(current, str):
        return str(value) if not isinstance(value, str) else value
    elif isinstance(current, tuple | list) and isinstance(value, tuple | list):
        return type(current)(value)
    elif isinstance(current, ml_collections.ConfigDict) and isinstance(value, dict):
        return ml_collections.ConfigDict(value)
    elif type(value) is type(current):
        return value
    raise ConfigError(f"override {key}={value!r}: expected {type(current).__name__} "
                      f"(current value {current!r}), got {type(value).__name__}")


def to_dict(config: ml_collections.ConfigDict) -> dict:
    """A JSON-serialisable plain dict of a config."""
    return json.loads(config.to_json_best_effort())


def from_dict(data: dict) -> ml_collections.ConfigDict:
    """Rebuilds a config saved with :func:`to_dict` (lists come back as tuples where the config used them)."""
    return ml_collections.ConfigDict(data)


BASE_CONFIG = "digits_cnn.py"  # the complete base config: every key the library reads, with its default


def base_config() -> ml_collections.ConfigDict:
    """``get_config()`` of the base config (shipped in the package where present, else the repository's configs/)."""
    here = Path(__file__).resolve().parent
    for folder in (here / "configs", here.parent / "configs"):
        if (folder / BASE_CONFIG).is_file():
            return load_config(folder / BASE_CONFIG)
    raise ConfigError(f"the base config {BASE_CONFIG} is missing from the installation")


def saved_config(data: dict) -> ml_collections.ConfigDict:
    """A config as a run saved it (``config.json``), with every key added to the base config since then filled in
    from the base config (e.g. ``checkpoint.best_metric`` for runs older than it). Saved values always win; only
    config sections are merged key by key (never ``model``, whose keys depend on the model, nor mappings such as
    ``mesh.axes``)."""
    def merge(defaults: ml_collections.ConfigDict, saved: dict, prefix: str) -> dict:
        out = dict(saved)
        for key, value in defaults.items():
            if key not in saved:
                out[key] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
            elif (isinstance(value, ml_collections.ConfigDict) and isinstance(saved[key], dict)
                  and f"{prefix}{key}" not in DICT_SETTINGS):
                out[key] = merge(value, saved[key], f"{prefix}{key}.")
        return out

    return from_dict(merge(base_config(), data, ""))


# taken whole from the saved run, never merged with the base config's: mappings of user-chosen names, and the model
# section (each model has its own keyword arguments)
DICT_SETTINGS = ("mesh.axes", "mesh.dcn_axes", "model")
