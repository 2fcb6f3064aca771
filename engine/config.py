"""Startup-kit and MMAR config files (Clara Train 3.1 forms) parsed into dataclasses.

Every problem names the file, the dotted key and what is expected. A file is read whole before
anything is refused, so one error lists every problem of the file (``ConfigProblems``), and the
``*_problems`` functions return them as a list (``fltui check-config``).
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "CLARA_REQUEST_PROCESSORS",
    "DEFAULT_MAX_N_ITER",
    "ENVIRONMENT_FILE",
    "NOT_IMPLEMENTED",
    "REQUEST_PROCESSORS",
    "TENSORFLOW_ONLY",
    "ClientKitConfig",
    "ComponentSpec",
    "ConfigError",
    "ConfigProblems",
    "MMARClientConfig",
    "MMAREnvironment",
    "ServerConfig",
    "ServerEndpoint",
    "clara_base",
    "client_kit_problems",
    "environment_problems",
    "existing_files",
    "load_client_kit",
    "load_environment",
    "load_json",
    "load_mmar_client_config",
    "load_server_config",
    "mmar_client_problems",
    "read_client_kit",
    "read_mmar_client_config",
    "read_server_config",
    "refusal",
    "server_problems",
]

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
NOT_IMPLEMENTED: dict[str, str] = {
    "ModelEncryptor": "homomorphic encryption is not implemented here; remove it from the list "
    "(updates travel over TLS, and a privacy protocol can protect them)",
    "ModelDecryptor": "homomorphic encryption is not implemented here; remove it from the list "
    "(models travel over TLS)",
}
#: The admin request processors of Clara 3.1's ``req_processors`` (plus Clara 4.0's MGpu one).
CLARA_REQUEST_PROCESSORS = (
    "StartClientProcessor",
    "ClientStatusProcessor",
    "AbortClientProcessor",
    "ShutdownClientProcessor",
    "DeployProcessor",
    "ValidateRequestProcessor",
    "ShellCommandProcessor",
    "DeleteRunNumberProcessor",
    "SysInfoProcessor",
    "RestartClientProcessor",
)
REQUEST_PROCESSORS = (*CLARA_REQUEST_PROCESSORS, "StartClientMGpuProcessor")

# Module prefixes of TensorFlow (and Clara's TF training package): a "path" there cannot run.
_TF_MODULES = ("tensorflow", "tf", "keras", "nvmidl", "horovod")
# Clara's processor and privacy modules: a "path" there means the built-in of that name.
_CLARA_MODULES = ("fed_learn", "nvmidl.apps.fed_learn")

_MMAR_CLIENT_KEYS = (
    "local_epochs",
    "steps_aggregation",
    "exclude_vars",
    "cross_site_validate",
    "privacy",
    "pre_processors",
    "post_processors",
    "client_state_processors",
    "req_processors",
    "model_reader_writer",
    "model_validator",
    "retry_timeout",
    "ssl_private_key",
    "ssl_cert",
    "ssl_root_cert",
    "compression",
)
_SERVER_KEYS = (
    "name",
    "service",
    "ssl_private_key",
    "ssl_cert",
    "ssl_root_cert",
    "secure_train",
    "min_num_clients",
    "max_num_clients",
    "wait_after_min_clients",
    "heart_beat_timeout",
    "start_round",
    "num_rounds",
    "exclude_vars",
    "num_server_workers",
    "validate_on_server",
    "num_rounds_per_valid",
    "compression",
    "fl_clients",
    "admin_clients",
)
_SERVER_TOP_KEYS = (
    "format_version",
    "servers",
    "aggregator",
    "pre_processors",
    "post_processors",
    "model_saver",
    "admin_cmd_modules",
    "result_processors",
)
_ADMIN_CMD_MODULES = (
    "TrainingCommandModule",
    "ValidationCommandModule",
    "ShellCommandModule",
    "SystemCommandModule",
)
_COMPRESSING_PROCESSORS = ("DataCompressor", "DataDeCompressor")
DEFAULT_MAX_N_ITER = 1_000_000
"""The largest ``n_iter`` one contribution may claim when nothing tells the server more: a
million local optimizer steps a round is far beyond the rounds of this lineage (Clara's examples
train tens to a few thousand), yet a lying site can outweigh no more than that."""
MAX_N_ITER_MARGIN = 2
"""``max_n_iter`` from ``steps_aggregation`` is this many times it (a site trains exactly that
many steps a round; the margin is for trainers that count a last partial step or so)."""
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
_WRITTEN_PATH_VARIABLES = tuple(_PATH_DEFAULTS)
ENVIRONMENT_FILE = Path("config") / "environment.json"


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


@dataclass(frozen=True)
class ServerEndpoint:
    """One server of a ``servers`` list: task name, gRPC target and channel options."""

    name: str
    target: str
    options: list[tuple[str, Any]] = field(default_factory=list)


# Options that decide which server certificate is accepted: the startup kit's alone, never a
# deployed MMAR's (which comes from the federation's admin, not from the site).
_KIT_ONLY_OPTIONS = ("grpc.ssl_target_name_override", "grpc.default_authority")
# The channel options a deployed MMAR may set: sizes, keepalive and reconnect pacing. Anything
# else (grpc.http_proxy, grpc.service_config, ...) could route or reshape the site's traffic,
# and only the site's own startup kit may choose it.
_MMAR_OPTIONS = (
    "grpc.max_send_message_length",
    "grpc.max_receive_message_length",
    "grpc.keepalive_time_ms",
    "grpc.keepalive_timeout_ms",
    "grpc.keepalive_permit_without_calls",
    "grpc.http2.max_pings_without_data",
    "grpc.http2.min_time_between_pings_ms",
    "grpc.initial_reconnect_backoff_ms",
    "grpc.min_reconnect_backoff_ms",
    "grpc.max_reconnect_backoff_ms",
)


def _servers(reader: _Reader, need_target: bool, mmar: bool = False) -> list[ServerEndpoint]:
    items = reader.get("servers", list)
    if items is None:
        return []
    if not items:
        reader.report("servers", "expected at least one server")
        return []
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            reader.report(f"servers[{i}]", f"expected an object, got {item!r}")
            continue
        s = _Reader(reader.path, item, reader.key(f"servers[{i}]"), reader.problems)
        service = s.sub("service", {})
        target = service.get("target", str, "")
        if (need_target or target) and not re.fullmatch(
            r"[^\s:]+:\d{1,5}|\[[0-9a-fA-F:]+\]:\d{1,5}", target
        ):
            service.report("target", f'expected "host:port", got {target!r}')
        options = []
        for j, opt in enumerate(service.get("options", list, []) or []):
            if not (isinstance(opt, list) and len(opt) == 2 and isinstance(opt[0], str)):
                service.report(f"options[{j}]", f'expected ["grpc.option", value], got {opt!r}')
                continue
            name, value = opt
            if not name.startswith("grpc."):
                service.report(
                    f"options[{j}]", f'expected a gRPC channel option "grpc.…", got {name!r}'
                )
            elif mmar and name in _KIT_ONLY_OPTIONS:
                service.report(
                    f"options[{j}]",
                    f"{name} changes which server certificate is accepted; only the site's "
                    "startup kit (startup/fed_client.json) may set it, not a deployed MMAR",
                )
            elif mmar and name not in _MMAR_OPTIONS:
                service.report(
                    f"options[{j}]",
                    f"{name} may be set by the site's startup kit (startup/fed_client.json) "
                    f"only, not by a deployed MMAR; an MMAR may set {', '.join(_MMAR_OPTIONS)}",
                )
            elif isinstance(value, bool) or not isinstance(value, (int, str)):
                # gRPC takes integers and strings only; 1e9 written as a float is refused there.
                service.report(
                    f"options[{j}]",
                    f"expected an integer or a string value for {name}, got {value!r}",
                )
            else:
                options.append((name, value))
        name = s.get("name", str)
        if name is not None:
            out.append(ServerEndpoint(name=name, target=target, options=options))
    return out


def _request_processors(reader: _Reader, key: str = "req_processors") -> tuple[str, ...] | None:
    items = reader.get(key, list, None)
    if items is None:
        return None
    names = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]"
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict):
            reader.report(where, f'expected {{"name": "<processor>"}}, got {item!r}')
            continue
        if "path" in item:
            reader.report(
                f"{where}.path",
                "custom request processors are not run here: admin requests are served by the "
                f"built-in processors ({', '.join(REQUEST_PROCESSORS)}), within site_policy.json",
            )
            continue
        name = item.get("name")
        if name not in REQUEST_PROCESSORS:
            hint = difflib.get_close_matches(str(name), REQUEST_PROCESSORS, n=1)
            also = f" (did you mean {hint[0]!r}?)" if hint else ""
            reader.report(
                f"{where}.name",
                f"unknown request processor {name!r}{also}; expected one of "
                f"{', '.join(REQUEST_PROCESSORS)}",
            )
            continue
        if item.get("args"):
            reader.report(f"{where}.args", f"{name} takes no arguments, got {item['args']!r}")
        names.append(name)
    return tuple(names)


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


@dataclass(frozen=True)
class ClientKitConfig:
    """A site's startup kit, ``<workspace>/startup/fed_client.json``.

    ``req_processors`` (Clara 3.1), when given, are the only admin request processors the site
    registers; None registers all of them.
    """

    path: Path
    client_name: str
    servers: list[ServerEndpoint]
    retry_timeout: float = 30.0
    compression: str | None = None
    secure_train: bool = False
    ssl_root_cert: Path | None = None
    ssl_cert: Path | None = None
    ssl_private_key: Path | None = None
    heartbeat_interval: float = 60.0
    req_processors: tuple[str, ...] | None = None


def _parse_client_kit(path: Path, sink: list[ConfigError]) -> ClientKitConfig:
    r = _Reader(path, load_json(path), problems=sink)
    client = r.sub("client", {})
    name = client.get("client_name", str)
    if name is not None and not SITE_NAME.fullmatch(name):
        client.report("client_name", f"expected letters, digits, '.', '_' or '-', got {name!r}")

    def cert(key: str) -> Path | None:
        value = client.get(key, str, None)
        return (path.parent / value) if value else None

    return ClientKitConfig(
        path=path,
        client_name=name or "",
        servers=_servers(r, need_target=True),
        retry_timeout=client.number("retry_timeout", 30.0, 0),
        compression=_compression(client),
        # A kit that names certificates uses them unless it says otherwise (provisioned kits say
        # so explicitly); a kit without any stays plaintext, and a TLS server refuses it.
        secure_train=client.get(
            "secure_train", bool, any(k in client.data for k in ("ssl_cert", "ssl_private_key"))
        ),
        ssl_root_cert=cert("ssl_root_cert"),
        ssl_cert=cert("ssl_cert"),
        ssl_private_key=cert("ssl_private_key"),
        heartbeat_interval=client.number("heartbeat_interval", 60.0, 0.05),
        req_processors=_request_processors(client),
    )


def load_client_kit(path: Path) -> ClientKitConfig:
    """Parses a startup kit's ``fed_client.json`` (paths in it are relative to its folder).

    Raises:
        ConfigError: naming the file, the key and what is expected (ConfigProblems: several).
    """
    return _strict(lambda sink: _parse_client_kit(path, sink))


def client_kit_problems(path: Path) -> list[ConfigError]:
    """Every problem of a startup kit's ``fed_client.json`` (empty: none)."""
    return _collect(lambda sink: _parse_client_kit(path, sink))


