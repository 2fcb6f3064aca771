"""TLS at run time: reading and checking kits' files, peer identity, reasons for failures.

Certificates are real X.509 (``cryptography``), issued by ``engine.provision``: an ECDSA P-256
certificate authority per project, and certificates for the server (its host names as subject
alternative names), each site and each admin. A certificate's role (``server``, ``site``,
``admin``) is its organizational unit, so a site's certificate cannot open the admin console and
an admin's cannot register as a site.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import re
import socket
import ssl
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from engine.config import ConfigError

__all__ = [
    "EXIT_REFUSED",
    "NAME_MISMATCH",
    "NOT_IN_FEDERATION",
    "ROLE_ADMIN",
    "ROLE_SERVER",
    "ROLE_SITE",
    "TOKEN_REFUSED",
    "WRONG_ROLE",
    "KitError",
    "PeerIdentity",
    "SecurityFailure",
    "check_private_key_file",
    "check_tls_files",
    "classify_rpc_error",
    "diagnose_certificate",
    "load_certificate",
    "peer_identity",
    "preflight_certificate",
    "probe_speaks_tls",
    "read_tls_files",
    "refusal_kind",
    "security_failure",
    "valid_name",
]

EXIT_REFUSED = 3
"""Exit code of ``fltui`` when TLS or authentication refused this site or admin (not retried)."""

ROLE_SERVER, ROLE_SITE, ROLE_ADMIN = "server", "site", "admin"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")


class KitError(ConfigError):
    """A TLS file of a kit that cannot be used (missing, unreadable, a key others can read).

    A ConfigError: the command line reports it like any other configuration error (exit code 2),
    naming the file and saying how to fix it.
    """

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(path, "", problem)
        self.problem = problem


class SecurityFailure(Exception):
    """TLS or authentication refused a connection; retrying cannot help.

    Attributes:
        kind: a short stable name (``wrong_ca``, ``expired``, ``host_name``, ``not_in_federation``,
            ``plaintext_to_tls``, ``tls_to_plaintext``, ``no_certificate``, ``name_mismatch``,
            ``token``, ``role``, ``tls``).
        reason: the reason in words, for the operator.
    """

    def __init__(self, kind: str, reason: str) -> None:
        self.kind, self.reason = kind, reason
        super().__init__(reason)


# The server's refusals start with these words; the client names the failure by them.
NOT_IN_FEDERATION = "site not in the federation"
NAME_MISMATCH = "certificate name mismatch"
TOKEN_REFUSED = "token refused"
WRONG_ROLE = "wrong certificate role"
_REFUSAL_KINDS = {
    NOT_IN_FEDERATION: "not_in_federation",
    "admin not in the federation": "not_in_federation",
    NAME_MISMATCH: "name_mismatch",
    TOKEN_REFUSED: "token",
    WRONG_ROLE: "role",
    "Unknown client identity": "token",
}


def refusal_kind(details: str) -> str:
    """The kind of an UNAUTHENTICATED or PERMISSION_DENIED refusal, from its first words."""
    for prefix, kind in _REFUSAL_KINDS.items():
        if details.startswith(prefix):
            return kind
    return "auth"


# ---------------------------------------------------------------------------- files


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def load_certificate(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file.

    Raises:
        KitError: the file is missing, unreadable or not a PEM certificate.
    """
    data = _read_file(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise KitError(
            path, "not a PEM certificate (expected -----BEGIN CERTIFICATE-----)"
        ) from None


def _read_file(path: Path | str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise KitError(path, f"{what} file not found") from None
    except IsADirectoryError:
        raise KitError(path, f"expected the {what} file, found a folder") from None
    except OSError as exc:
        raise KitError(path, f"{what} file cannot be read: {exc.strerror}") from None


def check_private_key_file(path: Path | str) -> None:
    """Refuses a private key that others can read or write.

    Raises:
        KitError: naming the file, its mode and the command that fixes it.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise KitError(path, "private key file not found") from None
    except OSError as exc:
        raise KitError(path, f"private key file cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KitError(path, "the private key is not a regular file")
    loose = st.st_mode & (stat.S_IRWXG | stat.S_IRWXO)
    if loose:
        raise KitError(
            path,
            f"the private key is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"refusing to use it. Fix: chmod 600 {path}",
        )


def check_tls_files(
    root_cert: Path | str | None,
    cert: Path | str | None,
    private_key: Path | str | None,
    where: str = "the kit",
) -> None:
    """Checks that the three TLS files of a kit are named, present and the key is owner-only.

    Raises:
        KitError: naming the missing setting or the file, and how to fix it.
    """
    for value, key in (
        (root_cert, "ssl_root_cert"),
        (cert, "ssl_cert"),
        (private_key, "ssl_private_key"),
    ):
        if not value:
            raise KitError(
                where,
                f"{key} is not set but TLS (secure_train) is on; "
                "use a kit made by `fltui provision`",
            )
    assert root_cert and cert and private_key
    _read_file(root_cert, "root certificate")
    _read_file(cert, "certificate")
    check_private_key_file(private_key)
    _read_file(private_key, "private key")


def read_tls_files(
    root_cert: Path | str | None, cert: Path | str | None, private_key: Path | str | None
) -> tuple[bytes, bytes, bytes]:
    """``(root, cert chain, key)`` bytes for gRPC credentials, after ``check_tls_files``."""
    check_tls_files(root_cert, cert, private_key)
    assert root_cert and cert and private_key
    return (
        _read_file(root_cert, "root certificate"),
        _read_file(cert, "certificate"),
        _read_file(private_key, "private key"),
    )


def _fmt_time(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M UTC")


def preflight_certificate(
    root_cert: Path | str, cert: Path | str, private_key: Path | str, now: dt.datetime | None = None
) -> None:
    """Checks a kit's own certificate before it is shown to the server.

    The server refuses these too; checking here gives the operator the reason in plain words
    (a TLS peer only sees "handshake failed").

    Raises:
        SecurityFailure: expired or not yet valid, not issued by the kit's authority, or not the
            certificate of the kit's key.
        KitError: a file is not a certificate or a key.
    """
    now = now or _now()
    mine = load_certificate(Path(cert))
    root = load_certificate(Path(root_cert))
    if now > mine.not_valid_after_utc:
        raise SecurityFailure(
            "expired",
            f"expired certificate: {cert} expired on {_fmt_time(mine.not_valid_after_utc)}; "
            "ask the federation's admin for a new startup kit",
        )
    if now < mine.not_valid_before_utc:
        raise SecurityFailure(
            "expired",
            f"certificate not yet valid: {cert} is valid from "
            f"{_fmt_time(mine.not_valid_before_utc)} (is this machine's clock right?)",
        )
    try:
        mine.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        raise SecurityFailure(
            "wrong_ca",
            f"wrong certificate authority: {cert} ({_subject(mine)}) was not issued by the "
            f"authority in {root_cert} ({_subject(root)}); the kit mixes files of two projects",
        ) from None
    key_data = _read_file(private_key, "private key")
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError):
        raise KitError(private_key, "not an unencrypted PEM private key") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if key.public_key().public_bytes(enc, pub) != mine.public_key().public_bytes(enc, pub):
        raise KitError(private_key, f"this key does not belong to the certificate {cert}")


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


# ---------------------------------------------------------------------------- server side


@dataclass(frozen=True)
class PeerIdentity:
    """Who is on the other end of a mutual-TLS call: common name and role of its certificate."""

    common_name: str
    role: str | None
    org: str | None = None


@functools.lru_cache(maxsize=1024)
def _identity_from_pem(pem: bytes) -> PeerIdentity | None:
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    subject = cert.subject

    def one(oid: x509.ObjectIdentifier) -> str | None:
        values = subject.get_attributes_for_oid(oid)
        return str(values[0].value) if len(values) == 1 else None

    cn = one(NameOID.COMMON_NAME)
    if not cn:
        return None
    return PeerIdentity(cn, one(NameOID.ORGANIZATIONAL_UNIT_NAME), one(NameOID.ORGANIZATION_NAME))


def peer_identity(context: Any) -> PeerIdentity | None:
    """The verified client certificate's identity of a gRPC call, or None (no TLS, no cert).

    gRPC has already checked the certificate against the federation's authority (the server
    requires and verifies client certificates); this only reads its subject.
    """
    auth: Mapping[str, list[bytes]] = context.auth_context() or {}
    pem = auth.get("x509_pem_cert")
    if pem:
        return _identity_from_pem(bytes(pem[0]))
    names = auth.get("x509_common_name")
    if names:
        return PeerIdentity(names[0].decode("utf-8", "replace"), None)
    return None


def valid_name(name: str) -> bool:
    """A site or admin name usable as a certificate's common name and a folder name."""
    return bool(_NAME.fullmatch(name)) and name not in (".", "..")


# ---------------------------------------------------------------------------- client side

_HOST_NAME = re.compile(r"peer name (\S+) is not in peer certificate", re.IGNORECASE)
_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    (
        "host_name",
        re.compile(
            r"not in peer certificate|hostname mismatch|Hostname Verification|"
            r"does not match SSL server name",
            re.IGNORECASE,
        ),
    ),
    ("expired", re.compile(r"CERTIFICATE_EXPIRED|certificate has expired", re.IGNORECASE)),
    (
        "wrong_ca",
        re.compile(
            r"UNKNOWN_CA|CERTIFICATE_VERIFY_FAILED|unable to get local issuer|"
            r"self.signed certificate|BAD_CERTIFICATE|DECRYPT_ERROR",
            re.IGNORECASE,
        ),
    ),
    (
        "no_certificate",
        re.compile(r"CERTIFICATE_REQUIRED|PEER_DID_NOT_RETURN_A_CERTIFICATE", re.IGNORECASE),
    ),
    (
        "tls_to_plaintext",
        re.compile(r"WRONG_VERSION_NUMBER|RECORD_LAYER_FAILURE|HTTP_REQUEST", re.IGNORECASE),
    ),
    ("tls", re.compile(r"\b(ssl|tls|handshake|x509)\b|TSI_", re.IGNORECASE)),
]


