"""Mutual TLS over loopback with real certificates: who is let in, who is refused, and why."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from engine.client import FLCommunicationError
from engine.client.admin import AdminMessageSender
from engine.events import ConnectionChanged, EventBus
from engine.rpc import TOKEN_HEADER, FederatedStub
from engine.tls import diagnose_certificate
from protos import admin_pb2 as apb
from protos import admin_pb2_grpc
from protos import federated_pb2 as pb
from tests.conftest import Recorder
from tests.security.conftest import ADMIN, TASK, Kit, model, tls_client


def _channel(server, kit: Kit | None, with_cert: bool = True) -> grpc.Channel:
    """A raw gRPC channel, to show what the server itself accepts (no client-side checks)."""
    if kit is None:
        return grpc.insecure_channel(f"127.0.0.1:{server.port}")
    creds = grpc.ssl_channel_credentials(
        root_certificates=kit.root_cert.read_bytes(),
        private_key=kit.key.read_bytes() if with_cert else None,
        certificate_chain=kit.cert.read_bytes() if with_cert else None,
    )
    return grpc.secure_channel(f"127.0.0.1:{server.port}", creds)


def _raw_register(server, kit: Kit | None, name: str, with_cert: bool = True) -> grpc.RpcError:
    channel = _channel(server, kit, with_cert)
    try:
        FederatedStub(channel).Register(
            pb.ClientLogin(client_name=name, meta=pb.ModelMetaData(task=TASK)), timeout=5
        )
    except grpc.RpcError as exc:
        return exc
    finally:
        channel.close()
    raise AssertionError(f"the server accepted {name}")


def _refused(client, bus_rec: Recorder | None = None) -> FLCommunicationError:
    """Registration fails at once (no retries within the 30 s retry_timeout) with a kind."""
    t0 = time.monotonic()
    with pytest.raises(FLCommunicationError) as info:
        client.connect_to_server({"heart_beat": False})
    assert time.monotonic() - t0 < 8, "a TLS/auth failure was retried"
    assert info.value.security, info.value
    if bus_rec is not None:
        states = [e.state for e in bus_rec.of(ConnectionChanged)]
        assert "retrying" not in states and states[-1] == "failed", states
        assert bus_rec.of(ConnectionChanged)[-1].detail == info.value.reason
    return info.value


def test_sites_with_their_certificates_train_a_round_over_mutual_tls(pki, start_secure_server):
    server = start_secure_server()
    a = tls_client(server, "site-a", pki.sites["site-a"])
    b = tls_client(server, "site-b", pki.sites["site-b"])
    for c in (a, b):
        c.connect_to_server({"heart_beat": False})
    assert sorted(server.sites) == ["site-a", "site-b"]
    for c, value in ((a, 1.0), (b, 3.0)):
        got = c.pull_models_from_server()
        np.testing.assert_array_equal(got["w"], model()["w"])
        c.push_models_to_server({k: np.full_like(v, value) for k, v in got.items()})
    assert server.current_round == 1
    np.testing.assert_allclose(server.global_model["w"], model()["w"] + 2.0)
    a.heartbeat()  # a heartbeat over TLS with the session token
    assert "site-a" in server.sites


def test_a_site_without_a_certificate_is_refused(pki, start_secure_server, tmp_path):
    server = start_secure_server()
    # The server itself: a TLS client that shows no certificate does not get through.
    exc = _raw_register(server, pki.sites["site-a"], "site-a", with_cert=False)
    assert exc.code() == grpc.StatusCode.UNAVAILABLE
    assert not server.sites
    # The operator: a kit that names no certificate says so before connecting.
    bus = EventBus()
    rec = Recorder(bus)
    kit = pki.sites["site-a"]
    client = tls_client(server, "site-a", None, bus=bus)
    client.communicator.ssl_args = {"ssl_root_cert": kit.root_cert}
    err = _refused(client, rec)
    assert err.kind == "kit" and "ssl_cert is not set" in err.reason


def test_a_certificate_from_another_authority_is_refused(pki, start_secure_server):
    server = start_secure_server()
    # Refused by the server's TLS: the federation's root, another authority's certificate.
    exc = _raw_register(server, pki.other_cert_site, "site-a")
    assert exc.code() == grpc.StatusCode.UNAVAILABLE
    assert not server.sites
    # The same refusal as the operator sees it when gRPC only says "Socket closed".
    refusal = diagnose_certificate(
        f"127.0.0.1:{server.port}", pki.other_cert_site.cert, pki.other_cert_site.key
    )
    assert refusal is not None and refusal.kind == "certificate_refused"
    assert "wrong certificate authority" in refusal.reason
    # ... and the federation's own certificate is not refused by that check.
    assert (
        diagnose_certificate(
            f"127.0.0.1:{server.port}", pki.sites["site-a"].cert, pki.sites["site-a"].key
        )
        is None
    )
    # A whole kit of another project: this site does not trust the server either.
    bus = EventBus()
    rec = Recorder(bus)
    err = _refused(tls_client(server, "site-a", pki.other_ca_site, bus=bus), rec)
    assert err.kind == "wrong_ca"
    assert err.reason.startswith("wrong certificate authority")
    # A kit that mixes the two: found before connecting, in words.
    err = _refused(tls_client(server, "site-a", pki.other_cert_site))
    assert err.kind == "wrong_ca" and "was not issued by the authority in" in err.reason
    assert not server.sites


def test_an_expired_certificate_is_refused(pki, start_secure_server):
    server = start_secure_server()
    exc = _raw_register(server, pki.expired_site, "site-a")
    assert exc.code() == grpc.StatusCode.UNAVAILABLE
    assert not server.sites
    refusal = diagnose_certificate(
        f"127.0.0.1:{server.port}", pki.expired_site.cert, pki.expired_site.key
    )
    assert refusal is not None and refusal.kind == "certificate_refused"
    bus = EventBus()
    rec = Recorder(bus)
    err = _refused(tls_client(server, "site-a", pki.expired_site, bus=bus), rec)
    assert err.kind == "expired"
    assert err.reason.startswith("expired certificate:") and "expired on" in err.reason


def test_a_server_with_an_expired_certificate_is_refused_by_sites_and_will_not_start(
    pki, start_secure_server, tmp_path
):
    from engine.config import ConfigError
    from engine.server import FederatedServer
    from tests.security.conftest import server_config

    with pytest.raises(ConfigError, match="expired certificate"):
        FederatedServer(server_config(pki, pki.expired_server), tmp_path / "s", model())
    # A server that runs anyway (its certificate expired while it ran): sites say why.
    server = start_secure_server()
    server._tls = (
        pki.expired_server.root_cert.read_bytes(),
        pki.expired_server.cert.read_bytes(),
        pki.expired_server.key.read_bytes(),
    )
    server.stop(grace=0)
    server.start()
    err = _refused(tls_client(server, "site-a", pki.sites["site-a"]))
    assert err.kind == "expired" and err.reason.startswith("expired certificate")


def test_host_name_mismatch_is_refused(pki, start_secure_server):
    server = start_secure_server(pki.wrong_host_server)
    bus = EventBus()
    rec = Recorder(bus)
    err = _refused(tls_client(server, "site-a", pki.sites["site-a"], bus=bus), rec)
    assert err.kind == "host_name"
    assert err.reason.startswith("host name mismatch") and "'127.0.0.1'" in err.reason
    assert not server.sites
    # The same server reached by the name in its certificate would be fine: it is the name.
    ok = start_secure_server()
    tls_client(ok, "site-a", pki.sites["site-a"], host="localhost").connect_to_server(
        {"heart_beat": False}
    )
    assert "site-a" in ok.sites


def test_a_site_not_in_the_federation_is_refused(pki, start_secure_server):
    server = start_secure_server()
    err = _refused(tls_client(server, "site-x", pki.sites["site-x"]))
    assert err.kind == "not_in_federation"
    assert "site not in the federation: 'site-x' is not one of the sites" in err.reason
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    assert not server.sites


def test_site_a_certificate_registering_as_site_b_is_refused(pki, start_secure_server):
    server = start_secure_server()
    err = _refused(tls_client(server, "site-b", pki.sites["site-a"]))
    assert err.kind == "name_mismatch"
    assert "certificate is for 'site-a' but it registers as 'site-b'" in err.reason
    assert not server.sites
    # An admin's certificate is not a site's either.
    err = _refused(tls_client(server, "site-a", pki.admin))
    assert err.kind == "role" and "wrong certificate role" in err.reason


def test_a_token_from_one_session_is_refused_on_another(pki, start_secure_server):
    server = start_secure_server()
    a = tls_client(server, "site-a", pki.sites["site-a"])
    b = tls_client(server, "site-b", pki.sites["site-b"])
    a.connect_to_server({"heart_beat": False})
    b.connect_to_server({"heart_beat": False})
    token_a, token_b = a.token, b.token
    assert token_a and token_b and token_a != token_b

    def heartbeat(kit: Kit, token: str, name: str = "site-b") -> grpc.RpcError | None:
        channel = _channel(server, kit)
        try:
            FederatedStub(channel).Heartbeat(
                pb.ClientState(client_name=name, token=token, meta=pb.ModelMetaData(task=TASK)),
                metadata=((TOKEN_HEADER, token),),
                timeout=5,
            )
            return None
        except grpc.RpcError as exc:
            return exc
        finally:
            channel.close()

    assert heartbeat(pki.sites["site-b"], token_b) is None
    # site-a's token over site-b's certificate, the message naming site-a as the token does:
    # only the certificate binding can refuse it; the token is not echoed.
    exc = heartbeat(pki.sites["site-b"], token_a, name="site-a")
    assert exc is not None and exc.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "the site named in this connection's certificate" in exc.details()
    assert token_a not in exc.details()
    # with site-b's name in the message as well: refused too
    exc = heartbeat(pki.sites["site-b"], token_a)
    assert exc is not None and exc.code() == grpc.StatusCode.UNAUTHENTICATED
    assert exc.details().startswith("token refused") and token_a not in exc.details()
    # ... on the admin channel too.
    channel = _channel(server, pki.sites["site-b"])
    with pytest.raises(grpc.RpcError) as info:
        admin_pb2_grpc.AdminCommunicatingStub(channel).Retrieve(
            apb.Client(client_name=token_a), metadata=((TOKEN_HEADER, token_a),), timeout=5
        )
    channel.close()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert info.value.details().startswith("token refused")
    # site-a registers again: a new session, and the old session's token is dead.
    a.register()
    assert a.token != token_a
    exc = heartbeat(pki.sites["site-a"], token_a)
    assert exc is not None and exc.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Unknown client identity" in exc.details()
    assert heartbeat(pki.sites["site-a"], a.token) is not None  # the state names site-b...
    # ...but with its own name, the new token works.
    channel = _channel(server, pki.sites["site-a"])
    FederatedStub(channel).Heartbeat(pb.ClientState(client_name="site-a", token=a.token), timeout=5)
    channel.close()


def test_a_plaintext_client_against_a_tls_server_gets_the_clear_error(pki, start_secure_server):
    server = start_secure_server()
    bus = EventBus()
    rec = Recorder(bus)
    err = _refused(tls_client(server, "site-a", None, secure=False, bus=bus), rec)
    assert err.kind == "plaintext_to_tls"
    assert err.reason.startswith("plaintext client speaking to a TLS server")
    assert not server.sites


def test_a_tls_client_against_a_plaintext_server_gets_the_clear_error(pki, start_server):
    server = start_server(model())
    err = _refused(tls_client(server, "site-a", pki.sites["site-a"]))
    assert err.kind == "tls_to_plaintext"
    assert "does not speak TLS" in err.reason


def test_admin_channel_runs_over_mutual_tls_with_the_token_and_the_admin_named_by_certificate(
    pki, start_secure_server, tmp_path
):
    from engine.admin_defs import Message, MsgHeader, ok_reply, reply_to
    from fltui.admin import AdminConsole

    server = start_secure_server()
    site = tls_client(server, "site-a", pki.sites["site-a"])
    site.connect_to_server({"heart_beat": False})
    kit = pki.sites["site-a"]
    sender = AdminMessageSender(
        lambda: site.token or "",
        root_cert=str(kit.root_cert),
        ssl_cert=str(kit.cert),
        private_key=str(kit.key),
        server_args={"target": f"127.0.0.1:{server.port}"},
        secure=True,
    )
    admin_kit = tmp_path / "admin"
    (admin_kit / "startup").mkdir(parents=True)
    import json

    (admin_kit / "startup" / "fed_admin.json").write_text(
        json.dumps(
            {
                "admin": {
                    "name": "mallory",  # the server believes the certificate, not this
                    "target": f"127.0.0.1:{server.port}",
                    "ssl_root_cert": str(pki.admin.root_cert),
                    "ssl_cert": str(pki.admin.cert),
                    "ssl_private_key": str(pki.admin.key),
                }
            }
        )
    )
    console = AdminConsole(admin_kit)
    assert console.config.secure
    replies: list = []
    t = threading.Thread(
        target=lambda: replies.append(console.execute("check_status client site-a", timeout=20))
    )
    t.start()
    got: list[Message] = []
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        got = sender.retrieve_requests()
        time.sleep(0.05)
    assert got, "the site never received the admin's request"
    assert got[0].get_header(MsgHeader.USER_NAME) == ADMIN
    reply = ok_reply(body="status: fine")
    reply_to(got[0], reply)
    sender.send_reply(reply)
    t.join(timeout=20)
    assert replies and replies[0].ok and "site-a: status: fine" in replies[0].text
    sender.close()
    console.close()
