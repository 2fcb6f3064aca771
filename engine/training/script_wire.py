"""The wire between a training worker and the script it runs (``fltui.client``): one boundary.

Both ends hold a ``multiprocessing.connection`` pair on loopback, authenticated by a one-time key
the worker makes for each script start. A message is a JSON header frame, then one raw frame per
array the header lists (``{"name", "dtype", "shape"}``): numbers only, nothing is unpickled, and a
receiver reads each tensor straight into its own buffer. numpy only, so a script imports torch
when it needs tensors, not for the wire.

Worker → script: ``task`` (``train`` / ``evaluate``, the round, the model), ``ack`` (a result was
taken), ``stop`` (the run is over), ``abort`` (stop now). Script → worker: ``hello``,
``receive`` (give me the next task), ``send`` (the result), ``log`` (metrics), ``progress``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from multiprocessing import BufferTooShort
from typing import Any

import numpy as np

__all__ = [
    "ADDRESS_ENV",
    "AUTHKEY_ENV",
    "MAX_HEADER_BYTES",
    "PROTOCOL_VERSION",
    "SITE_ENV",
    "WireError",
    "parse_address",
    "recv_message",
    "send_message",
]

#: Environment variables the worker sets for the script's rank 0 (and only those of fltui).
ADDRESS_ENV = "FLTUI_CLIENT_ADDRESS"
AUTHKEY_ENV = "FLTUI_CLIENT_AUTHKEY"
SITE_ENV = "FLTUI_SITE_NAME"

PROTOCOL_VERSION = 1
#: A header holds names, shapes and metrics; more than this is not a header.
MAX_HEADER_BYTES = 16 * 1024 * 1024
_NUMERIC = "biufc"


class WireError(ValueError):
    """A message that breaks the wire format (nothing of it is used)."""


def parse_address(text: str) -> tuple[str, int]:
    """``"127.0.0.1:PORT"`` → ``("127.0.0.1", PORT)``.

    Raises:
        WireError: not a loopback ``host:port``.
    """
    host, _, port = text.rpartition(":")
    if host not in ("127.0.0.1", "localhost") or not port.isdigit():
        raise WireError(f"expected a loopback address 127.0.0.1:PORT, got {text!r}")
    return host, int(port)


def send_message(
    conn: Any, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None
) -> None:
    """Sends one message: ``header`` (JSON), then each array's bytes (no copy when contiguous).

    Raises:
        WireError: an array that is not numeric.
        OSError, ValueError: the connection is gone.
    """
    items = list((arrays or {}).items())
    specs = []
    frames = []
    for name, value in items:
        array = np.asarray(value)
        shape = array.shape  # ascontiguousarray makes a 0-d array 1-d: keep the true shape
        array = np.ascontiguousarray(array)
        if array.dtype.kind not in _NUMERIC:
            raise WireError(f"variable {name!r}: dtype {array.dtype} is not numeric")
        specs.append({"name": str(name), "dtype": array.dtype.str, "shape": list(shape)})
        frames.append(array.reshape(-1).view(np.uint8))
    conn.send_bytes(json.dumps({**header, "arrays": specs}).encode("utf-8"))
    for frame in frames:
        conn.send_bytes(frame)


def recv_message(conn: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Receives one message: its header and its arrays (writable, in buffers of their own).

    Raises:
        WireError: the header or an array frame breaks the format.
        EOFError, OSError: the connection is gone.
    """
    raw = conn.recv_bytes(MAX_HEADER_BYTES)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError(f"a message header is not JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise WireError("a message header must be a JSON object with an 'op'")
    specs = header.pop("arrays", [])
    if not isinstance(specs, list):
        raise WireError("'arrays' must be a list")
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        name, dtype, shape = _spec(spec)
        size = math.prod(shape) * dtype.itemsize
        buffer = bytearray(size)
        try:
            got = conn.recv_bytes_into(buffer)
        except BufferTooShort:
            raise WireError(f"variable {name!r}: more than its {size} bytes arrived") from None
        if got != size:
            raise WireError(f"variable {name!r}: {got} bytes received, {size} expected")
        arrays[name] = np.frombuffer(buffer, dtype=dtype).reshape(shape)
    return header, arrays


def _spec(spec: Any) -> tuple[str, np.dtype[Any], tuple[int, ...]]:
    if not isinstance(spec, dict):
        raise WireError("an array spec must be an object with name, dtype and shape")
    name, dtype, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
    if not isinstance(name, str) or not isinstance(dtype, str) or not isinstance(shape, list):
        raise WireError(f"bad array spec {spec!r}")
    try:
        parsed = np.dtype(dtype)
    except TypeError as exc:
        raise WireError(f"variable {name!r}: unknown dtype {dtype!r}") from exc
    if parsed.kind not in _NUMERIC or parsed.hasobject:
        raise WireError(f"variable {name!r}: dtype {dtype} is not numeric")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise WireError(f"variable {name!r}: bad shape {shape!r}")
    return name, parsed, tuple(shape)