def classify_rpc_error(details: str, target: str, secure: bool) -> SecurityFailure | None:
    """The security failure a gRPC error's details describe, in the operator's words, or None.

    Args:
        details: the error's details.
        target: the server's ``host:port``.
        secure: whether this end used TLS.
    """
    if not secure:
        return None
    for kind, pattern in _PATTERNS:
        if pattern.search(details):
            return SecurityFailure(kind, _words(kind, details, target))
    return None


def _words(kind: str, details: str, target: str) -> str:
    host = target.rsplit(":", 1)[0]
    if kind == "host_name":
        m = _HOST_NAME.search(details)
        name = m.group(1) if m else host
        return (
            f"host name mismatch: the server's certificate is not valid for {name!r} (the host "
            f"in the kit's target {target}); use a host name the server was provisioned with"
        )
    if kind == "expired":
        return (
            f"expired certificate: the TLS handshake with {target} failed because a certificate "
            "has expired (this site's or the server's); provision new certificates"
        )
    if kind == "wrong_ca":
        return (
            f"wrong certificate authority: {target} and this kit do not trust each other's "
            "certificates (the server's certificate was not issued by the kit's rootCA.pem, or "
            "this site's by the server's); use the startup kit of this federation"
        )
    if kind == "no_certificate":
        return f"no client certificate: the server at {target} requires one and none was sent"
    if kind == "tls_to_plaintext":
        return (
            f"the server at {target} does not speak TLS (plaintext server) but this kit has "
            "secure_train on; ask the federation's admin whether the server runs without TLS"
        )
    return f"TLS failure talking to {target}: {details}"


