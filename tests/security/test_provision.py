"""`fltui provision`: real X.509 kits that load, chain to the project's authority and work."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from engine.client import DirectFederatedClient
from engine.config import ConfigError, load_client_kit, load_server_config
from engine.provision import load_project
from engine.server import FederatedServer
from engine.site.policy import load_site_policy
from fltui.admin import load_admin_kit
from fltui.provision import main as provision_main

PROJECT = {
    "name": "my_federation",
    "server": {
        "name": "localhost",
        "host_names": ["127.0.0.1", "fl.example.org"],
        "port": 8002,
        "org": "coordinator",
        "min_num_clients": 2,
        "num_rounds": 3,
    },
    "fl_clients": [{"name": "site-1", "org": "hospital-a"}, {"name": "site-2"}],
    "admin_clients": [{"name": "admin@example.org"}],
    "valid_days": 30,
}


def _project(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "project.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("provision")
    assert (
        provision_main(["--project", str(_project(tmp, PROJECT)), "--out", str(tmp / "out")]) == 0
    )
    return tmp / "out"


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_kit_is_laid_out_with_private_keys_owner_only(provisioned: Path) -> None:
    out = provisioned
    expected = [
        "ca/rootCA.pem",
        "ca/rootCA.key",
        "server/config_fed_server.json",
        "server/startup/server.crt",
        "server/startup/server.key",
        "server/startup/rootCA.pem",
        "admins/admin@example.org/startup/fed_admin.json",
        "admins/admin@example.org/startup/client.crt",
        "admins/admin@example.org/startup/client.key",
        "admins/admin@example.org/startup/rootCA.pem",
    ]
    for site in ("site-1", "site-2"):
        expected += [
            f"sites/{site}/startup/{f}"
            for f in (
                "fed_client.json",
                "client.crt",
                "client.key",
                "rootCA.pem",
                "site_policy.json",
            )
        ]
    for rel in expected:
        assert (out / rel).is_file(), rel
    keys = sorted(out.rglob("*.key"))
    assert len(keys) == 5
    assert all(_mode(k) == 0o600 for k in keys), {str(k): oct(_mode(k)) for k in keys}
    assert _mode(out / "sites/site-1/startup/client.crt") == 0o644
    # no leftovers of the temporary folder the kits were written in
    assert [p.name for p in out.parent.iterdir() if "provision-" in p.name] == []


def test_certificates_chain_to_the_authority_with_names_roles_and_host_names(
    provisioned: Path,
) -> None:
    ca = _cert(provisioned / "ca/rootCA.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = _cert(provisioned / "server/startup/server.crt")
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "fl.example.org"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    for rel, cn, role in (
        ("sites/site-1/startup/client.crt", "site-1", "site"),
        ("sites/site-2/startup/client.crt", "site-2", "site"),
        ("admins/admin@example.org/startup/client.crt", "admin@example.org", "admin"),
    ):
        cert = _cert(provisioned / rel)
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == cn
        assert (
            cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == role
        )
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
        assert days == 30
    org = _cert(provisioned / "sites/site-1/startup/client.crt").subject
    assert org.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "hospital-a"


def test_kits_load_with_tls_on_and_the_server_knows_its_federation(provisioned: Path) -> None:
    kit = load_client_kit(provisioned / "sites/site-1/startup/fed_client.json")
    assert kit.client_name == "site-1" and kit.secure_train
    assert kit.servers[0].name == "my_federation" and kit.servers[0].target == "localhost:8002"
    assert kit.ssl_private_key == provisioned / "sites/site-1/startup/client.key"
    policy = load_site_policy(provisioned / "sites/site-1/startup/site_policy.json")
    assert policy.allow_byoc is False and policy.path is not None
    server = load_server_config(provisioned / "server/config_fed_server.json")
    assert server.secure_train and server.target == "0.0.0.0:8002"
    assert server.fl_clients == ("site-1", "site-2")
    assert server.admin_clients == ("admin@example.org",)
    assert (server.min_num_clients, server.num_rounds) == (2, 3)
    assert server.ssl_cert == provisioned / "server/startup/server.crt"
    admin = load_admin_kit(provisioned / "admins/admin@example.org")
    assert admin.secure and admin.name == "admin@example.org" and admin.target == "localhost:8002"


def test_a_provisioned_site_registers_with_the_provisioned_server(
    provisioned: Path, tmp_path: Path
) -> None:
    config = replace(
        load_server_config(provisioned / "server/config_fed_server.json"), target="127.0.0.1:0"
    )
    server = FederatedServer(config, tmp_path / "ws", {"w": np.zeros(2, np.float32)})
    server.start()
    try:
        kit = load_client_kit(provisioned / "sites/site-2/startup/fed_client.json")
        endpoint = replace(kit.servers[0], target=f"localhost:{server.port}")
        client = DirectFederatedClient(
            kit.client_name,
            {
                "ssl_args": {
                    "ssl_root_cert": kit.ssl_root_cert,
                    "ssl_cert": kit.ssl_cert,
                    "ssl_private_key": kit.ssl_private_key,
                }
            },
            kit.secure_train,
            [endpoint],
        )
        client.connect_to_server({"heart_beat": False})
        assert list(server.sites) == ["site-2"]
        client.close()
    finally:
        server.stop(grace=0)


def test_clara_spellings_are_accepted(tmp_path: Path) -> None:
    project = load_project(
        _project(
            tmp_path,
            {
                "name": "p",
                "server": {"cn": "fl.example.org", "fed_learn_port": 9002},
                "fl_clients": [{"client_name": "site-1", "org": "a"}],
                "admin_clients": [{"email": "admin@a.org"}],
            },
        )
    )
    assert project.server.name == "fl.example.org" and project.server.port == 9002
    assert project.server.target == "fl.example.org:9002"
    assert [s.name for s in project.sites] == ["site-1"]
    assert [a.name for a in project.admins] == ["admin@a.org"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": None}, r"project.json: name: expected the project \(task\) name"),
        ({"server": "fl"}, r"project.json: server: expected"),
        ({"server": {"port": 1}}, r"server.name: is required"),
        ({"server": {"name": "bad host!"}}, r"server.name: expected a host name or IP address"),
        (
            {"server": {"name": "fl", "host_names": ["ok", 3]}},
            r"server.host_names\[1\]: expected a host name or IP address, got 3",
        ),
        ({"server": {"name": "fl", "port": 70000}}, r"server.port: expected a whole number in"),
        ({"server": {"name": "fl", "num_rounds": 0}}, r"server.num_rounds: expected a whole"),
        (
            {"server": {"name": "fl", "min_num_clients": 3, "max_num_clients": 2}},
            r"server.max_num_clients: expected >= server.min_num_clients",
        ),
        ({"fl_clients": []}, r"fl_clients: expected a non-empty list"),
        ({"fl_clients": None}, r"fl_clients: is required"),
        ({"fl_clients": [{"org": "x"}]}, r"fl_clients\[0\].name: is required"),
        ({"fl_clients": [{"name": "../etc"}]}, r"fl_clients\[0\].name: expected a site name"),
        (
            {"fl_clients": [{"name": "a"}, {"name": "a"}]},
            r"fl_clients\[1\].name: 'a' is listed twice",
        ),
        ({"admin_clients": ["root"]}, r"admin_clients\[0\]: expected"),
        ({"valid_days": 0}, r"valid_days: expected a whole number in 1..3650"),
        ({"valid_days": True}, r"valid_days: expected a whole number"),
    ],
)
def test_bad_projects_name_the_file_and_key_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict, message: str
) -> None:
    data = {**PROJECT, **change}
    if data.get("fl_clients") is None and "fl_clients" in change:
        del data["fl_clients"]
    path = _project(tmp_path, data)
    with pytest.raises(ConfigError, match=message):
        load_project(path)
    out = tmp_path / "out"
    assert provision_main(["--project", str(path), "--out", str(out)]) == 2
    assert "fltui provision: " in capsys.readouterr().err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project.json"]


def test_an_output_folder_with_files_is_never_overwritten(
    provisioned: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {p: p.read_bytes() for p in provisioned.rglob("*") if p.is_file()}
    code = provision_main(
        ["--project", str(_project(tmp_path, PROJECT)), "--out", str(provisioned)]
    )
    assert code == 2
    assert "the output folder is not empty" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in provisioned.rglob("*") if p.is_file()} == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert provision_main(["--project", str(tmp_path / "project.json"), "--out", str(empty)]) == 0
    assert (empty / "ca" / "rootCA.pem").is_file()
    # a second project gets its own authority
    assert (empty / "ca" / "rootCA.pem").read_bytes() != (
        provisioned / "ca/rootCA.pem"
    ).read_bytes()


def test_missing_or_broken_project_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        provision_main(["--project", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "nope.json: file not found" in capsys.readouterr().err
    assert (
        provision_main(["--project", str(_project(tmp_path, "{x")), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_failure_while_writing_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import engine.provision as prov

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prov, "_write_admin", broken)
    project = load_project(_project(tmp_path, PROJECT))
    with pytest.raises(ConfigError, match=r"cannot write the kits: .*No space left"):
        prov.provision(project, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project.json"]


def test_key_files_are_never_readable_by_others_even_with_a_loose_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        assert (
            provision_main(
                ["--project", str(_project(tmp_path, PROJECT)), "--out", str(tmp_path / "o")]
            )
            == 0
        )
    finally:
        os.umask(old)
    out = tmp_path / "o"
    assert all(_mode(k) == 0o600 for k in out.rglob("*.key"))
    # no folder anyone else may write (a swapped rootCA.pem or key); the authority's is private
    folders = [out, *(p for p in out.rglob("*") if p.is_dir())]
    assert all(_mode(f) & 0o022 == 0 for f in folders), [(f, oct(_mode(f))) for f in folders]
    assert _mode(out / "ca") == 0o700


def test_site_names_a_kit_would_refuse_are_refused_at_provisioning(tmp_path: Path) -> None:
    for bad in ("hospital+a", "site@b", "x" * 65):
        data = {**PROJECT, "fl_clients": [{"name": bad}]}
        with pytest.raises(ConfigError, match=r"fl_clients\[0\]\.name: expected a site name"):
            load_project(_project(tmp_path, data))