def read_client_kit(path: Path) -> tuple[ClientKitConfig | None, list[ConfigError]]:
    """What of a kit could be read, and every problem (for checks that go on past the first)."""
    return _lenient(lambda sink: _parse_client_kit(path, sink))


@dataclass(frozen=True)
class MMARClientConfig:
    """An MMAR's ``config/config_fed_client.json``: the task and the Clara 3.1 ``client`` block.

    Attributes:
        servers: the ``servers`` list; the startup kit says where they are, and the MMAR's
            ``service.options`` are added to the kit's (the kit wins for the same option).
        ssl_root_cert, ssl_cert, ssl_private_key: relative to the MMAR root, as Clara resolved
            them; used where the startup kit names none.
        model_reader_writer, model_validator: the torch engine's own (``PTModelReaderWriter``,
            ``PTModelValidator``); TensorFlow ones are refused.
        req_processors: the request processors this MMAR lists (checked; the site's admin agent
            runs before any MMAR is deployed, so the startup kit's list is the one that counts).
    """

    path: Path
    task_name: str
    local_epochs: int | None = None
    steps_aggregation: int = 0
    exclude_vars: str | None = None
    cross_site_validate: bool = False
    privacy: ComponentSpec | None = None
    pre_processors: list[ComponentSpec] = field(default_factory=list)
    post_processors: list[ComponentSpec] = field(default_factory=list)
    client_state_processors: list[ComponentSpec] = field(default_factory=list)
    retry_timeout: float | None = None
    compression: str | None = None
    servers: list[ServerEndpoint] = field(default_factory=list)
    req_processors: tuple[str, ...] | None = None
    model_reader_writer: str = "PTModelReaderWriter"
    model_validator: str = "PTModelValidator"
    ssl_root_cert: Path | None = None
    ssl_cert: Path | None = None
    ssl_private_key: Path | None = None

    @property
    def wire_compression(self) -> str | None:
        """The gRPC compression to use: ``compression``, else Gzip when a DataCompressor or
        DataDeCompressor is listed (Clara compressed the model bytes; here the channel does)."""
        if self.compression:
            return self.compression
        names = {s.name for s in (*self.pre_processors, *self.post_processors)}
        return "Gzip" if names & set(_COMPRESSING_PROCESSORS) else None

    def server_options(self, task_name: str) -> list[tuple[str, Any]]:
        """The ``service.options`` this MMAR gives for ``task_name``."""
        for server in self.servers:
            if server.name == task_name:
                return list(server.options)
        return []


