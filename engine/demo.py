"""The demo federation: a reference server and N sites on loopback, this process being site-1."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import ConfigError, load_client_kit, load_server_config
from engine.events import Event, EventBus, LogRecord, event_from_dict
from engine.fileio import load_npz, save_json_atomic, tail_text
from engine.provision import (
    CertificateAuthority,
    issue_identity,
    server_tls_settings,
    site_tls_settings,
)
from engine.server import FederatedServer
from engine.site.deploy import code_refusal
from engine.site.lock import SessionClaim
from engine.site.logs import attach_workspace_logs
from engine.site.paths import SitePaths
from engine.site.site_service import SiteService
from engine.tls import ROLE_ADMIN, ROLE_SERVER, ROLE_SITE
from engine.training import demo_mmar_path
from engine.training.initial_model import write_initial_model

__all__ = [
    "TASKS",
    "DemoFederation",
    "DemoResult",
    "mmar_task_name",
    "prepare_workspace",
    "task_mmar",
]

log = logging.getLogger("engine.demo")

TASK = "demo_federation"
#: The demo's tasks: the MMAR each deploys to every site, unchanged.
TASKS = ("classification", "segmentation")
#: Each segmentation site's synthetic volumes (MONAI's generators): small enough that a round
#: takes seconds on two CPU cores, and a different seed per site so that the sites differ.
SEGMENTATION_DATA = {"n_train": 8, "n_validation": 4, "size": 32, "dims": 3}
#: A segmentation site's own settings (``<site>/local/environment.json``): the one MMAR reads
#: each site's data from the site's ``local/data/`` (relative to ``local/``).
SEGMENTATION_ENVIRONMENT = {"DATA_ROOT": "data", "DATASET_JSON": "data/datalist.json"}
PEER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ADMIN = "admin@demo"
# The demo's server listens on loopback: its certificate is valid for both spellings.
DEMO_HOST_NAMES = ("localhost", "127.0.0.1")


def _site_names(num_sites: int) -> list[str]:
    return [f"site-{i}" for i in range(1, num_sites + 1)]


def task_mmar(task: str) -> Path:
    """The bundled MMAR of one of the demo's ``TASKS``."""
    if task not in TASKS:
        raise ValueError(f"unknown demo task {task!r} (tasks: {', '.join(TASKS)})")
    demo = demo_mmar_path()
    return demo if task == "classification" else demo.parent / "seg_mmar"


