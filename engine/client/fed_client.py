"""FederatedClient: runs the rounds of a federation with a fitter, from first pull to Quit."""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable
from typing import Any

import grpc

from engine.client.communicator import FLCommunicationError
from engine.client.fed_client_base import FederatedClientBase
from engine.events import (
    ContributionResent,
    FederationFinished,
    MetricsReported,
    PrivacyApplied,
    RoundCompleted,
    RoundStarted,
)
from engine.status import ClientStatus
from engine.training.errors import TrainingAborted

__all__ = ["FederatedClient", "TestFederatedClient", "TrainingAbortedError"]

log = logging.getLogger("engine.client")


class TrainingAbortedError(RuntimeError):
    """Training was aborted by the operator or the federation."""


class FederatedClient(FederatedClientBase):
    """Federated client-side implementation: pull → train → Δ → privacy → push, each round."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.final_metrics: dict[str, float] = {}
        self.outcome = ""
        self._reported_round = 0
        self._thread: threading.Thread | None = None
        # A training worker under a site service uses the service's session (token, heartbeat)
        # and must not end it: the service stays registered and administrable between runs.
        self.owns_session = True
        # Multi-GPU rank 0: called after each pull with "go on?" so the other ranks follow.
        self.round_sync: Callable[[bool], None] | None = None

    # ------------------------------------------------------------------ one round

    def federated_step(self, fitter: Any) -> bool:
        """Runs one federated step: pull, (validate,) train, push.

        Returns:
            False once the federation has finished (the final model was received and validated).
        """
        self.phase("pulling model")
        self.pull_models()
        self._report_global_model(fitter)
        if self.lost_contributions and not self.train_end and self.round_sync is None:
            # (Under multi-GPU training the other ranks train each round with rank 0, so the
            # round is trained again there instead.)
            self._resend_lost_contributions()
            return True
        if self.round_sync is not None:
            self.round_sync(not self.train_end)
        if self.train_end:
            return False
        self._check_abort()
        rnd = self.current_round + 1
        self.bus.publish(RoundStarted(site=self.client_name, round=rnd, num_rounds=self.num_rounds))
        self.phase("training")
        n_iter = self.model_manager.train()
        metrics = self.model_manager.validate_model(None, None, after_training=True)
        self.bus.publish(
            MetricsReported(site=self.client_name, round=rnd, scope="local model", metrics=metrics)
        )
        self._check_abort()
        # push_remote_model announces "privacy" and "submitting" as each begins
        if not self._counted(rnd, self.push_models):
            return True
        info = self.model_manager.last_privacy
        if info is not None:
            self.bus.publish(PrivacyApplied(site=self.client_name, round=rnd, **info))
        log.info("%s: round %d contribution sent (n_iter=%d)", self.client_name, rnd, n_iter)
        self.phase("waiting for the others")
        return True

    def _counted(self, rnd: int, send: Callable[[], object]) -> bool:
        """Runs ``send``; False when the server did not count the update (we were late)."""
        try:
            send()
        except FLCommunicationError as exc:
            # The round closed without us (we were late) or training ended meanwhile: the
            # update is dropped, not the site. The next pull says what comes next.
            late = exc.code == grpc.StatusCode.FAILED_PRECONDITION and exc.reason.startswith(
                "Contrib"
            )
            if not (late or exc.code == grpc.StatusCode.OUT_OF_RANGE):
                raise
            log.warning("%s: round %d update not counted: %s", self.client_name, rnd, exc.reason)
            return False
        return True

    def _resend_lost_contributions(self) -> None:
        """The server restarted before aggregating our contribution: the same one goes again."""
        lost, self.lost_contributions = self.lost_contributions, {}
        for task_name, pending in lost.items():
            rnd = pending.round + 1
            cid = pending.header.contribution_id
            self.bus.publish(
                ContributionResent(site=self.client_name, round=rnd, contribution_id=cid)
            )
            self.phase("submitting", rnd)

            def send(task: str = task_name, kept: Any = pending) -> str:
                return self.send_contribution(task, kept)

            if self._counted(rnd, send):
                log.info("%s: round %d contribution %s sent again", self.client_name, rnd, cid)
        self.phase("waiting for the others")

    def _report_global_model(self, fitter: Any) -> None:
        # A model of server round r >= 1 is the aggregate of round r (1-based): measure it once.
        r = self.current_round
        if r < 1 or r <= self._reported_round:
            return
        self.phase("validating global model", r)
        metrics = self.model_manager.validate_model(None, None)
        self._reported_round = r
        self.final_metrics = metrics
        trainer = self.model_manager.get_fitter()
        self.bus.publish(
            RoundCompleted(
                site=self.client_name,
                round=r,
                num_rounds=self.num_rounds,
                metrics=metrics,
                key_metric=str(getattr(trainer, "metric_name", "") or ""),
            )
        )

    def _check_abort(self) -> None:
        if self.stop_event.is_set():
            raise TrainingAbortedError("aborted")

    # ------------------------------------------------------------------ whole run

    def run_federated_steps(self, fitter: Any) -> None:
        """Keeps running federated steps until the federation finishes."""
        while self.federated_step(fitter):
            pass

    def admin_run(self, fitter: Any) -> str:
        """Runs the whole federation for this site and reports how it ended.

        Returns:
            the outcome: "completed", "aborted" or "failed".
        """
        self.model_manager.set_fitter(fitter)
        self.train_end = False
        self.set_status(ClientStatus.TRAINING_STARTING)
        detail = ""
        try:
            if self.owns_session or self.token is None:
                self.register()
            if self.owns_session:
                self.start_heartbeat()
            self.set_status(ClientStatus.TRAINING_STARTED)
            self.run_federated_steps(fitter)
            if self.cross_site_validate:
                self.cross_validation(0)
            self.outcome = "completed"
            self.set_status(ClientStatus.TRAINING_STOPPED)
        except Exception as exc:  # every ending is reported, never swallowed
            aborted = self.stop_event.is_set() or isinstance(
                exc, (TrainingAborted, TrainingAbortedError)
            )
            if aborted:
                self.outcome, detail = "aborted", "stopped by request"
                self.set_status(ClientStatus.TRAINING_STOPPED, detail)
            else:
                self.outcome = "failed"
                detail = (
                    exc.reason
                    if isinstance(exc, FLCommunicationError)
                    else f"{type(exc).__name__}: {exc}"
                )
                log.error("%s: training failed: %s", self.client_name, detail)
                log.debug("%s", traceback.format_exc())
                self.set_status(ClientStatus.TRAINING_EXCEPTION, detail)
        finally:
            if self.owns_session:
                self.close()
            else:
                self.communicator.close()
                self.model_manager.close()
        self.bus.publish(
            FederationFinished(
                site=self.client_name,
                outcome=self.outcome,
                rounds=self._reported_round,
                metrics=self.final_metrics,
                detail=detail,
            )
        )
        return self.outcome

    def cross_validation(self, client_local_rank: int) -> None:
        """Cross-site validation after training (rank 0 only)."""
        if client_local_rank == 0:
            self.run_cross_site_validation()

    def run(self, fitter: Any) -> threading.Thread:
        """Runs the client in a thread; returns it."""
        self._thread = threading.Thread(
            target=self.admin_run, args=(fitter,), name=f"fl-client-{self.client_name}", daemon=True
        )
        self._thread.start()
        return self._thread

    def abort(self) -> None:
        """Stops training at the next step and waiting at once."""
        self.stop_event.set()
        fitter = self.model_manager.get_fitter()
        if fitter is not None:
            fitter.abort()

    def wait(self, timeout: float | None = None) -> bool:
        """Waits for ``run``'s thread; returns True when it has ended."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()


class TestFederatedClient(FederatedClient):
    """The lineage's test client: ``client_login`` registers with one server."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        client_id: str,
        client_args: Any,
        secure_train: bool,
        server_args: Any = None,
        exclude_vars: str | None = None,
        privacy_params: Any = None,
        req_processors: list[Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            client_id,
            client_args,
            secure_train,
            server_args,
            exclude_vars,
            privacy=privacy_params,
            req_processors=req_processors,
            **kwargs,
        )

    def client_login(self, task_name: str) -> str:
        """Registers with ``task_name``'s server; returns the token."""
        return self.client_register(task_name)
