"""The admin agent: polls the server for the federation's requests and answers each one."""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import grpc

from engine.admin_defs import Message, MsgHeader, Topic, error_reply, ok_reply, reply_to
from engine.client.communicator import RECONNECT_OPTIONS, channel_options
from engine.rpc import TOKEN_HEADER
from engine.tls import read_tls_files
from protos import admin_pb2 as apb
from protos import admin_pb2_grpc

__all__ = ["AdminMessageSender", "FedAdminAgent", "RequestProcessor", "Sender"]

log = logging.getLogger("engine.client.admin")

CALL_TIMEOUT = 10.0


class RequestProcessor:
    """Processes the requests of some topics."""

    def get_topics(self) -> list[str]:
        """Topics this processor handles."""
        raise NotImplementedError

    def process(self, req: Message, app_ctx: Any) -> Message | None:
        """Handles ``req``; returns the reply (None: a plain "ok")."""
        raise NotImplementedError


class Sender:
    """Connects the agent to the messaging system. Its methods never raise."""

    def retrieve_requests(self) -> list[Message]:
        """Pending requests from the server."""
        raise NotImplementedError

    def send_reply(self, reply: Message) -> None:
        """Sends the reply to a request."""
        raise NotImplementedError

    def send_result(self, message: Message) -> None:
        """Sends an asynchronous result (e.g. cross-site validation) to the server."""
        raise NotImplementedError


class AdminMessageSender(Sender):
    """Sender over the server's ``AdminCommunicating`` gRPC service.

    Args:
        client_name: the site's FL token (as in the lineage), or a function returning the current
            one (the token changes when the site registers again).
        root_cert, ssl_cert, private_key: TLS files when ``secure`` (mutual TLS: the server checks
            that the certificate is the site's whose token is sent).
        server_args: ``{"target": "host:port", "options": [...]}``.
        secure: use TLS.

    Raises:
        KitError: with ``secure``, a TLS file is missing or the key is readable by others.
        is_multi_gpu: the site trains on several ranks.
        rank: this process's rank; only rank 0 talks to the server.
    """

    def __init__(
        self,
        client_name: str | Callable[[], str],
        root_cert: str | None = None,
        ssl_cert: str | None = None,
        private_key: str | None = None,
        server_args: dict[str, Any] | None = None,
        secure: bool = False,
        is_multi_gpu: bool = False,
        rank: int = 0,
    ) -> None:
        self._token = client_name if callable(client_name) else (lambda: client_name)
        self.is_multi_gpu = is_multi_gpu
        self.rank = rank
        args = dict(server_args or {})
        self.target = str(args.get("target", ""))
        # As the training channel: gRPC's own reconnect backoff (up to 2 min) must not keep
        # the agent away from a server that is back (it polls every few seconds).
        options = channel_options(args.get("options", []), RECONNECT_OPTIONS)
        if secure:
            root, cert, key = read_tls_files(root_cert, ssl_cert, private_key)
            creds = grpc.ssl_channel_credentials(
                root_certificates=root, private_key=key, certificate_chain=cert
            )
            self._channel = grpc.secure_channel(self.target, creds, options)
        else:
            self._channel = grpc.insecure_channel(self.target, options)
        self._stub = admin_pb2_grpc.AdminCommunicatingStub(self._channel)
        self._failing = False

    @property
    def client_name(self) -> str:
        return self._token()

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        # Every call carries the session token in its header too, as the training calls do.
        token = self.client_name
        return ((TOKEN_HEADER, token),) if token else ()

    def _active(self) -> bool:
        return self.rank == 0

    def _warn(self, action: str, exc: grpc.RpcError) -> None:
        # One line when the link goes bad, not one per poll.
        if not self._failing:
            log.warning("admin %s to %s failed: %s", action, self.target, _details(exc))
        self._failing = True

    def retrieve_client_requests(self, taskname: str) -> list[Message]:
        return self.retrieve_requests()

    def retrieve_requests(self) -> list[Message]:
        if not self._active():
            return []
        try:
            reply = self._stub.Retrieve(
                apb.Client(client_name=self.client_name),
                metadata=self._metadata(),
                timeout=CALL_TIMEOUT,
            )
        except grpc.RpcError as exc:
            self._warn("Retrieve", exc)
            return []
        except ValueError:
            return []  # the channel is closed: the site is stopping
        self._failing = False
        out = []
        for msg in reply.message:
            try:
                out.append(Message.from_proto(msg))
            except ValueError as exc:
                log.warning("admin request refused: %s", exc)
                bad = error_reply(f"malformed request: {exc}")
                bad.set_header(MsgHeader.REF_MSG_ID, msg.id)
                self.send_reply(bad)
        return out

    def send_client_reply(self, message: Message, taskname: str) -> None:
        self.send_reply(message)

    def send_reply(self, reply: Message) -> None:
        self._send("SendReply", reply)

    def send_result(self, message: Message) -> None:
        self._send("SendResult", message)

    def _send(self, action: str, message: Message) -> None:
        if not self._active():
            return
        try:
            getattr(self._stub, action)(
                apb.Reply(client_name=self.client_name, message=message.to_proto()),
                metadata=self._metadata(),
                timeout=CALL_TIMEOUT,
            )
        except grpc.RpcError as exc:
            self._warn(action, exc)
        except ValueError:
            log.warning("admin %s dropped: the channel is closed (the site is stopping)", action)

    def close(self) -> None:
        self._channel.close()


