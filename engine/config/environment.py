"""An MMAR's ``config/environment.json``: its variables and the confinement of written paths."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config.common import ConfigError, _collect, _strict, load_json

#: environment.json variables that name files or folders; relative ones are under the MMAR.
_PATH_VARIABLES = (
    "DATA_ROOT",
    "DATASET_JSON",
    "MMAR_CKPT_DIR",
    "MMAR_EVAL_OUTPUT_PATH",
    "PRETRAIN_WEIGHTS_FILE",
)
#: The path variables the site writes under (checkpoints, evaluation output): these must resolve
#: (links followed) inside the MMAR, with these defaults.
_PATH_DEFAULTS = {"MMAR_CKPT_DIR": "models", "MMAR_EVAL_OUTPUT_PATH": "eval"}
ENVIRONMENT_FILE = Path("config") / "environment.json"


@dataclass(frozen=True)
class MMAREnvironment:
    """An MMAR's ``config/environment.json``: Clara's variables for its configs.

    ``{NAME}`` in a string of ``config_train.json`` is replaced by the variable's value
    (``"{DATASET_JSON}"``, ``"{DATA_ROOT}/images"``). The path variables (DATA_ROOT,
    DATASET_JSON, MMAR_CKPT_DIR, MMAR_EVAL_OUTPUT_PATH, PRETRAIN_WEIGHTS_FILE) are resolved
    against the MMAR root when relative; ``MMAR_ROOT`` is always defined.

    Attributes:
        path: the file (it may not exist: then only the defaults are defined).
        mmar_root: the MMAR.
        variables: name -> value (paths as absolute strings).
    """

    path: Path
    mmar_root: Path
    variables: dict[str, Any]

    @property
    def ckpt_dir(self) -> Path:
        """Where checkpoints go (``MMAR_CKPT_DIR``, default ``models``)."""
        return Path(self.variables["MMAR_CKPT_DIR"])

    @property
    def eval_dir(self) -> Path:
        """Where evaluation output goes (``MMAR_EVAL_OUTPUT_PATH``, default ``eval``)."""
        return Path(self.variables["MMAR_EVAL_OUTPUT_PATH"])

    @property
    def data_root(self) -> Path | None:
        value = self.variables.get("DATA_ROOT")
        return Path(value) if value else None

    @property
    def dataset_json(self) -> Path | None:
        value = self.variables.get("DATASET_JSON")
        return Path(value) if value else None

    def substitute(self, data: Any, file: Path, key: str = "") -> tuple[Any, list[ConfigError]]:
        """``data`` with every ``{NAME}`` replaced, and the problems (undefined names)."""
        problems: list[ConfigError] = []

        def walk(value: Any, where: str) -> Any:
            if isinstance(value, dict):
                return {k: walk(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
            if isinstance(value, list):
                return [walk(v, f"{where}[{i}]") for i, v in enumerate(value)]
            if not isinstance(value, str) or "{" not in value:
                return value
            whole = _PLACEHOLDER.fullmatch(value)
            if whole and whole.group(1) in self.variables:
                return self.variables[whole.group(1)]  # a number stays a number

            def one(m: re.Match[str]) -> str:
                name = m.group(1)
                if name in self.variables:
                    return str(self.variables[name])
                if not name.isupper():  # "{epoch}" in a file name pattern is not a variable
                    return m.group(0)
                problems.append(
                    ConfigError(
                        file,
                        where,
                        f"{{{name}}} is not defined in {self.path} (defined: "
                        f"{', '.join(sorted(self.variables))})",
                    )
                )
                return m.group(0)

            return _PLACEHOLDER.sub(one, value)

        return walk(data, key), problems


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _written_path_problem(raw: str, value: str, root: Path, default: str) -> str | None:
    """Why a folder the worker creates and writes (``raw`` as given, ``value`` resolved against
    the MMAR) is refused, or None: an MMAR shipped by the federation must not make the site write
    anywhere the service user can (an absolute path, "../..", a link out, or "", which would be
    the worker's working folder, wherever the service was started)."""
    if not raw.strip():
        return f"is empty; give a folder inside the MMAR (default {default!r})"
    resolved = os.path.realpath(value)
    if os.path.commonpath([resolved, str(root)]) == str(root):
        return None
    return (
        f"{json.dumps(raw)} resolves to {resolved}, outside the MMAR ({root}); the folders the "
        'site writes must be inside it (a relative path such as "models")'
    )


def _parse_environment(mmar_root: Path, sink: list[ConfigError]) -> MMAREnvironment:
    root = Path(mmar_root).resolve()
    path = root / ENVIRONMENT_FILE
    variables: dict[str, Any] = {
        "MMAR_ROOT": str(root),
        **_PATH_DEFAULTS,
    }
    given: dict[str, Any] = {}
    if path.exists():
        data = given = load_json(path)
        for name, value in data.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                sink.append(
                    ConfigError(path, name, "expected a variable name (letters, digits, _)")
                )
            elif name == "MMAR_ROOT":
                sink.append(ConfigError(path, name, "is the MMAR's own folder; it cannot be set"))
            elif isinstance(value, (str, int, float)) and not (
                name in _PATH_VARIABLES and not isinstance(value, str)
            ):
                variables[name] = value
            else:
                expected = "a path (a string)" if name in _PATH_VARIABLES else "a string or number"
                sink.append(
                    ConfigError(path, name, f"expected {expected}, got {json.dumps(value)}")
                )
    for name in _PATH_VARIABLES:
        value = variables.get(name)
        if isinstance(value, str) and value:
            variables[name] = str(root / value)  # an absolute value stays as it is
    for name, default in _PATH_DEFAULTS.items():
        raw = given.get(name, default)
        if not isinstance(raw, str):
            continue  # reported above; the default stands
        problem = _written_path_problem(raw, variables[name], root, default)
        if problem:
            sink.append(ConfigError(path, name, problem))
            variables[name] = str(root / default)  # never used: the MMAR is refused
    return MMAREnvironment(path=path, mmar_root=root, variables=variables)


def load_environment(mmar_root: Path) -> MMAREnvironment:
    """Reads ``<mmar_root>/config/environment.json`` (a missing file means the defaults).

    Raises:
        ConfigError: naming the file, the variable and what is expected.
    """
    return _strict(lambda sink: _parse_environment(mmar_root, sink))


def environment_problems(mmar_root: Path) -> list[ConfigError]:
    """Every problem of an MMAR's ``config/environment.json`` (empty: none)."""
    return _collect(lambda sink: _parse_environment(mmar_root, sink))
