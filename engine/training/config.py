"""Parsing and checking of an MMAR's ``config/config_train.json`` (no torch needed)."""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.training.errors import TrainConfigError

__all__ = [
    "METRICS",
    "TRAIN_CONFIG",
    "ComponentSpec",
    "TrainConfig",
    "load_train_config",
    "parse_train_config",
]

#: Where the training config lives inside an MMAR.
TRAIN_CONFIG = Path("config") / "config_train.json"

#: Built-in validation metrics and whether a higher value is better.
METRICS: dict[str, bool] = {"accuracy": True, "loss": False}

_COMPONENT_KEYS = ("model", "train_data", "validation_data", "loss", "optimizer")
_TOP_KEYS = ("epochs", "batch_size", "seed", *_COMPONENT_KEYS, "validation")
_SPEC_KEYS = ("name", "path", "args")
_VALIDATION_KEYS = ("metric", "batch_size")


@dataclass(frozen=True)
class ComponentSpec:
    """One ``{"name"|"path": ..., "args": {...}}`` entry of the training config.

    Attributes:
        key: The config key holding this component (``model``, ``optimizer``, ...).
        name: A built-in or torch class name, when given.
        path: A ``module.Class`` import path, when given.
        args: Keyword arguments for the constructor.
    """

    key: str
    name: str | None
    path: str | None
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How the component is named in messages: its ``name`` or its ``path``."""
        return self.name if self.name is not None else str(self.path)


@dataclass(frozen=True)
class TrainConfig:
    """A checked ``config_train.json``.

    Attributes:
        file: The file it was read from (for messages).
        epochs: Local epochs per round, unless the caller overrides them.
        batch_size: Training batch size.
        seed: Seed for weight initialisation, shuffling and dropout.
        model: The network.
        train_data: The site's training dataset.
        validation_data: The site's validation dataset.
        loss: The loss function (called as ``loss(output, target)``).
        optimizer: The optimizer (built with the model's parameters first).
        metric: The key validation metric; one of ``METRICS``.
        validation_batch_size: Batch size for validation.
    """

    file: Path
    epochs: int
    batch_size: int
    seed: int
    model: ComponentSpec
    train_data: ComponentSpec
    validation_data: ComponentSpec
    loss: ComponentSpec
    optimizer: ComponentSpec
    metric: str
    validation_batch_size: int


def load_train_config(mmar_root: str | Path) -> TrainConfig:
    """Read and check ``<mmar_root>/config/config_train.json``.

    Args:
        mmar_root: The MMAR folder.

    Returns:
        The checked config.

    Raises:
        TrainConfigError: The file is missing, is not JSON, or breaks the format.
    """
    file = Path(mmar_root) / TRAIN_CONFIG
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrainConfigError(
            file, None, "file not found; an MMAR needs config/config_train.json"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainConfigError(file, None, f"cannot be read: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TrainConfigError(
            file, None, f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    return parse_train_config(data, file)


def parse_train_config(data: object, file: str | Path) -> TrainConfig:
    """Check the decoded JSON of a training config.

    Args:
        data: The decoded JSON document.
        file: The file it came from, for messages.

    Returns:
        The checked config.

    Raises:
        TrainConfigError: The document breaks the format.
    """
    file = Path(file)
    top = _mapping(data, file, None, "a JSON object with the training settings")
    _no_unknown_keys(top, _TOP_KEYS, file, None)
    epochs = _positive_int(top, "epochs", file)
    batch_size = _positive_int(top, "batch_size", file)
    seed = _int(top, "seed", file, default=0)
    specs = {key: _component(top, key, file) for key in _COMPONENT_KEYS}

    validation = _mapping(
        top.get("validation", {}), file, "validation", 'an object like {"metric": "accuracy"}'
    )
    _no_unknown_keys(validation, _VALIDATION_KEYS, file, "validation")
    metric = validation.get("metric", "accuracy")
    if not isinstance(metric, str) or metric not in METRICS:
        raise TrainConfigError(
            file, "validation.metric", f"expected one of {_choices(METRICS)}, got {metric!r}"
        )
    val_batch = _positive_int(
        validation, "batch_size", file, default=batch_size, prefix="validation"
    )
    return TrainConfig(
        file=file,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        metric=metric,
        validation_batch_size=val_batch,
        **specs,
    )


def _component(top: Mapping[str, Any], key: str, file: Path) -> ComponentSpec:
    expected = (
        'an object {"name": "<built-in>", "args": {...}} or {"path": "module.Class", "args": {...}}'
    )
    if key not in top:
        raise TrainConfigError(file, key, f"missing; expected {expected}")
    spec = _mapping(top[key], file, key, expected)
    _no_unknown_keys(spec, _SPEC_KEYS, file, key)
    has_name, has_path = "name" in spec, "path" in spec
    if has_name == has_path:
        raise TrainConfigError(
            file, key, f'give exactly one of "name" and "path"; expected {expected}'
        )
    which = "name" if has_name else "path"
    value = spec[which]
    if not isinstance(value, str) or not value.strip():
        raise TrainConfigError(
            file, f"{key}.{which}", f"expected a non-empty string, got {value!r}"
        )
    if which == "path" and ("." not in value or value.startswith(".") or value.endswith(".")):
        raise TrainConfigError(
            file, f"{key}.path", f'expected "module.Class" (a dotted import path), got {value!r}'
        )
    args = _mapping(spec.get("args", {}), file, f"{key}.args", "an object of keyword arguments")
    return ComponentSpec(
        key=key,
        name=value if has_name else None,
        path=value if has_path else None,
        args=dict(args),
    )


def _mapping(value: object, file: Path, key: str | None, expected: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TrainConfigError(file, key, f"expected {expected}, got {_kind(value)}")
    return value


def _no_unknown_keys(
    obj: Mapping[str, Any], allowed: tuple[str, ...], file: Path, prefix: str | None
) -> None:
    for name in obj:
        if name not in allowed:
            key = f"{prefix}.{name}" if prefix else str(name)
            hint = difflib.get_close_matches(str(name), allowed, n=1)
            also = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise TrainConfigError(
                file, key, f"unknown key{also}; expected only {_choices(allowed)}"
            )


def _int(obj: Mapping[str, Any], name: str, file: Path, *, default: int | None = None) -> int:
    if name not in obj and default is not None:
        return default
    if name not in obj:
        raise TrainConfigError(file, name, "missing; expected an integer")
    value = obj[name]
    # bool is an int subclass; "true" epochs is a typo, not a count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TrainConfigError(file, name, f"expected an integer, got {value!r}")
    return value


def _positive_int(
    obj: Mapping[str, Any],
    name: str,
    file: Path,
    *,
    default: int | None = None,
    prefix: str | None = None,
) -> int:
    key = f"{prefix}.{name}" if prefix else name
    if name not in obj:
        if default is not None:
            return default
        raise TrainConfigError(file, key, "missing; expected a positive integer")
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TrainConfigError(file, key, f"expected a positive integer, got {value!r}")
    return value


def _choices(names: Iterable[str]) -> str:
    return ", ".join(repr(n) for n in names)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), f"{type(value).__name__} {value!r}"
    )
