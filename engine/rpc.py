"""Method table of the FederatedTraining service, shared by our client stub and our server.

The model-carrying methods move pre-encoded frames (``engine.serde``) as raw bytes instead of
message objects; everything else uses the generated message classes. The wire format is exactly
that of ``protos/federated.proto``: the generated stub and servicer interoperate with ours.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from protos import federated_pb2 as pb

__all__ = ["SERVICE", "TOKEN_HEADER", "FederatedStub", "federated_generic_handler"]

SERVICE = "fedlearn.FederatedTraining"
TOKEN_HEADER = "x-custom-token"

_ser = lambda cls: cls.SerializeToString  # noqa: E731
_de = lambda cls: cls.FromString  # noqa: E731

# name: (cardinality, request type or None for raw frames, response type or None for raw frames)
METHODS: dict[str, tuple[str, Any, Any]] = {
    "Register": ("unary_unary", pb.ClientLogin, pb.FederatedSummary),
    "Quit": ("unary_unary", pb.ClientState, pb.FederatedSummary),
    "GetModel": ("unary_stream", pb.ClientState, None),
    "SubmitUpdate": ("stream_unary", None, pb.FederatedSummary),
    "Heartbeat": ("unary_unary", pb.ClientState, pb.FederatedSummary),
    "SubmitBestLocalModel": ("stream_unary", None, pb.FederatedSummary),
    "GetValidationModels": ("unary_stream", pb.ClientState, None),
    "SubmitCrossSiteValidationResults": (
        "unary_unary",
        pb.CrossValidationResults,
        pb.FederatedSummary,
    ),
}


class FederatedStub:
    """Client stub: ``GetModel(state)`` yields raw frames; ``SubmitUpdate(frames)`` sends them."""

    def __init__(self, channel: grpc.Channel) -> None:
        for name, (kind, req, resp) in METHODS.items():
            factory = getattr(channel, kind)
            setattr(
                self,
                name,
                factory(
                    f"/{SERVICE}/{name}",
                    request_serializer=_ser(req) if req else None,
                    response_deserializer=_de(resp) if resp else None,
                ),
            )

    # Typed attributes for readers and mypy; set in __init__.
    Register: Callable[..., pb.FederatedSummary]
    Quit: Callable[..., pb.FederatedSummary]
    GetModel: Callable[..., Any]
    SubmitUpdate: Callable[..., pb.FederatedSummary]
    Heartbeat: Callable[..., pb.FederatedSummary]
    SubmitBestLocalModel: Callable[..., pb.FederatedSummary]
    GetValidationModels: Callable[..., Any]
    SubmitCrossSiteValidationResults: Callable[..., pb.FederatedSummary]


def federated_generic_handler(servicer: Any) -> grpc.GenericRpcHandler:
    """A handler that routes every method to ``servicer.<Method>(request_or_iterator, context)``."""
    handlers = {}
    for name, (kind, req, resp) in METHODS.items():
        make = getattr(grpc, f"{kind}_rpc_method_handler")
        handlers[name] = make(
            getattr(servicer, name),
            request_deserializer=_de(req) if req else None,
            response_serializer=_ser(resp) if resp else None,
        )
    return grpc.method_handlers_generic_handler(SERVICE, handlers)
