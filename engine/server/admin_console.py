"""The server's admin console service: parses an admin's command and sends requests to sites."""

from __future__ import annotations

import difflib
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

__all__ = [
    "COMMANDS",
    "COMMAND_HELP",
    "AdminConsoleService",
    "did_you_mean",
    "format_validation_progress",
]

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
    "validation_progress": "validation_progress",
    "sys_info": "sys_info client site",
    "set_timeout": "set_timeout SECONDS",
    **{c: f"{c} site [args]   (read-only, inside the site's workspace)" for c in SHELL_COMMANDS},
}

# One line each, for ``fltui admin --help`` and the console's ``help``.
COMMAND_HELP = {
    "check_status": "the server's round and sites, or each site's status and last error",
    "set_run_number": "the run number that deploy, start and delete_run_number act on",
    "deploy": "send an MMAR from the kit's transfer/ to sites (checked there before it is kept)",
    "start": "start training the deployed run at sites",
    "start_mgpu": "start training on GPUS GPUs at one site",
    "abort": "stop training at sites (the sites stay up)",
    "restart": "restart the sites' engines",
    "shutdown": "stop the sites' services",
    "delete_run_number": "delete run N's folder at every site",
    "validate": "cross-site validation: each site validates every model, with progress",
    "validation_progress": "how far the running (or last) cross-site validation is",
    "sys_info": "a site's machine: OS, Python, CPUs, GPUs",
    "set_timeout": "how long to wait for each site's reply",
    "pwd": "a site's workspace folder",
    "env": "a site's environment (secrets hidden)",
    "ls": "list files in a site's workspace",
    "cat": "print a file of a site's workspace",
    "head": "the first lines of a file of a site's workspace",
    "tail": "the last lines of a file of a site's workspace",
    "grep": "search files of a site's workspace",
}


def format_validation_progress(data: dict[str, Any]) -> str:
    """One line: each site's models validated / expected and its current one, elapsed, timeout."""
    parts = []
    for site, p in sorted(data.get("sites", {}).items()):
        if p.get("done"):
            parts.append(f"{site} done ({p['validated']}/{p['expected']})")
            continue
        now = f", on {p['current']}'s" if p.get("current") else ""
        parts.append(
            f"{site} {p['validated']}/{p['expected']} validated, {p['received']} received{now}"
        )
    head = "validation" if data.get("outcome") == "running" else f"validation {data['outcome']}"
    return (
        f"{head}: {'; '.join(parts) or 'no site'} · {data.get('elapsed', 0):.0f} s "
        f"of {data.get('timeout', 0):g} s"
    )


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """`` (did you mean X?)`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


class _Usage(Exception):
    """The command's form is wrong: the reply ends with its usage line."""


class _Refused(Exception):
    """The command is well formed but cannot be done now (no usage line: the form was right)."""


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
        # The running (or last) cross-site validation, for ``validation_progress``.
        self.validation: dict[str, Any] = {}

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
            hint = did_you_mean(name, tuple(COMMANDS))
            if not hint:
                hint = f" (commands: {', '.join(sorted(COMMANDS))})"
            return apb.ConsoleReply(ok=False, text=f"unknown command {name!r}{hint}")
        try:
            ok, text, data = handler(args, request)
        except _Usage as exc:
            usage = COMMANDS.get(name, "")
            return apb.ConsoleReply(ok=False, text=f"{exc}\nusage: {usage}")
        except _Refused as exc:
            return apb.ConsoleReply(ok=False, text=str(exc))
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
            hint = did_you_mean(unknown[0], registered)
            known = ", ".join(registered) or "none"
            raise _Refused(f"not registered: {', '.join(unknown)}{hint} (registered: {known})")
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
            raise _Refused("set a run number first (set_run_number N)")
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
            raise _Refused("the console sends the MMAR zip with the command (use fltui admin)")
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
        timeout = max(self.timeout, 600.0)
        began = time.monotonic()
        self.validation = {
            "sites": sites,
            "started": time.time(),
            "timeout": timeout,
            "done": [],
            "outcome": "running",
        }
        ok, text, data = self._send(sites, Topic.VALIDATE, request)
        if not ok:
            self.validation["outcome"] = "refused"
            return ok, text, data
        # Each site validates in the background and sends its result when done.
        deadline = began + timeout
        while time.monotonic() < deadline:
            done = {s for s, m in self.server.admin.results[start:] if m.topic == Topic.VALIDATE}
            self.validation["done"] = sorted(done & set(sites))
            if set(sites) <= done:
                break
            time.sleep(0.2)
        else:
            progress = self._validation_progress()
            self.validation["outcome"] = "timed out"
            missing = [s for s in sites if s not in self.validation["done"]]
            details = "; ".join(
                f"{s}: {p['validated']} of {p['expected']} models validated, "
                f"{p['received']} received" + (f", on {p['current']}'s" if p["current"] else "")
                for s, p in progress["sites"].items()
                if s in missing
            )
            matrix = self.server.cross_val_results_snapshot()
            return (
                False,
                f"validation timed out after {timeout:g} s: no result from "
                f"{', '.join(missing)} ({details}); results so far:\n"
                + json.dumps(matrix, indent=2, sort_keys=True),
                {"timed_out": True, "missing": missing, "results": matrix},
            )
        self.validation["outcome"] = "done"
        matrix = self.server.cross_val_results_snapshot()
        if len(args) == 2:
            matrix = {args[0]: {args[1]: matrix.get(args[0], {}).get(args[1])}}
        return True, json.dumps(matrix, indent=2, sort_keys=True), matrix

    def _validation_progress(self) -> dict[str, Any]:
        v = self.validation
        if not v:
            return {"outcome": "none"}
        with self.server._cond:
            finished = self.server.finished
        sites = self.server.cross_site.progress(v["sites"], finished)
        for site in v["done"]:
            sites[site]["done"] = True
        return {
            "outcome": v["outcome"],
            "elapsed": round(time.time() - v["started"], 1),
            "timeout": v["timeout"],
            "sites": sites,
        }

    def _cmd_validation_progress(self, args: list[str], request: apb.ConsoleCommand) -> Any:
        data = self._validation_progress()
        if data["outcome"] == "none":
            return True, "no validation has run", data
        return True, format_validation_progress(data), data

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
