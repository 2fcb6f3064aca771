"""An MMAR's ``config/config_fed_client.json`` (Clara 3.1 form)."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
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
    "script",
    "script_args",
    "script_timeout",
)

#: Seconds the training worker waits for a script to ask for a model it has to train or
#: evaluate (``fltui.client.receive()``), unless ``script_timeout`` says otherwise.
DEFAULT_SCRIPT_TIMEOUT = 300.0


@dataclass(frozen=True)
class ScriptSpec:
    """A research team's own training script, run through ``fltui.client`` (the script form).

    Attributes:
        path: the script, relative to the MMAR root and under ``custom/`` (the MMAR's own code,
            run only where the site policy's ``allow_byoc`` allows), e.g. ``custom/train.py``.
        args: its command-line arguments (``script_args``).
        timeout: seconds the worker waits for the script to ask for a model
            (``script_timeout``): a script that never calls ``receive()`` fails the run.
        file: the config that named it, for messages.
    """

    path: str
    args: tuple[str, ...] = ()
    timeout: float = DEFAULT_SCRIPT_TIMEOUT
    file: Path | None = None


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
    script: ScriptSpec | None = None

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
        script=_script(c, mmar_root),
    )


def _script(c: _Reader, mmar_root: Path) -> ScriptSpec | None:
    """``client.script`` / ``script_args`` / ``script_timeout``: a script under ``custom/``."""
    raw = c.get("script", str, None)
    if raw is None:
        for key in ("script_args", "script_timeout"):
            if c.data.get(key) is not None:
                c.report(key, 'only goes with "script" (the training script it is for)')
        return None
    rel = PurePosixPath(raw)
    if rel.is_absolute() or ".." in rel.parts or "\\" in raw:
        c.report("script", f"expected a path inside the MMAR, like custom/train.py; got {raw!r}")
        return None
    if len(rel.parts) < 2 or rel.parts[0] != "custom" or rel.suffix != ".py":
        # custom/ is what the site policy's allow_byoc governs (deploy refuses it there): a
        # script elsewhere would be the MMAR's code outside that rule.
        c.report(
            "script",
            f"expected a Python file under the MMAR's custom/ folder, like custom/train.py; "
            f"got {raw!r}",
        )
        return None
    if not (mmar_root / rel).is_file():
        c.report("script", f"{raw} is not a file of the MMAR ({mmar_root / rel} not found)")
        return None
    args: tuple[str, ...] = ()
    value = c.data.get("script_args")
    if isinstance(value, str):
        try:
            args = tuple(shlex.split(value))
        except ValueError as exc:
            c.report("script_args", f"cannot be split into arguments as a shell would: {exc}")
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        args = tuple(value)
    elif value is not None:
        c.report(
            "script_args",
            f"expected a list of strings (or one string, split as a shell would), like "
            f'["--lr", "0.01"]; got {json.dumps(value)}',
        )
    timeout = c.number("script_timeout", DEFAULT_SCRIPT_TIMEOUT, 0)
    if timeout == 0:
        c.report("script_timeout", "expected seconds > 0")
        timeout = DEFAULT_SCRIPT_TIMEOUT
    return ScriptSpec(path=str(rel), args=args, timeout=float(timeout), file=c.path)


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
