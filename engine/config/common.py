"""The config readers' shared machinery: errors, JSON loading, the typed reader, components."""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

COMPRESSIONS = ("Gzip", "Deflate")

#: Clara 3.1 components that need TensorFlow, and the torch component that replaces each here.
TENSORFLOW_ONLY: dict[str, str] = {
    "TFModelReaderWriter": "PTModelReaderWriter (the torch fitter reads and writes the model's "
    "state_dict)",
    "TFModelValidator": "PTModelValidator (the torch fitter validates on config_train.json's "
    "validation_data)",
    "TFModelSaver": "PTModelSaver (the reference server saves models/global_model.npz)",
    "TFTrainer": "the torch fitter built from config/config_train.json",
    "ClaraTrainer": "the torch fitter built from config/config_train.json",
    "SupervisedTrainer": "the torch fitter built from config/config_train.json",
    "FedTrainer": "the torch fitter built from config/config_train.json",
}
#: Clara components that have no implementation here (yet): refused by name, never ignored.
#: (ModelEncryptor / ModelDecryptor are built in now: engine.client.data_processors, engine.he.)
NOT_IMPLEMENTED: dict[str, str] = {}


# Module prefixes of TensorFlow (and Clara's TF training package): a "path" there cannot run.
_TF_MODULES = ("tensorflow", "tf", "keras", "nvmidl", "horovod")
# Clara's processor and privacy modules: a "path" there means the built-in of that name.
_CLARA_MODULES = ("fed_learn", "nvmidl.apps.fed_learn")


_COMPRESSING_PROCESSORS = ("DataCompressor", "DataDeCompressor")


# A site's name: in startup kits, certificates (provisioning) and the server's Register alike.
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ConfigError(ValueError):
    """A config file that cannot be used.

    Attributes:
        path: the file.
        key: dotted path of the offending key ("client.retry_timeout"), or "" for the whole file.
        problem: what is wrong and what is expected.
    """

    def __init__(self, path: Path | str, key: str, problem: str) -> None:
        self.path = Path(path)
        self.key = key
        self.problem = problem
        where = f"{path}: {key}" if key else str(path)
        super().__init__(f"{where}: {problem}")


class ConfigProblems(ConfigError):
    """Several problems of one config at once; ``path`` and ``key`` are the first one's.

    Attributes:
        problems: every problem, in the order of the file.
    """

    def __init__(self, problems: list[ConfigError]) -> None:
        first = problems[0]
        super().__init__(first.path, first.key, first.problem)
        self.problems = list(problems)
        self.args = ("\n".join(str(p) for p in problems),)

    def __str__(self) -> str:
        return str(self.args[0])


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows (use a finite number)")


