"""A federation with homomorphic encryption over loopback gRPC: 3 sites, 2 rounds, CKKS on.

Provisioned by ``engine.provision`` (one TenSEAL context: the sites' with the secret key, the
server's without); the sites encrypt Δ·n_iter (ModelEncryptor), the server adds ciphertexts and
multiplies by 1/Σn_iter, the sites decrypt (ModelDecryptor). The model decrypted at a site must
be the plaintext FedAvg of the same updates within CKKS error, and the server must never hold
the secret key, in its files or in its memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tenseal")

from engine import he
from engine.client import FLCommunicationError
from engine.client.data_processors import ModelDecryptor, ModelEncryptor
from engine.config import ConfigError, ServerConfig
from engine.fileio import load_npz
from engine.provision import load_project, provision
from engine.server import FederatedServer
from tests.conftest import TASK, direct_client

SITES = ("site-a", "site-b", "site-c")
CKKS_TOL = 1e-3  # CKKS at scale 2^40 is good to ~1e-6 on these magnitudes; generous bound


def _kits(tmp_path: Path) -> Path:
    project = tmp_path / "project.json"
    project.write_text(
        json.dumps(
            {
                "name": TASK,
                "server": {"name": "localhost"},
                "fl_clients": [{"client_name": s} for s in SITES],
                "homomorphic_encryption": {},
            }
        )
    )
    out = tmp_path / "kits"
    provision(load_project(project), out)
    return out


def _model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((16, 8)).astype(np.float32),
        "b": rng.standard_normal(8).astype(np.float32),
        "steps": np.array(3, dtype=np.int64),  # not a float: travels in the clear
    }


def _server(kits: Path, init: dict[str, np.ndarray], **config: object) -> FederatedServer:
    cfg = ServerConfig(task_name=TASK, target="127.0.0.1:0", **config)  # type: ignore[arg-type]
    server = FederatedServer(cfg, kits / "server", init, long_poll=0.5)
    server.start()
    return server


def _he_client(server: FederatedServer, kits: Path, site: str, **enc: object):
    ctx = str(kits / "sites" / site / "startup" / he.CLIENT_CONTEXT)
    return direct_client(
        server,
        site,
        pre_processors=[ModelEncryptor(tenseal_context_file=ctx, **enc)],
        post_processors=[ModelDecryptor(tenseal_context_file=ctx)],
    )


def test_provisioned_contexts_site_has_the_secret_key_owner_only_server_has_none(tmp_path):
    kits = _kits(tmp_path)
    server_ctx = kits / "server" / "startup" / he.SERVER_CONTEXT
    assert not he.load_context(server_ctx, "server").is_private()
    assert not list((kits / "server").rglob(he.CLIENT_CONTEXT))
    for site in SITES:
        path = kits / "sites" / site / "startup" / he.CLIENT_CONTEXT
        assert path.stat().st_mode & 0o777 == 0o600
        assert he.load_context(path, "site").is_private()
    # refusals: a site context without a key, a server context with one, a readable key
    with pytest.raises(he.HEError, match="no secret key"):
        he.load_context(server_ctx, "site")
    site_ctx = kits / "sites" / SITES[0] / "startup" / he.CLIENT_CONTEXT
    with pytest.raises(he.HEError, match="secret key; the server must never"):
        he.load_context(site_ctx, "server")
    site_ctx.chmod(0o644)
    with pytest.raises(he.HEError, match="chmod 600"):
        he.load_context(site_ctx, "site")


def test_three_sites_two_rounds_encrypted_fedavg_matches_plaintext(tmp_path):
    kits = _kits(tmp_path)
    init = _model()
    server = _server(kits, {k: v.copy() for k, v in init.items()}, min_num_clients=3, num_rounds=2)
    try:
        assert server.he_context is not None and not server.he_context.is_private()
        clients = [_he_client(server, kits, s) for s in SITES]
        rng = np.random.default_rng(1)
        expect = {k: v.astype(np.float64) for k, v in init.items()}
        for rnd in range(2):
            got = [c.pull_models_from_server() for c in clients]
            for g in got:
                for name in ("w", "b"):
                    np.testing.assert_allclose(g[name], expect[name], atol=CKKS_TOL)
                    assert g[name].dtype == np.float32 and g[name].shape == init[name].shape
            n_iters = [10, 30, 20]
            deltas = [
                {
                    "w": rng.standard_normal((16, 8)).astype(np.float32),
                    "b": rng.standard_normal(8).astype(np.float32),
                    "steps": np.array(i + 1, np.int64),
                }
                for i in range(3)
            ]
            for c, d, n in zip(clients, deltas, n_iters, strict=True):
                c.push_models_to_server(d, {"n_iter": n})
            assert server.current_round == rnd + 1
            total = sum(n_iters)
            for name in expect:
                expect[name] = (
                    expect[name]
                    + sum(
                        n * d[name].astype(np.float64) for d, n in zip(deltas, n_iters, strict=True)
                    )
                    / total
                )
            expect["steps"] = np.rint(expect["steps"])
            # the server holds ciphertexts of the float variables, plaintext for the counter
            assert he.is_ciphertext(server.global_model["w"])
            assert he.is_ciphertext(server.global_model["b"])
            assert not he.is_ciphertext(server.global_model["steps"])
        final = clients[0].pull_models_from_server()
        for name in ("w", "b"):
            assert np.max(np.abs(final[name] - expect[name])) < CKKS_TOL
        assert int(final["steps"]) == int(expect["steps"])
        # the saved global model is encrypted too (bytes, not the floats)
        saved = load_npz(server.workspace / "models" / "global_model.npz")
        assert saved["w"].dtype == np.uint8
        # no file of the server's workspace holds a secret key
        ts = he.tenseal()
        for path in server.workspace.rglob("*"):
            assert path.name != he.CLIENT_CONTEXT
            if path.is_file() and path.suffix == ".tenseal":
                assert not ts.context_from(path.read_bytes()).is_private()
    finally:
        server.stop(grace=0)


def test_encrypt_layers_leaves_other_variables_in_the_clear(tmp_path):
    kits = _kits(tmp_path)
    init = _model()
    server = _server(kits, init, min_num_clients=1, num_rounds=1)
    try:
        c = _he_client(server, kits, "site-a", encrypt_layers="^w$")
        c.pull_models_from_server()
        d = {k: np.ones_like(v) for k, v in init.items()}
        c.push_models_to_server(d, {"n_iter": 4})
        assert he.is_ciphertext(server.global_model["w"])
        assert not he.is_ciphertext(server.global_model["b"])
        got = c.pull_models_from_server()
        np.testing.assert_allclose(got["w"], init["w"] + 1, atol=CKKS_TOL)
        np.testing.assert_allclose(got["b"], init["b"] + 1, atol=1e-6)
    finally:
        server.stop(grace=0)


def test_mixed_federation_is_refused_with_the_reason(tmp_path):
    kits = _kits(tmp_path)
    init = _model()
    server = _server(kits, init, min_num_clients=2, num_rounds=1)
    try:
        plain = direct_client(server, "site-b")
        plain.pull_models_from_server()
        with pytest.raises(FLCommunicationError, match="aggregates encrypted updates"):
            plain.push_models_to_server({k: np.ones_like(v) for k, v in init.items()})
    finally:
        server.stop(grace=0)
    # the reverse: an encrypting site, a server provisioned without HE
    (kits / "server" / "startup" / he.SERVER_CONTEXT).unlink()
    server = _server(kits, init, min_num_clients=1, num_rounds=1)
    try:
        assert server.he_context is None
        enc = _he_client(server, kits, "site-a")
        enc.pull_models_from_server()
        with pytest.raises(FLCommunicationError, match="not provisioned for it"):
            enc.push_models_to_server({k: np.ones_like(v) for k, v in init.items()})
    finally:
        server.stop(grace=0)


def test_server_refuses_to_start_with_a_secret_key(tmp_path):
    kits = _kits(tmp_path)
    startup = kits / "server" / "startup"
    site_ctx = kits / "sites" / SITES[0] / "startup" / he.CLIENT_CONTEXT
    # a server context that holds the secret key
    (startup / he.SERVER_CONTEXT).write_bytes(site_ctx.read_bytes())
    cfg = ServerConfig(task_name=TASK, target="127.0.0.1:0")
    with pytest.raises(ConfigError, match="secret key; the server must never hold it"):
        FederatedServer(cfg, kits / "server", _model())
    # a site's context lying in the server's workspace
    (startup / he.SERVER_CONTEXT).unlink()
    (startup / he.CLIENT_CONTEXT).write_bytes(site_ctx.read_bytes())
    with pytest.raises(ConfigError, match="must never hold it"):
        FederatedServer(cfg, kits / "server", _model())


def test_site_without_the_key_is_refused(tmp_path):
    kits = _kits(tmp_path)
    missing = ModelEncryptor(tenseal_context_file=str(tmp_path / "nowhere.tenseal"))
    with pytest.raises(he.HEError, match="cannot read the HE context"):
        missing.tenseal_context()
    public = ModelDecryptor(
        tenseal_context_file=str(kits / "server" / "startup" / he.SERVER_CONTEXT)
    )
    with pytest.raises(he.HEError, match="no secret key"):
        public.tenseal_context()
