"""The reference server's ``config_fed_server.json`` (Clara 3.1 keys)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config.common import (
    _COMPRESSING_PROCESSORS,
    ComponentSpec,
    ConfigError,
    _collect,
    _component,
    _compression,
    _lenient,
    _pt_component,
    _Reader,
    _regex,
    _relative,
    _strict,
    load_json,
)
from engine.config.kit import ServerEndpoint, _servers

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


DEFAULT_MAX_N_ITER = 1_000_000
"""The largest ``n_iter`` one contribution may claim when nothing tells the server more: a
million local optimizer steps a round is far beyond the rounds of this lineage (Clara's examples
train tens to a few thousand), yet a lying site can outweigh no more than that."""
MAX_N_ITER_MARGIN = 2
"""``max_n_iter`` from ``steps_aggregation`` is this many times it (a site trains exactly that
many steps a round; the margin is for trainers that count a last partial step or so)."""


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
