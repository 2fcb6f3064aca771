"""The server's admin console service: parses an admin's command and sends requests to sites."""

from __future__ import annotations

import json
import shlex
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from engine.admin_defs import Message, MsgHeader, ReturnCode, Topic
from engine.shell import ShellCommandError, parse_shell_command
from protos import admin_pb2 as apb
from protos import admin_pb2_grpc

__all__ = ["COMMANDS", "AdminConsoleService"]

SHELL_COMMANDS = ("ls", "cat", "head", "tail", "grep", "pwd", "env")

COMMANDS = {
    "check_status": "check_status server | client [site ...]",
    "set_run_number": "set_run_number N",
    "deploy": "deploy MMAR client site|all   (MMAR: a folder in the admin kit's transfer/)",
    "start": "start client site|all",
    "start_mgpu": "start_mgpu client GPUS site",
    "abort": "abort client site|all",
    "restart": "restart client site|all",
    "shutdown": "shutdown client site|all",
    "delete_run_number": "delete_run_number N",
    "validate": "validate all | validate DATA_SITE MODEL_OWNER",
    "sys_info": "sys_info client site",
    "set_timeout": "set_timeout SECONDS",
    **{c: f"{c} site [args]   (read-only, inside the site's workspace)" for c in SHELL_COMMANDS},
}


class _Usage(Exception):
    pass


