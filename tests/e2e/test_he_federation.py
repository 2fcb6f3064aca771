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


def _he_client(
    server: FederatedServer, kits: Path, site: str, client_args: dict | None = None, **enc: object
):
    ctx = str(kits / "sites" / site / "startup" / he.CLIENT_CONTEXT)
    return direct_client(
        server,
        site,
        client_args=client_args or {},
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


def test_mixed_federation_is_refused_at_registration_with_the_reason(tmp_path):
    kits = _kits(tmp_path)
    init = _model()
    ctx = str(kits / "sites" / "site-a" / "startup" / he.CLIENT_CONTEXT)
    server = _server(kits, init, min_num_clients=2, num_rounds=1)
    try:
        with pytest.raises(FLCommunicationError, match="add ModelEncryptor to its pre_proc"):
            direct_client(server, "site-b")
        with pytest.raises(FLCommunicationError, match="does not take part in it: add ModelD"):
            direct_client(
                server, "site-b", pre_processors=[ModelEncryptor(tenseal_context_file=ctx)]
            )
        assert not server.sites  # refused before a token was handed out
        # A site that does not say (older than the flag) is still refused at its first upload.
        late = _he_client(server, kits, "site-a")
        late.pull_models_from_server()
        late.pre_processors.clear()
        with pytest.raises(FLCommunicationError, match="aggregates encrypted updates"):
            late.push_models_to_server({k: np.ones_like(v) for k, v in init.items()})
    finally:
        server.stop(grace=0)
    # the reverse: an encrypting site, a server provisioned without HE
    (kits / "server" / "startup" / he.SERVER_CONTEXT).unlink()
    server = _server(kits, init, min_num_clients=1, num_rounds=1)
    try:
        assert server.he_context is None
        with pytest.raises(FLCommunicationError, match="not provisioned for it"):
            _he_client(server, kits, "site-a")
        direct_client(server, "site-b").pull_models_from_server()  # a plaintext site is welcome
    finally:
        server.stop(grace=0)


class _BestFitter:
    """A stand-in fitter: its best local weights, and a metric of any model validated."""

    def __init__(self, best: dict[str, np.ndarray]) -> None:
        self.best = best
        self.seen: list[dict[str, np.ndarray]] = []

    def best_weights(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.best.items()}

    def validate(self, checkpoint, after_training=False):
        self.seen.append(checkpoint)
        return {"w_sum": float(np.sum(checkpoint["w"], dtype=np.float64))}


def _one_round(server, clients, init):
    for c in clients:
        c.pull_models_from_server()
    for i, c in enumerate(clients):
        c.push_models_to_server({k: np.full_like(v, i + 1) for k, v in init.items()}, {"n_iter": 1})
    assert server.finished


def test_cross_site_validation_sites_exchange_encrypted_best_models(tmp_path):
    import threading  # deferred: only this test runs sites side by side

    kits = _kits(tmp_path)
    init = _model()
    server = _server(kits, init, min_num_clients=2, num_rounds=1)
    sites = SITES[:2]
    try:
        clients = [_he_client(server, kits, s, client_args={"cross_val_poll": 0.05}) for s in sites]
        _one_round(server, clients, init)
        final = clients[0].pull_models_from_server()
        rng = np.random.default_rng(5)
        bests = {
            s: {k: (v + rng.standard_normal(v.shape)).astype(v.dtype) for k, v in init.items()}
            for s in sites
        }
        fitters = {}
        for c in clients:
            fitters[c.client_name] = _BestFitter(bests[c.client_name])
            c.model_manager.set_fitter(fitters[c.client_name])
        results: dict[str, dict] = {}
        threads = [
            threading.Thread(
                target=lambda c=c: results.update({c.client_name: c.run_cross_site_validation()})
            )
            for c in clients
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        # every site validated both best models and the server's, all decrypted at the site
        for s in sites:
            assert set(results[s]) == {*sites, "server"}
            for owner in sites:
                want = float(np.sum(bests[owner]["w"], dtype=np.float64))
                assert abs(results[s][owner]["w_sum"] - want) < 1e-2
            want = float(np.sum(final["w"], dtype=np.float64))
            assert abs(results[s]["server"]["w_sum"] - want) < 1e-2
            assert all(not he.is_ciphertext(v) for m in fitters[s].seen for v in m.values())
        # the server stored and forwarded ciphertexts only: no site's weights in the clear
        for s in sites:
            stored = load_npz(server.workspace / "cross_site" / s / "best_model.npz")
            assert stored["w"].dtype == np.uint8 and stored["b"].dtype == np.uint8
            assert he.is_ciphertext(server.best_models[s]["w"])
        assert set(server.cross_val_results_snapshot()) == set(sites)
    finally:
        server.stop(grace=0)


def test_plaintext_best_model_is_refused_by_an_encrypted_federation(tmp_path):
    kits = _kits(tmp_path)
    init = _model()
    server = _server(kits, init, min_num_clients=1, num_rounds=1)
    try:
        c = _he_client(server, kits, "site-a")
        _one_round(server, [c], init)
        c.model_manager.set_fitter(_BestFitter(init))
        c.he_encryptor = None  # a site that would send its best model in the clear
        with pytest.raises(FLCommunicationError, match="best local model is plaintext"):
            c.push_best_model(c.task_name)
        assert "site-a" not in server.best_models
    finally:
        server.stop(grace=0)


def test_site_without_model_decryptor_is_told_what_to_add(tmp_path):
    kits = _kits(tmp_path)
    init = _model()
    server = _server(kits, init, min_num_clients=1, num_rounds=2)
    try:
        c = _he_client(server, kits, "site-a")
        c.pull_models_from_server()
        c.push_models_to_server({k: np.ones_like(v) for k, v in init.items()}, {"n_iter": 1})
        # the site loses its ModelDecryptor after registering (an older site, a config edit)
        c.communicator.post_processors.clear()
        c.he_decryptor = None
        with pytest.raises(he.HEError, match=r'add \{"name": "ModelDecryptor"\} to the post_p'):
            c.pull_models_from_server()
    finally:
        server.stop(grace=0)


def test_restarted_server_reloads_its_encrypted_model_as_encrypted(tmp_path):
    kits = _kits(tmp_path)
    init = _model()
    server = _server(kits, init, min_num_clients=1, num_rounds=3)
    try:
        c = _he_client(server, kits, "site-a")
        c.pull_models_from_server()
        c.push_models_to_server({k: np.ones_like(v) for k, v in init.items()}, {"n_iter": 2})
        assert server.current_round == 1
    finally:
        server.stop(grace=0)
    cfg = ServerConfig(task_name=TASK, target="127.0.0.1:0", min_num_clients=1, num_rounds=3)
    again = FederatedServer(cfg, kits / "server", init, long_poll=0.5, resume=True)
    again.start()
    try:
        assert again.current_round == 1
        assert he.is_ciphertext(again.global_model["w"])
        assert not he.is_ciphertext(again.global_model["steps"])
        c = _he_client(again, kits, "site-a")
        got = c.pull_models_from_server()
        np.testing.assert_allclose(got["w"], init["w"] + 1, atol=CKKS_TOL)
        c.push_models_to_server({k: np.ones_like(v) for k, v in init.items()}, {"n_iter": 2})
        np.testing.assert_allclose(c.pull_models_from_server()["w"], init["w"] + 2, atol=CKKS_TOL)
    finally:
        again.stop(grace=0)
    # the saved model is encrypted: a server without the HE context refuses to resume it
    (kits / "server" / "startup" / he.SERVER_CONTEXT).unlink()
    with pytest.raises(ConfigError, match="saved global model is encrypted"):
        FederatedServer(cfg, kits / "server", init, resume=True)


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


def test_check_config_server_folder_and_site_workspace_he_contexts(tmp_path):
    from fltui.check_config import check_path  # deferred: the console's checker, only here

    kits = _kits(tmp_path)
    assert not check_path(kits / "server").problems
    site = kits / "sites" / "site-a"
    assert not [p for p in check_path(site).problems if "tenseal" in str(p)]
    # a server folder holding a secret key: a site's context, or a server context with one
    secret = site / "startup" / he.CLIENT_CONTEXT
    (kits / "server" / "startup" / he.SERVER_CONTEXT).write_bytes(secret.read_bytes())
    lines = [str(p) for p in check_path(kits / "server").problems]
    assert any("server_context.tenseal" in x and "must never hold it" in x for x in lines)
    # a site whose context has no secret key, or is readable by others
    public = kits / "sites" / "site-b" / "startup" / he.CLIENT_CONTEXT
    public.write_bytes(he.tenseal().context_from(secret.read_bytes()).serialize())
    secret.chmod(0o644)
    assert any("chmod 600" in str(p) for p in check_path(site).problems)
    ctx = he.tenseal().context_from(public.read_bytes())
    ctx.make_context_public()
    public.write_bytes(ctx.serialize())
    lines = [str(p) for p in check_path(kits / "sites" / "site-b").problems]
    assert any("no secret key" in x for x in lines)
