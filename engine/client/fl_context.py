"""FLContext: named properties that travel with one federated step through the processors."""

from __future__ import annotations

from typing import Any

__all__ = ["FLContext"]


class FLContext:
    """A small property bag (the lineage's ``fed_learn.model_meta.FLContext``)."""

    def __init__(self, **props: Any) -> None:
        self._props: dict[str, Any] = dict(props)

    def get_prop(self, key: str, default: Any = None) -> Any:
        return self._props.get(key, default)

    def set_prop(self, key: str, value: Any) -> None:
        self._props[key] = value

    def props(self) -> dict[str, Any]:
        return dict(self._props)
