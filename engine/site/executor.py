"""Executors: run a site's training in a child process group (default), in threads, or on N GPUs."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import Executor, Future
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Any

from engine.events import RunChanged, StatusChanged, event_from_dict
from engine.site.paths import write_token_file
from engine.site.site_engine import SiteEngine
from engine.status import ClientStatus

__all__ = [
    "ClientExecutor",
    "ProcessExecutor",
    "ThreadExecutor",
    "listen_command",
    "update_client_properties",
]

log = logging.getLogger("engine.site.executor")

CONNECT_TIMEOUT = 60.0  # the worker imports torch and builds its model before it connects
ABORT_GRACE = 5.0  # seconds for the worker to stop by itself after the abort command
TERM_GRACE = 5.0  # seconds between SIGTERM and SIGKILL


class ClientExecutor(ABC):
    """Starts, watches and aborts a site's training.

    ``client`` in every method is the site's session client (a FederatedClientBase): its name,
    token, status and bus.
    """

    @abstractmethod
    def start_train(self, client: Any, args: dict[str, Any], mmar_root: Path) -> None:
        """Starts training the MMAR at ``mmar_root`` (``args["run_number"]``)."""

    @abstractmethod
    def start_mgpu_train(
        self, client: Any, args: dict[str, Any], mmar_root: Path, gpu_number: int
    ) -> None:
        """Starts training on ``gpu_number`` ranks (torch.distributed)."""

    @abstractmethod
    def check_status(self, client: Any) -> str:
        """The training status message ("training started", ...)."""

    @abstractmethod
    def abort_train(self, client: Any) -> str:
        """Stops training; returns what happened, in words."""

    def is_running(self) -> bool:
        return False

    def wait_process_complete(self, client: Any, timeout: float | None = None) -> bool:
        return True

    def wait_training_process_finish(self, client: Any, timeout: float | None = None) -> bool:
        return self.wait_process_complete(client, timeout)

    def close(self) -> None:  # noqa: B027 - most executors hold nothing to release
        """Aborts any running training and releases resources."""


def update_client_properties(client: Any, trainer: Any, cross_site_val_conf: Any = None) -> None:
    """Points the client's model manager at ``trainer`` (the fitter) and cross-site settings."""
    client.model_manager.set_fitter(trainer)
    if cross_site_val_conf is not None:
        client.cross_site_validate = bool(cross_site_val_conf)


