"""Server half of the admin channel: a request queue per site, replies matched by request id."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc

from engine.rpc import TOKEN_HEADER
from protos import admin_pb2 as apb
from protos import admin_pb2_grpc

__all__ = ["AdminQueues"]

REF_MSG_ID = "_refMsgId"


class AdminQueues(admin_pb2_grpc.AdminCommunicatingServicer):
    """Holds admin requests until the site polls (``Retrieve``) and collects its replies.

    Args:
        site_by_token: resolves the token a client sends (as ``client_name``) to its site, or None.
        authorize: ``(site name, context)``: aborts the call when this connection may not act
            for that site (with TLS: its certificate is another site's).
    """

    def __init__(
        self,
        site_by_token: Callable[[str], Any],
        authorize: Callable[[str, grpc.ServicerContext], None] | None = None,
    ) -> None:
        self._site_by_token = site_by_token
        self._authorize = authorize
        self._cond = threading.Condition()
        self._queues: dict[str, list[apb.Message]] = {}
        self._replies: dict[str, apb.Message] = {}
        self._sent_to: dict[str, str] = {}  # request id -> the site it went to
        self.results: list[tuple[str, apb.Message]] = []

    def _site(self, token: str, context: grpc.ServicerContext) -> str:
        header = dict(context.invocation_metadata()).get(TOKEN_HEADER)
        if header is not None and header != token:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "token in header and message differ")
        site = self._site_by_token(token) if token else None
        if site is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "Unknown client identity")
        if self._authorize is not None:
            self._authorize(str(site.name), context)
        return str(site.name)

    def send_request(
        self,
        site: str,
        topic: str,
        body: bytes | str = b"",
        headers: dict[str, str] | None = None,
        timeout: float = 10.0,
    ) -> apb.Message | None:
        """Queues a request for ``site`` and waits for its reply; None when it timed out."""
        is_str = isinstance(body, str)
        msg = apb.Message(
            id=str(uuid.uuid4()),
            topic=topic,
            body_type="str" if is_str else "bytes",
            body=body.encode() if isinstance(body, str) else body,
            headers=headers or {},
        )
        deadline = time.monotonic() + timeout
        with self._cond:
            self._queues.setdefault(site, []).append(msg)
            self._sent_to[msg.id] = site
            try:
                while msg.id not in self._replies:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        # Withdraw it if not yet retrieved, so a late poll does not run it.
                        queue = self._queues.get(site, [])
                        if msg in queue:
                            queue.remove(msg)
                        return None
                    self._cond.wait(left)
                return self._replies.pop(msg.id)
            finally:
                self._sent_to.pop(msg.id, None)

    def Retrieve(self, request: apb.Client, context: grpc.ServicerContext) -> apb.Messages:
        site = self._site(request.client_name, context)
        with self._cond:
            pending = self._queues.pop(site, [])
        return apb.Messages(message=pending)

    def SendReply(self, request: apb.Reply, context: grpc.ServicerContext) -> apb.Empty:
        site = self._site(request.client_name, context)
        ref = request.message.headers.get(REF_MSG_ID, "")
        with self._cond:
            # Only the site a request went to may answer it, and only while someone waits.
            if self._sent_to.get(ref) == site:
                self._replies[ref] = request.message
                self._cond.notify_all()
        return apb.Empty()

    def SendResult(self, request: apb.Reply, context: grpc.ServicerContext) -> apb.Empty:
        site = self._site(request.client_name, context)
        with self._cond:
            self.results.append((site, request.message))
        return apb.Empty()