def load_json(path: Path) -> dict[str, Any]:
    """Reads a JSON object from ``path``; any problem is a ConfigError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, "", f"cannot be read: {getattr(exc, 'strerror', exc)}") from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        # Configs arrive from the network (a deployed MMAR): "[[[[..." must not crash a site.
        raise ConfigError(path, "", "not valid JSON (nested too deeply)") from None
    except ValueError as exc:
        if not isinstance(exc, json.JSONDecodeError):
            raise ConfigError(path, "", str(exc)) from None
        raise ConfigError(path, "", f"not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(path, "", f"expected a JSON object, got {type(data).__name__}")
    return data


_MISSING = object()


class _Reader:
    """Typed access to a JSON object; problems name the file and dotted key.

    A problem found by ``get`` / ``number`` / ``report`` is recorded in ``problems`` (shared by
    every reader of a file) and parsing goes on with the default, so a file's problems are all
    found in one pass. ``fail`` builds an error for callers that must stop.
    """

    def __init__(
        self,
        path: Path,
        data: dict[str, Any],
        prefix: str = "",
        problems: list[ConfigError] | None = None,
    ) -> None:
        self.path, self.data, self.prefix = path, data, prefix
        self.problems: list[ConfigError] = problems if problems is not None else []

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.path, self.key(name), problem)

    def report(self, name: str, problem: str) -> None:
        self.problems.append(self.fail(name, problem))

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
        """The value of ``name`` if it has the type; else a reported problem and the default
        (None for a required key)."""
        value = self.data.get(name, _MISSING)
        if value is _MISSING or (value is None and default is not _MISSING):
            if default is _MISSING:
                self.report(name, "is required")
                return None
            return default
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python, but `"retry_timeout": true` is a mistake.
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        else:
            ok = isinstance(value, kinds) or (float in kinds and isinstance(value, int))
        if not ok:
            expected = " or ".join(k.__name__ for k in kinds)
            self.report(name, f"expected {expected}, got {json.dumps(value)}")
            return None if default is _MISSING else default
        return value

    def number(self, name: str, default: Any, minimum: float, integer: bool = False) -> Any:
        value = self.get(name, int if integer else (int, float), default)
        if value is not None and value < minimum:
            self.report(name, f"expected a number >= {minimum}, got {value}")
            return default
        return value

    def sub(self, name: str, default: Any = _MISSING) -> _Reader:
        value = self.get(name, dict, default)
        return _Reader(
            self.path, value if isinstance(value, dict) else {}, self.key(name), self.problems
        )

    def only(self, allowed: Iterable[str], what: str = "") -> None:
        """Reports every key not in ``allowed`` (with a close match when there is one)."""
        allowed = tuple(allowed)
        for name in self.data:
            if name in allowed:
                continue
            hint = difflib.get_close_matches(str(name), allowed, n=1)
            also = f" (did you mean {hint[0]!r}?)" if hint else ""
            self.report(str(name), f"unknown key{also}{what}; expected one of {', '.join(allowed)}")


@dataclass(frozen=True)
class ComponentSpec:
    """A ``{"name"|"path": ..., "args": {...}}`` component of a config.

    Attributes:
        name: a built-in (or torch) class name, when given.
        path: a ``module.Class`` import path (code under the MMAR's ``custom/``), when given.
        args: keyword arguments for the constructor.
        key: the dotted key holding it ("client.privacy", "optimizer"), for messages.
        file: the config file, for messages.
    """

    name: str | None
    path: str | None
    args: dict[str, Any] = field(default_factory=dict)
    key: str = ""
    file: Path | None = None
    #: ``"<file>: <key>"`` in one string, the older way of giving both.
    where: str = ""

    def __post_init__(self) -> None:
        if self.where and not (self.key or self.file):
            file, _, key = self.where.partition(": ")
            object.__setattr__(self, "file", Path(file))
            object.__setattr__(self, "key", key)

    @property
    def ref(self) -> str:
        return self.name or self.path or ""

    @property
    def label(self) -> str:
        """How the component is named in messages: its ``name`` or its ``path``."""
        return self.ref


def clara_base(path: str) -> str | None:
    """The class name of a Clara module path (``fed_learn.client.fed_privacy.SVTProtocol``)."""
    module, _, attr = path.rpartition(".")
    if any(module == m or module.startswith(m + ".") for m in _CLARA_MODULES):
        return attr
    return None


def refusal(spec: ComponentSpec) -> str | None:
    """Why this component cannot be used here at all (TensorFlow-only, not implemented), or None.

    The reason names the component and what replaces it.
    """
    name = spec.name
    if spec.path is not None:
        module = spec.path.rpartition(".")[0]
        top = module.partition(".")[0]
        if top in _TF_MODULES and clara_base(spec.path) is None:
            return (
                f"{spec.path!r} is TensorFlow code (module {module!r}); TensorFlow components "
                "cannot run here, write it with torch"
            )
        name = clara_base(spec.path)
    if name is None:
        return None
    if name in TENSORFLOW_ONLY:
        return (
            f"{name} is a TensorFlow-only component of Clara; use {TENSORFLOW_ONLY[name]} instead"
        )
    if name in NOT_IMPLEMENTED:
        return f"{name}: {NOT_IMPLEMENTED[name]}"
    if re.fullmatch(r"TF[A-Z]\w*", name):
        return (
            f"{name} is a TensorFlow component; TensorFlow components cannot run here, "
            "use a torch one"
        )
    return None


def _component(reader: _Reader, value: Any, key: str) -> ComponentSpec | None:
    if not isinstance(value, dict):
        reader.report(key, f'expected {{"name"|"path": ..., "args": {{...}}}}, got {value!r}')
        return None
    # Exactly one of the two keys, holding a non-empty string: a null or empty "name" beside a
    # "path" is not "no name" (it once let a path through the BYOC check unseen).
    present = [k for k in ("name", "path") if k in value]
    if len(present) != 1:
        reader.report(
            key,
            'expected exactly one of "name" or "path" (a non-empty string), got '
            + (" and ".join(f'"{k}"' for k in present) if present else "neither"),
        )
        return None
    which = present[0]
    if not isinstance(value[which], str) or not value[which].strip():
        reader.report(
            f"{key}.{which}", f"expected a non-empty string, got {json.dumps(value[which])}"
        )
        return None
    name, path = value.get("name"), value.get("path")
    for extra in value:
        if extra not in ("name", "path", "args"):
            hint = difflib.get_close_matches(str(extra), ("name", "path", "args"), n=1)
            also = f" (did you mean {hint[0]!r}?)" if hint else ""
            reader.report(f"{key}.{extra}", f'unknown key{also}; expected "name"|"path" and "args"')
    args = value.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        reader.report(f"{key}.args", f"expected an object, got {json.dumps(args)}")
        args = {}
    spec = ComponentSpec(name=name, path=path, args=args, key=reader.key(key), file=reader.path)
    why = refusal(spec)
    if why:
        reader.report(f"{key}.{'name' if name else 'path'}", why)
        return None
    return spec


def _components(reader: _Reader, key: str) -> list[ComponentSpec]:
    items = reader.get(key, list, [])
    specs = [_component(reader, item, f"{key}[{i}]") for i, item in enumerate(items or [])]
    return [s for s in specs if s is not None]


def _regex(reader: _Reader, key: str) -> str | None:
    value = reader.get(key, str, None)
    if value is None:
        return None
    try:
        re.compile(value)
    except re.error as exc:
        reader.report(key, f"not a valid regular expression: {exc}")
        return None
    return value


def _compression(reader: _Reader, key: str = "compression") -> str | None:
    value = reader.get(key, str, None)
    if value is not None and value not in COMPRESSIONS:
        # Clara mapped any other string to "no compression"; a typo should not silently do so.
        reader.report(key, f"expected one of {', '.join(COMPRESSIONS)} or null, got {value!r}")
        return None
    return value


def _clara_root(config: Path) -> Path:
    """The folder Clara resolved a config's relative paths against: the MMAR root for a file in
    an MMAR's ``config/``, else the file's own folder (a startup kit)."""
    parent = config.parent
    return parent.parent if parent.name == "config" else parent


def _relative(config: Path, value: str | None) -> Path | None:
    if not value:
        return None
    return _clara_root(config) / value


def _ssl_path(reader: _Reader, key: str, base: Path) -> Path | None:
    value = reader.get(key, str, None)
    if not value:
        return None
    return base / value


def _pt_component(reader: _Reader, key: str, accepted: str) -> str:
    """A component that the torch engine does itself (model_reader_writer, ...): only the PT
    name (or nothing) is accepted; TensorFlow ones are refused with their replacement."""
    value = reader.get(key, dict, None)
    if value is None:
        return accepted
    spec = _component(reader, value, key)
    if spec is None:
        return accepted
    if spec.name != accepted:
        reader.report(
            f"{key}.{'name' if spec.name else 'path'}",
            f"expected {accepted!r} (the torch engine does this itself), got {spec.ref!r}",
        )
    elif spec.args:
        reader.report(f"{key}.args", f"{accepted} takes no arguments, got {spec.args!r}")
    return accepted


T = TypeVar("T")


def _strict(parse: Callable[[list[ConfigError]], T]) -> T:
    sink: list[ConfigError] = []
    try:
        result = parse(sink)
    except ConfigError as exc:
        sink.append(exc)
    if sink:
        raise sink[0] if len(sink) == 1 else ConfigProblems(sink)
    return result


def _lenient(parse: Callable[[list[ConfigError]], T]) -> tuple[T | None, list[ConfigError]]:
    """What could be parsed (None when the file could not be read at all) and every problem."""
    sink: list[ConfigError] = []
    result = None
    try:
        result = parse(sink)
    except ConfigError as exc:
        sink.extend(getattr(exc, "problems", [exc]))
    return result, sink


def _collect(parse: Callable[[list[ConfigError]], Any]) -> list[ConfigError]:
    return _lenient(parse)[1]


def existing_files(
    owner: Path, paths: Mapping[str, Path | None], what: str = "file"
) -> list[ConfigError]:
    """A problem for each named path that is not a readable file."""
    problems = []
    base = _clara_root(owner)
    for key, p in paths.items():
        if p is not None and not p.is_file():
            problems.append(
                ConfigError(
                    owner,
                    key,
                    f"expected an existing {what}, but {p} does not exist (a relative path is "
                    f"resolved against {base})",
                )
            )
    return problems