def _split(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


_NOT_TLS = re.compile(r"WRONG_VERSION_NUMBER|RECORD_LAYER|HTTP_REQUEST|UNEXPECTED_EOF", re.I)
# Bytes that are not TLS came back: a plaintext server answered our handshake.
_PLAINTEXT_REPLY = re.compile(r"WRONG_VERSION_NUMBER|HTTP_REQUEST|RECORD_LAYER", re.I)
# A TLS alert about certificates (unknown ca, bad/expired/required certificate, ...).
_CERT_ALERT = re.compile(r"ALERT.*(CA|CERTIFICATE)|CERTIFICATE.*(REQUIRED|UNKNOWN|EXPIRED)", re.I)
# The HTTP/2 connection preface and an empty SETTINGS frame: what gRPC sends first.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def probe_speaks_tls(target: str, timeout: float = 2.0) -> bool:
    """Whether the server at ``target`` answers a TLS handshake (certificates not checked).

    Used when a plaintext connection fails: a TLS server hangs up on plaintext HTTP/2, which looks
    like a network error unless we ask.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        host, port = _split(target)
        with (
            socket.create_connection((host, port), timeout=timeout) as sock,
            ctx.wrap_socket(sock),
        ):
            return True
    except ssl.SSLError as exc:
        # An alert about certificates still means a TLS server answered.
        return not _NOT_TLS.search(str(exc))
    except (OSError, ValueError):
        return False


def diagnose_certificate(
    target: str, cert: Path | str, private_key: Path | str, timeout: float = 2.0
) -> SecurityFailure | None:
    """Asks the server whether it accepts this kit's certificate, when gRPC only says "closed".

    A gRPC server that refuses a client certificate closes the connection without a TLS alert
    (TLS 1.3 checks the client's certificate after the client's side of the handshake is done),
    so the client's error is a bare "Socket closed". This handshake presents the same certificate
    and sends gRPC's opening bytes: a server that accepts it answers with HTTP/2 settings, one
    that refuses it hangs up.

    Returns:
        the refusal, or None when the server accepted the certificate or could not be reached
        (then the failure was the network's, and is worth a retry).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the server's side is gRPC's to check, and it did
    ctx.set_alpn_protocols(["h2"])
    try:
        ctx.load_cert_chain(str(cert), str(private_key))
        host, port = _split(target)
        sock = socket.create_connection((host, port), timeout=timeout)
    except (OSError, ValueError, ssl.SSLError):
        return None
    # The handshake: a peer that hangs up or stalls before it completes is the network's
    # trouble (a proxy whose far end is down, a slow link), worth a retry - not a refusal.
    try:
        tls = ctx.wrap_socket(sock)
    except ssl.SSLError as exc:
        sock.close()
        if _PLAINTEXT_REPLY.search(str(exc)):
            return SecurityFailure("tls_to_plaintext", _words("tls_to_plaintext", "", target))
        if not _CERT_ALERT.search(str(exc)):
            return None
        answer = b""
    except OSError:
        sock.close()
        return None
    else:
        # After the handshake: a server that refuses our certificate (TLS 1.3 checks it now)
        # sends an alert or hangs up; one that accepts it answers with HTTP/2 settings.
        with tls:
            try:
                tls.sendall(_H2_PREFACE)
                answer = tls.recv(9)
            except ssl.SSLError as exc:
                if not (_CERT_ALERT.search(str(exc)) or "EOF" in str(exc)):
                    return None
                answer = b""
            except ConnectionResetError:
                answer = b""
            except OSError:  # a timeout: a slow server, not a refusal
                return None
    if answer:
        return None
    return SecurityFailure(
        "certificate_refused",
        f"the server at {target} refused this site's certificate {cert} during the TLS "
        "handshake: it does not trust the certificate authority that issued it (wrong "
        "certificate authority), or the certificate is expired or not yet valid by the "
        "server's clock; ask the federation's admin for this federation's startup kit",
    )


# Whole words only: a host named "fedtls.example" that does not resolve is not a TLS failure.
_TLS_WORDS = re.compile(r"\b(ssl|tls|handshake|certificate|x509)\b", re.IGNORECASE)
# The TCP connection never opened: nothing to ask the server about TLS.
_NO_CONNECTION = re.compile(
    r"Connection refused|DNS resolution|Name resolution|Network is unreachable|No route|"
    r"Deadline Exceeded|deadline",
    re.IGNORECASE,
)
_AUTH_CODES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
# gRPC's words for a peer that closed the connection during the TLS handshake.
_HUNG_UP = re.compile(r"Socket closed|Connection reset|end of file|\bEOF\b", re.IGNORECASE)


def security_failure(
    code: grpc.StatusCode | None,
    details: str,
    target: str,
    *,
    secure: bool,
    cert: Path | str | None = None,
    private_key: Path | str | None = None,
) -> SecurityFailure | None:
    """What TLS or authentication refused in a failed call, in the operator's words.

    Args:
        code: the call's status code.
        details: its details.
        target: the server's ``host:port``.
        secure: whether this end used TLS.
        cert, private_key: this end's certificate and key (to ask the server about them when
            the connection was only "closed").

    Returns:
        the failure (never worth a retry), or None when TLS and authentication are not to blame.
    """
    if secure and code == grpc.StatusCode.UNAUTHENTICATED and _PATTERNS[0][1].search(details):
        return SecurityFailure("host_name", _words("host_name", details, target))
    if code in _AUTH_CODES:
        return SecurityFailure(
            refusal_kind(details), f"refused by the server at {target}: {details}"
        )
    if code != grpc.StatusCode.UNAVAILABLE and not _TLS_WORDS.search(details):
        return None
    connected = code == grpc.StatusCode.UNAVAILABLE and not _NO_CONNECTION.search(details)
    if secure:
        failure = classify_rpc_error(details, target, secure=True)
        if failure is not None and failure.kind != "tls":
            return failure
        if connected and cert and private_key:
            # "Socket closed": a server that refuses our certificate hangs up without a word.
            refused = diagnose_certificate(target, cert, private_key)
            if refused is not None:
                return refused
            if failure is not None and failure.kind == "tls" and _HUNG_UP.search(details):
                # The peer hung up mid-handshake and our own handshake with the same certificate
                # found no refusal: the network's fault (a proxy whose far end is down), which
                # is worth a retry, not a refusal.
                return None
        return failure
    if connected and probe_speaks_tls(target):
        return SecurityFailure(
            "plaintext_to_tls",
            f"plaintext client speaking to a TLS server: the server at {target} requires TLS "
            "with certificates, and this kit has none (secure_train off); use the startup kit "
            "`fltui provision` made for it",
        )
    if _TLS_WORDS.search(details):
        return SecurityFailure("tls", f"TLS failure talking to {target}: {details}")
    return None
