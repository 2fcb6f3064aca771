"""Startup-kit and MMAR config files parsed into dataclasses; errors name file and key."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ClientKitConfig",
    "ComponentSpec",
    "ConfigError",
    "MMARClientConfig",
    "ServerConfig",
    "ServerEndpoint",
    "load_client_kit",
    "load_json",
    "load_mmar_client_config",
    "load_server_config",
]

COMPRESSIONS = ("Gzip", "Deflate")


class ConfigError(ValueError):
    """A config file that cannot be used.

    Attributes:
        path: the file.
        key: dotted path of the offending key ("client.retry_timeout"), or "" for the whole file.
    """

    def __init__(self, path: Path | str, key: str, problem: str) -> None:
        self.path = Path(path)
        self.key = key
        where = f"{path}: {key}" if key else str(path)
        super().__init__(f"{where}: {problem}")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows (use a finite number)")


def load_json(path: Path) -> dict[str, Any]:
    """Reads a JSON object from ``path``; any problem is a ConfigError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot be read: {exc.strerror}") from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except ValueError as exc:
        if not isinstance(exc, json.JSONDecodeError):
            raise ConfigError(path, "", str(exc)) from None
        raise ConfigError(path, "", f"not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(path, "", f"expected a JSON object, got {type(data).__name__}")
    return data


_MISSING = object()


class _Reader:
    """Typed access to a JSON object with errors naming the file and dotted key."""

    def __init__(self, path: Path, data: dict[str, Any], prefix: str = "") -> None:
        self.path, self.data, self.prefix = path, data, prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.path, self.key(name), problem)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
        value = self.data.get(name, _MISSING)
        if value is _MISSING or (value is None and default is not _MISSING):
            if default is _MISSING:
                raise self.fail(name, "is required")
            return default
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python, but `"retry_timeout": true` is a mistake.
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        else:
            ok = isinstance(value, kinds) or (float in kinds and isinstance(value, int))
        if not ok:
            expected = " or ".join(k.__name__ for k in kinds)
            raise self.fail(name, f"expected {expected}, got {json.dumps(value)}")
        return value

    def number(self, name: str, default: Any, minimum: float, integer: bool = False) -> Any:
        value = self.get(name, int if integer else (int, float), default)
        if value < minimum:
            raise self.fail(name, f"expected a number >= {minimum}, got {value}")
        return value

    def sub(self, name: str, default: Any = _MISSING) -> _Reader:
        return _Reader(self.path, self.get(name, dict, default), self.key(name))


@dataclass(frozen=True)
class ComponentSpec:
    """A ``{"name"|"path": ..., "args": {...}}`` component of a config."""

    name: str | None
    path: str | None
    args: dict[str, Any]
    where: str = ""

    @property
    def ref(self) -> str:
        return self.name or self.path or ""


def _component(reader: _Reader, value: Any, key: str) -> ComponentSpec:
    where = f"{reader.path}: {reader.key(key)}"
    if not isinstance(value, dict):
        raise reader.fail(key, f'expected {{"name"|"path": ..., "args": {{...}}}}, got {value!r}')
    name, path = value.get("name"), value.get("path")
    if bool(name) == bool(path) or not isinstance(name or path, str):
        raise reader.fail(key, 'expected exactly one of "name" or "path" (a string)')
    args = value.get("args", {})
    if not isinstance(args, dict):
        raise reader.fail(f"{key}.args", f"expected an object, got {json.dumps(args)}")
    return ComponentSpec(name=name, path=path, args=args, where=where)


def _components(reader: _Reader, key: str) -> list[ComponentSpec]:
    items = reader.get(key, list, [])
    return [_component(reader, item, f"{key}[{i}]") for i, item in enumerate(items)]


def _regex(reader: _Reader, key: str) -> str | None:
    value = reader.get(key, str, None)
    if value is None:
        return None
    try:
        re.compile(value)
    except re.error as exc:
        raise reader.fail(key, f"not a valid regular expression: {exc}") from None
    return value


def _compression(reader: _Reader, key: str = "compression") -> str | None:
    value = reader.get(key, str, None)
    if value is not None and value not in COMPRESSIONS:
        raise reader.fail(key, f"expected one of {', '.join(COMPRESSIONS)} or null, got {value!r}")
    return value


@dataclass(frozen=True)
class ServerEndpoint:
    """One server of a ``servers`` list: task name, gRPC target and channel options."""

    name: str
    target: str
    options: list[tuple[str, Any]] = field(default_factory=list)


