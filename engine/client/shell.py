"""The admin shell commands a site runs (pwd env ls cat head tail grep), re-validated locally."""

from __future__ import annotations

import os
import re
import selectors
import shlex
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ALLOWED_COMMANDS",
    "ENV_SHOWN",
    "ShellCommandError",
    "parse_shell_command",
    "run_shell_command",
]

# The lineage's whitelist (NVF20 fuel/hci/shell_cmd_val.py), plus .jsonl for our own logs.
ALLOWED_COMMANDS = ("pwd", "env", "ls", "cat", "head", "tail", "grep")
READABLE_EXTENSIONS = (".txt", ".log", ".json", ".jsonl", ".csv", ".sh", ".config", ".py")
MAX_COUNT = 10**7
# Tools run from the system folders only: never from a PATH an operator's shell or venv set.
SAFE_PATH = "/usr/bin:/bin"
# shell=False makes these harmless, but a command holding one was written to attack a shell:
# refusing it says so plainly instead of running something the sender did not mean.
_METACHARACTERS = {
    ";": "';'",
    "|": "'|'",
    "&": "'&'",
    "$": "'$'",
    "`": "a backtick",
    ">": "'>'",
    "<": "'<'",
    "\n": "a newline",
    "\r": "a carriage return",
    "\x00": "a NUL byte",
}
_FILE_RE = re.compile(r"^[A-Za-z0-9\-._/]*$")
_SECRET_RE = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL|PRIVATE", re.IGNORECASE)
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
#: The file holding the session token and the worker's key (never readable remotely).
TOKEN_FILE = "client_token.txt"


class ShellCommandError(ValueError):
    """A shell command this site refuses to run, or one that failed to run (timeout)."""


@dataclass(frozen=True)
class _Spec:
    flags: str  # single-letter options without a value
    valued: str  # single-letter options that take a positive integer
    min_files: int
    max_files: int
    pattern: bool = False  # grep: a PATTERN before the file
    readable: bool = True  # the file must have one of READABLE_EXTENSIONS


_SPECS = {
    "pwd": _Spec("", "", 0, 0, readable=False),
    "env": _Spec("", "", 0, 0, readable=False),
    "ls": _Spec("altSRu", "", 0, 1, readable=False),
    "cat": _Spec("nbsT", "", 1, 1),
    "head": _Spec("", "cn", 1, 1),
    "tail": _Spec("", "cn", 1, 1),
    "grep": _Spec("nib", "", 1, 1, pattern=True),
}


@dataclass(frozen=True)
class _Parsed:
    argv: list[str]
    files: list[str]


def _options_text(spec: _Spec) -> str:
    opts = [f"-{c}" for c in spec.flags] + [f"-{c} N" for c in spec.valued]
    return " ".join(opts) if opts else "none"


def _count(cmd: str, opt: str, value: str) -> str:
    if not re.fullmatch(r"[0-9]+", value) or not 1 <= int(value) <= MAX_COUNT:
        raise ShellCommandError(
            f"{cmd}: option -{opt} needs a positive whole number up to {MAX_COUNT}, got {value!r}"
        )
    return str(int(value))


def _check_file(cmd: str, path: str, spec: _Spec) -> None:
    if not path:
        raise ShellCommandError(f"{cmd}: an empty file name is not allowed")
    if not _FILE_RE.match(path):
        raise ShellCommandError(
            f"{cmd}: file {path!r} may only hold letters, digits, '-', '.', '_' and '/'"
        )
    if path.startswith("/"):
        raise ShellCommandError(
            f"{cmd}: absolute path {path!r} is not allowed; give a path inside the workspace"
        )
    if ".." in path.split("/"):
        raise ShellCommandError(f"{cmd}: path {path!r} may not hold a '..' component")
    if _secret_file(path):
        # The session token and worker key live in client_token.txt; keys in startup/.
        raise ShellCommandError(f"{cmd}: {path!r} may hold a secret and is not readable remotely")
    if spec.readable and not path.endswith(READABLE_EXTENSIONS):
        raise ShellCommandError(
            f"{cmd}: file {path!r} is not one of the readable kinds "
            f"({' '.join(READABLE_EXTENSIONS)})"
        )


