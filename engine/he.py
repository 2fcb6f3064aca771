"""Homomorphic encryption of updates (CKKS through TenSEAL): contexts, keys and ciphertext tensors.

The lineage's design (``reference/clara-lineage.md`` §4.4): provisioning makes one TenSEAL context
per federation; every site holds it with the secret key (``startup/client_context.tenseal``,
owner-only), the server a public copy without it (``startup/server_context.tenseal``). A site
encrypts Δ·n_iter; the server adds ciphertexts and multiplies by the plaintext 1/Σn_iter; the
sites decrypt the new global model. The server never holds the secret key: it refuses to load a
context that has one.

A ciphertext tensor travels as bytes (a :class:`engine.serde.CiphertextArray`, wire dtype
``"ckks"``): a small header (magic, the plaintext's dtype and shape) and one serialized
``CKKSVector`` holding the flattened values. TenSEAL is the optional extra ``fltui[he]``,
imported on first use.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.fileio import atomic_write
from engine.serde import CKKS, CiphertextArray

__all__ = [
    "CKKS",
    "CLIENT_CONTEXT",
    "DEFAULT_PARAMS",
    "SERVER_CONTEXT",
    "CKKSParams",
    "HEError",
    "decrypt",
    "encrypt",
    "is_ciphertext",
    "load_context",
    "make_contexts",
    "mark_ciphertexts",
    "plain_spec",
    "tenseal",
]

CLIENT_CONTEXT = "client_context.tenseal"
SERVER_CONTEXT = "server_context.tenseal"
MAGIC = b"FLCKKS1\n"
_HEAD = struct.Struct("<I")  # length of the JSON header that follows the magic
MAX_HEADER = 4096


class HEError(ValueError):
    """A context, key or ciphertext that cannot be used, with the reason."""


def tenseal() -> Any:
    """The ``tenseal`` module, or an HEError telling which extra to install."""
    try:
        import tenseal as ts  # deferred: optional extra fltui[he], loaded only when HE is used
    except ImportError:
        raise HEError(
            "homomorphic encryption needs TenSEAL: install the extra fltui[he] "
            "(pip install 'fltui[he]')"
        ) from None
    return ts


@dataclass(frozen=True)
class CKKSParams:
    """CKKS parameters of a federation's context (NVFlare's defaults)."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40)
    global_scale_bits: int = 40

    @classmethod
    def from_project(cls, value: Any) -> CKKSParams:
        """The ``homomorphic_encryption`` option of a project file (``{}`` or ``true``: defaults).

        Raises:
            HEError: a key that is unknown or out of range (the message names it).
        """
        if value is True or value == {}:
            return cls()
        if not isinstance(value, dict):
            raise HEError(f"expected an object of CKKS parameters, got {value!r}")
        unknown = set(value) - {"poly_modulus_degree", "coeff_mod_bit_sizes", "global_scale"}
        if unknown:
            raise HEError(
                f"unknown key(s) {sorted(unknown)}; expected poly_modulus_degree, "
                "coeff_mod_bit_sizes, global_scale"
            )
        degree = value.get("poly_modulus_degree", 8192)
        if degree not in (4096, 8192, 16384, 32768):
            raise HEError(
                f"poly_modulus_degree: expected 4096, 8192, 16384 or 32768, got {degree!r}"
            )
        bits = value.get("coeff_mod_bit_sizes", [60, 40, 40])
        if (
            not isinstance(bits, list)
            or len(bits) < 3
            or not all(isinstance(b, int) and 20 <= b <= 60 for b in bits)
        ):
            raise HEError(
                "coeff_mod_bit_sizes: expected a list of at least 3 whole numbers in 20..60 "
                f"(one multiplication needs 3), got {bits!r}"
            )
        scale = value.get("global_scale", 2**40)
        if not isinstance(scale, (int, float)) or scale < 2**20 or scale > 2**60:
            raise HEError(f"global_scale: expected a number in 2^20..2^60, got {scale!r}")
        return cls(degree, tuple(bits), round(float(np.log2(float(scale)))))


DEFAULT_PARAMS = CKKSParams()


def make_contexts(params: CKKSParams = DEFAULT_PARAMS) -> tuple[bytes, bytes]:
    """One federation's context: (with the secret key, for the sites; without, for the server)."""
    ts = tenseal()
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
    )
    ctx.global_scale = 2.0**params.global_scale_bits
    private = ctx.serialize(save_secret_key=True)
    ctx.make_context_public()
    return private, ctx.serialize()


def write_context(path: Path, data: bytes, secret: bool) -> None:
    """Writes a context file atomically; one with the secret key is owner-only (0600)."""

    def write(f: Any) -> None:
        os.fchmod(f.fileno(), 0o600 if secret else 0o644)
        f.write(data)

    atomic_write(path, write)