def _parse_mmar_client(mmar_root: Path, sink: list[ConfigError]) -> MMARClientConfig:
    path = mmar_root / "config" / "config_fed_client.json"
    r = _Reader(path, load_json(path), problems=sink)
    r.only(("format_version", "servers", "client"), " (a Clara 3.1 config_fed_client.json)")
    servers = _servers(r, need_target=False, mmar=True)
    c = r.sub("client", {})
    c.only(_MMAR_CLIENT_KEYS)
    privacy_raw = c.get("privacy", dict, {})
    privacy = _component(c, privacy_raw, "privacy") if privacy_raw else None
    local_epochs = (
        c.number("local_epochs", None, 1, integer=True)
        if c.data.get("local_epochs") is not None
        else None
    )
    base = _clara_root(path)
    return MMARClientConfig(
        path=path,
        task_name=servers[0].name if servers else "",
        local_epochs=local_epochs,
        steps_aggregation=c.number("steps_aggregation", 0, 0, integer=True),
        exclude_vars=_regex(c, "exclude_vars"),
        cross_site_validate=c.get("cross_site_validate", bool, False),
        privacy=privacy,
        pre_processors=_components(c, "pre_processors"),
        post_processors=_components(c, "post_processors"),
        client_state_processors=_components(c, "client_state_processors"),
        retry_timeout=c.number("retry_timeout", None, 0),
        compression=_compression(c),
        servers=servers,
        req_processors=_request_processors(c),
        model_reader_writer=_pt_component(c, "model_reader_writer", "PTModelReaderWriter"),
        model_validator=_pt_component(c, "model_validator", "PTModelValidator"),
        ssl_root_cert=_ssl_path(c, "ssl_root_cert", base),
        ssl_cert=_ssl_path(c, "ssl_cert", base),
        ssl_private_key=_ssl_path(c, "ssl_private_key", base),
    )