class FedAdminAgent:
    """Polls for admin requests and runs them one at a time through the registered processors.

    Unknown topics, refusals by the site policy and processor exceptions get error replies,
    never a crash; every request is written to the audit log and published as an
    ``AdminRequestHandled`` event.

    Args:
        client_name: this site's name.
        sender: how requests arrive and replies leave.
        app_ctx: the ClientAdminInterface (with ``policy``, ``audit`` and ``bus``).
        req_poll_interval: seconds between two polls.
        process_poll_interval: seconds the processing thread waits for a request.
    """

    def __init__(
        self,
        client_name: str,
        sender: Sender,
        app_ctx: Any,
        req_poll_interval: float = 0.5,
        process_poll_interval: float = 0.1,
    ) -> None:
        self.client_name = client_name
        self.sender = sender
        self.app_ctx = app_ctx
        self.req_poll_interval = req_poll_interval
        self.process_poll_interval = process_poll_interval
        self.processors: dict[str, RequestProcessor] = {}
        self._requests: queue.Queue[Message] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def register_processor(self, processor: RequestProcessor) -> None:
        """Adds a processor for its topics (a topic registered twice is an error)."""
        for topic in processor.get_topics():
            if topic in self.processors:
                raise ValueError(f"topic {topic!r} already has a processor")
            self.processors[topic] = processor

    def start(self) -> None:
        """Starts polling and processing in two threads."""
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._poll, name="admin-poll", daemon=True),
            threading.Thread(target=self._process_loop, name="admin-process", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def shutdown(self) -> None:
        """Stops the agent (called by the engine for a graceful shutdown)."""
        self._stop.set()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5)

    def _poll(self) -> None:
        while not self._stop.is_set():
            for req in self.sender.retrieve_requests():
                self._requests.put(req)
            self._stop.wait(self.req_poll_interval)

    def _process_loop(self) -> None:
        while not self._stop.is_set():
            try:
                req = self._requests.get(timeout=self.process_poll_interval)
            except queue.Empty:
                continue
            reply = self.process(req)
            self.sender.send_reply(reply)

    def process(self, req: Message) -> Message:
        """Runs one request and returns its reply (also used directly by tests)."""
        origin = req.get_header(MsgHeader.USER_NAME) or "federation"
        refusal = None
        policy = getattr(self.app_ctx, "policy", None)
        processor = self.processors.get(req.topic)
        if processor is None:
            reply = error_reply(f"invalid_request: unknown topic {req.topic!r}")
            outcome, detail = "refused", f"unknown topic {req.topic!r}"
        elif policy is not None and (refusal := policy.refusal(req.topic)) is not None:
            reply = error_reply(refusal)
            outcome, detail = "refused", refusal
        else:
            try:
                result = processor.process(req, self.app_ctx)
            except Exception as exc:  # a broken request must not stop the agent
                log.exception("admin request %s failed", req.topic)
                result = error_reply(f"exception_occurred: {type(exc).__name__}: {exc}")
            reply = result if result is not None else ok_reply()
            failed = reply.get_header(MsgHeader.RETURN_CODE) == "_error"
            outcome = "error" if failed else "ok"
            detail = reply.body if isinstance(reply.body, str) else f"{len(reply.body)} bytes"
            if req.topic == Topic.SHELL and not failed:
                # What an admin read is the command line; the output (a log, a config) stays
                # out of the audit log, which is kept longer and read by more people.
                size = len(reply.body.encode() if isinstance(reply.body, str) else reply.body)
                detail = f"{size} bytes of output"
        if req.topic == Topic.SHELL:
            detail = f"command {_command_line(req.body)}: {detail}"
        reply_to(req, reply)
        record = getattr(self.app_ctx, "record", None)  # ClientAdminInterface.record
        if record is not None:
            record(origin, req.topic, outcome, str(detail))
        return reply


def _command_line(body: Any) -> str:
    """A shell request's command line as the admin sent it, quoted, for the audit log."""
    if not isinstance(body, str):
        return f"(none: the body is {type(body).__name__})"
    text = body if len(body) <= 200 else body[:197] + "..."
    return json.dumps(text, ensure_ascii=False)


def _details(exc: grpc.RpcError) -> str:
    details = exc.details() if hasattr(exc, "details") else None
    return str(details or exc)
