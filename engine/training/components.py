"""The training config's components: our built-ins, torch classes, or code under custom/.

Building itself is ``engine.components`` (one builder for every config); this module adds what
only training has: the built-ins per ``config_train.json`` key and the torch namespaces a
``name`` falls back to.
"""

from __future__ import annotations

import importlib.machinery
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from engine import components
from engine.components import _custom_dirs
from engine.config import ComponentSpec
from engine.training.errors import TrainConfigError

__all__ = ["BUILTINS", "build_component", "check_component", "is_installed", "resolve_component"]

_DATA = {
    "SyntheticClassification": "engine.training.data:SyntheticClassification",
    "DatalistDataset": "engine.training.datalist:DatalistDataset",
}

#: Built-in components per config key, as "module:attribute" so they import on demand.
BUILTINS: dict[str, dict[str, str]] = {
    "model": {"MLP": "engine.training.models:MLP"},
    "train_data": _DATA,
    "validation_data": _DATA,
    "loss": {},
    "optimizer": {},
}


def _torch_fallback(key: str) -> components.Fallback | None:
    if key not in ("model", "loss", "optimizer"):
        return None

    def look(name: str) -> tuple[Any, list[str], str]:
        import torch  # deferred: torch loads in the worker, not to check a config

        ns: Any
        base: type
        if key == "optimizer":
            where, ns, base = "torch.optim", torch.optim, torch.optim.Optimizer
        else:
            where, ns, base = "torch.nn", torch.nn, torch.nn.Module
        obj = getattr(ns, name, None)
        if isinstance(obj, type) and issubclass(obj, base) and not name.startswith("_"):
            return obj, [], where
        known = [n for n in dir(ns) if isinstance(getattr(ns, n), type) and not n.startswith("_")]
        return None, known, where

    return look


def resolve_component(
    spec: ComponentSpec, file: Path, custom_dir: Path | None
) -> Callable[..., Any]:
    """Find the class (or factory) a component names.

    ``name`` is looked up among our built-ins for the key, then in ``torch.nn`` (models, losses)
    or ``torch.optim`` (optimizers). ``path`` is imported with ``custom_dir`` on ``sys.path``.

    Raises:
        TrainConfigError: The name is unknown, TensorFlow-only, or the path cannot be imported.
    """
    return components.resolve_component(
        _with_file(spec, file),
        BUILTINS.get(spec.key, {}),
        "component",
        custom_dir=custom_dir,
        fallback=_torch_fallback(spec.key),
        error=TrainConfigError,
    )


def is_installed(dotted: str) -> bool:
    """Whether module ``dotted`` is installed, found on disk without importing any of it."""
    top, *rest = dotted.split(".")
    # The installed packages only: not an MMAR's custom/ this process put on sys.path, and not
    # sys.modules (a site's module imported earlier is not "installed").
    custom = {c.resolve() for c in _custom_dirs}
    search = [p for p in sys.path if not p or Path(p).resolve() not in custom]
    try:
        spec = importlib.machinery.PathFinder.find_spec(top, search)  # nothing is imported
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    locations = [Path(p) for p in (spec.submodule_search_locations or [])]
    for i, part in enumerate(rest):
        last = i == len(rest) - 1
        packages = [loc / part for loc in locations if (loc / part).is_dir()]
        if packages:
            locations = packages
            continue
        return last and any(
            any(loc.glob(f"{part}.py")) or any(loc.glob(f"{part}.*.so")) for loc in locations
        )
    return True


def check_component(spec: ComponentSpec, file: Path, custom_dir: Path | None) -> None:
    """Resolve a built-in or torch component and check its arguments, without building it.

    Components named by ``path`` (a site's own code) are only checked to exist under
    ``custom/``: importing them runs their code, which only the training worker does.

    Raises:
        TrainConfigError: naming the key and what is expected.
    """
    spec = _with_file(spec, file)
    if spec.path is not None:
        dotted = spec.path.rpartition(".")[0]
        module = dotted.replace(".", "/")
        if custom_dir is not None and (
            (custom_dir / f"{module}.py").is_file() or (custom_dir / module).is_dir()
        ):
            return
        if is_installed(dotted):  # an installed package's class (torch.nn.Linear, MONAI, ...)
            return
        where = f"{custom_dir}" if custom_dir is not None else "the MMAR's custom/ (none here)"
        raise TrainConfigError(
            file,
            f"{spec.key}.path",
            f"no module {dotted!r} in {where}, nor installed in this Python",
        )
    factory = resolve_component(spec, file, custom_dir)
    leading: tuple[Any, ...] = ([],) if spec.key == "optimizer" else ()
    context = {"site_name": "check", "mmar_root": file.parent.parent}
    components.bind_arguments(
        spec, factory, leading=leading, context=context, error=TrainConfigError
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
        context: ``{"site_name": ..., "mmar_root": Path, ...}``.
        *leading: Positional arguments before ``args`` (an optimizer's parameters).

    Returns:
        The built object.

    Raises:
        TrainConfigError: The component cannot be found, or rejects its arguments.
    """
    return components.build_component(
        _with_file(spec, file),
        BUILTINS.get(spec.key, {}),
        "component",
        custom_dir=custom_dir,
        context=context,
        leading=leading,
        fallback=_torch_fallback(spec.key),
        error=TrainConfigError,
    )


def _with_file(spec: ComponentSpec, file: Path) -> ComponentSpec:
    if spec.file == file:
        return spec
    return ComponentSpec(name=spec.name, path=spec.path, args=spec.args, key=spec.key, file=file)