def load_context(path: Path, role: str) -> Any:
    """Loads a TenSEAL context for ``role`` ("site": must hold the secret key, owner-only file;
    "server": must not hold it).

    Raises:
        HEError: the file is missing, unreadable, too open, or holds the wrong kind of key.
    """
    path = Path(path)
    if role not in ("site", "server"):
        raise ValueError(f"role must be 'site' or 'server', got {role!r}")
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode & 0o777
    except OSError as exc:
        raise HEError(f"{path}: cannot read the HE context: {exc.strerror or exc}") from None
    ts = tenseal()
    try:
        ctx = ts.context_from(data)
    except Exception as exc:  # TenSEAL raises its own C++ exception types
        raise HEError(f"{path}: not a TenSEAL context ({exc})") from None
    if role == "server" and ctx.is_private():
        raise HEError(
            f"{path}: this context holds the federation's secret key; the server must never "
            f"hold it: give the server the public {SERVER_CONTEXT} that provisioning wrote"
        )
    if role == "site":
        if not ctx.is_private():
            raise HEError(
                f"{path}: this context has no secret key, so this site cannot decrypt the "
                f"global model: use the {CLIENT_CONTEXT} of this site's startup kit"
            )
        if mode & 0o077:
            raise HEError(
                f"{path}: mode {mode:o} lets other users read the federation's secret key; "
                f"make it owner-only (chmod 600 {path})"
            )
    return ctx


# ---------------------------------------------------------------------------- ciphertext tensors


def is_ciphertext(value: Any) -> bool:
    return isinstance(value, CiphertextArray)


def _pack(dtype: str, shape: tuple[int, ...], body: bytes) -> CiphertextArray:
    head = json.dumps({"dtype": dtype, "shape": list(shape)}).encode()
    out = np.empty(len(MAGIC) + _HEAD.size + len(head) + len(body), np.uint8)
    raw = memoryview(out)  # type: ignore[arg-type]
    pos = len(MAGIC) + _HEAD.size
    raw[: len(MAGIC)] = MAGIC
    raw[len(MAGIC) : pos] = _HEAD.pack(len(head))
    raw[pos : pos + len(head)] = head
    raw[pos + len(head) :] = body
    return out.view(CiphertextArray)


