"""The one boundary between named tensors and protobuf messages, including chunked model streams.

A model travels as a stream of frames, each one serialized ``ModelChunk`` or ``ContributionChunk``
(the two share field numbers: 1 header, 2 chunk, 3 end, 4 done):

    header  the message (CurrentModel or Contribution) with every tensor's name, dtype and shape
    chunk   (tensor index, byte offset, at most 1 MiB of payload), tensors in header order
    end     totals that the receiver checks before anything is used

On the wire, consecutive frames may share one gRPC message, a ``batch`` (field 5: the frames as
a repeated bytes field), up to ``BATCH_BYTES``: a model under 1 MiB is one message instead of
five, which is most of what a round costs the server. ``encode_model_stream(..., batch=True)``
packs (with the same single copy of the payload); every decoder here unpacks (``unbatch``).

Chunk frames are encoded and decoded here by hand, in protobuf's own wire format, because the
generic path costs two extra copies of every payload byte (``bytes`` slice, message field,
serialization). Tests check that protobuf parses our frames and that we parse protobuf's.
The receiver writes every payload straight into one preallocated buffer per tensor; nothing is
handed to the caller until the ``end`` frame has been checked, so a corrupt or truncated stream
leaves the caller's model untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message

from protos import federated_pb2 as pb

__all__ = [
    "CHUNK_BYTES",
    "CKKS",
    "DEFAULT_MAX_MODEL_BYTES",
    "CiphertextArray",
    "ModelAssembler",
    "SerdeError",
    "TensorSpec",
    "decode_model_stream",
    "decode_model_streams",
    "encode_done_frame",
    "encode_model_stream",
    "model_nbytes",
    "ndarray_to_proto",
    "parse_header_frame",
    "proto_to_ndarray",
    "receive_model",
    "specs_of",
    "unbatch",
]

CHUNK_BYTES = 1 << 20
"""Most payload bytes in one chunk frame (far below gRPC's 4 MiB default message limit)."""

BATCH_BYTES = CHUNK_BYTES + (64 << 10)
"""Most bytes of frames packed into one message (a full chunk and a header fit together)."""

DEFAULT_MAX_MODEL_BYTES = 256 << 30
"""A header announcing more than this is refused before anything is allocated."""

MAX_TENSORS = 1_000_000

# numpy dtype names that may cross the wire; all fixed-size, stored little-endian.
ALLOWED_DTYPES = frozenset(
    {
        "bool",
        "int8",
        "uint8",
        "int16",
        "uint16",
        "int32",
        "uint32",
        "int64",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    }
)

CKKS = "ckks"
"""The wire dtype of a ciphertext tensor (homomorphic encryption, ``engine.he``): its payload is
opaque bytes (shape ``[n bytes]``), encrypted and serialized by the sender. A receiver takes one
only when it says so (``ModelAssembler(ciphertexts=True)``); it must be one-dimensional, non-empty,
and, where the receiver expects the variable, stand for a float variable or a ciphertext."""


class CiphertextArray(np.ndarray):
    """The bytes of one ciphertext tensor (uint8, 1-D) that go on the wire with dtype ``"ckks"``.

    A view class: ``arr.view(CiphertextArray)`` tags received bytes without copying them.
    """


_F_HEADER, _F_CHUNK, _F_END, _F_DONE, _F_BATCH = 1, 2, 3, 4, 5
_WT_VARINT, _WT_I64, _WT_LEN, _WT_I32 = 0, 1, 2, 5

H = TypeVar("H", bound=Message)


class SerdeError(ValueError):
    """A model message or chunk stream that does not add up.

    Attributes:
        variable: the variable the problem concerns, or None when it is not about one.
    """

    def __init__(self, message: str, variable: str | None = None) -> None:
        self.variable = variable
        if variable is not None:
            message = f"variable {variable!r}: {message}"
        super().__init__(message)


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one tensor, as announced in a stream header."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        if self.dtype == CKKS:
            return math.prod(self.shape)
        # Python ints: np.prod in int64 wraps around on hostile shapes such as [2**62, 4].
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


# ---------------------------------------------------------------------------- single tensors


def _as_wire_array(name: str, value: Any) -> np.ndarray:
    if isinstance(value, CiphertextArray):
        if value.ndim != 1 or not value.size or value.dtype != np.uint8:
            raise SerdeError("a ciphertext tensor must be non-empty, 1-D bytes", name)
        return value if value.flags.c_contiguous else value.copy()
    arr = np.asarray(value)
    name_ = arr.dtype.name
    if name_ not in ALLOWED_DTYPES:
        raise SerdeError(
            f"dtype {arr.dtype} cannot be sent (allowed: {sorted(ALLOWED_DTYPES)})", name
        )
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    # np.ascontiguousarray would turn a 0-d scalar into shape (1,).
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def _check_spec(name: str, dtype: str, shape: Iterable[int]) -> TensorSpec:
    if not name:
        raise SerdeError("a tensor has an empty name")
    if dtype == CKKS:
        dims = tuple(int(d) for d in shape)
        if len(dims) != 1 or dims[0] <= 0:
            raise SerdeError(f"a ciphertext must be 1-D non-empty bytes, got shape {dims}", name)
        return TensorSpec(name, dtype, dims)
    if dtype not in ALLOWED_DTYPES:
        raise SerdeError(f"unknown dtype {dtype!r} (allowed: {sorted(ALLOWED_DTYPES)})", name)
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise SerdeError(f"negative dimension in shape {dims}", name)
    if len(dims) > 32:
        raise SerdeError(f"{len(dims)} dimensions (at most 32)", name)
    return TensorSpec(name, dtype, dims)


def ndarray_to_proto(value: Any, name: str = "") -> pb.NDArray:
    """One tensor with its payload inline (small tensors only; models use the chunk stream)."""
    arr = _as_wire_array(name, value)
    return pb.NDArray(dtype=arr.dtype.name, shape=arr.shape, data=arr.tobytes())


def proto_to_ndarray(msg: pb.NDArray, name: str = "") -> np.ndarray:
    """The tensor of an inline ``NDArray`` message, checked against its dtype and shape."""
    spec = _check_spec(name or "<unnamed>", msg.dtype, msg.shape)
    if len(msg.data) != spec.nbytes:
        raise SerdeError(
            f"{len(msg.data)} payload bytes for dtype {spec.dtype} and shape {spec.shape} "
            f"(expected {spec.nbytes})",
            spec.name,
        )
    return np.frombuffer(msg.data, dtype=spec.dtype).reshape(spec.shape).copy()


def _wire_dtype(arr: np.ndarray) -> str:
    return CKKS if isinstance(arr, CiphertextArray) else arr.dtype.name


def specs_of(params: Mapping[str, Any]) -> list[TensorSpec]:
    """The specs of a dict of tensors, in its order."""
    return [
        TensorSpec(name, _wire_dtype(arr), tuple(arr.shape))
        for name, arr in ((n, _as_wire_array(n, v)) for n, v in params.items())
    ]


def model_nbytes(params: Mapping[str, Any]) -> int:
    """Payload bytes of a dict of tensors."""
    return sum(int(np.asarray(v).nbytes) for v in params.values())


# ---------------------------------------------------------------------------- wire helpers


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint((field << 3) | wire_type)


_BATCH_KEY = (_F_BATCH << 3) | _WT_LEN  # one byte: a message that begins with it is a batch
_FRAME_KEY = (1 << 3) | _WT_LEN


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise SerdeError("truncated frame (varint runs past the end)")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise SerdeError("malformed frame (varint longer than 10 bytes)")


def _skip_field(buf: memoryview, wire_type: int, pos: int, end: int) -> int:
    if wire_type == _WT_VARINT:
        return _read_varint(buf, pos, end)[1]
    if wire_type == _WT_I64:
        pos += 8
    elif wire_type == _WT_I32:
        pos += 4
    elif wire_type == _WT_LEN:
        length, pos = _read_varint(buf, pos, end)
        pos += length
    else:
        raise SerdeError(f"malformed frame (wire type {wire_type})")
    if pos > end:
        raise SerdeError("truncated frame (field runs past the end)")
    return pos


def _chunk_frame_pieces(index: int, offset: int, payload: memoryview) -> tuple[bytes, memoryview]:
    """A chunk frame as (its protobuf prefix, the payload still in the tensor's memory)."""
    n = payload.nbytes
    inner = b"".join(
        (
            _key(1, _WT_VARINT) + _varint(index) if index else b"",
            _key(2, _WT_VARINT) + _varint(offset) if offset else b"",
            _key(3, _WT_LEN),
            _varint(n),
        )
    )
    return _key(_F_CHUNK, _WT_LEN) + _varint(len(inner) + n) + inner, payload


def _decode_chunk(buf: memoryview, pos: int, end: int) -> tuple[int, int, memoryview]:
    index = offset = 0
    data = buf[0:0]
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        field, wire_type = key >> 3, key & 7
        if field == 1 and wire_type == _WT_VARINT:
            index, pos = _read_varint(buf, pos, end)
        elif field == 2 and wire_type == _WT_VARINT:
            offset, pos = _read_varint(buf, pos, end)
        elif field == 3 and wire_type == _WT_LEN:
            length, pos = _read_varint(buf, pos, end)
            if pos + length > end:
                raise SerdeError("truncated chunk (payload runs past the end of the frame)")
            data = buf[pos : pos + length]
            pos += length
        else:
            pos = _skip_field(buf, wire_type, pos, end)
    return index, offset, data


def _encode_message_frame(field: int, message: Message) -> bytes:
    body = message.SerializeToString()
    return _key(field, _WT_LEN) + _varint(len(body)) + body


def encode_done_frame(more_models_available: bool) -> bytes:
    """The last frame of a GetValidationModels stream."""
    return _encode_message_frame(
        _F_DONE, pb.ValidationModelsDone(more_models_available=more_models_available)
    )


# ---------------------------------------------------------------------------- encoding


def encode_model_stream(
    header: Message, params: Mapping[str, Any], chunk_bytes: int = CHUNK_BYTES, batch: bool = False
) -> Iterator[bytes]:
    """Frames (serialized ModelChunk / ContributionChunk) for one model.

    Args:
        header: a ``CurrentModel`` or ``Contribution``; its ``data`` is replaced by the specs.
        params: the named tensors, sent in this order.
        chunk_bytes: payload bytes per chunk, at most ``CHUNK_BYTES``.
        batch: pack consecutive frames into one message each, up to ``BATCH_BYTES`` (what goes
            on the wire); without it, one frame per item.

    Yields:
        bytes of one frame each (header, chunks, end), or of one batch of them. Either way the
        payload is copied once, straight from the tensor's memory.
    """
    if not 0 < chunk_bytes <= CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in 1..{CHUNK_BYTES}, got {chunk_bytes}")
    frames = _frame_pieces(header, params, chunk_bytes)
    if batch:
        yield from _batched(frames)
    else:
        for pieces in frames:
            yield b"".join(pieces)


def _frame_pieces(
    header: Message, params: Mapping[str, Any], chunk_bytes: int
) -> Iterator[tuple[bytes | memoryview, ...]]:
    arrays = [(name, _as_wire_array(name, value)) for name, value in params.items()]
    data = header.data  # type: ignore[attr-defined]
    del data.params[:]
    for name, arr in arrays:
        data.params.add(name=name, array=pb.NDArray(dtype=_wire_dtype(arr), shape=arr.shape))
    yield (_encode_message_frame(_F_HEADER, header),)
    total = chunks = 0
    for index, (_, arr) in enumerate(arrays):
        raw = memoryview(arr.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
        for offset in range(0, raw.nbytes, chunk_bytes):
            piece = raw[offset : offset + chunk_bytes]
            yield _chunk_frame_pieces(index, offset, piece)
            total += piece.nbytes
            chunks += 1
    end = pb.StreamEnd(total_bytes=total, num_tensors=len(arrays), num_chunks=chunks)
    yield (_encode_message_frame(_F_END, end),)


def _batched(frames: Iterable[tuple[bytes | memoryview, ...]]) -> Iterator[bytes]:
    """Consecutive frames, packed into batch messages of at most ``BATCH_BYTES`` (a frame that
    is larger on its own goes alone, unwrapped)."""
    pending: list[tuple[tuple[bytes | memoryview, ...], int]] = []
    size = 0

    def flush() -> bytes:
        if len(pending) == 1:
            return b"".join(pending[0][0])
        parts: list[bytes | memoryview] = []
        for pieces, n in pending:
            parts.append(_key(1, _WT_LEN) + _varint(n))
            parts.extend(pieces)
        body = sum(len(p) for p in parts)
        return b"".join((_key(_F_BATCH, _WT_LEN), _varint(body), *parts))

    for pieces in frames:
        n = sum(len(p) for p in pieces)
        cost = n + 11  # the frame plus its key and length inside the batch
        if pending and size + cost > BATCH_BYTES:
            yield flush()
            pending, size = [], 0
        pending.append((pieces, n))
        size += cost
    if pending:
        yield flush()


def unbatch(messages: Iterable[bytes | memoryview]) -> Iterator[bytes | memoryview]:
    """The frames of a stream as sent: batch messages opened (views, no copy), others as they are.

    Raises:
        SerdeError: a batch that is malformed, empty, or holds anything but frames.
    """
    for message in messages:
        buf = memoryview(message)
        end = buf.nbytes
        if not end or buf[0] != _BATCH_KEY:
            yield message
            continue
        length, pos = _read_varint(buf, 1, end)
        if pos + length != end:
            raise SerdeError(f"batch length {length} does not match its {end - pos} bytes")
        count = 0
        while pos < end:
            key, pos = _read_varint(buf, pos, end)
            if key != _FRAME_KEY:
                raise SerdeError(
                    f"a batch holds field {key >> 3} (wire type {key & 7}), not frames"
                )
            length, pos = _read_varint(buf, pos, end)
            if pos + length > end:
                raise SerdeError("truncated batch (a frame runs past its end)")
            yield buf[pos : pos + length]
            pos += length
            count += 1
        if not count:
            raise SerdeError("an empty batch")


# ---------------------------------------------------------------------------- decoding


class ModelAssembler:
    """Receives one model's frames into one preallocated buffer per tensor.

    Args:
        header_type: ``pb.CurrentModel`` or ``pb.Contribution``.
        expected: when given, every announced variable must be in it with this dtype and shape.
        max_total_bytes: a header announcing more payload than this is refused.
        allocate: makes the buffer for one tensor (default ``np.empty``); a receiver that gets
            the same shapes every round can hand out buffers whose memory is already committed.
        ciphertexts: whether ciphertext tensors (dtype ``"ckks"``) are taken. None (the
            default): only when nothing is ``expected`` (a site receiving a global model);
            a receiver that expects a model says it. Refused otherwise, with the reason.
    """

    def __init__(
        self,
        header_type: type[H],
        expected: Mapping[str, tuple[str, tuple[int, ...]]] | None = None,
        max_total_bytes: int = DEFAULT_MAX_MODEL_BYTES,
        allocate: Callable[[TensorSpec], np.ndarray] | None = None,
        ciphertexts: bool | None = None,
    ) -> None:
        self._ciphertexts = expected is None if ciphertexts is None else ciphertexts
        self._allocate = allocate or (lambda s: np.empty(s.shape, dtype=s.dtype))
        self._header_type = header_type
        self._expected = expected
        self._max_total = max_total_bytes
        self.header: Any = None
        self.specs: list[TensorSpec] = []
        self._buffers: list[np.ndarray] = []
        self._bytes: list[np.ndarray] = []
        self._filled: list[int] = []
        self._current = 0
        self._chunks = 0
        self.received_bytes = 0
        self.finished = False

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    def _var(self, index: int) -> str:
        return self.specs[index].name if 0 <= index < len(self.specs) else f"#{index}"

    def on_header(self, header: Any) -> None:
        if self.header is not None:
            raise SerdeError("a second header arrived before the stream ended")
        specs: list[TensorSpec] = []
        seen: set[str] = set()
        params = header.data.params
        if len(params) > MAX_TENSORS:
            raise SerdeError(f"{len(params)} tensors announced (at most {MAX_TENSORS})")
        for item in params:
            spec = _check_spec(item.name, item.array.dtype, item.array.shape)
            if spec.name in seen:
                raise SerdeError("announced twice in the header", spec.name)
            if item.array.data:
                raise SerdeError(
                    "inline payload in a stream header (payload must be chunked)", spec.name
                )
            if spec.dtype == CKKS and not self._ciphertexts:
                raise SerdeError(
                    "is encrypted (homomorphic encryption), but this receiver does not run "
                    "homomorphic encryption: the federation is not provisioned for it",
                    spec.name,
                )
            if self._expected is not None:
                want = self._expected.get(spec.name)
                if want is None:
                    raise SerdeError("is not a variable of this model", spec.name)
                if spec.dtype == CKKS:
                    if want[0] != CKKS and not want[0].startswith("float"):
                        raise SerdeError(
                            f"is encrypted, but the model's variable is {want[0]} (only float "
                            "variables are encrypted)",
                            spec.name,
                        )
                elif want[0] == CKKS:
                    raise SerdeError(
                        f"arrived in plaintext ({spec.dtype}) where the global model holds a "
                        "ciphertext: every site of this federation encrypts the same variables",
                        spec.name,
                    )
                elif (spec.dtype, spec.shape) != (want[0], tuple(want[1])):
                    raise SerdeError(
                        f"dtype {spec.dtype} shape {spec.shape} does not match the model's "
                        f"dtype {want[0]} shape {tuple(want[1])}",
                        spec.name,
                    )
            seen.add(spec.name)
            specs.append(spec)
        total = sum(s.nbytes for s in specs)
        if total > self._max_total:
            raise SerdeError(
                f"the stream announces {total} bytes, more than the limit of {self._max_total}"
            )
        self.specs = specs
        # np.empty maps pages lazily: memory is committed as payload arrives, not up front.
        self._buffers = []
        for s in specs:
            if s.dtype == CKKS:  # opaque bytes: never a pooled float buffer
                self._buffers.append(np.empty(s.shape, np.uint8).view(CiphertextArray))
                continue
            try:
                self._buffers.append(self._allocate(s))
            except (MemoryError, ValueError) as exc:
                raise SerdeError(
                    f"cannot allocate {s.nbytes} bytes for dtype {s.dtype} shape {s.shape}: {exc}",
                    s.name,
                ) from None
        self._bytes = [b.reshape(-1).view(np.uint8) for b in self._buffers]
        self._filled = [0] * len(specs)
        header.data.ClearField("params")
        self.header = header

    def on_chunk(self, index: int, offset: int, payload: memoryview | bytes) -> None:
        if self.header is None:
            raise SerdeError("a chunk arrived before the stream header")
        if self.finished:
            raise SerdeError("a chunk arrived after the end of the stream")
        if index >= len(self.specs):
            raise SerdeError(
                f"chunk for tensor #{index}, but the header announced {len(self.specs)}"
            )
        name = self._var(index)
        if index < self._current:
            raise SerdeError("chunk arrived after the stream moved on to a later tensor", name)
        for skipped in range(self._current, index):
            if self._filled[skipped] != self.specs[skipped].nbytes:
                raise SerdeError(
                    f"incomplete: {self._filled[skipped]} of {self.specs[skipped].nbytes} bytes "
                    f"when chunks for {name!r} began",
                    self._var(skipped),
                )
        self._current = index
        n = len(payload)
        if n == 0 or n > CHUNK_BYTES:
            raise SerdeError(f"chunk of {n} bytes (must be 1..{CHUNK_BYTES})", name)
        if offset != self._filled[index]:
            raise SerdeError(
                f"chunk at byte offset {offset}, but {self._filled[index]} bytes were received so "
                "far (chunks missing, repeated or out of order)",
                name,
            )
        if offset + n > self.specs[index].nbytes:
            raise SerdeError(
                f"{offset + n} bytes received, more than the {self.specs[index].nbytes} of dtype "
                f"{self.specs[index].dtype} shape {self.specs[index].shape}",
                name,
            )
        self._bytes[index][offset : offset + n] = np.frombuffer(payload, dtype=np.uint8)
        self._filled[index] = offset + n
        self._chunks += 1
        self.received_bytes += n

    def on_end(self, end: pb.StreamEnd) -> None:
        if self.header is None:
            raise SerdeError("the stream ended before its header")
        for i, spec in enumerate(self.specs):
            if self._filled[i] != spec.nbytes:
                raise SerdeError(
                    f"stream ended with {self._filled[i]} of {spec.nbytes} bytes received "
                    "(truncated)",
                    spec.name,
                )
        if (end.total_bytes, end.num_tensors, end.num_chunks) != (
            self.received_bytes,
            len(self.specs),
            self._chunks,
        ):
            raise SerdeError(
                f"stream totals do not add up: sender says {end.total_bytes} bytes, "
                f"{end.num_tensors} tensors, {end.num_chunks} chunks; received "
                f"{self.received_bytes} bytes, {len(self.specs)} tensors, {self._chunks} chunks"
            )
        self.finished = True

    def buffers(self) -> list[np.ndarray]:
        """The buffers allocated so far (to recycle them when the stream is refused)."""
        return list(self._buffers)

    def filled(self, index: int) -> int:
        """Payload bytes received so far for tensor ``index``."""
        return self._filled[index]

    def result(self) -> dict[str, np.ndarray]:
        """The received tensors; only after the end frame was checked."""
        if not self.finished:
            raise SerdeError("the model stream is incomplete (no end frame)")
        return {spec.name: buf for spec, buf in zip(self.specs, self._buffers, strict=True)}


def _parse_frame(frame: bytes | memoryview) -> tuple[int, memoryview, int, int]:
    buf = memoryview(frame)
    end = buf.nbytes
    if end == 0:
        raise SerdeError("empty frame")
    key, pos = _read_varint(buf, 0, end)
    field, wire_type = key >> 3, key & 7
    if wire_type != _WT_LEN or field not in (_F_HEADER, _F_CHUNK, _F_END, _F_DONE):
        raise SerdeError(f"unexpected frame (field {field}, wire type {wire_type})")
    length, pos = _read_varint(buf, pos, end)
    if pos + length != end:
        raise SerdeError(f"frame length {length} does not match its {end - pos} bytes")
    return field, buf, pos, end


def _parse_message(cls: type[H], buf: memoryview, pos: int, end: int) -> H:
    try:
        return cls.FromString(bytes(buf[pos:end]))
    except DecodeError as exc:
        raise SerdeError(f"malformed {cls.__name__} frame: {exc}") from exc


def parse_header_frame(frame: bytes | memoryview, header_type: type[H]) -> H:
    """The header message of a stream's first frame (nothing else is read).

    Raises:
        SerdeError: the frame is not a well-formed header frame.
    """
    field, buf, pos, end = _parse_frame(frame)
    if field != _F_HEADER:
        raise SerdeError("the stream does not begin with a header frame")
    return _parse_message(header_type, buf, pos, end)


def receive_model(
    assembler: ModelAssembler, frames: Iterable[bytes | memoryview]
) -> dict[str, np.ndarray]:
    """Feeds chunk frames and the end frame into an assembler that has its header.

    Reads ``frames`` up to and including the end frame, and no further.

    Raises:
        SerdeError: the frames do not add up or stop early; the assembler's buffers are dropped.
    """
    for frame in frames:
        field, buf, pos, end = _parse_frame(frame)
        if field == _F_CHUNK:
            assembler.on_chunk(*_decode_chunk(buf, pos, end))
        elif field == _F_END:
            assembler.on_end(_parse_message(pb.StreamEnd, buf, pos, end))
            return assembler.result()
        else:
            raise SerdeError("a header or done frame arrived in the middle of a model")
    var = next(
        (s.name for i, s in enumerate(assembler.specs) if assembler.filled(i) < s.nbytes), None
    )
    raise SerdeError("the stream stopped before its end frame (truncated)", var)


def decode_model_streams(
    frames: Iterable[bytes | memoryview],
    header_type: type[H],
    expected: Mapping[str, tuple[str, tuple[int, ...]]] | None = None,
    max_total_bytes: int = DEFAULT_MAX_MODEL_BYTES,
    on_header: Callable[[Any], None] | None = None,
    ciphertexts: bool | None = None,
) -> Iterator[tuple[Any, dict[str, np.ndarray]] | bool]:
    """Decodes a stream of one or more models.

    Args:
        frames: the messages as received.
        header_type: ``pb.CurrentModel`` or ``pb.Contribution``.
        expected: as for :class:`ModelAssembler`.
        max_total_bytes: as for :class:`ModelAssembler`.
        on_header: called with each model's header message as it arrives, before its payload
            (what a receiver can let go of before a model-sized buffer fills).

    Yields:
        ``(header, params)`` for each complete model, and the ``more_models_available`` flag as a
        bool when a ``done`` frame arrives (GetValidationModels).

    Raises:
        SerdeError: the frames do not add up; nothing of the broken model is yielded.
    """
    it = iter(unbatch(frames))
    for frame in it:
        field, buf, pos, end = _parse_frame(frame)
        if field == _F_HEADER:
            header = _parse_message(header_type, buf, pos, end)
            if on_header is not None:
                on_header(header)
            assembler = ModelAssembler(
                header_type, expected, max_total_bytes, ciphertexts=ciphertexts
            )
            assembler.on_header(header)
            params = receive_model(assembler, it)
            yield assembler.header, params
        elif field == _F_DONE:
            yield _parse_message(pb.ValidationModelsDone, buf, pos, end).more_models_available
        else:
            raise SerdeError("a chunk or end frame arrived before the stream header")


def decode_model_stream(
    frames: Iterable[bytes | memoryview],
    header_type: type[H],
    expected: Mapping[str, tuple[str, tuple[int, ...]]] | None = None,
    max_total_bytes: int = DEFAULT_MAX_MODEL_BYTES,
    on_header: Callable[[Any], None] | None = None,
    ciphertexts: bool | None = None,
) -> tuple[Any, dict[str, np.ndarray]]:
    """Decodes a stream that carries exactly one model (``on_header``: as for
    :func:`decode_model_streams`).

    Returns:
        the header message (its ``data`` cleared) and the tensors in stream order.

    Raises:
        SerdeError: the frames do not add up, or there is not exactly one model.
    """
    models = []
    for item in decode_model_streams(
        frames, header_type, expected, max_total_bytes, on_header, ciphertexts
    ):
        if isinstance(item, bool):
            raise SerdeError("unexpected 'done' frame in a single-model stream")
        models.append(item)
        if len(models) > 1:
            raise SerdeError("more than one model in a single-model stream")
    if not models:
        raise SerdeError("the stream carried no model")
    return models[0]