def _parse(command: str) -> _Parsed:
    if not isinstance(command, str):
        raise ShellCommandError(f"the shell command must be text, got {type(command).__name__}")
    for char, name in _METACHARACTERS.items():
        if char in command:
            raise ShellCommandError(
                f"shell command {command!r} holds {name}; shell operators are not allowed"
            )
    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise ShellCommandError(f"shell command {command!r} cannot be parsed: {exc}") from None
    if not words:
        raise ShellCommandError("the shell command is empty")
    cmd, args = words[0], words[1:]
    spec = _SPECS.get(cmd)
    if spec is None:
        raise ShellCommandError(
            f"command {cmd!r} is not allowed; allowed: {', '.join(ALLOWED_COMMANDS)}"
        )
    if not (spec.flags or spec.valued or spec.max_files) and args:
        raise ShellCommandError(f"{cmd}: takes no arguments (got: {shlex.join(args)})")
    flags: list[str] = []
    valued: list[str] = []
    positionals: list[str] = []
    i = 0
    while i < len(args):
        word = args[i]
        i += 1
        if word == "--":
            positionals.extend(args[i:])
            break
        if not word.startswith("-") or word == "-":
            positionals.append(word)
            continue
        if word.startswith("--"):
            raise ShellCommandError(
                f"{cmd}: option {word!r} is not allowed (allowed: {_options_text(spec)})"
            )
        # argparse-style short options: "-la" is "-l -a", "-n5" is "-n 5".
        j = 1
        while j < len(word):
            opt = word[j]
            if opt in spec.flags:
                flags.append(f"-{opt}")
                j += 1
            elif opt in spec.valued:
                value = word[j + 1 :]
                if not value:
                    if i >= len(args):
                        raise ShellCommandError(f"{cmd}: option -{opt} needs a number")
                    value = args[i]
                    i += 1
                valued += [f"-{opt}", _count(cmd, opt, value)]
                break
            else:
                raise ShellCommandError(
                    f"{cmd}: option -{opt} is not allowed (allowed: {_options_text(spec)})"
                )
    pattern: list[str] = []
    if spec.pattern:
        if not positionals:
            raise ShellCommandError(f"{cmd}: needs a PATTERN and a file")
        pattern, positionals = positionals[:1], positionals[1:]
    if not spec.min_files <= len(positionals) <= spec.max_files:
        if spec.max_files == 0:
            want = "takes no arguments"
        elif spec.min_files == spec.max_files:
            want = "needs exactly one file"
        else:
            want = "takes at most one file"
        got = " ".join(shlex.quote(p) for p in positionals) or "none"
        raise ShellCommandError(f"{cmd}: {want} (got: {got})")
    for path in positionals:
        _check_file(cmd, path, spec)
    # "--" before the operands: a file named like an option can never become one.
    tail = ["--", *pattern, *positionals] if (pattern or positionals) else []
    return _Parsed([cmd, *flags, *valued, *tail], positionals)


def parse_shell_command(command: str) -> list[str]:
    """Validates an admin shell command against the site's whitelist.

    Allowed: ``pwd``, ``env`` (no arguments), ``ls -a -l -t -S -R -u [file]``,
    ``cat -n -b -s -T file``, ``head -c N -n N file``, ``tail -c N -n N file`` and
    ``grep -n -i -b PATTERN file``. Files are relative paths of ``[A-Za-z0-9-._/]`` without a
    ``..`` component; ``cat``/``head``/``tail``/``grep`` read only ``.txt .log .json .jsonl .csv
    .sh .config .py`` files. Shell operators are refused.

    Args:
        command: the command line as the admin typed it.

    Returns:
        The argv to run: the command, its options, then ``--`` and the operands.

    Raises:
        ShellCommandError: the command is not allowed; the text says what was wrong.
    """
    return _parse(command).argv


def _secret_file(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return bool(_SECRET_RE.search(name)) or name == TOKEN_FILE


def _shown(name: str, extra: Sequence[str]) -> bool:
    """Whether ``env`` shows this variable's value: on the allow-list (ours and the policy's)
    and not named like a secret (FLTUI_TOKEN stays hidden)."""
    if _SECRET_RE.search(name):
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


def _inside(workspace: str, cmd: str, path: str, spec: _Spec) -> None:
    """The file a path operand really reaches (links followed) is inside the workspace, and is
    neither a secret nor, for the readers, of a kind they may not read: the checks of the name
    hold for what it resolves to, and a hard link to a secret is the secret."""
    real = os.path.realpath(os.path.join(workspace, path))
    if real != workspace and os.path.commonpath([workspace, real]) != workspace:
        raise ShellCommandError(f"{cmd}: path {path!r} resolves outside the workspace")
    rel = os.path.relpath(real, workspace)
    if real != os.path.normpath(os.path.join(workspace, path)):
        if _secret_file(rel):
            raise ShellCommandError(
                f"{cmd}: {path!r} resolves to {rel!r}, which may hold a secret and is not "
                "readable remotely"
            )
        if spec.readable and not rel.endswith(READABLE_EXTENSIONS):
            raise ShellCommandError(
                f"{cmd}: {path!r} resolves to {rel!r}, which is not one of the readable kinds "
                f"({' '.join(READABLE_EXTENSIONS)})"
            )
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
    parsed = _parse(command)
    cmd = parsed.argv[0]
    ws = os.path.realpath(workspace)
    if not os.path.isdir(ws):
        raise ShellCommandError(f"the workspace {str(workspace)!r} is not a folder")
    if cmd == "pwd":
        return _cap((os.path.abspath(workspace) + "\n").encode(), max_output)
    if cmd == "env":
        return _cap(_env_text(env_shown).encode("utf-8", errors="replace"), max_output)
    spec = _SPECS[cmd]
    for path in parsed.files:
        _inside(ws, cmd, path, spec)
    exe = shutil.which(cmd, path=SAFE_PATH)
    if exe is None:
        raise ShellCommandError(f"{cmd}: not found on this site (looked in {SAFE_PATH})")
    try:
        return _run(exe, parsed.argv, ws, timeout, max_output)
    except OSError as exc:
        raise ShellCommandError(f"{cmd}: cannot be started: {exc.strerror}") from None
