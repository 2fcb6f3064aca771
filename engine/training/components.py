"""The training config's components: our built-ins, torch classes, or code under custom/.

Building itself is ``engine.components`` (one builder for every config); this module adds what
only training has: the built-ins per ``config_train.json`` key and the torch namespaces a
``name`` falls back to.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from engine import components
from engine.config import ComponentSpec
from engine.training.errors import TrainConfigError

__all__ = ["BUILTINS", "build_component", "check_component", "resolve_component"]

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


def check_component(spec: ComponentSpec, file: Path, custom_dir: Path | None) -> None:
    """Resolve a built-in or torch component and check its arguments, without building it.

    Components named by ``path`` (a site's own code) are only checked to exist under
    ``custom/``: importing them runs their code, which only the training worker does.

    Raises:
        TrainConfigError: naming the key and what is expected.
    """
    spec = _with_file(spec, file)
    if spec.path is not None:
        missing = components.missing_module(spec.path, custom_dir)
        if missing:
            raise TrainConfigError(file, f"{spec.key}.path", missing)
        return
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
