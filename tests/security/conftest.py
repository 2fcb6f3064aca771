"""Real certificates for the security tests, made once per session, and a mutual-TLS server."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.client import DirectFederatedClient
from engine.config import ServerConfig, ServerEndpoint
from engine.events import EventBus
from engine.provision import (
    CertificateAuthority,
    issue_identity,
    write_certificate,
    write_private_key,
)
from engine.server import FederatedServer
from engine.tls import ROLE_ADMIN, ROLE_SERVER, ROLE_SITE

TASK = "secure_federation"
SITES = ("site-a", "site-b")
ADMIN = "admin@test"


@dataclass(frozen=True)
class Kit:
    """The three TLS files of one party."""

    root_cert: Path
    cert: Path
    key: Path

    @property
    def ssl_args(self) -> dict[str, Path]:
        return {"ssl_root_cert": self.root_cert, "ssl_cert": self.cert, "ssl_private_key": self.key}


@dataclass(frozen=True)
class Pki:
    """Every certificate the tests need: the federation's and the hostile ones."""

    ca: CertificateAuthority
    server: Kit  # localhost, 127.0.0.1
    sites: dict[str, Kit]  # site-a, site-b (in the federation), site-x (same CA, not listed)
    admin: Kit
    other_ca_site: Kit  # site-a's name, another authority's certificate and root
    other_cert_site: Kit  # the federation's root, but a certificate of another authority
    expired_site: Kit  # site-a, expired yesterday
    expired_server: Kit
    wrong_host_server: Kit  # valid only for fl.example.org


def _kit(startup: Path, server: bool = False) -> Kit:
    name = "server" if server else "client"
    return Kit(startup / "rootCA.pem", startup / f"{name}.crt", startup / f"{name}.key")


def _expired(ca: CertificateAuthority, startup: Path, cn: str, role: str, hosts=()) -> Kit:
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30)
    key, cert = ca.issue(cn, role, host_names=hosts, valid_days=29, not_before=past)
    kit = _kit(startup, role == ROLE_SERVER)
    write_private_key(kit.key, key)
    write_certificate(kit.cert, cert)
    write_certificate(kit.root_cert, ca.cert)
    return kit


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.create(TASK)
    other = CertificateAuthority.create("another_project")
    issue_identity(ca, root / "server", "localhost", ROLE_SERVER, host_names=("127.0.0.1",))
    sites = {}
    for name in (*SITES, "site-x"):
        issue_identity(ca, root / name, name, ROLE_SITE)
        sites[name] = _kit(root / name)
    issue_identity(ca, root / "admin", ADMIN, ROLE_ADMIN)
    issue_identity(other, root / "other", "site-a", ROLE_SITE)
    issue_identity(other, root / "other-cert", "site-a", ROLE_SITE)
    write_certificate(root / "other-cert" / "rootCA.pem", ca.cert)
    issue_identity(
        ca, root / "wrong-host", "fl.example.org", ROLE_SERVER, host_names=("fl.example.org",)
    )
    return Pki(
        ca=ca,
        server=_kit(root / "server", server=True),
        sites=sites,
        admin=_kit(root / "admin"),
        other_ca_site=_kit(root / "other"),
        other_cert_site=_kit(root / "other-cert"),
        expired_site=_expired(ca, root / "expired-site", "site-a", ROLE_SITE),
        expired_server=_expired(
            ca, root / "expired-server", "localhost", ROLE_SERVER, ("127.0.0.1",)
        ),
        wrong_host_server=_kit(root / "wrong-host", server=True),
    )


def model() -> dict[str, np.ndarray]:
    return {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float64)}


def server_config(pki: Pki, server_kit: Kit | None = None, **overrides: Any) -> ServerConfig:
    kit = server_kit or pki.server
    config = ServerConfig(
        task_name=TASK,
        target="127.0.0.1:0",
        min_num_clients=2,
        num_rounds=2,
        secure_train=True,
        ssl_root_cert=kit.root_cert,
        ssl_cert=kit.cert,
        ssl_private_key=kit.key,
        fl_clients=SITES,
        admin_clients=(ADMIN,),
    )
    return replace(config, **overrides)


@pytest.fixture
def start_secure_server(pki: Pki, tmp_path: Path) -> Iterator[Callable[..., FederatedServer]]:
    """Starts mutual-TLS FederatedServers on 127.0.0.1:<free port>; stopped after the test."""
    servers: list[FederatedServer] = []

    def start(server_kit: Kit | None = None, **overrides: Any) -> FederatedServer:
        config = server_config(pki, server_kit, **overrides)
        server = FederatedServer(config, tmp_path / f"server{len(servers)}", model(), long_poll=0.3)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace=0)


def tls_client(
    server: FederatedServer,
    name: str,
    kit: Kit | None,
    *,
    secure: bool = True,
    host: str = "127.0.0.1",
    retry_timeout: float = 30,
    bus: EventBus | None = None,
) -> DirectFederatedClient:
    """A site's client for ``server`` (not registered yet). A long retry_timeout on purpose:
    a refused connection must fail at once, not after the retries."""
    return DirectFederatedClient(
        name,
        {"ssl_args": kit.ssl_args if kit else {}},
        secure,
        [ServerEndpoint(name=TASK, target=f"{host}:{server.port}")],
        retry_timeout=retry_timeout,
        bus=bus,
    )