def load_mmar_client_config(mmar_root: Path) -> MMARClientConfig:
    """Parses ``<mmar_root>/config/config_fed_client.json`` (Clara 3.1 form).

    Raises:
        ConfigError: naming the file, the key and what is expected (ConfigProblems: several).
    """
    return _strict(lambda sink: _parse_mmar_client(mmar_root, sink))


def mmar_client_problems(mmar_root: Path) -> list[ConfigError]:
    """Every problem of an MMAR's ``config/config_fed_client.json`` (empty: none)."""
    return _collect(lambda sink: _parse_mmar_client(mmar_root, sink))


def read_mmar_client_config(
    mmar_root: Path,
) -> tuple[MMARClientConfig | None, list[ConfigError]]:
    """What of ``config_fed_client.json`` could be read (parts with problems left at their
    defaults or out), and every problem: for checks that go on past the first."""
    return _lenient(lambda sink: _parse_mmar_client(mmar_root, sink))


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
    for name in _WRITTEN_PATH_VARIABLES:
        value = variables.get(name)
        if not isinstance(value, str):
            continue
        raw = given.get(name, _PATH_DEFAULTS[name])
        if isinstance(raw, str) and not raw.strip():
            # "" would be the worker's working folder, wherever the service was started
            sink.append(
                ConfigError(
                    path,
                    name,
                    f"is empty; give a folder inside the MMAR (default {_PATH_DEFAULTS[name]!r})",
                )
            )
            variables[name] = str(root / _PATH_DEFAULTS[name])  # never used: the MMAR is refused
            continue
        # The worker creates and writes these folders: an MMAR shipped by the federation must
        # not make it write anywhere the service user can (an absolute path, "../..", a link).
        resolved = os.path.realpath(value)
        if os.path.commonpath([resolved, str(root)]) != str(root):
            sink.append(
                ConfigError(
                    path,
                    name,
                    f"{json.dumps(given.get(name))} resolves to {resolved}, outside the "
                    f"MMAR ({root}); the folders the site writes must be inside it (a relative "
                    'path such as "models")',
                )
            )
            variables[name] = str(root / _PATH_DEFAULTS[name])  # never used: the MMAR is refused
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


