"""Plug-ins by import path: ``"my_pkg.models:Tiny"`` names the attribute ``Tiny`` of module ``my_pkg.models``.

A model (``model.name``) or a lake source (``lepton-jax lake ingest --source``) given as an import path is stored in
the run's config or the table's lineage as that string, so every later command (eval, predict, robust-eval, the
registry, serve, export) rebuilds it the same way, in any process where the module is importable (installed, on
``PYTHONPATH``, or in the working directory). Names registered in a live Python process
(:func:`lepton_jax.models.register_model`) only exist in that process; use an import path for anything that runs in
another one.

A plug-in is called with the config keys its signature declares (:func:`declared_kwargs`): a model whose
constructor takes only ``(input_shape, num_classes, rngs)`` trains with the base config, whose ``model`` section also
holds the built-in models' keys (``features``, ``hidden``, ``dropout``, ``dtype``).
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Iterable
from typing import Any

from lepton_jax.errors import ConfigError

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_import_path(name: str) -> bool:
    """``pkg.module:Attr`` (module and attribute are dotted Python identifiers)."""
    return bool(_IMPORT_PATH.match(name))


def load_object(path: str, what: str = "object") -> Any:
    """The object ``module:attr`` names; a :class:`ConfigError` (one line) when the module or attribute is missing."""
    if not is_import_path(path):
        raise ConfigError(f"{what} {path!r} is not an import path; write package.module:Name")
    module_name, attr = path.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{what} {path!r}: cannot import {module_name!r} ({e}); install it or put its folder on "
                          "PYTHONPATH") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{what} {path!r} is a {type(obj).__name__}, not a class or function")
    return obj


def declared_kwargs(factory: Callable[..., Any], kwargs: dict[str, Any], inherited: Iterable[str]) -> dict[str, Any]:
    """``kwargs`` less the ``inherited`` keys (defaults a config section carries for other plug-ins) that
    ``factory``'s signature does not declare; all of ``kwargs`` when it takes ``**kwargs`` or has no signature. Keys
    that are not inherited always pass, so a misspelt key still fails the call."""
    try:  # a class's own __init__ (nnx.Module's metaclass makes the class itself look like (*args, **kwargs))
        parameters = inspect.signature(factory.__init__ if inspect.isclass(factory) else factory).parameters.values()
    except (TypeError, ValueError):  # a builtin or extension type without a signature
        return dict(kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return dict(kwargs)
    names = {p.name for p in parameters if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
    inherited = set(inherited)
    return {k: v for k, v in kwargs.items() if k in names or k not in inherited}
