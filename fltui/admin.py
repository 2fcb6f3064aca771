"""``fltui admin``: the federation admin's console, interactive or one command for scripts."""

from __future__ import annotations

import cmd
import contextlib
import json
import os
import shlex
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc

from engine.config import ConfigError, load_json
from engine.server.admin_console import COMMAND_HELP, COMMANDS, SHELL_COMMANDS, did_you_mean
from engine.site.deploy import DeployError, make_mmar_zip
from engine.tls import (
    EXIT_REFUSED,
    SecurityFailure,
    preflight_certificate,
    read_tls_files,
    security_failure,
)
from fltui.exits import EXIT_INTERRUPTED
from protos import admin_pb2 as apb
from protos import admin_pb2_grpc

__all__ = [
    "EXIT_REFUSED",
    "AdminConsole",
    "AdminKit",
    "AdminRefused",
    "AdminShell",
    "command_list",
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
        if words:
            return _one_command(console, words, json_out, out)
        return AdminShell(console, out).run()
    except AdminRefused as exc:
        # Not retried: a certificate or a permission does not change by asking again.
        print(f"fltui admin: refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("\nfltui admin: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        console.close()


def _one_command(console: AdminConsole, words: list[str], json_out: bool, out: IO[str]) -> int:
    name = words[0]
    if name not in COMMANDS and name not in LOCAL_COMMANDS:
        hint = did_you_mean(name, tuple(COMMANDS))
        print(
            f"fltui admin: unknown command {name!r}{hint}; `fltui admin --help` lists them",
            file=sys.stderr,
        )
        return 2
    if name in LOCAL_COMMANDS:
        print(_help_text(words[1:]), file=out)
        return 0
    # Progress of a long command goes to stderr: stdout stays the result, for scripts.
    reply = _execute(console, shlex.join(words), sys.stderr)
    print(reply.json if json_out and reply.json else reply.text, file=out)
    return 0 if reply.ok else 1


def _execute(console: AdminConsole, line: str, progress: IO[str] | None) -> apb.ConsoleReply:
    """Runs ``line`` in a thread (so Ctrl-C is felt at once); ``validate`` reports progress."""
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["reply"] = console.execute(line)
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=call, name="admin-command", daemon=True)
    worker.start()
    validating = progress is not None and line.split()[:1] == ["validate"]
    last, next_poll = "", time.monotonic() + PROGRESS_PERIOD
    while worker.is_alive():
        worker.join(0.1)
        if validating and worker.is_alive() and time.monotonic() >= next_poll:
            next_poll = time.monotonic() + PROGRESS_PERIOD
            reply = console.execute("validation_progress", timeout=5)
            if reply.ok and reply.text != last and reply.text.startswith("validation"):
                last = reply.text
                print(reply.text, file=progress, flush=True)
    if "error" in box:
        raise box["error"]
    return box["reply"]  # type: ignore[no-any-return]


def _help_text(args: list[str]) -> str:
    """``help``: every command with its line; ``help CMD``: its usage and line."""
    if args:
        name = args[0]
        if name not in COMMANDS:
            return f"no command {name!r}{did_you_mean(name, tuple(COMMANDS))}"
        return f"usage: {COMMANDS[name]}\n  {COMMAND_HELP.get(name, '')}"
    width = max(len(c) for c in COMMANDS)
    lines = [f"  {c:<{width}}  {COMMAND_HELP.get(c, '')}" for c in COMMANDS]
    lines.append(f"  {'help [CMD]':<{width}}  this list, or one command's usage")
    lines.append(f"  {'bye':<{width}}  leave (also Ctrl-D or Ctrl-C)")
    return "\n".join(lines)


def command_list() -> str:
    """Every command with a line each, for ``fltui admin --help``."""
    return "commands:\n" + _help_text([])


def history_file() -> Path:
    """Where the interactive console keeps its history (``$XDG_STATE_HOME/fltui``)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "fltui" / "admin_history"


class AdminShell(cmd.Cmd):
    """The interactive console: line editing and history (readline), Tab completion of
    commands, site names and MMARs, "did you mean", Ctrl-C and Ctrl-D to leave."""

    prompt = "> "

    def __init__(self, console: AdminConsole, out: IO[str]) -> None:
        super().__init__(stdout=out)
        self.console = console
        self.out = out
        self.code = 0
        self._sites: tuple[float, list[str]] = (0.0, [])

    # ------------------------------------------------------------------ the loop

    def run(self) -> int:
        """Runs until ``bye``, Ctrl-D or Ctrl-C; returns the exit code."""
        print(
            f"fltui admin: {self.console.user} at {self.console.target}; "
            "'help' lists commands, Ctrl-D leaves",
            file=self.out,
        )
        rl = _readline() if sys.stdin.isatty() else None
        if rl is not None:
            rl.set_completer_delims(" \t\n")  # site-1 is one word
            with contextlib.suppress(OSError):
                rl.read_history_file(history_file())
            rl.set_history_length(1000)
        else:
            self.use_rawinput = sys.stdin.isatty()
            self.prompt = "> " if sys.stdin.isatty() else ""
        try:
            self.cmdloop()
        except KeyboardInterrupt:
            print("", file=self.out)  # off the prompt's line, no traceback
            self.code = EXIT_INTERRUPTED
        finally:
            if rl is not None:
                _save_history(rl)
        return self.code

    def onecmd(self, line: str) -> bool:
        line = line.strip()
        if not line:
            return False
        if line == "EOF":  # Ctrl-D
            print("", file=self.out)
            return True
        try:
            words = shlex.split(line)
        except ValueError as exc:
            print(f"cannot parse the command: {exc}", file=self.out)
            return False
        name = words[0]
        if name in ("bye", "exit", "quit"):
            return True
        if name in LOCAL_COMMANDS:
            print(_help_text(words[1:]), file=self.out)
            return False
        if name not in COMMANDS:
            hint = did_you_mean(name, (*COMMANDS, *LOCAL_COMMANDS, "bye"))
            print(f"unknown command {name!r}{hint}; 'help' lists commands", file=self.out)
            return False
        try:
            reply = _execute(self.console, line, self.out)
        except KeyboardInterrupt:
            print(
                f"\n(stopped waiting; the server goes on with {name!r} — check_status shows "
                "where the sites are)",
                file=self.out,
            )
            return False
        print(reply.text, file=self.out)
        return False

    # ------------------------------------------------------------------ completion

    def completenames(self, text: str, *ignored: Any) -> list[str]:
        names = [*COMMANDS, *LOCAL_COMMANDS, "bye"]
        return [f"{n} " for n in names if n.startswith(text)]

    def completedefault(self, text: str, line: str, begidx: int, endidx: int) -> list[str]:
        words = line[:begidx].split()
        if not words:
            return self.completenames(text)
        return [f"{c} " for c in self._candidates(words[0], len(words) - 1) if c.startswith(text)]

    def _candidates(self, name: str, position: int) -> list[str]:
        """What may stand at ``position`` (0: the first argument) of command ``name``."""
        if name in LOCAL_COMMANDS:
            return list(COMMANDS) if position == 0 else []
        if name in SHELL_COMMANDS:
            return self.sites() if position == 0 else []
        if name == "deploy":
            if position == 0:
                transfer = self.console.kit / "transfer"
                return sorted(p.name for p in transfer.glob("*") if p.is_dir())
            return ["client"] if position == 1 else [*self.sites(), "all"]
        if name == "start_mgpu":
            return ["client"] if position == 0 else self.sites() if position == 2 else []
        if name == "validate":
            return ["all", *self.sites()] if position == 0 else self.sites()
        if name in ("check_status", "start"):
            return ["client", "server"] if position == 0 else [*self.sites(), "all"]
        if name in CLIENT_TARGETED:
            return ["client"] if position == 0 else [*self.sites(), "all"]
        return []

    def sites(self) -> list[str]:
        """The server's registered sites (asked at most every few seconds; none if it is down)."""
        when, names = self._sites
        if time.monotonic() - when < 5.0:
            return names
        names = []
        try:
            reply = self.console.execute("check_status server", timeout=3)
            if reply.ok and reply.json:
                names = list(json.loads(reply.json).get("sites", []))
        except (AdminRefused, ValueError):
            pass
        self._sites = (time.monotonic(), names)
        return names


CLIENT_TARGETED = ("abort", "restart", "shutdown", "sys_info")
LOCAL_COMMANDS = ("help", "?")
PROGRESS_PERIOD = 2.0


def _readline() -> Any:
    try:
        import readline  # deferred: only an interactive console edits lines
    except ImportError:  # a Python built without it: plain input
        return None
    return readline


def _save_history(rl: Any) -> None:
    path = history_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        rl.write_history_file(path)
        os.chmod(path, 0o600)  # commands name sites and runs: the admin's own
    except OSError:
        pass


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(COMMANDS, indent=2))