def listen_command(
    client: Any, conn: Connection, report: dict[str, Any] | None = None
) -> str | None:
    """Relays a worker's messages to the service until the worker closes the connection.

    Events go onto ``client.bus`` as they are; the worker's status is mirrored into
    ``client.status``.

    Args:
        report: filled as messages come: ``seen`` (when the worker last sent anything) and
            ``failure`` (the reason the worker itself gave for a training exception).

    Returns:
        the outcome the worker reported ("completed", "aborted", "failed"), or None.
    """
    outcome = None
    report = report if report is not None else {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return outcome
        report["seen"] = time.time()
        if "event" in message:
            try:
                event = event_from_dict(message["event"])
            except ValueError as exc:
                log.warning("unreadable event from the worker: %s", exc)
                continue
            if isinstance(event, StatusChanged):
                client.status = event.status
                if event.status == ClientStatus.TRAINING_EXCEPTION:
                    report["failure"] = event.detail or event.message
            client.bus.publish(event)
        elif "outcome" in message:
            outcome = str(message["outcome"])
        elif "status_reply" in message:
            replies = getattr(client, "status_replies", None)
            if replies is not None:
                replies.put(str(message["status_reply"]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ProcessExecutor(ClientExecutor):
    """Runs training as ``python -m engine.site.worker`` in its own process group.

    Args:
        workspace: the site workspace (``client_token.txt`` goes there, worker logs to
            ``logs/worker.log``).
        extra_env: environment added for the worker (e.g. ``OMP_NUM_THREADS``).
    """

    def __init__(self, workspace: Path, extra_env: dict[str, str] | None = None) -> None:
        self.workspace = Path(workspace)
        self.extra_env = dict(extra_env or {})
        self._lock = threading.RLock()
        self._send_lock = threading.Lock()  # abort and check_status may send at once
        self._procs: list[subprocess.Popen[bytes]] = []
        self._pgid: int | None = None
        self._conn: Connection | None = None
        self._listener: Listener | None = None
        self._waiter: threading.Thread | None = None
        self._aborting = False
        self.outcome: str | None = None
        self.gpu_number = 0
        self.run_number = 0
        # This launch's: what the worker said (``listen_command``'s report) and where its
        # output begins in the shared logs/worker.log, so a failure is told from its own words.
        self._report: dict[str, Any] = {}
        self._log_from = 0

    @property
    def worker_seen(self) -> float | None:
        """When the current worker last sent anything (None: nothing yet)."""
        return self._report.get("seen")

    # ------------------------------------------------------------------ start

    def start_train(self, client: Any, args: dict[str, Any], mmar_root: Path) -> None:
        self._launch(client, args, 1)

    def start_mgpu_train(
        self, client: Any, args: dict[str, Any], mmar_root: Path, gpu_number: int
    ) -> None:
        if gpu_number < 1:
            raise ValueError(f"gpu_number must be >= 1, got {gpu_number}")
        self._launch(client, args, gpu_number)

    def is_running(self) -> bool:
        with self._lock:
            return any(p.poll() is None for p in self._procs) or (
                self._waiter is not None and self._waiter.is_alive()
            )

    def _launch(self, client: Any, args: dict[str, Any], world: int) -> None:

        with self._lock:
            if self.is_running():
                raise RuntimeError("training is already running")
            authkey = secrets.token_bytes(32)
            listener = Listener(("127.0.0.1", 0), authkey=authkey)
            port = int(listener.address[1])
            write_token_file(
                self.workspace,
                {
                    "token": client.token,
                    "run_number": int(args["run_number"]),
                    "client_name": client.client_name,
                    "listen_port": port,
                    "authkey": authkey.hex(),
                },
            )
            logs = self.workspace / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            env = {
                **os.environ,
                "PYTHONUNBUFFERED": "1",
                "FLTUI_SERVICE_PID": str(os.getpid()),
                **self.extra_env,
            }
            if world > 1:
                env.update(
                    {
                        "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(_free_port()),
                        "WORLD_SIZE": str(world),
                    }
                )
            cmd = [
                sys.executable,
                "-m",
                "engine.site.worker",
                "--workspace",
                str(self.workspace),
            ]
            if args.get("mode") == "validate":
                cmd += ["--mode", "validate"]
            self._procs = []
            self._pgid = None
            self._aborting = False
            self.outcome = None
            self.gpu_number = world if world > 1 else 0
            self.run_number = int(args["run_number"])
            self._report = {}
            with (logs / "worker.log").open("ab") as out:
                self._log_from = out.tell()
                for rank in range(world):
                    rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
                    # The first rank leads a new process group; the others join it, so abort
                    # can signal every rank (and anything they start) at once. A group, not a
                    # session: a process may only join a group of its own session.
                    proc = subprocess.Popen(
                        cmd,
                        env=rank_env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=out,
                        **_group_kwargs(self._pgid or 0),
                    )
                    if rank == 0:
                        self._pgid = proc.pid
                    self._procs.append(proc)
            self._listener = listener
            client.set_status(_busy_status(args))
            self._waiter = threading.Thread(
                target=self._watch, args=(client, listener), name="worker-watch", daemon=True
            )
            self._waiter.start()
        log.info(
            "%s: worker started (pid %d, %d rank%s)",
            client.client_name,
            self._procs[0].pid,
            world,
            "s" if world > 1 else "",
        )

    @property
    def kind(self) -> str:
        """How training runs: "process", or "N GPUs" under multi-GPU training."""
        return f"{self.gpu_number} GPUs" if self.gpu_number > 1 else "process"

    @property
    def pid(self) -> int | None:
        with self._lock:
            return self._procs[0].pid if self._procs else None

    # ------------------------------------------------------------------ watch

    def _accept(self, listener: Listener) -> Connection | None:
        result: list[Connection] = []

        def accept() -> None:
            with contextlib.suppress(OSError, EOFError):
                result.append(listener.accept())

        t = threading.Thread(target=accept, daemon=True)
        t.start()
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while t.is_alive() and time.monotonic() < deadline:
            if self._procs and self._procs[0].poll() is not None:
                break  # rank 0 died before it connected
            t.join(0.1)
        if not result:
            listener.close()  # unblocks accept()
            t.join(1)
        return result[0] if result else None

    def _watch(self, client: Any, listener: Listener) -> None:
        conn = self._accept(listener)
        if conn is not None:
            with self._lock:
                self._conn = conn
            self.outcome = listen_command(client, conn, self._report)
            conn.close()
        listener.close()
        codes = self._reap(client)
        code = codes[0] if codes else None
        with self._lock:
            self._conn = None
            aborting = self._aborting
        client.bus.publish(
            RunChanged(
                site=client.client_name,
                running=False,
                run_number=self.run_number,
                mmar="",
                executor=self.kind,
                detail="aborted" if aborting else f"worker exited with code {code}",
            )
        )
        if aborting or code in (0, 3):
            if client.status != ClientStatus.TRAINING_STOPPED:
                client.set_status(ClientStatus.TRAINING_STOPPED, "aborted" if aborting else "")
        else:
            # The reason is this worker's own: what it reported, else what it wrote to the log
            # since it started (never an earlier run's lines at the end of the shared file).
            log_path = self.workspace / "logs" / "worker.log"
            pid = self._procs[0].pid if self._procs else None
            how = _exit_words(code)
            failure = self._report.get("failure")
            if failure:
                detail = f"{failure} (worker pid {pid} {how})"
            else:
                said = _log_tail(log_path, self._log_from, 2)
                detail = f"worker pid {pid} {how}" + (
                    f": {said} (see {log_path})" if said else " without a word in its log"
                )
            if conn is None:
                detail = "worker did not start; " + detail
            client.set_status(ClientStatus.TRAINING_EXCEPTION, detail)

    def _reap(self, client: Any) -> list[int | None]:
        """Waits for rank 0; then the other ranks get a grace period and the group is cleared."""
        if not self._procs:
            return []
        first = self._procs[0]
        first.wait()
        deadline = time.monotonic() + TERM_GRACE
        for proc in self._procs[1:]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        self._kill_group()
        return [p.returncode for p in self._procs]

    # ------------------------------------------------------------------ abort

    def check_status(self, client: Any) -> str:
        """Asks the worker itself (over its connection); the last known status otherwise."""
        with self._lock:
            conn = self._conn
        if conn is not None:
            replies: queue.Queue[str] = queue.Queue()
            client.status_replies = replies
            try:
                with self._send_lock:
                    conn.send({"command": "check_status"})
                return replies.get(timeout=2.0)
            except (OSError, ValueError, queue.Empty):
                pass
            finally:
                client.status_replies = None
        return ClientStatus.get_status_message(client.status)

    def abort_train(self, client: Any) -> str:
        """Abort escalates: the abort command, then SIGTERM to the group, then SIGKILL.

        When it returns, no process of the worker's group is left.
        """
        with self._lock:
            if not self.is_running():
                return "training is not running"
            self._aborting = True
            conn = self._conn
        if conn is not None:
            with contextlib.suppress(OSError, ValueError), self._send_lock:
                conn.send({"command": "abort"})
        how = "stopped after the abort command"
        if not self._wait_procs(ABORT_GRACE):
            how = "stopped by SIGTERM"
            self._signal_group(signal.SIGTERM)
            if not self._wait_procs(TERM_GRACE):
                how = "killed (SIGKILL)"
        self._kill_group()
        if self._waiter is not None:
            self._waiter.join(timeout=10)
        log.info("%s: training aborted: worker %s", client.client_name, how)
        return f"training aborted: worker {how}"

    def _wait_procs(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for proc in list(self._procs):
            left = deadline - time.monotonic()
            try:
                proc.wait(max(0.0, left))
            except subprocess.TimeoutExpired:
                return False
        return True

    def _signal_group(self, sig: int) -> None:
        if self._pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._pgid, sig)

    def _kill_group(self) -> None:
        """SIGKILL whatever is left in the group and wait until the group is empty."""
        if self._pgid is None:
            return
        self._signal_group(signal.SIGKILL)
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.killpg(self._pgid, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                return
            time.sleep(0.05)
        log.error("process group %d still has members after SIGKILL", self._pgid)

    def wait_process_complete(self, client: Any, timeout: float | None = None) -> bool:
        waiter = self._waiter
        if waiter is None:
            return True
        waiter.join(timeout)
        return not waiter.is_alive()

    def close(self) -> None:
        if self.is_running():
            self.abort_train(_Anonymous())


def _exit_words(code: int | None) -> str:
    """ "exited with code 1", "killed by SIGKILL"."""
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _log_tail(path: Path, start: int, lines: int) -> str:
    """The last ``lines`` non-empty lines written to ``path`` from byte ``start`` on, joined."""
    try:
        with path.open("rb") as f:
            f.seek(start)
            text = f.read()[-65536:].decode(errors="replace")
    except OSError:
        return ""
    return " | ".join([line for line in text.splitlines() if line.strip()][-lines:])


class _Anonymous:
    client_name = "site"
    status = ClientStatus.TRAINING_STOPPED

    def set_status(self, status: int, detail: str = "") -> None:
        self.status = status


def _busy_status(args: dict[str, Any]) -> int:
    """The site's status while its worker runs: validating is not training."""
    if args.get("mode") == "validate":
        return ClientStatus.CROSS_SITE_VALIDATION
    return ClientStatus.TRAINING_STARTED


def _group_kwargs(pgid: int) -> dict[str, Any]:
    """Popen arguments that put the child in process group ``pgid`` (0: a new group)."""
    if sys.version_info >= (3, 11):
        return {"process_group": pgid}  # no preexec_fn: safe beside gRPC's threads
    return {"preexec_fn": lambda: os.setpgid(0, pgid)}


class ThreadExecutor(ClientExecutor):
    kind = "thread"
    pid = None

    """Runs training in this process (tests, tiny models): a SiteEngine in a worker thread.

    Args:
        client: the session client (its bus receives the training's events).
        executor: where to run (a ThreadPoolExecutor).
    """

    def __init__(self, client: Any, executor: Executor) -> None:
        self.client = client
        self.executor = executor
        self._future: Future[str] | None = None
        self._engine: Any = None
        self.workspace: Path = Path(client.client_args.get("workspace", "."))

    def is_running(self) -> bool:
        return self._future is not None and not self._future.done()

    def start_train(self, client: Any, args: dict[str, Any], mmar_root: Path) -> None:
        if self.is_running():
            raise RuntimeError("training is already running")
        engine = SiteEngine(self.workspace, client.bus, int(args["run_number"]))
        trainer = engine.build()
        trainer.token = client.token
        trainer.owns_session = False
        update_client_properties(trainer, engine.fitter)
        self._engine = engine
        client.set_status(_busy_status(args))

        validate = args.get("mode") == "validate"

        def run() -> str:
            outcome = "failed"
            try:
                outcome = engine.validate_only() if validate else engine.run()
            finally:
                if validate:  # as the process executor does when its worker exits
                    trainer.set_status(ClientStatus.TRAINING_STOPPED)
                client.status = trainer.status
                client.bus.publish(
                    RunChanged(
                        site=client.client_name,
                        running=False,
                        run_number=int(args["run_number"]),
                        mmar="",
                        executor="thread",
                        detail=outcome,
                    )
                )
            return outcome

        self._future = self.executor.submit(run)

    def start_mgpu_train(
        self, client: Any, args: dict[str, Any], mmar_root: Path, gpu_number: int
    ) -> None:
        raise RuntimeError("multi-GPU training needs the process executor")

    def check_status(self, client: Any) -> str:
        return ClientStatus.get_status_message(client.status)

    def abort_train(self, client: Any) -> str:
        if not self.is_running():
            return "training is not running"
        self._engine.abort()
        assert self._future is not None
        self._future.result(timeout=60)
        return "training aborted"

    def wait_process_complete(self, client: Any, timeout: float | None = None) -> bool:
        if self._future is None:
            return True
        try:
            self._future.result(timeout)
        except Exception:
            return self._future.done()
        return True
