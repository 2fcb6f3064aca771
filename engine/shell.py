"""The admin shell commands' grammar (pwd env ls cat head tail grep), for server and site."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

__all__ = [
    "ALLOWED_COMMANDS",
    "COMMAND_SPECS",
    "READABLE_EXTENSIONS",
    "SECRET_NAME",
    "TOKEN_FILE",
    "CommandSpec",
    "ParsedCommand",
    "ShellCommandError",
    "is_secret_file",
    "name_problem",
    "parse_command",
    "parse_shell_command",
]

# The lineage's whitelist (NVF20 fuel/hci/shell_cmd_val.py), plus .jsonl for our own logs.
ALLOWED_COMMANDS = ("pwd", "env", "ls", "cat", "head", "tail", "grep")
READABLE_EXTENSIONS = (".txt", ".log", ".json", ".jsonl", ".csv", ".sh", ".config", ".py")
MAX_COUNT = 10**7
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
SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL|PRIVATE", re.IGNORECASE)
#: The file holding the session token and the worker's key (never readable remotely).
TOKEN_FILE = "client_token.txt"


class ShellCommandError(ValueError):
    """A shell command this site refuses to run, or one that failed to run (timeout)."""


@dataclass(frozen=True)
class CommandSpec:
    flags: str  # single-letter options without a value
    valued: str  # single-letter options that take a positive integer
    min_files: int
    max_files: int
    pattern: bool = False  # grep: a PATTERN before the file
    readable: bool = True  # the file must have one of READABLE_EXTENSIONS


COMMAND_SPECS = {
    "pwd": CommandSpec("", "", 0, 0, readable=False),
    "env": CommandSpec("", "", 0, 0, readable=False),
    "ls": CommandSpec("altSRu", "", 0, 1, readable=False),
    "cat": CommandSpec("nbsT", "", 1, 1),
    "head": CommandSpec("", "cn", 1, 1),
    "tail": CommandSpec("", "cn", 1, 1),
    "grep": CommandSpec("nib", "", 1, 1, pattern=True),
}


@dataclass(frozen=True)
class ParsedCommand:
    argv: list[str]
    files: list[str]


def _options_text(spec: CommandSpec) -> str:
    opts = [f"-{c}" for c in spec.flags] + [f"-{c} N" for c in spec.valued]
    return " ".join(opts) if opts else "none"


def _count(cmd: str, opt: str, value: str) -> str:
    if not re.fullmatch(r"[0-9]+", value) or not 1 <= int(value) <= MAX_COUNT:
        raise ShellCommandError(
            f"{cmd}: option -{opt} needs a positive whole number up to {MAX_COUNT}, got {value!r}"
        )
    return str(int(value))


def _check_file(cmd: str, path: str, spec: CommandSpec) -> None:
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
    problem = name_problem(path, spec)
    if problem:
        raise ShellCommandError(f"{cmd}: file {path!r} {problem}")


def name_problem(name: str, spec: CommandSpec) -> str | None:
    """What the file-name rules hold against ``name`` for ``spec``'s command, or None: a file
    that may hold a secret (the session token and worker key live in client_token.txt, keys in
    startup/), or one of a kind the readers may not read. The site applies them to the name
    asked and again to what it resolves to."""
    if is_secret_file(name):
        return "may hold a secret and is not readable remotely"
    if spec.readable and not name.endswith(READABLE_EXTENSIONS):
        return f"is not one of the readable kinds ({' '.join(READABLE_EXTENSIONS)})"
    return None


def parse_command(command: str) -> ParsedCommand:
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
    spec = COMMAND_SPECS.get(cmd)
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
    return ParsedCommand([cmd, *flags, *valued, *tail], positionals)


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
    return parse_command(command).argv


def is_secret_file(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return bool(SECRET_NAME.search(name)) or name == TOKEN_FILE
