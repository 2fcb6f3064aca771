"""The site's sovereignty: startup/site_policy.json rules for admin requests, and the audit log."""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from engine.admin_defs import Topic
from engine.components import DEFAULT_TRUSTED_PACKAGES
from engine.config import ConfigError, load_json
from engine.fileio import atomic_write

__all__ = [
    "COMMANDS",
    "READ_ONLY_COMMANDS",
    "AuditLog",
    "LivePolicy",
    "SitePolicy",
    "command_of",
    "load_site_policy",
    "policy_source",
    "write_default_policy",
]

COMMANDS = (
    "deploy",
    "start",
    "abort",
    "restart",
    "shutdown",
    "delete_run",
    "check_status",
    "sys_info",
    "shell",
    "validate",
    "set_run_number",
)
# The commands that change nothing on the site (the shell whitelist only reads).
READ_ONLY_COMMANDS = ("check_status", "sys_info", "shell")
DEFAULT_MAX_DEPLOY_BYTES = 2 << 30

_TOPIC_COMMANDS = {
    Topic.START: "start",
    Topic.START_MGPU: "start",
    Topic.ABORT: "abort",
    Topic.DELETE_RUN: "delete_run",
    Topic.DEPLOY: "deploy",
    Topic.SHUTDOWN: "shutdown",
    Topic.RESTART: "restart",
    Topic.CHECK_STATUS: "check_status",
    Topic.SET_RUN_NUMBER: "set_run_number",
    Topic.SYS_INFO: "sys_info",
    Topic.SHELL: "shell",
    Topic.VALIDATE: "validate",
}

_KEYS_HELP = {
    "allow_byoc": (
        "true lets MMARs with their own code be deployed and run: files under custom/, and "
        "components that name code by path outside trusted_packages"
    ),
    "trusted_packages": (
        "installed top-level packages (default torch, monai, ignite, numpy) whose classes a "
        'component may name by "path" without allow_byoc; a package the MMAR\'s custom/ '
        "would shadow, and the entry points that run code (torch.hub, torch.load, numpy.load, "
        "monai.bundle, anything named eval, exec, run_*, subprocess, ...), still count as the "
        "MMAR's code"
    ),
    "allow_expressions": (
        "true lets config expressions run (Python in config strings: lambda ..., a MONAI "
        'bundle\'s "$..."; "@name" references and "%file#key" macros are not code); false '
        "refuses an MMAR holding one; left out: as allow_byoc"
    ),
    "allowed_commands": f"admin commands the federation may send: {', '.join(COMMANDS)}",
    "read_only": (
        "true allows only check_status, sys_info and shell, whatever allowed_commands says"
    ),
    "max_deploy_bytes": "the most bytes a deployed MMAR may hold once extracted",
    "shell_timeout": "seconds an admin shell command (ls, cat, head, tail, grep) may run",
    "shell_max_output": "bytes of shell command output sent back",
    "env_shown": (
        "more environment variables (names, or prefixes ending in *) whose values the admin's "
        "env command shows; every other variable is listed with its value hidden"
    ),
}


def command_of(topic: str) -> str:
    """Returns the policy's command name for a request topic.

    ``train.start`` and ``train.start_mgpu`` are "start", ``sys.shell`` is "shell",
    ``sys.info`` is "sys_info", ``train.delete_run`` is "delete_run", and so on.

    Raises:
        KeyError: the topic is not an admin request topic.
    """
    try:
        return _TOPIC_COMMANDS[topic]
    except KeyError:
        raise KeyError(f"{topic!r} is not an admin request topic") from None


def policy_source(path: Path | None) -> str:
    """How a refusal names the policy file: ``startup/site_policy.json``, or the defaults."""
    return _where(path)


def _where(path: Path | None) -> str:
    if path is None:
        return "defaults; no startup/site_policy.json"
    if path.parent.name == "startup":
        return f"startup/{path.name}"
    return str(path)