@dataclass(frozen=True)
class ServerConfig:
    """The reference server's settings (``config_fed_server.json``, Clara 3.1 keys)."""

    task_name: str = "demo_federation"
    target: str = "127.0.0.1:0"
    min_num_clients: int = 1
    max_num_clients: int = 100
    start_round: int = 0
    num_rounds: int = 5
    heart_beat_timeout: float = 600.0
    wait_after_min_clients: float = 30.0
    exclude_vars: str | None = None
    aggregation_weights: dict[str, float] = field(default_factory=dict)
    compression: str | None = None
    options: list[tuple[str, Any]] = field(default_factory=list)
    path: Path | None = None
    # Mutual TLS (engine/tls.py). From a file the default is on: a server without certificates
    # refuses to start unless its config says "secure_train": false.
    secure_train: bool = False
    ssl_root_cert: Path | None = None
    ssl_cert: Path | None = None
    ssl_private_key: Path | None = None
    # Names allowed in (None: any certificate of the authority with the right role).
    fl_clients: tuple[str, ...] | None = None
    admin_clients: tuple[str, ...] | None = None
    #: gRPC worker threads (Clara's ``num_server_workers``); None: sized from max_num_clients.
    num_server_workers: int | None = None
    #: Weigh each contribution by its ``n_iter`` (FedAvg, the default) or all equally
    #: (``aggregator.args.weigh_by_local_iter``, the name NVFlare's aggregators use), so that no
    #: site outweighs the others by claiming more steps. ``aggregation_weights`` apply either way.
    weigh_by_local_iter: bool = True
    #: The largest ``n_iter`` a contribution may claim; above it, it is refused.
    max_n_iter: int = DEFAULT_MAX_N_ITER
    #: Where ``max_n_iter`` came from (for the refusal a site gets).
    max_n_iter_source: str = "the server's default"


def _names(reader: _Reader, key: str) -> tuple[str, ...] | None:
    value = reader.get(key, list, None)
    if value is None:
        return None
    for i, name in enumerate(value):
        if not isinstance(name, str) or not name:
            raise reader.fail(f"{key}[{i}]", f"expected a name (a string), got {name!r}")
    return tuple(value)


