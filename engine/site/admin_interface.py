"""ClientAdminInterface: the one API the admin agent's processors and the console's keys call."""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from engine.admin_defs import Message, MsgHeader, Topic, new_message
from engine.config import ConfigError, load_client_kit
from engine.events import (
    AdminRequestHandled,
    CrossSiteValidated,
    Event,
    FederationFinished,
    RunChanged,
    StatusChanged,
)
from engine.site.deploy import DeployError, deploy_mmar, policy_refusal
from engine.site.paths import SitePaths, check_run_number, holds_mmar, latest_run
from engine.site.policy import AuditLog, SitePolicy
from engine.site.site_engine import check_mmar
from engine.status import ClientStatus

__all__ = ["AdminError", "ClientAdminInterface"]

log = logging.getLogger("engine.site.admin_interface")

LOCAL = "local"


class AdminError(RuntimeError):
    """An admin action that cannot be done now (the text says why, for the reply)."""


class ClientAdminInterface:
    """Carries out admin actions on this site, whoever asks: the federation or a local key.

    Args:
        client: the site's session client (registered, heart-beating; its token and status).
        client_name: this site's name.
        sender: the admin Sender (for asynchronous results such as validation).
        args: ``workspace`` (Path), ``executor`` (ClientExecutor), ``policy`` (SitePolicy),
            ``audit`` (AuditLog), ``bus`` (EventBus), ``on_shutdown(restart: bool)``.
        rank: this process's rank (only rank 0 administers).
        workers: threads for background work (validation, shutdown).
    """

    def __init__(
        self,
        client: Any,
        client_name: str,
        sender: Any,
        args: dict[str, Any],
        rank: int = 0,
        workers: int = 5,
    ) -> None:
        self.client = client
        self.client_name = client_name
        self.sender = sender
        self.args = args
        self.rank = rank
        self.workspace = Path(args["workspace"])
        self.executor = args["executor"]
        self.policy: SitePolicy = args["policy"]
        self.audit: AuditLog = args["audit"]
        self.bus = args["bus"]
        self._on_shutdown = args.get("on_shutdown")
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="admin-work")
        self._lock = threading.RLock()
        self.agent: Any = None
        self.run_number: int | None = None
        self.mmar_name = ""
        self.validating = False
        # The last failure of a run, as (run number, one line), for check_status.
        self.last_error: tuple[int | None, str] | None = None
        self._unsubscribe = self.bus.subscribe(self._note_error)

    def _note_error(self, event: Event) -> None:
        if event.site != self.client_name:
            return
        if isinstance(event, RunChanged) and event.running:
            self.last_error = None  # a new run: the errors of the last one are not its
        elif isinstance(event, StatusChanged) and event.status == ClientStatus.TRAINING_EXCEPTION:
            self.last_error = (self.run_number, _one_line(event.detail or event.message))
        elif (
            isinstance(event, FederationFinished)
            and event.outcome == "failed"
            and event.detail
            and self.last_error is None
        ):
            self.last_error = (self.run_number, _one_line(event.detail))

    # ------------------------------------------------------------------ plumbing

    def set_agent(self, admin_agent: Any) -> None:
        self.agent = admin_agent

    def local(self, topic: str, action: Any, *args: Any) -> str:
        """Runs an action for the local operator (a key, the CLI) and audits it like a request.

        Returns:
            the reply text. Raises AdminError when the action is refused.
        """
        try:
            text = str(action(*args))
        except (AdminError, DeployError, ValueError) as exc:
            self.record(LOCAL, topic, "error", str(exc))
            raise AdminError(str(exc)) from None
        self.record(LOCAL, topic, "ok", text)
        return text

    def record(self, origin: str, topic: str, outcome: str, detail: str) -> None:
        """One line of ``logs/audit.jsonl`` and an ``AdminRequestHandled`` event, for every
        request and local action (the agent records the federation's requests through here)."""
        short = detail if len(detail) <= 300 else detail[:297] + "..."
        try:
            self.audit.append(origin, topic, outcome, short)
        except OSError as exc:
            log.error("audit log not written: %s", exc)
        self.bus.publish(
            AdminRequestHandled(
                site=self.client_name, origin=origin, topic=topic, outcome=outcome, detail=short
            )
        )

    def _run_dir(self, run_number: int) -> Path:
        return SitePaths(self.workspace).run_dir(run_number)

    def _mmar(self, run_number: int) -> Path:
        return SitePaths(self.workspace).mmar(run_number, self.client_name)

    @staticmethod
    def _run_number(value: Any) -> int:
        try:
            return check_run_number(value, parse=True)  # headers and shell words are text
        except ValueError as exc:
            raise AdminError(str(exc)) from None

    # ------------------------------------------------------------------ status

    def client_status(self) -> str:
        """The lineage's status line (the token is shortened: tokens stay out of logs)."""
        token = self.client.token or ""
        shown = f"{token[:8]}..." if token else "(not registered)"
        status = (
            self.executor.check_status(self.client)
            if self.executor.is_running()
            else ClientStatus.get_status_message(self.client.status)
        )
        text = f"client name: {self.client_name}\ttoken: {shown}\tstatus: {status}"
        if self.run_number is not None:
            text += f"\trun: {self.run_number}\tmmar: {self.mmar_name}"
            pid = getattr(self.executor, "pid", None)
            if pid and self.executor.is_running():
                text += f"\tworker pid: {pid}"
        if self.last_error is not None:
            run, error = self.last_error
            text += f"\tlast error (run {run if run is not None else '?'}): {error}"
        return text

    def status_dict(self) -> dict[str, Any]:
        return {
            "site": self.client_name,
            "status": ClientStatus.get_status_message(self.client.status),
            "run_number": self.run_number,
            "mmar": self.mmar_name,
            "worker_pid": getattr(self.executor, "pid", None)
            if self.executor.is_running()
            else None,
            "last_error": (
                {"run_number": self.last_error[0], "error": self.last_error[1]}
                if self.last_error is not None
                else None
            ),
        }

    # ------------------------------------------------------------------ deploy and runs

    def deploy_mmar(self, data: Message) -> str:
        """Deploys the MMAR zip in ``data.body`` as ``run_<N>/mmar_<site>``."""
        number = self._run_number(data.get_header(MsgHeader.RUN_NUMBER))
        if not isinstance(data.body, bytes):
            raise AdminError("deploy: the request carries no zip (body must be bytes)")
        app = data.get_header(MsgHeader.APP_NAME) or "mmar"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", app):
            raise AdminError(f"deploy: app name {app!r} must be letters, digits, '.', '_', '-'")
        with self._lock:
            if self.executor.is_running() and self.run_number in (number, None):
                raise AdminError(f"run {number} is in use; abort it before deploying over it")
            policy = self.policy.current()  # the policy file as it is now (one read)
            try:
                kit = load_client_kit(SitePaths(self.workspace).kit)
            except ConfigError as exc:
                raise AdminError(f"deploy: {exc}") from None
            path = deploy_mmar(
                data.body,
                self.workspace,
                number,
                self.client_name,
                max_bytes=policy.max_deploy_bytes,
                allow_byoc=policy.allow_byoc,
                policy_file=policy.path,
                trusted_packages=policy.trusted_packages,
                allow_expressions=policy.expressions_allowed,
                # What start would find, the federation's name included.
                check=lambda tree: check_mmar(tree, kit),
            )
        (self._run_dir(number) / "fl_app.txt").write_text(app + "\n")
        log.info("%s: deployed %s as %s", self.client_name, app, path)
        return f"deployed {app} to {path.relative_to(self.workspace)}"

    def delete_run_number(self, num: Any) -> str:
        number = self._run_number(num)
        with self._lock:
            if self.executor.is_running() and self.run_number in (number, None):
                raise AdminError(f"run {number} is in use; abort it before deleting it")
            run_dir = self._run_dir(number)
            if not run_dir.is_dir():
                raise AdminError(f"there is no run {number} on {self.client_name}")
            shutil.rmtree(run_dir)
        return f"Delete run folder: {run_dir.relative_to(self.workspace)}"

    def remove_custom_path(self) -> None:
        """Drops earlier runs' ``custom/`` folders from sys.path (this process's only)."""
        sys.path[:] = [p for p in sys.path if not ("/run_" in p and p.endswith("/custom"))]

    # ------------------------------------------------------------------ training

    def _check_start(self, number: int) -> Path:
        status = self.client.status
        if status in (ClientStatus.TRAINING_STARTING, ClientStatus.TRAINING_STARTED):
            raise AdminError(f"{self.client_name} has already started (run {self.run_number})")
        if self.executor.is_running():
            raise AdminError(f"{self.client_name} is still busy (run {self.run_number})")
        mmar = self._mmar(number)
        if not holds_mmar(mmar):
            raise AdminError(f"run {number} is not deployed on {self.client_name}: deploy first")
        # The policy first: nothing of the MMAR's own code is imported before it says yes.
        refusal = policy_refusal(mmar, self.policy)
        if refusal:
            raise AdminError(refusal)
        try:
            check_mmar(mmar, load_client_kit(SitePaths(self.workspace).kit))
        except ConfigError as exc:
            raise AdminError(str(exc)) from None
        return mmar

    def start_client(self, run_number: Any) -> str:
        with self._lock:
            number = self._run_number(run_number)
            mmar = self._check_start(number)
            self.remove_custom_path()
            self.run_number, self.mmar_name = number, _app_name(self._run_dir(number))
            self.executor.start_train(self.client, {"run_number": number}, mmar)
            self._announce_run()
        return "Start the client app..."

    def start_mgpu_client(self, run_number: Any, gpu_number: Any) -> str:
        with self._lock:
            number = self._run_number(run_number)
            try:
                gpus = int(gpu_number)
            except (TypeError, ValueError):
                raise AdminError(f"gpu number must be a whole number, got {gpu_number!r}") from None
            if gpus < 1:
                raise AdminError(f"gpu number must be >= 1, got {gpus}")
            mmar = self._check_start(number)
            self.run_number, self.mmar_name = number, _app_name(self._run_dir(number))
            self.executor.start_mgpu_train(self.client, {"run_number": number}, mmar, gpus)
            self._announce_run()
        return f"Start the client app on {gpus} GPU rank(s)..."

    def _announce_run(self, mode: str = "train") -> None:
        self.bus.publish(
            RunChanged(
                site=self.client_name,
                running=True,
                run_number=self.run_number or 0,
                mmar=self.mmar_name,
                executor=self.executor.kind,
                pid=self.executor.pid,
                mode=mode,
            )
        )

    def abort_client(self) -> str:
        status = self.client.status
        if not self.executor.is_running():
            if status == ClientStatus.TRAINING_NOT_STARTED:
                return f"{self.client_name} has not started"
            return f"{self.client_name} is already stopped"
        return self.executor.abort_train(self.client)

    def wait_process_complete(self, timeout: float | None = None) -> bool:
        return bool(self.executor.wait_process_complete(self.client, timeout))

    def wait_training_process_finish(self, timeout: float | None = None) -> bool:
        return bool(self.executor.wait_training_process_finish(self.client, timeout))

    # ------------------------------------------------------------------ validation

    def do_validate(self, req: Message) -> str:
        """Starts cross-site validation in the background; the result goes back with SendResult."""
        with self._lock:
            if self.executor.is_running():
                raise AdminError(f"{self.client_name} is busy (run {self.run_number}); try later")
            number = self.run_number or latest_run(self.workspace, self.client_name)
            if number is None:
                raise AdminError(f"{self.client_name} has no deployed run to validate")
            results: dict[str, dict[str, float]] = {}

            def collect(event: Event) -> None:
                if isinstance(event, CrossSiteValidated) and event.site == self.client_name:
                    results[event.model_owner] = dict(event.metrics)

            unsubscribe = self.bus.subscribe(collect)
            self.validating = True
            self.run_number = number  # guards the run against deploy/delete meanwhile
            self.executor.start_train(
                self.client, {"run_number": number, "mode": "validate"}, self._mmar(number)
            )
            self.mmar_name = _app_name(self._run_dir(number))
            self._announce_run(mode="validate")

        def finish() -> None:
            try:
                self.executor.wait_process_complete(self.client)
            finally:
                unsubscribe()
                self.validating = False
            result = new_message(Topic.VALIDATE, json.dumps({self.client_name: results}))
            result.set_header(MsgHeader.REF_MSG_ID, req.id)
            self.sender.send_result(result)

        self._pool.submit(finish)
        return "validate process started."

    # ------------------------------------------------------------------ system

    def sys_info(self) -> str:
        info: dict[str, Any] = {
            "site": self.client_name,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
        }
        info.update(_meminfo())
        info.update(_gpu_names())
        return json.dumps(info)

    # ------------------------------------------------------------------ leaving

    def shutdown_client(self) -> str:
        self._pool.submit(self._leave, False)
        return "Shutdown the client..."

    def restart_client(self) -> str:
        self._pool.submit(self._leave, True)
        return "Restart the client..."

    def _leave(self, restart: bool) -> None:
        # Reply first (the caller returned already), then stop training and end the session.
        if self.executor.is_running():
            self.executor.abort_train(self.client)
        if self._on_shutdown is not None:
            self._on_shutdown(restart)

    def close(self) -> None:
        self._unsubscribe()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _one_line(text: str, limit: int = 300) -> str:
    """A failure in one line: a traceback's last line (the exception), capped."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = lines[-1] if lines and lines[0].startswith("Traceback") else " ".join(lines)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _app_name(run_dir: Path) -> str:
    try:
        return (run_dir / "fl_app.txt").read_text().strip() or run_dir.name
    except OSError:
        return run_dir.name


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                out[key.lower()] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def _gpu_names() -> dict[str, Any]:
    try:
        import pynvml  # deferred: NVML may be absent; the answer then says so

        pynvml.nvmlInit()
    except Exception as exc:  # no library, no driver: say so
        return {"gpu_count": 0, "gpu_note": f"NVML unavailable: {type(exc).__name__}"}
    try:
        count = pynvml.nvmlDeviceGetCount()
        names: dict[str, Any] = {"gpu_count": count}
        for i in range(count):
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
            names[f"gpu_device_{i}"] = name.decode() if isinstance(name, bytes) else str(name)
        return names
    finally:
        pynvml.nvmlShutdown()
