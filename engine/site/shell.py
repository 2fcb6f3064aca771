"""The admin shell commands a site runs, re-validated locally: no shell, paths inside the
workspace, secrets never read, output capped, a time limit."""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from engine.shell import (
    COMMAND_SPECS,
    SECRET_NAME,
    CommandSpec,
    ShellCommandError,
    name_problem,
    parse_command,
)

__all__ = ["ENV_SHOWN", "SAFE_PATH", "ShellCommandError", "run_shell_command"]

# Tools run from the system folders only: never from a PATH an operator's shell or venv set.
SAFE_PATH = "/usr/bin:/bin"

#: Environment variables ``env`` shows with their values (names, or prefixes ending in ``*``);
#: every other variable is listed by name with its value hidden. An allow-list, because secrets
#: hide behind names no deny-list foresees (DATABASE_URL, GH_PAT, AUTH_BEARER).
ENV_SHOWN = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "TERM",
    "PWD",
    "TZ",
    "HOSTNAME",
    "TMPDIR",
    "LANG",
    "LANGUAGE",
    "LC_*",
    "VIRTUAL_ENV",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "CUDA_HOME",
    "NVIDIA_*",
    "NCCL_*",
    "OMP_*",
    "MKL_*",
    "PYTHON*",
    "FLTUI_*",
)


def _shown(name: str, extra: Sequence[str]) -> bool:
    """Whether ``env`` shows this variable's value: on the allow-list (ours and the policy's)
    and not named like a secret (FLTUI_TOKEN stays hidden)."""
    if SECRET_NAME.search(name):
        return False
    return any(
        name.startswith(p[:-1]) if p.endswith("*") else name == p for p in (*ENV_SHOWN, *extra)
    )


def _env_text(extra: Sequence[str] = ()) -> str:
    lines = []
    hidden = 0
    for name, value in sorted(os.environ.items()):
        if _shown(name, extra):
            lines.append(f"{name}={value}")
        else:
            hidden += 1
            lines.append(f"{name}=[hidden]")
    if hidden:
        lines.append(
            f"[{hidden} value(s) hidden: only {', '.join(ENV_SHOWN)} and the site policy's "
            "env_shown are shown]"
        )
    return "\n".join(lines) + "\n"


def _cap(data: bytes, max_output: int) -> str:
    if len(data) <= max_output:
        return data.decode("utf-8", errors="replace")
    text = data[:max_output].decode("utf-8", errors="replace")
    sep = "" if text.endswith("\n") else "\n"
    return f"{text}{sep}[output truncated at {max_output} bytes]\n"


def _inside(workspace: str, cmd: str, path: str, spec: CommandSpec) -> None:
    """The file a path operand really reaches (links followed) is inside the workspace, and is
    neither a secret nor, for the readers, of a kind they may not read: the checks of the name
    hold for what it resolves to, and a hard link to a secret is the secret."""
    real = os.path.realpath(os.path.join(workspace, path))
    if real != workspace and os.path.commonpath([workspace, real]) != workspace:
        raise ShellCommandError(f"{cmd}: path {path!r} resolves outside the workspace")
    rel = os.path.relpath(real, workspace)
    if real != os.path.normpath(os.path.join(workspace, path)):
        problem = name_problem(rel, spec)
        if problem:
            raise ShellCommandError(f"{cmd}: {path!r} resolves to {rel!r}, which {problem}")
    if spec.readable and _hard_linked(real):
        raise ShellCommandError(
            f"{cmd}: {path!r} has other names (hard links) than the one asked for, and one of "
            "them may be a secret (a token or a key); it is not readable remotely"
        )


def _hard_linked(real: str) -> bool:
    """Whether a file has more than one name: its other names cannot be found cheaply (a key
    anywhere under the workspace, session_token.json, a kit's key elsewhere), so such a file is
    not read at all. Logs, configs and metrics are written with one name."""
    try:
        return os.stat(real).st_nlink > 1
    except OSError:
        return False  # the tool says the file is missing


def _run(exe: str, argv: list[str], cwd: str, timeout: float, max_output: int) -> str:
    env = {"PATH": SAFE_PATH, "LANG": "C"}
    proc = subprocess.Popen(
        argv,
        executable=exe,  # argv[0] stays the bare name, so the tool's messages read "cat: ..."
        shell=False,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    name = argv[0]
    deadline = time.monotonic() + timeout
    out = bytearray()
    # Read as it comes and stop at the cap: `cat` of a 50 GB file must not fill our memory.
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while len(out) <= max_output:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ShellCommandError(f"{name}: timed out after {timeout:g} s")
                if not sel.select(remaining):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                out += chunk
        if len(out) > max_output:
            proc.kill()
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise ShellCommandError(f"{name}: timed out after {timeout:g} s") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    return _cap(bytes(out), max_output)


def run_shell_command(
    command: str,
    workspace: Path,
    timeout: float = 10.0,
    max_output: int = 64 * 1024,
    env_shown: Sequence[str] = (),
) -> str:
    """Validates and runs an admin shell command in the site's workspace.

    The server validated the command too, but the site does not trust that: the command is
    checked again (see ``parse_shell_command``), every path operand must resolve (symlinks
    followed) inside ``workspace`` to a file its name rules allow (a link named ``tok.txt`` to
    ``client_token.txt`` is refused, as is a hard link to a key), and the tool runs without a
    shell, with stdin closed and an environment of only ``PATH`` and ``LANG=C``. ``pwd`` prints
    the workspace; ``env`` lists this process's variables, with the values of those on
    ``ENV_SHOWN`` (and the policy's ``env_shown``) only, never of one named like a secret.

    Args:
        command: the command line.
        workspace: the site's workspace folder; the command's working directory.
        timeout: seconds the command may run.
        max_output: bytes of output returned; more ends with "[output truncated at N bytes]".
        env_shown: more variable names (or prefixes ending in ``*``) whose values ``env`` shows.

    Returns:
        The command's stdout and stderr together, as text.

    Raises:
        ShellCommandError: the command is refused, cannot be started, or timed out.
    """
    parsed = parse_command(command)
    cmd = parsed.argv[0]
    ws = os.path.realpath(workspace)
    if not os.path.isdir(ws):
        raise ShellCommandError(f"the workspace {str(workspace)!r} is not a folder")
    if cmd == "pwd":
        return _cap((os.path.abspath(workspace) + "\n").encode(), max_output)
    if cmd == "env":
        return _cap(_env_text(env_shown).encode("utf-8", errors="replace"), max_output)
    spec = COMMAND_SPECS[cmd]
    for path in parsed.files:
        _inside(ws, cmd, path, spec)
    exe = shutil.which(cmd, path=SAFE_PATH)
    if exe is None:
        raise ShellCommandError(f"{cmd}: not found on this site (looked in {SAFE_PATH})")
    try:
        return _run(exe, parsed.argv, ws, timeout, max_output)
    except OSError as exc:
        raise ShellCommandError(f"{cmd}: cannot be started: {exc.strerror}") from None
