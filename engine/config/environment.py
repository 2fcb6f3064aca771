"""An MMAR's ``config/environment.json``, a site's ``local/environment.json`` over it, and the
confinement of the paths an MMAR makes the site write."""

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
#: A site's own variables, in its workspace (never deployed over: deploy writes only run_<N>/).
LOCAL_ENVIRONMENT_FILE = Path("local") / "environment.json"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RUN_DIR = re.compile(r"run_[0-9]+")


@dataclass(frozen=True)
class MMAREnvironment:
    """An MMAR's ``config/environment.json``: Clara's variables for its configs, with a site's
    ``local/environment.json`` over them.

    ``{NAME}`` in a string of ``config_train.json`` is replaced by the variable's value
    (``"{DATASET_JSON}"``, ``"{DATA_ROOT}/images"``). The path variables (DATA_ROOT,
    DATASET_JSON, MMAR_CKPT_DIR, MMAR_EVAL_OUTPUT_PATH, PRETRAIN_WEIGHTS_FILE) are resolved
    against the MMAR root when relative; ``MMAR_ROOT`` is always defined.

    A site's ``<workspace>/local/environment.json`` (same form) sets any variable over the MMAR's,
    so one MMAR goes to every site and each site points it at its own data. Its relative paths
    resolve against the workspace's ``local/`` folder, and its paths may point anywhere, the
    folders the site writes (MMAR_CKPT_DIR, MMAR_EVAL_OUTPUT_PATH) included: it is the site's
    own file, where the MMAR's written folders must stay inside the MMAR.

    Attributes:
        path: the MMAR's file (it may not exist: then only the defaults are defined).
        mmar_root: the MMAR.
        variables: name -> value (paths as absolute strings).
        local_path: the site's ``local/environment.json`` when one was read, else None.
        local_names: the variables that file set, in its order (they win over the MMAR's).
    """

    path: Path
    mmar_root: Path
    variables: dict[str, Any]
    local_path: Path | None = None
    local_names: tuple[str, ...] = ()

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


def _checked_variables(path: Path, data: dict[str, Any], sink: list[ConfigError]) -> dict[str, Any]:
    """The well-formed variables of one environment file; each bad one is a problem."""
    out: dict[str, Any] = {}
    for name, value in data.items():
        if not _NAME.fullmatch(name):
            sink.append(ConfigError(path, name, "expected a variable name (letters, digits, _)"))
        elif name == "MMAR_ROOT":
            sink.append(ConfigError(path, name, "is the MMAR's own folder; it cannot be set"))
        elif isinstance(value, (str, int, float)) and not (
            name in _PATH_VARIABLES and not isinstance(value, str)
        ):
            out[name] = value
        else:
            expected = "a path (a string)" if name in _PATH_VARIABLES else "a string or number"
            sink.append(ConfigError(path, name, f"expected {expected}, got {json.dumps(value)}"))
    return out


def _parse_local(local: Path, variables: dict[str, Any], sink: list[ConfigError]) -> list[str]:
    """Sets the variables of a site's ``local/environment.json`` over ``variables``; returns
    their names. A missing file sets nothing."""
    if not local.exists():
        return []
    try:
        data = load_json(local)
    except ConfigError as exc:
        sink.append(exc)  # the MMAR's own problems are still reported beside it
        return []
    folder = local.resolve().parent
    names = []
    for name, value in _checked_variables(local, data, sink).items():
        if name in _PATH_DEFAULTS and not value.strip():
            sink.append(
                ConfigError(
                    local,
                    name,
                    "is empty; give a folder (relative paths are under "
                    f"{folder}), or leave the variable out to use the MMAR's",
                )
            )
            continue
        if name in _PATH_VARIABLES and value:
            value = str(folder / value)  # an absolute value stays as it is
        variables[name] = value
        names.append(name)
    return names


def _parse_environment(
    mmar_root: Path, sink: list[ConfigError], local: Path | None = None
) -> MMAREnvironment:
    root = Path(mmar_root).resolve()
    path = root / ENVIRONMENT_FILE
    variables: dict[str, Any] = {
        "MMAR_ROOT": str(root),
        **_PATH_DEFAULTS,
    }
    given: dict[str, Any] = {}
    if path.exists():
        given = load_json(path)
        variables.update(_checked_variables(path, given, sink))
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
    # The site's own file last: it wins, and only it may point outside the MMAR.
    names: list[str] = []
    if local is not None:
        local = Path(local)
        names = _parse_local(local, variables, sink)
    return MMAREnvironment(
        path=path,
        mmar_root=root,
        variables=variables,
        local_path=local if local is not None and local.exists() else None,
        local_names=tuple(names),
    )


def local_environment_file(mmar_root: Path) -> Path | None:
    """The ``local/environment.json`` of the site workspace an MMAR sits in, or None.

    For code that is handed only an MMAR folder (the start check, the fitter, check-config): an
    MMAR deployed at ``<workspace>/run_<N>/<mmar>`` or offered at ``<workspace>/transfer/<mmar>``
    of a workspace (``startup/fed_client.json``) gets that workspace's file (which may not
    exist); any other folder gets None. The MMAR cannot choose: deploy writes only run_<N>/.
    """
    root = Path(mmar_root).resolve()
    parent = root.parent
    if not (_RUN_DIR.fullmatch(parent.name) or parent.name == "transfer"):
        return None
    workspace = parent.parent
    if not (workspace / "startup" / "fed_client.json").is_file():
        return None
    return workspace / LOCAL_ENVIRONMENT_FILE


def load_environment(mmar_root: Path, local: Path | None = None) -> MMAREnvironment:
    """Reads ``<mmar_root>/config/environment.json`` (a missing file means the defaults), with a
    site's ``local/environment.json`` over it.

    Args:
        mmar_root: the MMAR.
        local: the site's own file (``<workspace>/local/environment.json``; it may not exist),
            or None for the MMAR's variables alone. Its variables win; its relative paths
            resolve against its folder; its paths may point outside the MMAR.

    Raises:
        ConfigError: naming the file (the MMAR's or the site's), the variable and what is
            expected; several problems at once as ConfigProblems.
    """
    return _strict(lambda sink: _parse_environment(mmar_root, sink, local))


def environment_problems(mmar_root: Path, local: Path | None = None) -> list[ConfigError]:
    """Every problem of an MMAR's ``config/environment.json`` and of the site's ``local``
    file over it (empty: none)."""
    return _collect(lambda sink: _parse_environment(mmar_root, sink, local))