class AdminConsoleService(admin_pb2_grpc.AdminConsoleServicer):
    """Runs console commands against the sites of a FederatedServer.

    Args:
        server: the FederatedServer (its registered sites, admin queues and results).
    """

    def __init__(self, server: Any) -> None:
        self.server = server
        self.run_number: int | None = None
        self.timeout = 10.0
        self._lock = threading.Lock()

    def Execute(
        self, request: apb.ConsoleCommand, context: grpc.ServicerContext
    ) -> apb.ConsoleReply:
        # With TLS the admin is whoever its certificate names (an admin certificate of the
        # federation's authority); the name the console sends is not trusted.
        check = getattr(self.server, "check_admin_peer", None)
        certified = check(context) if check is not None else None
        if certified is not None:
            request.user = certified
        try:
            words = shlex.split(request.command)
        except ValueError as exc:
            return apb.ConsoleReply(ok=False, text=f"cannot parse the command: {exc}")
        if not words:
            return apb.ConsoleReply(ok=False, text="empty command")
        name, args = words[0], words[1:]
        handler: Callable[..., Any] | None = getattr(self, f"_cmd_{name}", None)
        if name in SHELL_COMMANDS:
            handler = self._shell
            args = words
        if handler is None:
            known = ", ".join(sorted(COMMANDS))
            return apb.ConsoleReply(ok=False, text=f"unknown command {name!r} (commands: {known})")
        try:
            ok, text, data = handler(args, request)
        except _Usage as exc:
            usage = COMMANDS.get(name, "")
            return apb.ConsoleReply(ok=False, text=f"{exc}\nusage: {usage}")
        return apb.ConsoleReply(ok=ok, text=text, json=json.dumps(data) if data is not None else "")

    # ------------------------------------------------------------------ helpers

    def _sites(self, args: list[str], allow_all: bool = True) -> list[str]:
        with self.server._cond:
            registered = sorted(self.server.sites)
        if not args or (allow_all and args == ["all"]):
            if not allow_all and not args:
                raise _Usage("name a site")
            return registered
        unknown = [s for s in args if s not in registered]
        if unknown:
            known = ", ".join(registered) or "none"
            raise _Usage(f"not registered: {', '.join(unknown)} (registered: {known})")
        return args

    def _client_target(self, args: list[str]) -> list[str]:
        if not args or args[0] != "client":
            raise _Usage("the target must be 'client site ...' or 'client all'")
        return self._sites(args[1:])

    def _send(
        self,
        sites: list[str],
        topic: str,
        request: apb.ConsoleCommand,
        body: str | bytes = "",
        headers: dict[str, str] | None = None,
    ) -> tuple[bool, str, dict[str, Any]]:
        if not sites:
            return False, "no site is registered", {}
        heads = {MsgHeader.USER_NAME: request.user or "admin", **(headers or {})}
        replies: dict[str, apb.Message | None] = {}
        threads = [
            threading.Thread(
                target=lambda s=s: replies.__setitem__(
                    s, self.server.admin.send_request(s, topic, body, heads, self.timeout)
                )
            )
            for s in sites
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        lines, data, ok = [], {}, True
        for site in sites:
            reply = replies.get(site)
            if reply is None:
                ok = False
                lines.append(f"{site}: no reply within {self.timeout:g} s")
                data[site] = {"ok": False, "text": "timeout"}
                continue
            text = Message.from_proto(reply).body
            text = text if isinstance(text, str) else f"<{len(text)} bytes>"
            good = reply.headers.get(MsgHeader.RETURN_CODE) != ReturnCode.ERROR
            ok = ok and good
            lines.append(f"{site}: {text}" if good else f"{site}: ERROR: {text}")
            data[site] = {"ok": good, "text": text}
        return ok, "\n".join(lines), data

    def _need_run(self) -> dict[str, str]:
        if self.run_number is None:
            raise _Usage("set a run number first (set_run_number N)")
        return {MsgHeader.RUN_NUMBER: str(self.run_number)}

    # ------------------------------------------------------------------ commands

    def _cmd_check_status(self, args: list[str], request: apb.ConsoleCommand) -> Any:
        if args[:1] == ["server"]:
            s = self.server
            with s._cond:
                data = {
                    "task": s.config.task_name,
                    "round": s.current_round,
                    "num_rounds": s.config.num_rounds,
                    "finished": s.finished,
                    "sites": sorted(s.sites),
                    "run_number": self.run_number,
                }
            text = (
                f"server: task {data['task']}, round {data['round']}/{data['num_rounds']}"
                f"{' (finished)' if data['finished'] else ''}, sites: "
                f"{', '.join(data['sites']) or 'none'}, run number: {self.run_number}"
            )
            return True, text, data
        return self._send(self._client_target(args), Topic.CHECK_STATUS, request)

    def _cmd_set_run_number(self, args: list[str], request: apb.ConsoleCommand) -> Any:
        if len(args) != 1 or not args[0].isdecimal() or not args[0].isascii() or int(args[0]) < 1:
            raise _Usage("the run number must be a whole number >= 1")
        self.run_number = int(args[0])
        return True, f"run number set to {self.run_number}", {"run_number": self.run_number}

    def _cmd_set_timeout(self, args: list[str], request: apb.ConsoleCommand) -> Any:
        try:
            value = float(args[0])
        except (IndexError, ValueError):
            raise _Usage("give the timeout in seconds") from None
        if not 0 < value <= 3600:
            raise _Usage("the timeout must be in (0, 3600] seconds")
        self.timeout = value
        return True, f"admin timeout set to {value:g} s", {"timeout": value}

    def _cmd_deploy(self, args: list[str], request: apb.ConsoleCommand) -> Any:
        if len(args) < 2:
            raise _Usage("name the MMAR and the target")
        headers = {**self._need_run(), MsgHeader.APP_NAME: args[0]}
        if not request.attachment:
            raise _Usage("the console sends the MMAR zip with the command (use fltui admin)")
        return self._send(
            self._client_target(args[1:]), Topic.DEPLOY, request, bytes(request.attachment), headers
        )

    def _cmd_start(self, args: list[str], request: apb.ConsoleCommand) -> Any:
        if args[:1] == ["server"]:
            return True, "the reference server trains from its start; nothing to do", None
        return self._send(self._client_target(args), Topic.START, request, "", self._need_run())

    def _cmd_start_mgpu(self, args: list[str], request: apb.ConsoleCommand) -> Any:
        if len(args) != 3 or args[0] != "client" or not (args[1].isdecimal() and args[1].isascii()):
            raise _Usage("start_mgpu client GPUS site")
        headers = {**self._need_run(), "gpu_number": args[1]}
        return self._send(
            self._sites(args[2:], allow_all=False), Topic.START_MGPU, request, "", headers
        )

    def _cmd_abort(self, args: list[str], request: apb.ConsoleCommand) -> Any:
        return self._send(self._client_target(args), Topic.ABORT, request)

    def _cmd_restart(self, args: list[str], request: apb.ConsoleCommand) -> Any:
        return self._send(self._client_target(args), Topic.RESTART, request)

    def _cmd_shutdown(self, args: list[str], request: apb.ConsoleCommand) -> Any:
        return self._send(self._client_target(args), Topic.SHUTDOWN, request)

    def _cmd_delete_run_number(self, args: list[str], request: apb.ConsoleCommand) -> Any:
        if len(args) != 1 or not (args[0].isdecimal() and args[0].isascii()):
            raise _Usage("delete_run_number N")
        return self._send(
            self._sites([]), Topic.DELETE_RUN, request, "", {MsgHeader.RUN_NUMBER: args[0]}
        )

    def _cmd_sys_info(self, args: list[str], request: apb.ConsoleCommand) -> Any:
        return self._send(self._client_target(args), Topic.SYS_INFO, request)

    def _cmd_validate(self, args: list[str], request: apb.ConsoleCommand) -> Any:
        if args != ["all"] and len(args) != 2:
            raise _Usage("validate all, or validate DATA_SITE MODEL_OWNER")
        sites = self._sites([])
        start = len(self.server.admin.results)
        self.server.reset_cross_site_delivery(sites)
        ok, text, data = self._send(sites, Topic.VALIDATE, request)
        if not ok:
            return ok, text, data
        # Each site validates in the background and sends its result when done.
        deadline = time.monotonic() + max(self.timeout, 600.0)
        while time.monotonic() < deadline:
            done = {s for s, m in self.server.admin.results[start:] if m.topic == Topic.VALIDATE}
            if set(sites) <= done:
                break
            time.sleep(0.2)
        else:
            return False, "validation results did not all arrive in time", data
        matrix = self.server.cross_val_results_snapshot()
        if len(args) == 2:
            matrix = {args[0]: {args[1]: matrix.get(args[0], {}).get(args[1])}}
        return True, json.dumps(matrix, indent=2, sort_keys=True), matrix

    def _shell(self, words: list[str], request: apb.ConsoleCommand) -> Any:
        if len(words) < 2:
            raise _Usage(f"{words[0]} needs a site")
        command = [words[0], *words[2:]]
        try:
            parse_shell_command(shlex.join(command))  # the site checks again itself
        except ShellCommandError as exc:
            return False, f"refused: {exc}", None
        return self._send(
            self._sites(words[1:2], allow_all=False), Topic.SHELL, request, shlex.join(command)
        )