def _indexed_components(reader: _Reader, key: str) -> list[tuple[int, ComponentSpec]]:
    items = reader.get(key, list, []) or []
    out = []
    for i, item in enumerate(items):
        spec = _component(reader, item, f"{key}[{i}]")
        if spec is not None:
            out.append((i, spec))
    return out


def _check_names(reader: _Reader, key: str, allowed: tuple[str, ...], what: str) -> None:
    for i, spec in _indexed_components(reader, key):
        if spec.name not in allowed:
            reader.report(
                f"{key}[{i}].{'name' if spec.name else 'path'}",
                f"unknown {what} {spec.ref!r}; the reference server has {', '.join(allowed)}",
            )


def _parse_server(path: Path, sink: list[ConfigError]) -> ServerConfig:
    r = _Reader(path, load_json(path), problems=sink)
    r.only(_SERVER_TOP_KEYS, " (a Clara 3.1 config_fed_server.json)")
    servers = _servers(r, need_target=True)
    raw = r.data.get("servers")
    first = raw[0] if isinstance(raw, list) and raw and isinstance(raw[0], dict) else {}
    s = _Reader(path, first, "servers[0]", sink)
    s.only(_SERVER_KEYS)
    min_c = s.number("min_num_clients", 1, 1, integer=True)
    max_c = s.number("max_num_clients", 100, 1, integer=True)
    if max_c < min_c:
        s.report("max_num_clients", f"expected >= min_num_clients ({min_c}), got {max_c}")
    start = s.number("start_round", 0, 0, integer=True)
    rounds = s.number("num_rounds", 5, 1, integer=True)
    if start >= rounds:
        s.report("start_round", f"expected < num_rounds ({rounds}), got {start}")
    if s.get("validate_on_server", bool, False):
        s.report(
            "validate_on_server",
            "expected false: the reference server holds no data to validate on (sites validate "
            "the global model, and cross-site validation runs on the sites)",
        )
    s.number("num_rounds_per_valid", 1, 1, integer=True)
    workers = s.number("num_server_workers", None, 1, integer=True)

    agg = r.sub("aggregator", {})
    agg.only(("name", "path", "args"))
    if agg.data:
        spec = _component(r, agg.data, "aggregator")
        if spec is not None and spec.name != "ModelAggregator":
            r.report(
                f"aggregator.{'name' if spec.name else 'path'}",
                f"expected 'ModelAggregator' (FedAvg weighted by n_iter and aggregation_weights), "
                f"got {spec.ref!r}; custom aggregators are not run by the reference server",
            )
    agg_args = agg.sub("args", {})
    agg_args.only(("exclude_vars", "aggregation_weights", "weigh_by_local_iter", "max_n_iter"))
    by_n_iter = agg_args.data.get("weigh_by_local_iter", True)
    if not isinstance(by_n_iter, bool):
        agg_args.report(
            "weigh_by_local_iter",
            "expected true (weigh each contribution by its n_iter) or false (equal weights), "
            f"got {json.dumps(by_n_iter)}",
        )
        by_n_iter = True
    max_n_iter = agg_args.number("max_n_iter", None, 1, integer=True)
    if max_n_iter is not None:
        max_n_iter_source = f"aggregator.args.max_n_iter of {path}"
    else:
        max_n_iter, max_n_iter_source = _default_max_n_iter(path)
    weights = agg_args.get("aggregation_weights", dict, {}) or {}
    good_weights: dict[str, float] = {}
    for site, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            agg_args.report(f"aggregation_weights.{site}", f"expected a number >= 0, got {w!r}")
        else:
            good_weights[site] = float(w)
    excludes = [x for x in (_regex(s, "exclude_vars"), _regex(agg_args, "exclude_vars")) if x]
    exclude = None
    if excludes:
        exclude = excludes[0] if len(set(excludes)) == 1 else "|".join(f"(?:{x})" for x in excludes)

    processors = []
    for key in ("pre_processors", "post_processors"):
        for i, spec in _indexed_components(r, key):
            if spec.name in _COMPRESSING_PROCESSORS:
                processors.append(spec)
            else:
                r.report(
                    f"{key}[{i}].{'name' if spec.name else 'path'}",
                    f"unknown processor {spec.ref!r} for the reference server; expected one of "
                    f"{', '.join(_COMPRESSING_PROCESSORS)}",
                )
    _pt_component(r, "model_saver", "PTModelSaver")
    _check_names(r, "admin_cmd_modules", _ADMIN_CMD_MODULES, "admin command module")
    _check_names(r, "result_processors", ("ValidateResultProcessor",), "result processor")

    compression = _compression(s)
    if compression is None and any(p.name in _COMPRESSING_PROCESSORS for p in processors):
        compression = "Gzip"
    server = servers[0] if servers else ServerEndpoint(name="", target="")
    return ServerConfig(
        task_name=server.name,
        target=server.target,
        min_num_clients=min_c,
        max_num_clients=max_c,
        start_round=start,
        num_rounds=rounds,
        heart_beat_timeout=s.number("heart_beat_timeout", 600.0, 0.1),
        wait_after_min_clients=s.number("wait_after_min_clients", 30.0, 0),
        exclude_vars=exclude,
        aggregation_weights=good_weights,
        compression=compression,
        options=server.options,
        path=path,
        secure_train=s.get("secure_train", bool, True),
        ssl_root_cert=_relative(path, s.get("ssl_root_cert", str, None)),
        ssl_cert=_relative(path, s.get("ssl_cert", str, None)),
        ssl_private_key=_relative(path, s.get("ssl_private_key", str, None)),
        fl_clients=_names(s, "fl_clients"),
        admin_clients=_names(s, "admin_clients"),
        num_server_workers=workers,
        weigh_by_local_iter=by_n_iter,
        max_n_iter=max_n_iter,
        max_n_iter_source=max_n_iter_source,
    )


