"""The startup kit's ``fed_client.json``, and the ``servers`` lists and admin request processors."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config.common import (
    SITE_NAME,
    ConfigError,
    _collect,
    _compression,
    _lenient,
    _Reader,
    _strict,
    load_json,
)

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
