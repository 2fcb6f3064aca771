"""``fltui admin``: the federation admin's console, interactive or one command for scripts."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import IO

import grpc

from engine.config import ConfigError, load_json
from engine.server.admin_console import COMMANDS
from protos import admin_pb2 as apb
from protos import admin_pb2_grpc

__all__ = ["AdminConsole", "load_admin_kit", "run_admin"]


def load_admin_kit(kit: Path) -> tuple[str, str]:
    """``(admin name, server target)`` from ``<kit>/startup/fed_admin.json``.

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
    return name, target


class AdminConsole:
    """Sends console commands to the server; reads MMARs to deploy from ``<kit>/transfer/``."""

    def __init__(self, kit: Path) -> None:
        self.kit = kit
        self.user, self.target = load_admin_kit(kit)
        self.channel = grpc.insecure_channel(
            self.target,
            [
                ("grpc.max_send_message_length", 1 << 30),
                ("grpc.max_receive_message_length", 64 << 20),
            ],
        )
        self.stub = admin_pb2_grpc.AdminConsoleStub(self.channel)

    def execute(self, command: str, timeout: float = 900.0) -> apb.ConsoleReply:
        """Runs one command line; a ``deploy`` attaches the named MMAR from transfer/."""
        from engine.client.deploy import DeployError, make_mmar_zip

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
            return apb.ConsoleReply(
                ok=False, text=f"the server at {self.target} did not answer: {exc.details()}"
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
    try:
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
    finally:
        console.close()


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(COMMANDS, indent=2))
