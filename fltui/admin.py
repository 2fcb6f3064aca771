"""``fltui admin``: the federation admin's console, interactive or one command for scripts."""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc

from engine.config import ConfigError, load_json
from engine.server.admin_console import COMMANDS
from engine.site.deploy import DeployError, make_mmar_zip
from engine.tls import (
    EXIT_REFUSED,
    SecurityFailure,
    preflight_certificate,
    read_tls_files,
    security_failure,
)
from protos import admin_pb2 as apb
from protos import admin_pb2_grpc

__all__ = [
    "EXIT_REFUSED",
    "AdminConsole",
    "AdminKit",
    "AdminRefused",
    "load_admin_kit",
    "run_admin",
]

_OPTIONS = [
    ("grpc.max_send_message_length", 1 << 30),
    ("grpc.max_receive_message_length", 64 << 20),
]


@dataclass(frozen=True)
class AdminKit:
    """An admin's kit, ``<kit>/startup/fed_admin.json``: who, which server, which certificates."""

    path: Path
    name: str
    target: str
    secure: bool = False
    ssl_root_cert: Path | None = None
    ssl_cert: Path | None = None
    ssl_private_key: Path | None = None


def load_admin_kit(kit: Path) -> AdminKit:
    """Parses ``<kit>/startup/fed_admin.json``.

    ``secure_train`` defaults to on when the kit names certificates (``fltui provision`` kits).

    Raises:
        ConfigError: naming the file and key.
    """
    path = kit / "startup" / "fed_admin.json"
    data = load_json(path)
    admin = data.get("admin")
    if not isinstance(admin, dict):
        raise ConfigError(path, "admin", 'expected {"name": ..., "target": "host:port"}')
    name, target = admin.get("name"), admin.get("target")
    if not isinstance(name, str) or not name:
        raise ConfigError(path, "admin.name", "expected the admin's name (a string)")
    if not isinstance(target, str) or ":" not in target:
        raise ConfigError(path, "admin.target", f'expected "host:port", got {target!r}')
    files: dict[str, Path | None] = {}
    for key in ("ssl_root_cert", "ssl_cert", "ssl_private_key"):
        value = admin.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(path, f"admin.{key}", f"expected a file name, got {value!r}")
        files[key] = path.parent / value if value else None
    secure = admin.get("secure_train", files["ssl_cert"] is not None)
    if not isinstance(secure, bool):
        raise ConfigError(path, "admin.secure_train", f"expected true or false, got {secure!r}")
    return AdminKit(path, name, target, secure, **files)


class AdminRefused(Exception):
    """TLS or authentication refused this admin (exit code 3); ``failure`` says why."""

    def __init__(self, failure: SecurityFailure) -> None:
        super().__init__(failure.reason)
        self.failure = failure


class AdminConsole:
    """Sends console commands to the server; reads MMARs to deploy from ``<kit>/transfer/``.

    With a secure kit the console authenticates by its admin certificate (mutual TLS): the
    server takes the admin's name from the certificate.

    Raises:
        ConfigError: the kit is unusable (a file missing, the key readable by others).
        AdminRefused: the kit's certificate is expired or not from the kit's authority.
    """

    def __init__(self, kit: Path) -> None:
        self.kit = kit
        self.config = load_admin_kit(kit)
        self.user, self.target = self.config.name, self.config.target
        c = self.config
        if c.secure:
            root, cert, key = read_tls_files(c.ssl_root_cert, c.ssl_cert, c.ssl_private_key)
            try:
                preflight_certificate(c.ssl_root_cert, c.ssl_cert, c.ssl_private_key)  # type: ignore[arg-type]
            except SecurityFailure as exc:
                raise AdminRefused(exc) from None
            creds = grpc.ssl_channel_credentials(
                root_certificates=root, private_key=key, certificate_chain=cert
            )
            self.channel = grpc.secure_channel(self.target, creds, _OPTIONS)
        else:
            self.channel = grpc.insecure_channel(self.target, _OPTIONS)
        self.stub = admin_pb2_grpc.AdminConsoleStub(self.channel)

    def execute(self, command: str, timeout: float = 900.0) -> apb.ConsoleReply:
        """Runs one command line; a ``deploy`` attaches the named MMAR from transfer/."""
        attachment = b""
        words = shlex.split(command)
        if words[:1] == ["deploy"] and len(words) > 1:
            folder = self.kit / "transfer" / words[1]
            if not folder.is_dir():
                offered = sorted(p.name for p in (self.kit / "transfer").glob("*") if p.is_dir())
                return apb.ConsoleReply(
                    ok=False,
                    text=f"no MMAR {words[1]!r} in {self.kit / 'transfer'} "
                    f"(there: {', '.join(offered) or 'nothing'})",
                )
            try:
                attachment = make_mmar_zip(folder)
            except DeployError as exc:
                return apb.ConsoleReply(ok=False, text=f"cannot send {folder}: {exc}")
        try:
            return self.stub.Execute(
                apb.ConsoleCommand(user=self.user, command=command, attachment=attachment),
                timeout=timeout,
            )
        except grpc.RpcError as exc:
            details = str(exc.details() or exc.code())
            failure = security_failure(
                exc.code(),
                details,
                self.target,
                secure=self.config.secure,
                cert=self.config.ssl_cert,
                private_key=self.config.ssl_private_key,
            )
            if failure is not None:
                raise AdminRefused(failure) from None
            return apb.ConsoleReply(
                ok=False, text=f"the server at {self.target} did not answer: {details}"
            )

    def close(self) -> None:
        self.channel.close()


def run_admin(
    kit: Path, words: list[str], json_out: bool = False, stream: IO[str] | None = None
) -> int:
    """One command (``words``) or, without words, an interactive console. Returns the exit code."""
    out = stream or sys.stdout
    try:
        console = AdminConsole(kit)
    except ConfigError as exc:
        print(f"fltui: {exc}", file=sys.stderr)
        return 2
    except AdminRefused as exc:
        print(f"fltui admin: refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    try:
        return _console(console, words, json_out, out)
    except AdminRefused as exc:
        # Not retried: a certificate or a permission does not change by asking again.
        print(f"fltui admin: refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    finally:
        console.close()


def _console(console: AdminConsole, words: list[str], json_out: bool, out: IO[str]) -> int:
    """Runs one command or the interactive loop; returns the exit code."""
    if words:
        reply = console.execute(shlex.join(words))
        print(reply.json if json_out and reply.json else reply.text, file=out)
        return 0 if reply.ok else 1
    print(
        f"fltui admin: {console.user} at {console.target}; 'help' lists commands, 'bye' ends",
        file=out,
    )
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return 0
        if line in ("bye", "exit", "quit"):
            return 0
        if line in ("help", "?"):
            for usage in COMMANDS.values():
                print(f"  {usage}", file=out)
            continue
        if line:
            print(console.execute(line).text, file=out)


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(COMMANDS, indent=2))