def _servers(reader: _Reader, need_target: bool) -> list[ServerEndpoint]:
    items = reader.get("servers", list)
    if not items:
        raise reader.fail("servers", "expected at least one server")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise reader.fail(f"servers[{i}]", f"expected an object, got {item!r}")
        s = _Reader(reader.path, item, reader.key(f"servers[{i}]"))
        service = s.sub("service", {})
        target = service.get("target", str, "")
        if need_target and not re.fullmatch(r"[^\s:]+:\d{1,5}|\[[0-9a-fA-F:]+\]:\d{1,5}", target):
            raise service.fail("target", f'expected "host:port", got {target!r}')
        options = []
        for j, opt in enumerate(service.get("options", list, [])):
            if not (isinstance(opt, list) and len(opt) == 2 and isinstance(opt[0], str)):
                raise service.fail(f"options[{j}]", f'expected ["grpc.option", value], got {opt!r}')
            options.append((opt[0], opt[1]))
        out.append(ServerEndpoint(name=s.get("name", str), target=target, options=options))
    return out


@dataclass(frozen=True)
class ClientKitConfig:
    """A site's startup kit, ``<workspace>/startup/fed_client.json``."""

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


def load_client_kit(path: Path) -> ClientKitConfig:
    """Parses a startup kit's ``fed_client.json``.

    Raises:
        ConfigError: naming the file, the key and what is expected.
    """
    r = _Reader(path, load_json(path))
    client = r.sub("client", {})
    name = client.get("client_name", str)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise client.fail("client_name", f"expected letters, digits, '.', '_' or '-', got {name!r}")

    def cert(key: str) -> Path | None:
        value = client.get(key, str, None)
        return (path.parent / value) if value else None

    return ClientKitConfig(
        path=path,
        client_name=name,
        servers=_servers(r, need_target=True),
        retry_timeout=client.number("retry_timeout", 30.0, 0),
        compression=_compression(client),
        secure_train=client.get("secure_train", bool, False),
        ssl_root_cert=cert("ssl_root_cert"),
        ssl_cert=cert("ssl_cert"),
        ssl_private_key=cert("ssl_private_key"),
        heartbeat_interval=client.number("heartbeat_interval", 60.0, 0.05),
    )


@dataclass(frozen=True)
class MMARClientConfig:
    """The ``client`` block (and task name) of an MMAR's ``config/config_fed_client.json``."""

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


def load_mmar_client_config(mmar_root: Path) -> MMARClientConfig:
    """Parses ``<mmar_root>/config/config_fed_client.json``.

    Raises:
        ConfigError: naming the file, the key and what is expected.
    """
    path = mmar_root / "config" / "config_fed_client.json"
    r = _Reader(path, load_json(path))
    servers = _servers(r, need_target=False)
    c = r.sub("client", {})
    privacy_raw = c.get("privacy", dict, {})
    retry = c.get("retry_timeout", (int, float), None)
    if retry is not None and retry < 0:
        raise c.fail("retry_timeout", f"expected a number >= 0, got {retry}")
    return MMARClientConfig(
        path=path,
        task_name=servers[0].name,
        local_epochs=c.number("local_epochs", None, 1, integer=True)
        if c.data.get("local_epochs") is not None
        else None,
        steps_aggregation=c.number("steps_aggregation", 0, 0, integer=True),
        exclude_vars=_regex(c, "exclude_vars"),
        cross_site_validate=c.get("cross_site_validate", bool, False),
        privacy=_component(c, privacy_raw, "privacy") if privacy_raw else None,
        pre_processors=_components(c, "pre_processors"),
        post_processors=_components(c, "post_processors"),
        client_state_processors=_components(c, "client_state_processors"),
        retry_timeout=retry,
        compression=_compression(c),
    )


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


def load_server_config(path: Path) -> ServerConfig:
    """Parses a ``config_fed_server.json``.

    Raises:
        ConfigError: naming the file, the key and what is expected.
    """
    r = _Reader(path, load_json(path))
    server = _servers(r, need_target=True)[0]
    s = _Reader(path, r.data["servers"][0], "servers[0]")
    min_c = s.number("min_num_clients", 1, 1, integer=True)
    max_c = s.number("max_num_clients", 100, 1, integer=True)
    if max_c < min_c:
        raise s.fail("max_num_clients", f"expected >= min_num_clients ({min_c}), got {max_c}")
    start = s.number("start_round", 0, 0, integer=True)
    rounds = s.number("num_rounds", 5, 1, integer=True)
    if start >= rounds:
        raise s.fail("start_round", f"expected < num_rounds ({rounds}), got {start}")
    agg = r.sub("aggregator", {})
    agg_args = agg.sub("args", {})
    weights = agg_args.get("aggregation_weights", dict, {})
    for site, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise agg_args.fail(f"aggregation_weights.{site}", f"expected a number >= 0, got {w!r}")
    return ServerConfig(
        task_name=server.name,
        target=server.target,
        min_num_clients=min_c,
        max_num_clients=max_c,
        start_round=start,
        num_rounds=rounds,
        heart_beat_timeout=s.number("heart_beat_timeout", 600.0, 0.1),
        wait_after_min_clients=s.number("wait_after_min_clients", 30.0, 0),
        exclude_vars=_regex(s, "exclude_vars") or _regex(agg_args, "exclude_vars"),
        aggregation_weights={k: float(v) for k, v in weights.items()},
        compression=_compression(s),
        options=server.options,
        path=path,
    )