def mmar_task_name(mmar: Path) -> str:
    """The federation's task an MMAR trains for: ``servers[0].name`` of its
    ``config/config_fed_client.json`` (what its sites ask the server for).

    Raises:
        ConfigError: the MMAR is no folder, or the file is missing or names no task.
    """
    if not mmar.is_dir():
        raise ConfigError(mmar, "", "not a folder: give the MMAR's folder")
    path = mmar / "config" / "config_fed_client.json"
    if not path.is_file():
        raise ConfigError(path, "", "file not found: an MMAR for federated training has one")
    try:
        name = json.loads(path.read_text())["servers"][0]["name"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ConfigError(path, "servers[0].name", f"expected the task's name ({exc})") from exc
    if not isinstance(name, str) or not name:
        raise ConfigError(path, "servers[0].name", "expected the task's name (a string)")
    return name


def prepare_workspace(
    root: Path,
    num_sites: int = 3,
    num_rounds: int = 5,
    heartbeat_interval: float = 5.0,
    torch_in_subprocess: bool = False,
    secure: bool = False,
    task: str = "classification",
    mmar: Path | None = None,
) -> None:
    """Lays out a demo federation under ``root``: ``server/`` and ``site-1/`` … ``site-N/``.

    Each site gets a startup kit (server port filled in by ``DemoFederation`` once the server
    listens), the MMAR offered in ``transfer/`` and deployed as run 1, unchanged: the bundled
    MMAR of ``task`` (``TASKS``), or ``mmar``. The federation's task name is the MMAR's
    (``servers[0].name`` of its ``config_fed_client.json``); the server's other settings come
    from the MMAR's ``config_fed_server.json``, else from the classification demo's.

    The ``segmentation`` task makes each site's synthetic NIfTI volumes and datalist at first
    run, in ``<site>/local/data/`` (a different seed per site; kept for later runs), with a
    ``<site>/local/environment.json`` that points the MMAR's ``DATA_ROOT`` and
    ``DATASET_JSON`` there. The initial model is the MMAR's own (its checkpoint, else its model
    component built alone): the server needs no data.

    With ``torch_in_subprocess`` the initial model and the data are made by a child process,
    so that this one (the console's) never imports torch. With ``secure`` the demo is
    provisioned as a real federation would be: a certificate authority in ``ca/``, certificates
    for the server (localhost, 127.0.0.1), each site and the admin, and mutual TLS on every
    connection.

    Raises:
        ConfigError: ``mmar`` is unusable, or the workspace holds a demo of another MMAR.
        ValueError: an unknown ``task``.
    """
    source = Path(mmar).resolve() if mmar is not None else task_mmar(task)
    task_name = mmar_task_name(source)
    mmar_name = source.name
    server_dir = root / "server"
    names = _site_names(num_sites)
    _check_same_mmar(root, names, mmar_name)
    # The demo is plaintext unless asked: a server is secure by default otherwise.
    server_tls: dict[str, Any] = {"secure_train": False}
    client_tls: dict[str, Any] = {"secure_train": False}
    if secure:
        _provision_demo(root, names)
        server_tls, client_tls = server_tls_settings(names, [ADMIN]), site_tls_settings()
    config: dict[str, Any] = {
        "format_version": 1,
        "servers": [
            {
                "name": task_name,
                "service": {"target": "127.0.0.1:0"},
                "min_num_clients": num_sites,
                "max_num_clients": num_sites + 8,
                "start_round": 0,
                "num_rounds": num_rounds,
                "heart_beat_timeout": 60,
                "wait_after_min_clients": 30,
                **server_tls,
            }
        ],
        "aggregator": {"name": "ModelAggregator", "args": {"exclude_vars": "dummy"}},
    }
    # The rest of the server's settings come from the MMAR's Clara 3.1 config_fed_server.json
    # (the classification demo's where the MMAR has none).
    server_file = source / "config" / "config_fed_server.json"
    if not server_file.is_file():
        server_file = demo_mmar_path() / "config" / "config_fed_server.json"
    try:
        clara = json.loads(server_file.read_text())
        clara_server = clara["servers"][0]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ConfigError(
            server_file, "servers[0]", f"expected the server's settings ({exc})"
        ) from exc
    config = {**clara, **config, "servers": [{**clara_server, **config["servers"][0]}]}
    save_json_atomic(server_dir / "config_fed_server.json", config)
    if not (server_dir / "models" / "initial_model.npz").exists():
        # The federation starts from the MMAR's own initial model (no data needed).
        scratch = server_dir / "mmar"
        if not scratch.exists():
            shutil.copytree(source, scratch)
        _make_initial_model(
            scratch, server_dir / "models" / "initial_model.npz", torch_in_subprocess
        )
    admin = root / "admin"
    save_json_atomic(
        admin / "startup" / "fed_admin.json",
        {
            "admin": {
                "name": ADMIN,
                "target": "127.0.0.1:0",
                **client_tls,
            }
        },
    )
    if not (admin / "transfer" / mmar_name).exists():
        shutil.copytree(source, admin / "transfer" / mmar_name)
    for name in names:
        paths = SitePaths(root / name)
        save_json_atomic(
            paths.kit,
            {
                "format_version": 1,
                "servers": [
                    {"name": task_name, "service": {"target": "127.0.0.1:0", "options": []}}
                ],
                "client": {
                    "client_name": name,
                    "retry_timeout": 30,
                    "heartbeat_interval": heartbeat_interval,
                    **client_tls,
                },
            },
        )
        offered = paths.transfer / mmar_name
        if not offered.exists():
            shutil.copytree(source, offered)
        deployed = paths.mmar(1, name)
        if not deployed.exists():
            shutil.copytree(source, deployed)
            (deployed.parent / "fl_app.txt").write_text(f"{mmar_name}\n")
    if mmar is not None:
        _allow_the_mmars_code(root, names, source)
    if task == "segmentation":
        _segmentation_sites(root, names, torch_in_subprocess)


def _allow_the_mmars_code(root: Path, names: list[str], mmar: Path) -> None:
    """A researcher's MMAR with its own code (custom/, a script, config expressions) runs in the
    demo: the demo's sites, all on this machine, allow it in their site policy, and say so. A
    real site decides that in its own startup/site_policy.json; a demo site's existing policy
    file is never replaced."""
    why = code_refusal(mmar, False, None)
    if why is None:
        return
    for name in names:
        policy = SitePaths(root / name).startup / "site_policy.json"
        if not policy.exists():
            save_json_atomic(policy, {"allow_byoc": True})
    log.warning(
        "demo: the sites allow this MMAR's own code (allow_byoc in their "
        "startup/site_policy.json), which the default policy refuses: %s",
        why,
    )


def _check_same_mmar(root: Path, names: list[str], mmar_name: str) -> None:
    """A demo workspace keeps its MMAR: a second run with another would mix two models."""
    for name in names:
        app = SitePaths(root / name).mmar(1, name).parent / "fl_app.txt"
        if app.is_file():
            deployed = app.read_text().strip()
            if deployed and deployed != mmar_name:
                raise ConfigError(
                    app,
                    "",
                    f"this demo workspace runs the MMAR {deployed!r}, not {mmar_name!r}: "
                    "give another --workspace (or none, for a fresh one)",
                )


def _make_initial_model(mmar: Path, out: Path, in_subprocess: bool) -> None:
    if not in_subprocess:
        write_initial_model(mmar, out)
        return
    proc = subprocess.run(
        [sys.executable, "-m", "engine.training.initial_model", str(mmar), str(out)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        # The child's last line is the TrainConfigError's (file, key, problem): say that.
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ConfigError(mmar, "", f"no initial model: {last.split('Error: ', 1)[-1]}")


# Run in a child process where this one must not import torch (the console's demo service).
_DATA_CODE = (
    "import json, sys\n"
    "from engine.training.segmentation import write_segmentation_data\n"
    "for folder, seed in json.loads(sys.argv[1]):\n"
    "    write_segmentation_data(folder, seed=seed, **json.loads(sys.argv[2]))\n"
)


def _segmentation_sites(root: Path, names: list[str], in_subprocess: bool) -> None:
    """Each site's own data in ``<site>/local/data/`` and its ``local/environment.json``."""
    missing: list[tuple[str, int]] = []
    for seed, name in enumerate(names, start=1):
        local = root / name / "local"
        if not (local / "environment.json").exists():  # the site's own file: never overwritten
            save_json_atomic(local / "environment.json", SEGMENTATION_ENVIRONMENT)
        if not (local / "data" / "datalist.json").is_file():
            missing.append((str(local / "data"), seed))
    if not missing:
        return  # made at first run, kept since
    log.info("making synthetic segmentation data for %d site(s)", len(missing))
    if in_subprocess:
        env = {**os.environ, **PEER_ENV}
        subprocess.run(
            [sys.executable, "-c", _DATA_CODE, json.dumps(missing), json.dumps(SEGMENTATION_DATA)],
            check=True,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        return
    from engine.training.segmentation import (  # deferred: MONAI and nibabel, only for this task
        write_segmentation_data,
    )

    for folder, seed in missing:
        write_segmentation_data(Path(folder), seed=seed, **SEGMENTATION_DATA)  # type: ignore[arg-type]


def _provision_demo(root: Path, sites: list[str]) -> None:
    """Certificates for the demo: one authority (kept across runs), fresh leaf certificates."""
    ca_cert, ca_key = root / "ca" / "rootCA.pem", root / "ca" / "rootCA.key"
    if ca_cert.exists() and ca_key.exists():
        ca = CertificateAuthority.load(ca_cert, ca_key)
    else:
        ca = CertificateAuthority.create(TASK)
        ca.save(ca_cert, ca_key)
    issue_identity(
        ca, root / "server" / "startup", "localhost", ROLE_SERVER, host_names=DEMO_HOST_NAMES
    )
    for name in sites:
        issue_identity(ca, SitePaths(root / name).startup, name, ROLE_SITE)
    issue_identity(ca, root / "admin" / "startup", ADMIN, ROLE_ADMIN)


def _set_port(kit: Path, port: int) -> None:
    data = json.loads(kit.read_text())
    for server in data["servers"]:
        server["service"]["target"] = f"127.0.0.1:{port}"
    save_json_atomic(kit, data)


def _set_admin_port(kit: Path, port: int) -> None:
    path = kit / "startup" / "fed_admin.json"
    data = json.loads(path.read_text())
    data["admin"]["target"] = f"127.0.0.1:{port}"
    save_json_atomic(path, data)


@dataclass
class DemoResult:
    """How the demo ended: per-site outcome and the server's history."""

    outcomes: dict[str, str] = field(default_factory=dict)
    server_finished: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.server_finished
            and bool(self.outcomes)
            and all(o == "completed" for o in self.outcomes.values())
        )


class DemoFederation:
    """Runs the demo: the server in this process, site-1 in this process, peers as children.

    Args:
        root: the demo workspace (created and laid out if needed).
        bus: where every event goes, the peers' included (relayed from their JSON output).
        num_sites: sites in the federation (site-1 is this one).
        num_rounds: rounds of FedAvg.
        secure: provision certificates into the workspace and run every connection (training,
            admin agent, admin console) over mutual TLS.
        task: one of ``TASKS``: the bundled MMAR and, for ``segmentation``, each site's data.
        mmar: federate this MMAR instead of the task's (see ``prepare_workspace``).
    """

    def __init__(
        self,
        root: Path,
        bus: EventBus,
        num_sites: int = 3,
        num_rounds: int = 5,
        torch_in_subprocess: bool = False,
        site_1_stays: bool = False,
        secure: bool = False,
        task: str = "classification",
        mmar: Path | None = None,
    ) -> None:
        if num_sites < 1:
            raise ValueError(f"the demo needs at least one site, got {num_sites}")
        self.root = Path(root)
        self.bus = bus
        self.num_sites = num_sites
        self.num_rounds = num_rounds
        self.torch_in_subprocess = torch_in_subprocess
        self.secure = secure
        task_mmar(task)  # an unknown task fails here, not once the federation is laid out
        self.task = task
        self.mmar = Path(mmar) if mmar is not None else None
        # Under a console, site-1 stays up after its training (abort, then start again).
        self.site_1_stays = site_1_stays
        self.peers: dict[str, subprocess.Popen[bytes]] = {}
        self._relays: list[threading.Thread] = []
        self.site_service: SiteService | None = None
        self._done = threading.Event()
        self._aborted = threading.Event()

    def run(self, timeout: float = 900.0) -> DemoResult:
        """Runs the whole federation; returns when every site has ended."""
        prepare_workspace(
            self.root,
            self.num_sites,
            self.num_rounds,
            torch_in_subprocess=self.torch_in_subprocess,
            secure=self.secure,
            task=self.task,
            mmar=self.mmar,
        )
        server_dir = self.root / "server"
        detach_server_logs = attach_workspace_logs(server_dir, self.bus, "server")
        config = load_server_config(server_dir / "config_fed_server.json")
        server = FederatedServer(
            config, server_dir, load_npz(server_dir / "models" / "initial_model.npz"), self.bus
        )
        result = DemoResult()
        try:
            port = server.start()
            names = _site_names(self.num_sites)
            for name in names:
                _set_port(SitePaths(self.root / name).kit, port)
            _set_admin_port(self.root / "admin", port)
            for name in names[1:]:
                if self._aborted.is_set():  # stopped while starting: start no more peers
                    break
                self._start_peer(name)
            watchdog = threading.Thread(target=self._watch_peers, name="demo-watchdog", daemon=True)
            watchdog.start()
            outcome = self._run_site_1()
            result.outcomes[names[0]] = outcome
            if outcome != "completed" and (not self.site_1_stays or self._aborted.is_set()):
                self.stop_peers()  # the federation cannot finish without this site
            for name, proc in self.peers.items():
                try:
                    code = proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    code = proc.wait()
                result.outcomes[name] = "completed" if code == 0 else f"failed (exit code {code})"
            for relay in self._relays:
                relay.join(timeout=5)
            result.server_finished = server.finished
            result.history = list(server.history)
        finally:
            self._done.set()
            self.stop_peers()
            server.stop(grace=1)
            detach_server_logs()
        return result

    def _run_site_1(self) -> str:
        root = self.root / "site-1"
        # This machine's one live session of site-1 with this server: a console or service
        # pointed at site-1's workspace is refused rather than take it over.
        claim = SessionClaim("site-1", load_client_kit(SitePaths(root).kit).servers[0].target, root)
        claim.acquire()
        detach = attach_workspace_logs(root, self.bus, "site-1")
        try:
            service = SiteService(root, self.bus)
            # Several sites share this machine's cores: one thread each avoids oversubscription.
            service.executor.extra_env.update(PEER_ENV)
            self.site_service = service
            if self._aborted.is_set():
                return "aborted"
            return service.run(auto_start=True, stay=self.site_1_stays)
        finally:
            detach()
            claim.release()

    def _start_peer(self, name: str) -> None:
        root = self.root / name
        (root / "logs").mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **PEER_ENV, "PYTHONUNBUFFERED": "1"}
        stderr = (root / "logs" / "stderr.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "fltui", "--no-ui", "--json", "--workspace", str(root)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        stderr.close()
        self.peers[name] = proc
        relay = threading.Thread(
            target=self._relay, args=(name, proc), name=f"relay-{name}", daemon=True
        )
        relay.start()
        self._relays.append(relay)

    def _watch_peers(self) -> None:
        """A peer that dies before the end stops the demo (the others would wait for it forever)."""
        while not self._done.is_set():
            for name, proc in self.peers.items():
                code = proc.poll()
                if code not in (None, 0) and not self._done.is_set():
                    log.error(
                        "%s exited with code %s: %s",
                        name,
                        code,
                        tail_text(self.root / name / "logs" / "stderr.log", 3, "stderr log"),
                    )
                    self.abort()
                    return
            if self._done.wait(0.5):
                return

    def _relay(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        """Re-publishes a peer's JSON event lines on our bus."""
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                event: Event = event_from_dict(json.loads(line))
            except (ValueError, TypeError):
                event = LogRecord(site=name, level="INFO", logger="stdout", message=line)
            self.bus.publish(event)

    @property
    def aborted(self) -> bool:
        """Whether ``abort`` was called (the demo was stopped on request)."""
        return self._aborted.is_set()

    def abort(self) -> None:
        """Stops site-1 and the peers."""
        self._aborted.set()
        if self.site_service is not None:
            self.site_service.interface.local(
                "train.abort", self.site_service.interface.abort_client
            )
            self.site_service.request_stop()
        self.stop_peers()

    def stop_peers(self) -> None:
        """Terminates the peers still running (SIGTERM, then SIGKILL after 10 s)."""
        for proc in self.peers.values():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
