"""An MMAR's ``config/config_fed_client.json`` (Clara 3.1 form)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config.common import (
    _COMPRESSING_PROCESSORS,
    ComponentSpec,
    ConfigError,
    _clara_root,
    _collect,
    _component,
    _components,
    _compression,
    _lenient,
    _pt_component,
    _Reader,
    _regex,
    _ssl_path,
    _strict,
    load_json,
)
from engine.config.kit import ServerEndpoint, _request_processors, _servers

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
    bare_bundle = not path.exists() and any(
        (mmar_root / "configs" / f"train{ext}").is_file() for ext in (".json", ".yaml", ".yml")
    )
    # A MONAI bundle deployed as it is has no config_fed_client.json: the defaults, and the
    # task of the startup kit's server (task_name "").
    r = _Reader(path, {} if bare_bundle else load_json(path), problems=sink)
    r.only(("format_version", "servers", "client"), " (a Clara 3.1 config_fed_client.json)")
    servers = [] if bare_bundle else _servers(r, need_target=False, mmar=True)
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
