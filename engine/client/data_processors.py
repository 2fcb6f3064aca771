"""Pre-, post- and client-state processors of the update pipeline (``DataProcessor.process``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.client.fl_context import FLContext
from engine.components import build_component
from engine.config import ComponentSpec
from protos import federated_pb2 as pb

__all__ = [
    "BestMetricGenerator",
    "DataCompressor",
    "DataContext",
    "DataDeCompressor",
    "DataProcessor",
    "IteratorNumberGenerator",
    "build_processors",
]


@dataclass
class DataContext:
    """What a processor sees: the tensors, the message header, the step's context."""

    model: dict[str, np.ndarray]
    header: Any = None  # pb.Contribution on the way out, pb.CurrentModel on the way in
    fl_ctx: FLContext = field(default_factory=FLContext)


class DataProcessor:
    """Changes a DataContext in place (pre: before upload; post: after download)."""

    def process(self, data_ctx: DataContext, app_ctx: dict[str, Any]) -> None:
        raise NotImplementedError


class IteratorNumberGenerator(DataProcessor):
    """Writes the number of local iterations into the contribution (``n_iter``)."""

    def __init__(self, field: str = "n_iter") -> None:
        if field != "n_iter":
            raise ValueError(f"field must be 'n_iter', got {field!r}")
        self.field = field

    def process(self, data_ctx: DataContext, app_ctx: dict[str, Any]) -> None:
        n_iter = int(data_ctx.fl_ctx.get_prop("n_iter", 1))
        if isinstance(data_ctx.header, pb.Contribution):
            data_ctx.header.n_iter = max(1, n_iter)


class BestMetricGenerator(DataProcessor):
    """Writes the best local validation metric into the contribution's metadata."""

    def __init__(self, field: str = "best_validation_metric") -> None:
        self.field = field

    def process(self, data_ctx: DataContext, app_ctx: dict[str, Any]) -> None:
        best = data_ctx.fl_ctx.get_prop("best_validation_metric")
        if best is not None and isinstance(data_ctx.header, pb.Contribution):
            data_ctx.header.meta_data.update({self.field: float(best)})


class DataCompressor(DataProcessor):
    """Clara's DataCompressor (pre-processor): the update travels compressed.

    Clara zipped each tensor's bytes inside the message. Here models move as streams of raw
    chunks, and the gRPC channel compresses them: listing DataCompressor (or DataDeCompressor)
    makes the site's channel use Gzip when ``compression`` is not set (see
    ``MMARClientConfig.wire_compression``), so the arrays themselves pass through unchanged.
    """

    #: The channel compression this processor asks for.
    compression = "Gzip"

    def __init__(self, **args: Any) -> None:
        if args:
            raise ValueError(f"DataCompressor takes no arguments, got {sorted(args)}")

    def process(self, data_ctx: DataContext, app_ctx: dict[str, Any]) -> None:
        data_ctx.fl_ctx.set_prop("wire_compression", self.compression)


class DataDeCompressor(DataCompressor):
    """Clara's DataDeCompressor (post-processor): a compressed model is decompressed.

    gRPC decompresses what the server sent compressed before the stream reaches the site, so
    the arrays pass through unchanged; like DataCompressor it asks for a Gzip channel.
    """

    def __init__(self, **args: Any) -> None:
        if args:
            raise ValueError(f"DataDeCompressor takes no arguments, got {sorted(args)}")


DATA_PROCESSORS: dict[str, type] = {
    "IteratorNumberGenerator": IteratorNumberGenerator,
    "BestMetricGenerator": BestMetricGenerator,
    "DataCompressor": DataCompressor,
    "DataDeCompressor": DataDeCompressor,
}


def build_processors(
    specs: list[ComponentSpec], search_paths: list[Path] | None = None
) -> list[Any]:
    """Instantiates a config's processor list, in order."""
    return [
        build_component(s, DATA_PROCESSORS, "data processor", None, search_paths) for s in specs
    ]
