"""Homomorphic encryption with real processes: ``fltui provision``, ``fltui server`` and three
``fltui --no-ui`` sites, 2 rounds, ModelEncryptor / ModelDecryptor on (issue 20, "Must show").

Each site's MMAR (the bundled demo, on a small data set) lists its own pre-processor before
ModelEncryptor, which writes the plaintext Δ and n_iter the site is about to encrypt, and one
after ModelDecryptor, which writes the global model the site decrypted (BYO code: the sites'
``site_policy.json`` allows it). The model decrypted in round 2 must be the plaintext FedAvg of
the round-1 Δs within CKKS error. The server process runs under an audit hook that logs every
file it opens and every TenSEAL context it loads: it never opens a site's context, never holds a
context with a secret key, and no file of its workspace holds one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tenseal")
pytest.importorskip("torch")

from engine import he
from engine.training import demo_mmar_path

ROOT = Path(__file__).resolve().parents[2]
SITES = ("site-1", "site-2", "site-3")
TASK = "he_processes"
CKKS_TOL = 1e-4  # CKKS at 2^40 is good to ~1e-6 here (the bench's max error is 5e-7)

# The sites' own processors (custom/he_probe.py): what goes into the encryptor, what comes out
# of the decryptor, one .npz per call in PROBE_DIR.
PROBE = """
import os, time
import numpy as np

class Probe:
    def __init__(self, what):
        self.what = what

    def process(self, data_ctx, app_ctx):
        out = os.environ["PROBE_DIR"]
        mmar = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        site = mmar[len("mmar_"):]
        n = sum(1 for f in os.listdir(out) if f.startswith(f"{site}-{self.what}-"))
        model = {k: np.array(v) for k, v in data_ctx.model.items()}
        n_iter = int(getattr(data_ctx.header, "n_iter", 0) or 0)
        np.savez(os.path.join(out, f"{site}-{self.what}-{n}.npz"), __n_iter=n_iter, **model)
"""

# Runs `fltui server` with an audit hook: every file opened, every TenSEAL context loaded.
SERVER_SPY = """
import sys
log = open(sys.argv[1], "w", buffering=1)
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, __import__("os").PathLike)):
        log.write("open " + __import__("os").fsdecode(args[0]) + "\\n")
sys.addaudithook(hook)
import tenseal
real = tenseal.context_from
def context_from(*a, **k):
    ctx = real(*a, **k)
    log.write(f"context private={ctx.is_private()} secret={ctx.has_secret_key()}\\n")
    return ctx
tenseal.context_from = context_from
from fltui.__main__ import main
sys.argv = ["fltui", *sys.argv[2:]]
main()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mmar(dst: Path) -> None:
    """The demo MMAR, small, with the probes around the HE processors and no cross-site run."""
    shutil.copytree(demo_mmar_path(), dst)
    train = json.loads((dst / "config" / "config_train.json").read_text())
    train["train_data"]["args"]["samples"] = 900
    train["validation_data"]["args"]["samples"] = 90
    (dst / "config" / "config_train.json").write_text(json.dumps(train))
    fed = json.loads((dst / "config" / "config_fed_client.json").read_text())
    fed["servers"][0]["name"] = TASK
    client = fed["client"]
    client["cross_site_validate"] = False
    client["pre_processors"] += [
        {"path": "he_probe.Probe", "args": {"what": "delta"}},
        {"name": "ModelEncryptor", "args": {}},
    ]
    client["post_processors"] = [
        {"name": "ModelDecryptor", "args": {}},
        {"path": "he_probe.Probe", "args": {"what": "global"}},
    ]
    (dst / "config" / "config_fed_client.json").write_text(json.dumps(fed))
    (dst / "custom" / "he_probe.py").write_text(PROBE)


def _provision(tmp: Path, port: int) -> Path:
    project = {
        "name": TASK,
        "server": {
            "name": "localhost",
            "host_names": ["127.0.0.1"],
            "port": port,
            "min_num_clients": len(SITES),
            "num_rounds": 2,
        },
        "fl_clients": [{"name": s} for s in SITES],
        "homomorphic_encryption": {},
    }
    (tmp / "project.json").write_text(json.dumps(project))
    kits = tmp / "kits"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fltui",
            "provision",
            "--project",
            str(tmp / "project.json"),
            "--out",
            str(kits),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(tmp),
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return kits


def _env(tmp: Path) -> dict[str, str]:
    probes = tmp / "probes"
    probes.mkdir(exist_ok=True)
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "PROBE_DIR": str(probes),
    }


def _load(path: Path) -> tuple[dict[str, np.ndarray], int]:
    with np.load(path) as f:
        model = {k: f[k] for k in f.files if k != "__n_iter"}
        return model, int(f["__n_iter"])