def mark_ciphertexts(model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``model`` with each ciphertext tensor read back from a file tagged as one again.

    A saved ciphertext is a plain uint8 array once loaded (an ``.npz`` keeps no view class);
    one whose bytes begin with this format's magic is a ciphertext tensor (no copy is made).
    Call it only on a model its writer said is encrypted: it is the file's marking that
    makes the bytes a ciphertext, the magic only says which variables.
    """
    out: dict[str, np.ndarray] = {}
    for name, value in model.items():
        arr = np.asarray(value)
        if (
            arr.dtype == np.uint8
            and arr.ndim == 1
            and arr.size > len(MAGIC)
            and bytes(arr[: len(MAGIC)]) == MAGIC
        ):
            out[name] = arr.view(CiphertextArray)
        else:
            out[name] = value
    return out


def plain_spec(value: np.ndarray) -> tuple[str, tuple[int, ...], memoryview]:
    """The plaintext dtype and shape a ciphertext tensor holds, and its CKKS bytes.

    Raises:
        HEError: the bytes are not a ciphertext tensor of this format.
    """
    raw = memoryview(np.ascontiguousarray(value).reshape(-1).view(np.uint8))  # type: ignore[arg-type]
    start = len(MAGIC) + _HEAD.size
    if raw.nbytes < start or bytes(raw[: len(MAGIC)]) != MAGIC:
        raise HEError("not a ciphertext tensor (bad magic)")
    (n,) = _HEAD.unpack(raw[len(MAGIC) : start])
    if n > MAX_HEADER or start + n > raw.nbytes:
        raise HEError("not a ciphertext tensor (bad header length)")
    try:
        head = json.loads(bytes(raw[start : start + n]))
        dtype = str(head["dtype"])
        shape = tuple(int(d) for d in head["shape"])
    except (ValueError, KeyError, TypeError) as exc:
        raise HEError(f"not a ciphertext tensor (bad header: {exc})") from None
    if dtype not in ("float16", "float32", "float64") or any(d < 0 for d in shape):
        raise HEError(f"a ciphertext of dtype {dtype!r} shape {shape} cannot be decrypted here")
    return dtype, shape, raw[start + n :]


def encrypt(ctx: Any, value: np.ndarray, factor: float = 1.0) -> CiphertextArray:
    """``value·factor`` as a ciphertext tensor (the values flattened into one CKKS vector)."""
    ts = tenseal()
    arr = np.asarray(value)
    flat = arr.reshape(-1).astype(np.float64)
    if factor != 1.0:
        flat *= factor
    vec = ts.ckks_vector(ctx, flat)
    return _pack(arr.dtype.name, tuple(arr.shape), vec.serialize())


def vector(ctx: Any, value: np.ndarray) -> tuple[Any, str, tuple[int, ...]]:
    """The CKKS vector of a ciphertext tensor, linked to ``ctx``, and its plaintext dtype, shape."""
    ts = tenseal()
    dtype, shape, body = plain_spec(value)
    try:
        vec = ts.ckks_vector_from(ctx, bytes(body))
    except Exception as exc:  # TenSEAL raises its own C++ exception types
        raise HEError(f"a ciphertext that TenSEAL cannot read ({exc})") from None
    size = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if vec.size() != size:
        raise HEError(f"a ciphertext of {vec.size()} values for shape {shape}")
    return vec, dtype, shape


def pack_vector(vec: Any, dtype: str, shape: tuple[int, ...]) -> CiphertextArray:
    """A CKKS vector as a ciphertext tensor."""
    return _pack(dtype, shape, vec.serialize())


# Ciphertexts (of poly_modulus_degree/2 values each) decrypted at a time by ``decrypt``.
DECRYPT_BATCH = 32


def _varint(raw: memoryview, pos: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        if pos >= raw.nbytes or shift > 63:
            raise HEError("a ciphertext that TenSEAL cannot read (truncated varint)")
        b = raw[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, pos
        shift += 7


def _ckks_records(body: memoryview) -> tuple[list[int], list[tuple[int, int]], bytes]:
    """A serialized ``CKKSVectorProto`` (TenSEAL's tensors.proto: ``repeated uint32 sizes = 1;
    repeated bytes ciphertexts = 2; double scale = 3``) in parts: the sizes, each ciphertext's
    whole record (tag, length and bytes) as (start, end) in ``body``, and the scale's record."""
    sizes: list[int] = []
    records: list[tuple[int, int]] = []
    scale = b""
    pos, end = 0, body.nbytes
    while pos < end:
        start = pos
        key, pos = _varint(body, pos)
        field, wire = key >> 3, key & 7
        if field == 1 and wire == 2:  # packed sizes
            n, pos = _varint(body, pos)
            stop = pos + n
            if stop > end:
                raise HEError("a ciphertext that TenSEAL cannot read (truncated sizes)")
            while pos < stop:
                size, pos = _varint(body, pos)
                sizes.append(size)
        elif field == 1 and wire == 0:
            size, pos = _varint(body, pos)
            sizes.append(size)
        elif field == 2 and wire == 2:
            n, pos = _varint(body, pos)
            pos += n
            if pos > end:
                raise HEError("a ciphertext that TenSEAL cannot read (truncated ciphertext)")
            records.append((start, pos))
        elif field == 3 and wire == 1:
            pos += 8
            scale = bytes(body[start:pos])
        else:
            raise HEError(f"a ciphertext that TenSEAL cannot read (field {field}, wire {wire})")
    if pos != end:
        raise HEError("a ciphertext that TenSEAL cannot read (truncated scale)")
    if len(sizes) != len(records):
        raise HEError(
            f"a ciphertext that TenSEAL cannot read ({len(sizes)} sizes, {len(records)} "
            "ciphertexts)"
        )
    return sizes, records, scale


def _packed_sizes(sizes: list[int]) -> bytes:
    payload = bytearray()
    for v in sizes:
        while v >= 0x80:
            payload.append((v & 0x7F) | 0x80)
            v >>= 7
        payload.append(v)
    head = bytearray([0x0A])  # field 1, length-delimited
    n = len(payload)
    while n >= 0x80:
        head.append((n & 0x7F) | 0x80)
        n >>= 7
    head.append(n)
    return bytes(head + payload)


def decrypt(ctx: Any, value: np.ndarray) -> np.ndarray:
    """The plaintext of a ciphertext tensor, in its own dtype and shape (needs the secret key).

    Decrypted DECRYPT_BATCH ciphertexts at a time, straight into the result: the bytes of each
    batch are copied once (TenSEAL reads only ``bytes``), and neither the whole vector's
    ciphertexts nor a list of all its values is ever held. The values are those of decrypting
    the vector whole: every ciphertext decrypts alone.
    """
    ts = tenseal()
    dtype, shape, body = plain_spec(value)
    size = int(np.prod(shape, dtype=np.int64)) if shape else 1
    sizes, records, scale = _ckks_records(body)
    if sum(sizes) != size:
        raise HEError(f"a ciphertext of {sum(sizes)} values for shape {shape}")
    out = np.empty(size, dtype=dtype)
    pos = 0
    for i in range(0, len(records), DECRYPT_BATCH):
        part = sizes[i : i + DECRYPT_BATCH]
        first, last = records[i][0], records[min(i + DECRYPT_BATCH, len(records)) - 1][1]
        data = b"".join((_packed_sizes(part), body[first:last], scale))
        try:
            vec = ts.ckks_vector_from(ctx, data)
        except Exception as exc:  # TenSEAL raises its own C++ exception types
            raise HEError(f"a ciphertext that TenSEAL cannot read ({exc})") from None
        n = sum(part)
        out[pos : pos + n] = vec.decrypt()
        pos += n
    return out.reshape(shape)
