"""Turns config components into objects: our built-ins, torch classes, or code under custom/."""

from __future__ import annotations

import difflib
import importlib
import inspect
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from engine.training.config import ComponentSpec
from engine.training.errors import TrainConfigError

__all__ = ["BUILTINS", "build_component", "resolve_component"]

_DATA = {"SyntheticClassification": "engine.training.data:SyntheticClassification"}

#: Built-in components per config key, as "module:attribute" so they import on demand.
BUILTINS: dict[str, dict[str, str]] = {
    "model": {"MLP": "engine.training.models:MLP"},
    "train_data": _DATA,
    "validation_data": _DATA,
    "loss": {},
    "optimizer": {},
}

# custom/ folders this process has put on sys.path; a cached module loaded from one of them
# must not answer for another MMAR's custom/ code of the same name.
_custom_dirs: set[Path] = set()


def _torch_namespace(key: str) -> tuple[str, Any, type] | None:
    if key in ("model", "loss"):
        return "torch.nn", torch.nn, torch.nn.Module
    if key == "optimizer":
        return "torch.optim", torch.optim, torch.optim.Optimizer
    return None


def resolve_component(
    spec: ComponentSpec, file: Path, custom_dir: Path | None
) -> Callable[..., Any]:
    """Find the class (or factory) a component names.

    ``name`` is looked up among our built-ins for the key, then in ``torch.nn`` (models, losses)
    or ``torch.optim`` (optimizers). ``path`` is imported with ``custom_dir`` on ``sys.path``.

    Args:
        spec: The component.
        file: The config file, for messages.
        custom_dir: The MMAR's ``custom/`` folder, or ``None``.

    Returns:
        A callable that builds the component.

    Raises:
        TrainConfigError: The name is unknown or the path cannot be imported.
    """
    if spec.path is not None:
        return _import_path(spec, spec.path, file, custom_dir)
    name = str(spec.name)
    builtins = BUILTINS.get(spec.key, {})
    if name in builtins:
        module_name, _, attr = builtins[name].partition(":")
        return getattr(importlib.import_module(module_name), attr)  # type: ignore[no-any-return]
    candidates = list(builtins)
    namespace = _torch_namespace(spec.key)
    if namespace is not None:
        _, ns, base = namespace
        obj = getattr(ns, name, None)
        if isinstance(obj, type) and issubclass(obj, base) and not name.startswith("_"):
            return obj
        candidates += [
            n for n in dir(ns) if isinstance(getattr(ns, n), type) and not n.startswith("_")
        ]
    hint = difflib.get_close_matches(name, candidates, n=1)
    where = ["our built-ins" + (f" ({', '.join(builtins)})" if builtins else "")]
    if namespace is not None:
        where.append(namespace[0])
    raise TrainConfigError(
        file,
        f"{spec.key}.name",
        f"unknown component {name!r}"
        + (f" (did you mean {hint[0]!r}?)" if hint else "")
        + f"; looked in {' and '.join(where)}. For your own code use "
        '"path": "module.Class" with the module under the MMAR\'s custom/ folder',
    )


def build_component(
    spec: ComponentSpec,
    file: Path,
    custom_dir: Path | None,
    context: Mapping[str, Any],
    *leading: Any,
) -> Any:
    """Resolve a component and call it with ``*leading`` and its ``args``.

    A constructor with a ``context`` parameter also gets ``context`` (unless args set it).

    Args:
        spec: The component.
        file: The config file, for messages.
        custom_dir: The MMAR's ``custom/`` folder, or ``None``.
        context: ``{"site_name": ..., "mmar_root": Path}``.
        *leading: Positional arguments before ``args`` (an optimizer's parameters).

    Returns:
        The built object.

    Raises:
        TrainConfigError: The component cannot be found, or rejects its arguments.
    """
    factory = resolve_component(spec, file, custom_dir)
    kwargs = dict(spec.args)
    try:
        signature: inspect.Signature | None = inspect.signature(factory)
    except (TypeError, ValueError):  # some C-implemented callables have no signature
        signature = None
    if signature is not None:
        params = signature.parameters
        context_param = params.get("context")
        if (
            "context" not in kwargs
            and context_param is not None
            and context_param.kind
            in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        ):
            kwargs["context"] = dict(context)
        # Binding first turns a misspelt argument into a message naming the exact key.
        try:
            signature.bind(*leading, **kwargs)
        except TypeError as exc:
            accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
            unknown = [k for k in kwargs if k not in params]
            if unknown and not accepts_any:
                known = [
                    n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL
                ][len(leading) :]
                hint = difflib.get_close_matches(unknown[0], known, n=1)
                raise TrainConfigError(
                    file,
                    f"{spec.key}.args.{unknown[0]}",
                    f"{spec.label} takes no argument {unknown[0]!r}"
                    + (f" (did you mean {hint[0]!r}?)" if hint else "")
                    + f"; it accepts {', '.join(known) or 'no arguments'}",
                ) from exc
            raise TrainConfigError(
                file, f"{spec.key}.args", f"{spec.label} rejected its arguments: {exc}"
            ) from exc
    try:
        return factory(*leading, **kwargs)
    except (TypeError, ValueError) as exc:
        raise TrainConfigError(
            file, f"{spec.key}.args", f"{spec.label} rejected its arguments: {exc}"
        ) from exc


def _import_path(
    spec: ComponentSpec, path: str, file: Path, custom_dir: Path | None
) -> Callable[..., Any]:
    module_name, _, attr = path.rpartition(".")
    key = f"{spec.key}.path"
    if custom_dir is not None and custom_dir.is_dir():
        custom_dir = custom_dir.resolve()
        _use_custom_dir(custom_dir, module_name)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure in user code is a bad component, not a crash
        where = f" (custom/ is {custom_dir})" if custom_dir is not None else ""
        raise TrainConfigError(
            file, key, f"cannot import module {module_name!r}{where}: {type(exc).__name__}: {exc}"
        ) from exc
    obj = getattr(module, attr, None)
    if obj is None:
        raise TrainConfigError(
            file,
            key,
            f"module {module_name!r} ({getattr(module, '__file__', '?')}) "
            f"has no attribute {attr!r}",
        )
    if not callable(obj):
        raise TrainConfigError(file, key, f"{path!r} is not a class or factory function")
    return obj  # type: ignore[no-any-return]


def _use_custom_dir(custom_dir: Path, module_name: str) -> None:
    entry = str(custom_dir)
    # Clara puts custom/ on PYTHONPATH; first place so this MMAR's modules win over another
    # MMAR's custom/ that an earlier fitter in this process put there.
    if sys.path[:1] != [entry]:
        while entry in sys.path:
            sys.path.remove(entry)
        sys.path.insert(0, entry)
    _custom_dirs.add(custom_dir)
    # Files written since the last import (a freshly deployed MMAR) are otherwise invisible to
    # the path finders' directory caches.
    importlib.invalidate_caches()
    top = module_name.partition(".")[0]
    cached = sys.modules.get(top)
    if cached is None:
        return
    origin = _module_dir(cached)
    if origin is None or origin == custom_dir:
        return
    if any(origin == d or d in origin.parents for d in _custom_dirs if d != custom_dir):
        # Loaded from another MMAR's custom/: forget it so this MMAR's file is imported.
        for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
            del sys.modules[name]


def _module_dir(module: Any) -> Path | None:
    file = getattr(module, "__file__", None)
    if not file:
        return None
    path = Path(file).resolve()
    # A package's __init__.py sits one level deeper than the sys.path entry.
    return path.parent.parent if path.name == "__init__.py" else path.parent