@dataclass(frozen=True)
class SitePolicy:
    """What the federation may do on this site (``startup/site_policy.json``).

    Attributes:
        allow_byoc: whether MMARs with their own code (``custom/``, code by path) may run.
        trusted_packages: installed top-level packages a component may name by path without
            ``allow_byoc`` (``engine.components.own_code`` says what still counts as code).
        allow_expressions: whether config expressions may run; None (left out): as
            ``allow_byoc`` (``expressions_allowed`` is the answer).
        allowed_commands: admin commands the federation may send (``COMMANDS`` names).
        read_only: when true only check_status, sys_info and shell run.
        max_deploy_bytes: the most bytes a deployed MMAR may hold once extracted.
        shell_timeout: seconds an admin shell command may run.
        shell_max_output: bytes of shell output sent back.
        env_shown: more variables (names, or prefixes ending in ``*``) whose values ``env``
            shows, beside ``engine.site.shell.ENV_SHOWN``.
        path: the file the policy came from; None for the defaults.
    """

    allow_byoc: bool = False
    trusted_packages: tuple[str, ...] = DEFAULT_TRUSTED_PACKAGES
    allow_expressions: bool | None = None
    allowed_commands: frozenset[str] = field(default_factory=lambda: frozenset(COMMANDS))
    read_only: bool = False
    max_deploy_bytes: int = DEFAULT_MAX_DEPLOY_BYTES
    shell_timeout: float = 10.0
    shell_max_output: int = 65536
    env_shown: tuple[str, ...] = ()
    path: Path | None = None

    def current(self) -> SitePolicy:
        """This policy (a ``LivePolicy`` answers with the file's policy now): code that reads
        several keys takes one snapshot."""
        return self

    @property
    def expressions_allowed(self) -> bool:
        """Whether config expressions may run: ``allow_expressions``, else ``allow_byoc``."""
        return self.allow_byoc if self.allow_expressions is None else self.allow_expressions

    def refusal(self, topic: str) -> str | None:
        """Returns None when a request of ``topic`` may run, else why not (rule and file).

        A topic that names no known command is refused: the policy cannot say it is harmless.
        """
        where = f"refused by site policy ({_where(self.path)})"
        command = _TOPIC_COMMANDS.get(topic)
        if command is None:
            return f"{where}: {topic!r} is not a known admin command"
        if self.read_only and command not in READ_ONLY_COMMANDS:
            return f"{where}: read_only is true: only check_status, sys_info and shell may run"
        if command not in self.allowed_commands:
            return f'{where}: "{command}" is not in allowed_commands'
        return None

    def to_dict(self) -> dict[str, Any]:
        """The policy as the JSON object its file holds (``allow_expressions`` only when set)."""
        expressions = (
            {} if self.allow_expressions is None else {"allow_expressions": self.allow_expressions}
        )
        return {
            "allow_byoc": self.allow_byoc,
            "trusted_packages": list(self.trusted_packages),
            **expressions,
            "allowed_commands": [c for c in COMMANDS if c in self.allowed_commands],
            "read_only": self.read_only,
            "max_deploy_bytes": self.max_deploy_bytes,
            "shell_timeout": self.shell_timeout,
            "shell_max_output": self.shell_max_output,
            "env_shown": list(self.env_shown),
        }


