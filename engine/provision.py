"""Provisioning: a project's certificate authority, server kit, site kits and admin kits.

``project.json`` follows Clara's ``project.yml``::

    {"name": "my_federation",
     "server": {"name": "fl.example.org", "host_names": ["fl.example.org", "10.0.0.5"],
                "port": 8002, "org": "hospital-a", "min_num_clients": 2, "num_rounds": 10},
     "fl_clients": [{"name": "site-1", "org": "hospital-a"}, {"name": "site-2"}],
     "admin_clients": [{"name": "admin@example.org"}],
     "valid_days": 365}

Clara's spellings are accepted too: ``server.cn``, ``server.fed_learn_port``,
``fl_clients[].client_name`` and ``admin_clients[].email``. The output folder gets::

    ca/            rootCA.pem, rootCA.key (0600: keep it offline; it signs every certificate)
    server/        config_fed_server.json, startup/{server.crt, server.key, rootCA.pem}
    sites/<site>/  startup/{fed_client.json, client.crt, client.key, rootCA.pem, site_policy.json}
    admins/<name>/ startup/{fed_admin.json, client.crt, client.key, rootCA.pem}, transfer/

Everything is written into a temporary folder beside the output and renamed into place at the
end: a failure leaves nothing behind.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from engine import he
from engine.config import SITE_NAME, ConfigError, load_json
from engine.fileio import atomic_write, save_json_atomic
from engine.site.policy import write_default_policy
from engine.tls import (
    ROLE_ADMIN,
    ROLE_SERVER,
    ROLE_SITE,
    KitError,
    load_certificate,
    valid_name,
)

__all__ = [
    "SERVER_SETTINGS",
    "CertificateAuthority",
    "Participant",
    "Project",
    "ProvisionResult",
    "ServerSpec",
    "describe",
    "issue_identity",
    "load_project",
    "provision",
    "server_tls_settings",
    "site_tls_settings",
    "write_certificate",
    "write_private_key",
]

ROOT_CERT, CLIENT_CERT, CLIENT_KEY = "rootCA.pem", "client.crt", "client.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"

# Server settings a project may give (config_fed_server.json keys): (type, minimum).
SERVER_SETTINGS: dict[str, tuple[type, float]] = {
    "min_num_clients": (int, 1),
    "max_num_clients": (int, 1),
    "start_round": (int, 0),
    "num_rounds": (int, 1),
    "heart_beat_timeout": (float, 0.1),
    "wait_after_min_clients": (float, 0),
}
_TASK = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DNS = re.compile(
    r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


@dataclass(frozen=True)
class Participant:
    """A site or an admin: its name (the certificate's common name) and organization."""

    name: str
    org: str | None = None


@dataclass(frozen=True)
class ServerSpec:
    """The server: its name, the host names its certificate is valid for, port and settings."""

    name: str
    host_names: tuple[str, ...]
    port: int = 8002
    org: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        """Where sites and admins connect: ``name:port`` (IPv6 in brackets)."""
        try:
            if ipaddress.ip_address(self.name).version == 6:
                return f"[{self.name}]:{self.port}"
        except ValueError:
            pass
        return f"{self.name}:{self.port}"


@dataclass(frozen=True)
class Project:
    """A parsed ``project.json``."""

    path: Path
    name: str
    server: ServerSpec
    sites: tuple[Participant, ...]
    admins: tuple[Participant, ...]
    valid_days: int = 365
    ca_valid_days: int = 3650
    #: ``"homomorphic_encryption"``: the CKKS parameters of the federation's TenSEAL context.
    homomorphic_encryption: he.CKKSParams | None = None


@dataclass
class ProvisionResult:
    """What ``provision`` wrote: the output folder and each kit's folder."""

    out: Path
    ca: Path
    server: Path
    sites: dict[str, Path]
    admins: dict[str, Path]


# ---------------------------------------------------------------------------- project.json


def _fail(path: Path, key: str, problem: str) -> ConfigError:
    return ConfigError(path, key, problem)


def _str(path: Path, data: dict[str, Any], key: str, where: str, *aliases: str) -> str | None:
    for name in (key, *aliases):
        if name in data and data[name] is not None:
            value = data[name]
            if not isinstance(value, str) or not value:
                raise _fail(path, f"{where}{name}", f"expected a non-empty string, got {value!r}")
            return value
    return None


def _int(path: Path, value: Any, key: str, low: int, high: int, default: int | None = None) -> int:
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(path, key, f"expected a whole number in {low}..{high}, got {value!r}")
    return value


def _host(path: Path, key: str, host: Any) -> str:
    if not isinstance(host, str):
        raise _fail(path, key, f"expected a host name or IP address, got {host!r}")
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if not _DNS.fullmatch(host):
        raise _fail(path, key, f"expected a host name or IP address, got {host!r}")
    return host


def _participants(
    path: Path, data: dict[str, Any], key: str, alias: str, required: bool, sites: bool = False
) -> tuple[Participant, ...]:
    items = data.get(key)
    if items is None:
        if required:
            raise _fail(path, key, 'is required (a list of {"name": ..., "org": ...})')
        return ()
    if not isinstance(items, list) or (required and not items):
        raise _fail(path, key, f'expected a non-empty list of {{"name": ...}}, got {items!r}')
    out: list[Participant] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        where = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise _fail(path, where, f'expected {{"name": ..., "org": ...}}, got {item!r}')
        name = _str(path, item, "name", f"{where}.", alias)
        if name is None:
            raise _fail(path, f"{where}.name", "is required")
        if sites and not SITE_NAME.fullmatch(name):
            # What a startup kit and the server's Register accept: a kit must be usable.
            raise _fail(
                path,
                f"{where}.name",
                "expected a site name of letters, digits and . _ - (at most 64, starting with a "
                f"letter or digit), got {name!r}",
            )
        if not valid_name(name):
            raise _fail(
                path,
                f"{where}.name",
                "expected letters, digits and . _ @ + - (at most 128, starting with a letter or "
                f"digit), got {name!r}",
            )
        if name in seen:
            raise _fail(path, f"{where}.name", f"{name!r} is listed twice")
        seen.add(name)
        out.append(Participant(name, _str(path, item, "org", f"{where}.")))
    return tuple(out)


def load_project(path: Path) -> Project:
    """Parses ``project.json``.

    Raises:
        ConfigError: naming the file, the key and what is expected.
    """
    path = Path(path)
    data = load_json(path)
    name = _str(path, data, "name", "")
    if name is None or not _TASK.fullmatch(name):
        raise _fail(
            path, "name", f"expected the project (task) name: letters, digits, . _ -, got {name!r}"
        )
    server = data.get("server")
    if not isinstance(server, dict):
        raise _fail(path, "server", f'expected {{"name": "host", ...}}, got {server!r}')
    server_name = _str(path, server, "name", "server.", "cn")
    if server_name is None:
        raise _fail(path, "server.name", "is required (the server's host name)")
    _host(path, "server.name", server_name)
    hosts_raw = server.get("host_names", [])
    if not isinstance(hosts_raw, list):
        raise _fail(path, "server.host_names", f"expected a list of host names, got {hosts_raw!r}")
    hosts = [_host(path, f"server.host_names[{i}]", h) for i, h in enumerate(hosts_raw)]
    port_key = "fed_learn_port" if "fed_learn_port" in server else "port"
    port = _int(path, server.get(port_key), f"server.{port_key}", 1, 65535, default=8002)
    settings: dict[str, Any] = {}
    for key, (kind, low) in SERVER_SETTINGS.items():
        if key not in server:
            continue
        value = server[key]
        ok = not isinstance(value, bool) and (
            isinstance(value, int) or (kind is float and isinstance(value, float))
        )
        if not ok or value < low:
            what = "a whole number" if kind is int else "a number"
            raise _fail(path, f"server.{key}", f"expected {what} >= {low:g}, got {value!r}")
        settings[key] = value
    if settings.get("max_num_clients", 100) < settings.get("min_num_clients", 1):
        raise _fail(path, "server.max_num_clients", "expected >= server.min_num_clients")
    if settings.get("start_round", 0) >= settings.get("num_rounds", 5):
        raise _fail(path, "server.start_round", "expected < server.num_rounds")
    he_params = None
    if data.get("homomorphic_encryption") not in (None, False):
        try:
            he_params = he.CKKSParams.from_project(data["homomorphic_encryption"])
        except he.HEError as exc:
            raise _fail(path, "homomorphic_encryption", str(exc)) from None
    sites = _participants(path, data, "fl_clients", "client_name", required=True, sites=True)
    admins = _participants(path, data, "admin_clients", "email", required=False)
    return Project(
        path=path,
        name=name,
        server=ServerSpec(
            name=server_name,
            host_names=tuple(dict.fromkeys([server_name, *hosts])),
            port=port,
            org=_str(path, server, "org", "server."),
            settings=settings,
        ),
        sites=sites,
        admins=admins,
        valid_days=_int(path, data.get("valid_days"), "valid_days", 1, 3650, default=365),
        ca_valid_days=_int(path, data.get("ca_valid_days"), "ca_valid_days", 1, 7300, 3650),
        homomorphic_encryption=he_params,
    )


# ---------------------------------------------------------------------------- issuing


_ROLES = (ROLE_SERVER, ROLE_SITE, ROLE_ADMIN)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _name(cn: str, role: str | None = None, org: str | None = None) -> x509.Name:
    attrs = []
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    if role:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


@dataclass
class CertificateAuthority:
    """A project's certificate authority: its key and self-signed certificate."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(
        cls, name: str, valid_days: int = 3650, not_before: dt.datetime | None = None
    ) -> CertificateAuthority:
        """A new authority named ``name`` (its common name), valid ``valid_days`` from now."""
        key = ec.generate_private_key(ec.SECP256R1())
        start = not_before or _now() - dt.timedelta(minutes=5)
        subject = _name(f"{name} root CA")
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        """An authority saved by ``save``."""
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise KitError(key_path, "not an EC private key of a certificate authority")
        return cls(key, load_certificate(cert_path))

    def save(self, cert_path: Path, key_path: Path) -> None:
        write_certificate(cert_path, self.cert)
        write_private_key(key_path, self.key)

    def issue(
        self,
        common_name: str,
        role: str,
        org: str | None = None,
        host_names: Iterable[str] = (),
        valid_days: int = 365,
        not_before: dt.datetime | None = None,
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A new key and a certificate for it, signed by this authority.

        Args:
            common_name: the site's name, the admin's name or the server's name.
            role: ``server``, ``site`` or ``admin`` (the certificate's organizational unit).
            org: the organization, if any.
            host_names: the server's DNS names and IP addresses (subject alternative names).
            valid_days: days of validity from ``not_before``.
            not_before: start of validity (default: five minutes ago, for clock skew).

        Returns:
            the private key and the certificate.
        """
        if role not in _ROLES:
            raise ValueError(f"role must be one of {', '.join(_ROLES)}, got {role!r}")
        key = ec.generate_private_key(ec.SECP256R1())
        start = not_before or _now() - dt.timedelta(minutes=5)
        usage = (
            ExtendedKeyUsageOID.SERVER_AUTH
            if role == ROLE_SERVER
            else (ExtendedKeyUsageOID.CLIENT_AUTH)
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, role, org))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        # A server's name is one of its host names (clients match SANs, never the CN).
        names = list(
            dict.fromkeys([common_name, *host_names] if role == ROLE_SERVER else host_names)
        )
        if names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_general_name(h) for h in names]), critical=False
            )
        return key, builder.sign(self.key, hashes.SHA256())


