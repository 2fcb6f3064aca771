"""FLContext and RemoteModel: what travels with one federated step (a context bag, a model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from protos import federated_pb2 as pb

__all__ = ["FLContext", "RemoteModel"]


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


@dataclass
class RemoteModel:
    """A model received from the server: its meta, owner and tensors."""

    meta: pb.ModelMetaData
    params: dict[str, np.ndarray]
    owner: str = "server"
    meta_data: dict[str, Any] | None = None

    @property
    def nbytes(self) -> int:
        return sum(int(v.nbytes) for v in self.params.values())