def _get(path: Path, data: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = data.get(key, default)
    # bool is an int in Python, but `"max_deploy_bytes": true` is a mistake.
    wrong_bool = isinstance(value, bool) and kind is not bool
    if wrong_bool or not (isinstance(value, kind) or (kind is float and isinstance(value, int))):
        expected = {bool: "true or false", int: "a whole number", float: "a number"}[kind]
        raise ConfigError(path, key, f"expected {expected}, got {json.dumps(value)}")
    return value


def load_site_policy(path: Path) -> SitePolicy:
    """Reads ``startup/site_policy.json``.

    Keys starting with "_" are comments. A missing file gives the defaults (``path`` None).

    Args:
        path: the policy file.

    Returns:
        The policy.

    Raises:
        ConfigError: the file cannot be read, is not a JSON object, has an unknown key, a value
            of the wrong type, or an unknown command name; the text names file and key.
    """
    path = Path(path)
    if not path.exists():
        return SitePolicy()
    data = load_json(path)
    known = [*_KEYS_HELP]
    for key in data:
        if key not in _KEYS_HELP and not key.startswith("_"):
            raise ConfigError(path, key, f"unknown key (known keys: {', '.join(known)})")
    defaults = SitePolicy()
    commands = data.get("allowed_commands", list(COMMANDS))
    if not isinstance(commands, list):
        raise ConfigError(
            path, "allowed_commands", f"expected a list of names, got {json.dumps(commands)}"
        )
    for i, name in enumerate(commands):
        if name not in COMMANDS:
            raise ConfigError(
                path,
                f"allowed_commands[{i}]",
                f"unknown command {json.dumps(name)} (known: {', '.join(COMMANDS)})",
            )
    max_bytes = _get(path, data, "max_deploy_bytes", int, defaults.max_deploy_bytes)
    if max_bytes < 1:
        raise ConfigError(path, "max_deploy_bytes", f"expected a number >= 1, got {max_bytes}")
    timeout = _get(path, data, "shell_timeout", float, defaults.shell_timeout)
    if not 0 < timeout <= 3600:
        raise ConfigError(path, "shell_timeout", f"expected 0 < seconds <= 3600, got {timeout}")
    max_output = _get(path, data, "shell_max_output", int, defaults.shell_max_output)
    if max_output < 1:
        raise ConfigError(path, "shell_max_output", f"expected a number >= 1, got {max_output}")
    env_shown = data.get("env_shown", [])
    if not isinstance(env_shown, list):
        raise ConfigError(
            path, "env_shown", f"expected a list of variable names, got {json.dumps(env_shown)}"
        )
    for i, name in enumerate(env_shown):
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*\*?", name):
            raise ConfigError(
                path,
                f"env_shown[{i}]",
                "expected a variable name or a prefix ending in * (PROXY_*), got "
                + json.dumps(name),
            )
    expressions = data.get("allow_expressions")
    if expressions is not None and not isinstance(expressions, bool):
        raise ConfigError(
            path,
            "allow_expressions",
            "expected true or false (or leave it out: as allow_byoc), got "
            + json.dumps(expressions),
        )
    return SitePolicy(
        env_shown=tuple(env_shown),
        allow_byoc=_get(path, data, "allow_byoc", bool, defaults.allow_byoc),
        trusted_packages=_trusted_packages(path, data),
        allow_expressions=expressions,
        allowed_commands=frozenset(commands),
        read_only=_get(path, data, "read_only", bool, defaults.read_only),
        max_deploy_bytes=max_bytes,
        shell_timeout=float(timeout),
        shell_max_output=max_output,
        path=path,
    )


# Names a site cannot trust as a library: the standard library (os.system, subprocess, ...) and
# this program's own packages (its components are named by "name").
_UNTRUSTABLE = frozenset(getattr(sys, "stdlib_module_names", ())) | {
    "builtins",
    "os",
    "sys",
    "subprocess",
    "engine",
    "fltui",
    "protos",
}


def _trusted_packages(path: Path, data: dict[str, Any]) -> tuple[str, ...]:
    names = data.get("trusted_packages", list(DEFAULT_TRUSTED_PACKAGES))
    if not isinstance(names, list):
        raise ConfigError(
            path,
            "trusted_packages",
            f"expected a list of top-level package names, got {json.dumps(names)}",
        )
    for i, name in enumerate(names):
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(
                path,
                f"trusted_packages[{i}]",
                'expected a top-level package name such as "monai" (letters, digits, _; no '
                f"dots), got {json.dumps(name)}",
            )
        if name in _UNTRUSTABLE or name.startswith("_"):
            raise ConfigError(
                path,
                f"trusted_packages[{i}]",
                f"{name!r} cannot be trusted: it is Python's standard library, private, or "
                "fltui itself, and naming it by path would run any code",
            )
    return tuple(dict.fromkeys(names))


def write_default_policy(path: Path, *, overwrite: bool = False) -> None:
    """Writes the default policy, with a "_help" entry per key, atomically.

    Args:
        path: the policy file, usually ``<workspace>/startup/site_policy.json``.
        overwrite: replace an existing file; without it an existing policy is kept.

    Raises:
        FileExistsError: the file exists and ``overwrite`` is false.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; not replacing a site's policy")
    doc = {"_help": _KEYS_HELP, **SitePolicy().to_dict()}
    text = (json.dumps(doc, indent=2) + "\n").encode()
    atomic_write(path, lambda f: f.write(text))


class LivePolicy:
    """``startup/site_policy.json`` as it is now: an edit takes effect without restarting the site.

    Reads as a SitePolicy (``policy.allow_byoc``, ``policy.refusal(topic)``, ...); each use
    looks at the file (one ``stat``) and reads it again when it changed. A file that has become
    unusable fails closed: ``refusal`` refuses every request, naming the file's problem, and
    every other attribute raises the ConfigError, so no deploy or start goes ahead under a
    policy the site did not write.

    Args:
        path: the policy file (it may not exist: then the defaults).

    Raises:
        ConfigError: at construction, when the file is unusable (a site does not start on a
            broken policy).
    """

    def __init__(self, path: Path) -> None:
        self._file = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, ...] | None = None
        self._policy: SitePolicy | None = None
        self._error: ConfigError | None = None
        self.current()

    def _read_stamp(self) -> tuple[int, ...]:
        try:
            st = self._file.stat()
        except FileNotFoundError:
            return ()
        except OSError:
            return (-1,)
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def current(self) -> SitePolicy:
        """The policy in the file now.

        Raises:
            ConfigError: the file is unusable (unreadable, not JSON, a bad key or value).
        """
        with self._lock:
            stamp = self._read_stamp()
            if stamp != self._stamp or (self._policy is None and self._error is None):
                try:
                    self._policy, self._error = load_site_policy(self._file), None
                except ConfigError as exc:
                    self._policy, self._error = None, exc
                self._stamp = stamp
            if self._error is not None:
                raise self._error
            assert self._policy is not None
            return self._policy

    def refusal(self, topic: str) -> str | None:
        """As ``SitePolicy.refusal``; a file that has become unusable refuses everything."""
        try:
            policy = self.current()
        except ConfigError as exc:
            return (
                f"refused by site policy ({_where(self._file)}): the policy cannot be used: {exc}"
            )
        return policy.refusal(topic)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.current(), name)


class AuditLog:
    """Appends one JSON line per admin action to ``logs/audit.jsonl``; safe across threads.

    Each line is ``{"time", "origin", "topic", "outcome", "detail"}``, written with one append
    and fsynced, so a crash loses at most the line being written.
    """

    def __init__(self, path: Path) -> None:
        """Creates the log writer (the file and its folder appear on the first append)."""
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, origin: str, topic: str, outcome: str, detail: str = "") -> dict[str, str]:
        """Appends a record and returns it.

        Args:
            origin: who asked: "local" or the admin user.
            topic: the request's topic or the local action.
            outcome: e.g. "ok", "error", "refused".
            detail: free text (a reason, a run number, ...).
        """
        record = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "origin": origin,
            "topic": topic,
            "outcome": outcome,
            "detail": detail,
        }
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        return record

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        """Returns the records of an audit log; a missing file has none.

        A line that is not a JSON object (a write cut short by a crash) is skipped.
        """
        try:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out