def _default_max_n_iter(server_path: Path) -> tuple[int, str]:
    """``max_n_iter`` when ``config_fed_server.json`` does not set it, and where it came from.

    A Clara MMAR holds ``config_fed_client.json`` beside the server's config: with
    ``steps_aggregation`` > 0 every site trains that many steps a round. With ``local_epochs``
    the steps depend on each site's data, which the server never sees: DEFAULT_MAX_N_ITER then.
    That file is the sites' to check; here it is only read for this default.
    """
    client = server_path.parent / "config_fed_client.json"
    try:
        steps = (
            load_json(client).get("client", {}).get("steps_aggregation")
            if client.is_file()
            else None
        )
    except (ConfigError, AttributeError):
        steps = None
    if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0:
        return (
            MAX_N_ITER_MARGIN * steps,
            f"{MAX_N_ITER_MARGIN} × client.steps_aggregation ({steps}) of {client}; set "
            "aggregator.args.max_n_iter to change it",
        )
    return (
        DEFAULT_MAX_N_ITER,
        "the server's default: the sites train local_epochs, whose steps it cannot know; set "
        "aggregator.args.max_n_iter in config_fed_server.json to bound it closer",
    )


def load_server_config(path: Path) -> ServerConfig:
    """Parses a ``config_fed_server.json`` (Clara 3.1 keys).

    Relative ``ssl_*`` paths are resolved as Clara did: against the MMAR root for a file in an
    MMAR's ``config/``, else against the file's folder.

    Raises:
        ConfigError: naming the file, the key and what is expected (ConfigProblems: several).
    """
    return _strict(lambda sink: _parse_server(path, sink))


def server_problems(path: Path) -> list[ConfigError]:
    """Every problem of a ``config_fed_server.json`` (empty: none)."""
    return _collect(lambda sink: _parse_server(path, sink))


def read_server_config(path: Path) -> tuple[ServerConfig | None, list[ConfigError]]:
    """What of a server config could be read, and every problem."""
    return _lenient(lambda sink: _parse_server(path, sink))


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
