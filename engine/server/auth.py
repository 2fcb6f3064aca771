"""The reference server's checks of its callers: session tokens and certificate identities."""

from __future__ import annotations

import logging
import re

import grpc

from engine.config import ServerConfig
from engine.rpc import TOKEN_HEADER
from engine.tls import (
    NAME_MISMATCH,
    NOT_IN_FEDERATION,
    ROLE_SITE,
    TOKEN_REFUSED,
    WRONG_ROLE,
    PeerIdentity,
    peer_identity,
)
from protos import federated_pb2 as pb

__all__ = [
    "Abort",
    "call_token",
    "check_name",
    "check_peer",
    "check_registration_peer",
    "check_site_peer",
]

log = logging.getLogger("engine.server")

_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class Abort(Exception):
    """Ends an RPC with a status code and details (the servicer turns it into an abort)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


def call_token(state: pb.ClientState, context: grpc.ServicerContext) -> str:
    """The session token of a call (its message's or its header's; both must agree)."""
    metadata = {k: str(v) for k, v in context.invocation_metadata()}
    token = state.token or metadata.get(TOKEN_HEADER, "")
    if not token:
        raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "Could not read client token")
    header = metadata.get(TOKEN_HEADER)
    if header is not None and header != token:
        raise Abort(grpc.StatusCode.UNAUTHENTICATED, "token in header and message differ")
    return token


def check_name(name: str) -> None:
    """Refuses a site name that is not a plain name (letters, digits, ``._-``; up to 64)."""
    if not _SITE_NAME.fullmatch(name):
        raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid client name {name!r}")


def check_peer(
    config: ServerConfig, secure: bool, context: grpc.ServicerContext, role: str
) -> PeerIdentity | None:
    """The caller's certificate identity (None without TLS), checked for ``role``.

    gRPC has verified the certificate against the authority before any call gets here.
    """
    if not secure:
        return None
    peer = peer_identity(context)
    if peer is None:
        raise Abort(grpc.StatusCode.UNAUTHENTICATED, "no client certificate")
    if peer.role != role:
        raise Abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{WRONG_ROLE}: {peer.common_name!r} has a certificate of role "
            f"{peer.role or 'none'!r}; this needs a {role} certificate",
        )
    allowed = config.fl_clients if role == ROLE_SITE else config.admin_clients
    if allowed is not None and peer.common_name not in allowed:
        what = NOT_IN_FEDERATION if role == ROLE_SITE else "admin not in the federation"
        raise Abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{what}: {peer.common_name!r} is not one of the {role}s of {config.task_name!r}",
        )
    return peer


def check_site_peer(peer: PeerIdentity | None, site: str, context: grpc.ServicerContext) -> None:
    """With TLS, a session's token is only good over its own site's certificate."""
    if peer is not None and peer.common_name != site:
        log.warning(
            "refused a call from %s (certificate %r) with a token of another session",
            context.peer(),
            peer.common_name,
        )
        raise Abort(
            grpc.StatusCode.UNAUTHENTICATED,
            f"{TOKEN_REFUSED}: it was not issued to the session of {peer.common_name!r} "
            "(the site named in this connection's certificate)",
        )


def check_registration_peer(
    peer: PeerIdentity | None, name: str, context: grpc.ServicerContext
) -> None:
    """With TLS, a site registers only under the name in its connection's certificate."""
    if peer is not None and peer.common_name != name:
        log.warning(
            "registration of %r from %s refused: its certificate is %r",
            name,
            context.peer(),
            peer.common_name,
        )
        raise Abort(
            grpc.StatusCode.UNAUTHENTICATED,
            f"{NAME_MISMATCH}: this connection's certificate is for {peer.common_name!r} "
            f"but it registers as {name!r}",
        )
