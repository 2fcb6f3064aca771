"""A network failure is not a TLS refusal: it is retried, never reported as a refused site.

A TCP proxy or SSH tunnel whose far end is down accepts the connection and hangs up; a slow
peer accepts and says nothing. gRPC calls both "Socket closed"; neither may become a refusal
(exit 3, which the systemd unit does not restart).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from engine.tls import security_failure

CLOSED = "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:{t}: Socket closed"


def _listener(behaviour: str) -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            if behaviour == "hang up":
                conn.close()
            else:  # "silent": keep it open, say nothing
                held.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(2)
        for conn in held:
            conn.close()
        sock.close()


@pytest.fixture(params=["hang up", "silent"])
def broken_peer(request: pytest.FixtureRequest) -> Iterator[str]:
    yield from _listener(request.param)


def test_a_peer_that_hangs_up_or_stalls_is_a_network_error(pki, broken_peer: str) -> None:  # type: ignore[no-untyped-def]
    kit = pki.sites["site-a"]
    t0 = time.monotonic()
    failure = security_failure(
        grpc.StatusCode.UNAVAILABLE,
        CLOSED.format(t=broken_peer),
        broken_peer,
        secure=True,
        cert=kit.cert,
        private_key=kit.key,
    )
    assert failure is None, failure
    assert time.monotonic() - t0 < 10  # the diagnosis gives up; it does not hang the client
    # A plaintext client against the same peer: not "a TLS server" either.
    assert (
        security_failure(
            grpc.StatusCode.UNAVAILABLE, CLOSED.format(t=broken_peer), broken_peer, secure=False
        )
        is None
    )
