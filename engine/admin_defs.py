"""Admin messages (id, topic, body, headers), topic names and reply helpers of the admin channel."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from protos import admin_pb2

__all__ = [
    "Message",
    "MessageError",
    "MsgHeader",
    "ReturnCode",
    "Topic",
    "error_reply",
    "new_message",
    "ok_reply",
    "reply_to",
]

BODY_TYPES = ("str", "bytes", "unknown")


class MessageError(ValueError):
    """An admin message that cannot be decoded (the text names the message id)."""


class MsgHeader:
    """Header names of admin messages."""

    REF_MSG_ID = "_refMsgId"
    RETURN_CODE = "_rtnCode"
    USER_NAME = "user_name"
    EVENT_ID = "event_id"
    ORIGIN = "origin"
    # Request headers of the lineage's deploy/start requests (NVF20 `run_number`, `app_name`).
    RUN_NUMBER = "run_number"
    APP_NAME = "app_name"


class ReturnCode:
    """Values of the ``_rtnCode`` header."""

    OK = "_ok"
    ERROR = "_error"


class Topic:
    """Request topics the server sends to a client (NVFlare 2.0 strings; Clara's are unknown)."""

    START = "train.start"
    START_MGPU = "train.start_mgpu"
    ABORT = "train.abort"
    DELETE_RUN = "train.delete_run"
    DEPLOY = "train.deploy"
    SHUTDOWN = "train.shutdown"
    RESTART = "train.restart"
    CHECK_STATUS = "train.check_status"
    SET_RUN_NUMBER = "train.set_run_number"
    SYS_INFO = "sys.info"
    SHELL = "sys.shell"
    VALIDATE = "validate"


class Message:
    """One admin request, reply or result.

    Attributes:
        id: a uuid4 string, new for every message.
        topic: what the message is about (a ``Topic`` value for requests, "reply" for replies).
        body: text (``body_type`` "str") or bytes ("bytes", or "unknown" when the sender's
            body type was not one this client knows).
        body_type: "str", "bytes" or "unknown".
        headers: string headers (``MsgHeader`` names).
    """

    __slots__ = ("body", "body_type", "headers", "id", "topic")

    def __init__(
        self,
        topic: str,
        body: str | bytes = "",
        headers: Mapping[str, str] | None = None,
        *,
        id: str | None = None,
        body_type: str | None = None,
    ) -> None:
        """Creates a message.

        Args:
            topic: the message's topic.
            body: text or bytes.
            headers: initial headers (copied).
            id: the message id; a new uuid4 when omitted.
            body_type: "str", "bytes" or "unknown"; derived from ``body`` when omitted.

        Raises:
            MessageError: ``body_type`` does not fit ``body``.
        """
        self.id = id or str(uuid.uuid4())
        self.topic = topic
        self.body: str | bytes = body
        if body_type is None:
            body_type = "str" if isinstance(body, str) else "bytes"
        if body_type not in BODY_TYPES:
            raise MessageError(f"message {self.id}: unknown body_type {body_type!r}")
        if (body_type == "str") != isinstance(body, str):
            raise MessageError(
                f"message {self.id}: body_type {body_type!r} does not fit a "
                f"{type(body).__name__} body"
            )
        self.body_type = body_type
        self.headers: dict[str, str] = dict(headers or {})

    def set_header(self, key: str, value: str) -> None:
        """Sets header ``key`` to ``value``."""
        self.headers[key] = value

    def get_header(self, key: str, default: str | None = None) -> str | None:
        """Returns header ``key``, or ``default`` when the message has none."""
        return self.headers.get(key, default)

    def to_proto(self) -> admin_pb2.Message:
        """Returns the wire form; a text body travels as UTF-8."""
        body = self.body.encode("utf-8") if isinstance(self.body, str) else bytes(self.body)
        return admin_pb2.Message(
            id=self.id,
            topic=self.topic,
            body_type=self.body_type,
            body=body,
            headers=self.headers,
        )

    @classmethod
    def from_proto(cls, msg: admin_pb2.Message) -> Message:
        """Builds a message from its wire form.

        A "str" body is decoded from UTF-8; a body type this client does not know is kept as
        bytes with body_type "unknown".

        Raises:
            MessageError: a "str" body that is not valid UTF-8 (the text names the message id).
        """
        body: str | bytes
        if msg.body_type == "str":
            try:
                body = msg.body.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MessageError(
                    f"message {msg.id} (topic {msg.topic!r}): body_type is 'str' but the body "
                    f"is not valid UTF-8 ({exc.reason} at byte {exc.start})"
                ) from None
            body_type = "str"
        else:
            body = bytes(msg.body)
            body_type = "bytes" if msg.body_type == "bytes" else "unknown"
        return cls(msg.topic, body, dict(msg.headers), id=msg.id, body_type=body_type)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return (self.id, self.topic, self.body_type, self.body, self.headers) == (
            other.id,
            other.topic,
            other.body_type,
            other.body,
            other.headers,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable: headers change after creation

    def __repr__(self) -> str:
        size = len(self.body)
        return (
            f"Message(id={self.id!r}, topic={self.topic!r}, body_type={self.body_type!r}, "
            f"body=<{size} {'chars' if self.body_type == 'str' else 'bytes'}>, "
            f"headers={self.headers!r})"
        )


def new_message(
    topic: str, body: str | bytes = "", headers: Mapping[str, str] | None = None
) -> Message:
    """Returns a new message with a fresh id."""
    return Message(topic, body, headers)


def ok_reply(topic: str = "reply", body: str = "") -> Message:
    """Returns a successful reply (``_rtnCode`` = ``_ok``)."""
    return Message(topic, body, {MsgHeader.RETURN_CODE: ReturnCode.OK})


def error_reply(err: str) -> Message:
    """Returns an error reply: topic "reply", ``_rtnCode`` = ``_error``, body = ``err``."""
    return Message("reply", err, {MsgHeader.RETURN_CODE: ReturnCode.ERROR})


def reply_to(request: Message, reply: Message) -> Message:
    """Marks ``reply`` as the answer to ``request`` (``_refMsgId``) and returns it."""
    reply.set_header(MsgHeader.REF_MSG_ID, request.id)
    return reply
