"""Builds ``{"name"|"path", "args"}`` config components, with errors naming the config key."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.config import ComponentSpec, ConfigError

__all__ = ["build_component", "import_path"]


def import_path(dotted: str, search_paths: list[Path] | None = None) -> Any:
    """Imports ``module.Class`` (with ``search_paths``, e.g. an MMAR's custom/, on sys.path)."""
    module_name, _, attr = dotted.rpartition(".")
    if not module_name:
        raise ImportError(f"{dotted!r} is not of the form module.Class")
    for p in search_paths or []:
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"module {module_name!r} has no {attr!r}") from None


def build_component(
    spec: ComponentSpec,
    builtins: Mapping[str, type],
    kind: str,
    base: type | None = None,
    search_paths: list[Path] | None = None,
) -> Any:
    """Instantiates a component from its spec.

    Args:
        spec: the parsed component; ``spec.where`` names file and key for errors.
        builtins: the names a ``"name"`` may take.
        kind: what it is, for messages ("privacy protocol", "pre-processor").
        base: when given, the class must derive from it.
        search_paths: folders put on sys.path for ``"path"`` components.

    Raises:
        ConfigError: unknown name, import failure, wrong base class, or bad args.
    """
    where = spec.where or kind
    path, key = [*where.split(": ", 1), ""][:2] if ": " in where else (where, "")
    if spec.name is not None:
        cls = builtins.get(spec.name)
        if cls is None:
            known = ", ".join(sorted(builtins)) or "none"
            raise ConfigError(path, key, f"unknown {kind} {spec.name!r} (known: {known})")
    else:
        try:
            cls = import_path(str(spec.path), search_paths)
        except Exception as exc:  # ImportError, SyntaxError in custom code, ...
            raise ConfigError(path, key, f"cannot import {kind} {spec.path!r}: {exc}") from None
    if base is not None and not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(path, key, f"{spec.ref!r} is not a {base.__name__}")
    try:
        return cls(**spec.args)
    except (TypeError, ValueError) as exc:
        # A component may say which argument was wrong (``exc.arg``): the key then names it.
        arg = getattr(exc, "arg", None)
        where_key = f"{key}.args.{arg}" if arg else f"{key}.args"
        raise ConfigError(path, where_key, f"bad arguments for {spec.ref}: {exc}") from None
