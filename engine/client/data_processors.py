"""Pre-, post- and client-state processors of the update pipeline (``DataProcessor.process``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine import clara_compat
from engine.client.fl_context import FLContext
from engine.components import build_component
from engine.config import ComponentSpec, ConfigError
from protos import federated_pb2 as pb

__all__ = [
    "CLIENT_STATE_PROCESSORS",
    "BestMetricGenerator",
    "ClientStateProcessor",
    "DataCompressor",
    "DataContext",
    "DataDeCompressor",
    "DataProcessor",
    "IteratorNumberGenerator",
    "build_client_state_processors",
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
    """Instantiates a config's processor list, in order.

    Code written for Clara imports its base class from Clara's module
    (``fed_learn.components.data_processor``): those paths are made to mean ours first.
    """
    clara_compat.install()
    return [
        build_component(s, DATA_PROCESSORS, "data processor", None, search_paths) for s in specs
    ]


class ClientStateProcessor:
    """Adds metadata to every ClientState this site sends (``client_state_processors``).

    The lineage's hook: the communicator calls ``process`` on the ClientState of every call
    (registration aside: GetModel, SubmitUpdate, Heartbeat, Quit, cross-site validation),
    with the client's ``app_ctx`` (site, round, status). A processor writes into
    ``client_state.meta_data`` (a protobuf Struct: ``client_state.meta_data.update({...})``)
    in place, or returns the ClientState to send instead. The server receives it with the
    call; the reference server does not read it.

    No processor is built in (Clara's ``MetadataGenerator`` is named in its module list, but
    what it wrote is not public): a site's own one is given by ``path``, under the site policy.
    Deriving from this class is not required (Clara's code derives from Clara's base); a
    ``process(client_state, app_ctx)`` method is.
    """

    def process(self, client_state: pb.ClientState, app_ctx: dict[str, Any]) -> Any:
        raise NotImplementedError


#: Built-in client-state processors, by name: none (see ClientStateProcessor).
CLIENT_STATE_PROCESSORS: dict[str, type] = {}


def build_client_state_processors(
    specs: list[ComponentSpec], search_paths: list[Path] | None = None
) -> list[Any]:
    """Instantiates ``client_state_processors``, in order.

    Raises:
        ConfigError: what ``build_component`` raises, or a component without a callable
            ``process(client_state, app_ctx)`` (named by file and key).
    """
    clara_compat.install()
    built = []
    for spec in specs:
        processor = build_component(
            spec, CLIENT_STATE_PROCESSORS, "client state processor", None, search_paths
        )
        if not callable(getattr(processor, "process", None)):
            which = "path" if spec.path else "name"
            key = f"{spec.key}.{which}" if spec.key else which
            raise ConfigError(
                spec.file or Path("<config>"),
                key,
                f"{spec.label!r} has no process(client_state, app_ctx) method; a client "
                "state processor adds metadata to every ClientState through it",
            )
        built.append(processor)
    return built