@pytest.mark.slow
def test_three_site_processes_decrypt_the_fedavg_and_the_server_never_holds_the_key(
    tmp_path: Path,
) -> None:
    port = _free_port()
    kits = _provision(tmp_path, port)
    env = _env(tmp_path)
    mmar = tmp_path / "mmar"
    _mmar(mmar)
    for site in SITES:
        ws = kits / "sites" / site
        policy = json.loads((ws / "startup" / "site_policy.json").read_text())
        (ws / "startup" / "site_policy.json").write_text(json.dumps({**policy, "allow_byoc": True}))
        shutil.copytree(mmar, ws / "run_1" / f"mmar_{site}")
        (ws / "run_1" / "fl_app.txt").write_text("mmar\n")

    spy_log = tmp_path / "server-spy.log"
    (tmp_path / "spy.py").write_text(SERVER_SPY)
    server_cmd = [sys.executable, str(tmp_path / "spy.py"), str(spy_log), "server", "--no-ui"]
    server = subprocess.Popen(
        [*server_cmd, "--workspace", str(kits / "server"), "--mmar", str(mmar)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    sites: list[subprocess.Popen[str]] = []
    try:
        assert server.stdout is not None
        lines: list[str] = []
        for line in server.stdout:
            lines.append(line)
            if re.search(r"server listening on port (\d+)", line):
                break
        assert any("listening" in x for x in lines), "".join(lines)
        reader = threading.Thread(target=lambda: lines.extend(server.stdout), daemon=True)
        reader.start()
        launch = ["-m", "fltui"]  # the site as shipped: its service, its training worker
        for site in SITES:
            sites.append(
                subprocess.Popen(
                    [sys.executable, *launch, "--no-ui", "--workspace", str(kits / "sites" / site)],
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env=env,
                )
            )
        outs = [p.communicate(timeout=420)[0] for p in sites]
        for site, p, out in zip(SITES, sites, outs, strict=True):
            assert p.returncode == 0, f"{site}:\n{out[-4000:]}"
            assert "round 2/2 completed" in out, f"{site}:\n{out[-4000:]}"
        assert server.wait(timeout=60) == 0, "".join(lines)[-4000:]
        reader.join(timeout=5)
    finally:
        for p in [*sites, server]:
            if p.poll() is None:
                p.kill()
                p.wait()
    log = "".join(lines)
    assert "round 2/2 aggregated from" in log, log[-4000:]

    # What each site encrypted in round 1 (Δ, n_iter), and the global models it decrypted.
    probes = tmp_path / "probes"
    deltas = {s: _load(probes / f"{s}-delta-0.npz") for s in SITES}
    assert {n for _, n in deltas.values()} != {0}
    initial, _ = _load(probes / f"{SITES[0]}-global-0.npz")
    total = sum(n for _, n in deltas.values())
    expect = {
        k: initial[k].astype(np.float64)
        + sum(n * d[k].astype(np.float64) for d, n in deltas.values()) / total
        for k in deltas[SITES[0]][0]
    }
    assert expect and all(np.issubdtype(v.dtype, np.floating) for v in initial.values())
    for site in SITES:
        got, _ = _load(probes / f"{site}-global-1.npz")  # the round-2 model, decrypted here
        assert set(got) == set(expect)
        for k, v in expect.items():
            assert got[k].shape == v.shape and got[k].dtype == initial[k].dtype
            err = float(np.max(np.abs(got[k].astype(np.float64) - v)))
            assert err < CKKS_TOL, (site, k, err)
        moved = max(float(np.max(np.abs(got[k] - initial[k]))) for k in got)
        assert moved > 100 * CKKS_TOL  # the check is not vacuous: training moved the model

    # The server: never opened a site's context, loaded only its own public one, and no file
    # of its workspace holds the secret key.
    spy = spy_log.read_text()
    opened = [ln[5:] for ln in spy.splitlines() if ln.startswith("open ")]
    assert not [p for p in opened if he.CLIENT_CONTEXT in p or "/sites/" in p]
    assert any(p.endswith(he.SERVER_CONTEXT) for p in opened), spy[-2000:]
    contexts = [ln for ln in spy.splitlines() if ln.startswith("context ")]
    assert contexts and set(contexts) == {"context private=False secret=False"}, contexts
    ts = he.tenseal()
    secret = (kits / "sites" / SITES[0] / "startup" / he.CLIENT_CONTEXT).read_bytes()
    assert ts.context_from(secret).is_private()
    server_files = [p for p in (kits / "server").rglob("*") if p.is_file()]
    assert not [p for p in server_files if p.name == he.CLIENT_CONTEXT]
    for path in server_files:
        data = path.read_bytes()
        assert secret not in data, path
        if path.suffix == ".tenseal":
            assert not ts.context_from(data).is_private(), path
    # The saved global model is ciphertext: the server could not have read it either.
    with np.load(kits / "server" / "models" / "global_model.npz") as f:
        saved = {k: f[k] for k in f.files}
    marked = he.mark_ciphertexts(saved)
    assert any(he.is_ciphertext(v) for v in marked.values())