# ---------------------------------------------------------------------------- files


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    def write(f: IO[bytes]) -> None:
        # atomic_write's temp file is 0600: a key is never readable by others, not even briefly.
        os.fchmod(f.fileno(), mode)
        f.write(data)

    atomic_write(path, write)


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Writes ``key`` as unencrypted PKCS#8 PEM, mode 0600 (owner only), atomically."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomic(path, pem, 0o600)


def write_certificate(path: Path, cert: x509.Certificate) -> None:
    """Writes ``cert`` as PEM, mode 0644, atomically."""
    _write_atomic(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


# ---------------------------------------------------------------------------- kits


def issue_identity(
    ca: CertificateAuthority,
    startup: Path,
    common_name: str,
    role: str,
    org: str | None = None,
    valid_days: int = 365,
    host_names: tuple[str, ...] = (),
) -> None:
    """Writes a new key (0600), its certificate and the authority's certificate into ``startup``.

    The server gets ``server.crt``/``server.key``; sites and admins ``client.crt``/``client.key``.
    """
    key, cert = ca.issue(common_name, role, org, host_names, valid_days)
    cert_name, key_name = (
        (SERVER_CERT, SERVER_KEY) if role == ROLE_SERVER else (CLIENT_CERT, CLIENT_KEY)
    )
    write_private_key(startup / key_name, key)
    write_certificate(startup / cert_name, cert)
    write_certificate(startup / ROOT_CERT, ca.cert)


def site_tls_settings() -> dict[str, Any]:
    """The ``client`` keys of a kit whose certificates ``issue_identity`` wrote."""
    return {
        "secure_train": True,
        "ssl_root_cert": ROOT_CERT,
        "ssl_cert": CLIENT_CERT,
        "ssl_private_key": CLIENT_KEY,
    }


def server_tls_settings(
    sites: list[str] | None = None, admins: list[str] | None = None, startup: str = "startup"
) -> dict[str, Any]:
    """The ``servers[0]`` keys of a server config whose certificates lie in ``startup/``."""
    out: dict[str, Any] = {
        "secure_train": True,
        "ssl_root_cert": f"{startup}/{ROOT_CERT}",
        "ssl_cert": f"{startup}/{SERVER_CERT}",
        "ssl_private_key": f"{startup}/{SERVER_KEY}",
    }
    if sites is not None:
        out["fl_clients"] = list(sites)
    if admins is not None:
        out["admin_clients"] = list(admins)
    return out


def _write_server(project: Project, ca: CertificateAuthority, root: Path) -> None:
    spec = project.server
    issue_identity(
        ca, root / "startup", spec.name, ROLE_SERVER, spec.org, project.valid_days, spec.host_names
    )
    server: dict[str, Any] = {
        "name": project.name,
        "service": {"target": f"0.0.0.0:{spec.port}", "options": []},
        "min_num_clients": 1,
        "max_num_clients": max(100, len(project.sites)),
        "num_rounds": 5,
        **spec.settings,
        **server_tls_settings([s.name for s in project.sites], [a.name for a in project.admins]),
    }
    save_json_atomic(
        root / "config_fed_server.json",
        {
            "format_version": 1,
            "servers": [server],
            "aggregator": {"name": "ModelAggregator", "args": {}},
        },
    )


def _write_site(project: Project, ca: CertificateAuthority, site: Participant, root: Path) -> None:
    startup = root / "startup"
    issue_identity(ca, startup, site.name, ROLE_SITE, site.org, project.valid_days)
    save_json_atomic(
        startup / "fed_client.json",
        {
            "format_version": 1,
            "servers": [
                {"name": project.name, "service": {"target": project.server.target, "options": []}}
            ],
            "client": {
                "client_name": site.name,
                "retry_timeout": 30,
                "heartbeat_interval": 60,
                **site_tls_settings(),
            },
        },
    )
    write_default_policy(startup / "site_policy.json")
    (root / "transfer").mkdir(parents=True, exist_ok=True)


def _write_admin(
    project: Project, ca: CertificateAuthority, admin: Participant, root: Path
) -> None:
    startup = root / "startup"
    issue_identity(ca, startup, admin.name, ROLE_ADMIN, admin.org, project.valid_days)
    save_json_atomic(
        startup / "fed_admin.json",
        {
            "admin": {
                "name": admin.name,
                "target": project.server.target,
                **site_tls_settings(),
            }
        },
    )
    (root / "transfer").mkdir(parents=True, exist_ok=True)


def provision(project: Project, out: Path) -> ProvisionResult:
    """Makes the authority and every kit of ``project`` under ``out``.

    Args:
        project: the parsed project.
        out: a folder that does not exist yet or is empty.

    Raises:
        ConfigError: ``out`` is not empty (kits are never overwritten) or cannot be written.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            out,
            "",
            "the output folder is not empty; provision into a new folder "
            "(kits and the authority's key are never overwritten)",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.provision-", dir=out.parent))
    try:
        ca = CertificateAuthority.create(project.name, project.ca_valid_days)
        ca.save(tmp / "ca" / ROOT_CERT, tmp / "ca" / "rootCA.key")
        _write_server(project, ca, tmp / "server")
        for site in project.sites:
            _write_site(project, ca, site, tmp / "sites" / site.name)
        for admin in project.admins:
            _write_admin(project, ca, admin, tmp / "admins" / admin.name)
        if project.homomorphic_encryption is not None:
            # One context per federation: every site the secret key (0600), the server none.
            try:
                private, public = he.make_contexts(project.homomorphic_encryption)
            except he.HEError as exc:
                raise ConfigError(project.path, "homomorphic_encryption", str(exc)) from None
            he.write_context(tmp / "server" / "startup" / he.SERVER_CONTEXT, public, secret=False)
            for site in project.sites:
                startup = tmp / "sites" / site.name / "startup"
                he.write_context(startup / he.CLIENT_CONTEXT, private, secret=True)
        # Folders are made with the process's umask, which may be loose: set every mode, so no
        # other user can swap a rootCA.pem or a key. The authority's folder is the owner's only.
        for folder in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            os.chmod(folder, 0o700 if folder.name == "ca" and folder.parent == tmp else 0o755)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(out, "", f"cannot write the kits: {exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ProvisionResult(
        out=out,
        ca=out / "ca",
        server=out / "server",
        sites={s.name: out / "sites" / s.name for s in project.sites},
        admins={a.name: out / "admins" / a.name for a in project.admins},
    )


def describe(result: ProvisionResult, project: Project) -> str:
    """What was made, for people."""
    lines = [
        f"provisioned {project.name!r} into {result.out}:",
        f"  certificate authority  {result.ca}/ (rootCA.key: keep it offline)",
        f"  server                 {result.server}/ (certificate for "
        f"{', '.join(project.server.host_names)}; sites connect to {project.server.target})",
    ]
    lines += [f"  site {name:<17} {path}/" for name, path in result.sites.items()]
    lines += [f"  admin {name:<16} {path}/" for name, path in result.admins.items()]
    if project.homomorphic_encryption is not None:
        lines.append(
            f"  homomorphic encryption  each site: startup/{he.CLIENT_CONTEXT} (the secret key, "
            f"0600); the server: startup/{he.SERVER_CONTEXT} (public, no secret key)"
        )
    lines.append(
        f"certificates valid for {project.valid_days} days; give each site its folder "
        "(keep the .key files private: mode 0600)"
    )
    return "\n".join(lines)
