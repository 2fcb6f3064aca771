"""A research team's own training script as a training form, run through ``fltui.client``.

An MMAR names its script in ``config_fed_client.json`` (``"script": "custom/train.py"``,
``"script_args"``, ``"script_timeout"``). :class:`ScriptTrainer` has the fitter's interface, so
the federated client does with it what it does with every form (Δ, ``exclude_vars``, privacy,
processors, retries, abort, events). Its :meth:`~ScriptTrainer.train` hands the global model to
the script and waits for what the script sends back; :meth:`~ScriptTrainer.validate` hands it
weights to evaluate.

The script is a child of the training worker, in the worker's process group (the executor's
abort reaches it), with the MMAR as its working folder. It learns only a loopback address and a
one-time key of a listener the worker owns (``engine.training.script_wire``): never the server's
address, the session token or the certificates. Under ``N`` ranks it runs as ``torchrun`` would
run it (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``); only rank 0
gets the address, and ``fltui.client`` on rank 0 broadcasts each model to the other ranks.

The model's variables (names, shapes, dtypes) are the MMAR's initial model: its checkpoint
(``PRETRAIN_WEIGHTS_FILE`` of ``config/environment.json``) or ``config_train.json``'s model, as
the server starts from. torch is imported only where a model file is read or written.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import math
import os
import queue
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Any

import numpy as np

from engine.config import ConfigError, load_environment, local_environment_file
from engine.config.mmar import ScriptSpec
from engine.training.config import TRAIN_CONFIG
from engine.training.errors import TrainConfigError, TrainingAborted
from engine.training.evaluation import higher_is_better, save_validation_metrics
from engine.training.script_wire import (
    ADDRESS_ENV,
    AUTHKEY_ENV,
    PROTOCOL_VERSION,
    SITE_ENV,
    WireError,
    recv_message,
    send_message,
)

__all__ = ["ScriptError", "ScriptTrainer", "build_script_trainer", "script_model_problem"]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, int, float], None]
EpochCallback = Callable[[int, dict[str, float]], None]
RoundInfo = Callable[[], tuple[int, int]]

#: Seconds a script has to end by itself once told the run is over (it may save its files).
STOP_GRACE = 10.0
#: After an abort: the worker itself has the executor's ABORT_GRACE (5 s) to end.
ABORT_STOP_GRACE = 2.0
TERM_GRACE = 1.0
_POLL = 0.1
_TAIL_LINES = 400
_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+)(?:, in (?P<func>.+))?$')


class ScriptError(RuntimeError):
    """The script failed, ended too early, timed out or broke the protocol; the message names
    the script (and, for an exception, its file and line)."""


def script_model_problem(mmar_root: Path) -> ConfigError | None:
    """Why a script MMAR has no model to start from, or None (no torch: for deploy and start).

    The script form has no model component: the server and the worker take the model's
    variables from the MMAR's checkpoint (``PRETRAIN_WEIGHTS_FILE``), or from
    ``config_train.json``'s model where the MMAR has one.
    """
    root = Path(mmar_root)
    environment = load_environment(root, local_environment_file(root))
    pretrained = environment.variables.get("PRETRAIN_WEIGHTS_FILE")
    if pretrained:
        if not Path(pretrained).is_file():
            return ConfigError(
                environment.path,
                "PRETRAIN_WEIGHTS_FILE",
                f"{pretrained} does not exist (the model the script's federation starts from)",
            )
        return None
    if (root / TRAIN_CONFIG).is_file():
        return None
    return ConfigError(
        environment.path,
        "PRETRAIN_WEIGHTS_FILE",
        "a script MMAR needs the model to start from: save the script's model once "
        "(torch.save(net.state_dict(), 'models/initial_model.pt')) and name that file here",
    )


def build_script_trainer(
    mmar_root: str | Path,
    script: ScriptSpec,
    *,
    site_name: str,
    local_epochs: int | None = None,
    steps_aggregation: int = 0,
    on_progress: ProgressCallback | None = None,
    on_epoch_end: EpochCallback | None = None,
    round_info: RoundInfo | None = None,
    ranks: int = 1,
) -> ScriptTrainer:
    """The trainer of a script MMAR; the script starts at the first train or validate.

    Args:
        mmar_root: the deployed MMAR (the script's working folder).
        script: ``config_fed_client.json``'s ``script``, ``script_args`` and ``script_timeout``.
        site_name: this site's name (the script may ask for it).
        local_epochs, steps_aggregation: the round's budget, handed to the script with each
            model (``model.meta``).
        on_progress: called with ``(step, total, epoch, loss)`` for each ``progress()``.
        on_epoch_end: called with ``(step, metrics)`` for each ``log()``.
        round_info: gives ``(current_round, total_rounds)`` of the federation (0-based round).
        ranks: how many ranks the script runs as (``torchrun`` semantics).

    Raises:
        TrainConfigError: no model to start from, or its file is unusable.
        ValueError: an argument is out of range.
    """
    if not isinstance(site_name, str) or not site_name:
        raise ValueError(f"site_name must be a non-empty string, got {site_name!r}")
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"ranks must be a positive integer, got {ranks!r}")
    from engine.training.initial_model import initial_weights  # deferred: torch reads the model

    root = Path(mmar_root).resolve()
    problem = script_model_problem(root)
    if problem is not None:
        raise TrainConfigError(problem.path, problem.key, problem.problem)
    environment = load_environment(root, local_environment_file(root))
    return ScriptTrainer(
        mmar_root=root,
        script=script,
        site_name=site_name,
        weights=initial_weights(root),
        local_epochs=local_epochs,
        steps_aggregation=steps_aggregation,
        on_progress=on_progress,
        on_epoch_end=on_epoch_end,
        round_info=round_info,
        ranks=ranks,
        ckpt_dir=environment.ckpt_dir,
        eval_dir=environment.eval_dir,
    )


class ScriptTrainer:
    """A script's model, as the federated client sees a fitter's.

    The weights live here, as numpy arrays with the initial model's names, shapes and dtypes:
    the global model is loaded into them, handed to the script with each task, and replaced
    by what the script sends after training. All methods serialise on one lock except
    :meth:`abort`, which sets a flag and tells the script at once.
    """

    def __init__(
        self,
        *,
        mmar_root: Path,
        script: ScriptSpec,
        site_name: str,
        weights: dict[str, np.ndarray],
        local_epochs: int | None,
        steps_aggregation: int,
        on_progress: ProgressCallback | None,
        on_epoch_end: EpochCallback | None,
        round_info: RoundInfo | None,
        ranks: int,
        ckpt_dir: Path,
        eval_dir: Path,
    ) -> None:
        self.mmar_root = mmar_root
        self.script = script
        self.site_name = site_name
        self.local_epochs = local_epochs
        self.steps_aggregation = steps_aggregation
        self.ranks = ranks
        self.ckpt_dir = ckpt_dir
        self.eval_dir = eval_dir
        self._weights = weights
        self._on_progress = on_progress
        self._on_epoch_end = on_epoch_end
        self._round_info = round_info
        self._lock = threading.RLock()
        self._abort = threading.Event()
        self._running: _Script | None = None
        self._failure: ScriptError | None = None
        self._closed = False
        self._n_iter = 0
        self._rounds = 0
        self._metrics: dict[str, float] | None = None
        self._key = ""
        self._trained: dict[str, np.ndarray] | None = None
        self._best: Any = None  # a BestModel, made on first use (torch)
        self._evaluates: bool | None = None  # None: not known yet
        self._told_no_evaluation = False
        self._logs = 0
        self._total = 0
        self._last_loss = math.nan

    # -- read-only facts ---------------------------------------------------------------------

    @property
    def model(self) -> None:
        """None: the torch model lives in the script's process."""
        return None

    @property
    def device(self) -> str:
        """Where the weights are kept here (the script chooses its own device)."""
        return "cpu"

    @property
    def metric_name(self) -> str:
        """The key metric the script named (``send(key_metric=...)``, else its first metric)."""
        return self._key

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger key metric is better; loss-like names (loss, error, ...) are not."""
        return higher_is_better(self._key)

    @property
    def best_metric(self) -> float | None:
        """The best key metric the script reported with a trained model, if any."""
        return self._best.metric if self._best is not None else None

    @property
    def n_iter(self) -> int:
        """The ``n_iter`` the script sent with its last trained model."""
        return self._n_iter

    @property
    def num_parameters(self) -> int:
        """Number of scalar values of the model."""
        return sum(int(a.size) for a in self._weights.values())

    @property
    def best_model_path(self) -> Path:
        """Where the best local model is saved: ``<MMAR_CKPT_DIR>/best_model.pt``."""
        from engine.training.weights import BEST_MODEL_NAME  # deferred: torch, with the module

        return self.ckpt_dir / BEST_MODEL_NAME

    @property
    def steps_per_round(self) -> int:
        """The round's steps, as the script's last ``progress()`` gave them (or the config's)."""
        return self._total or self.steps_aggregation

    @property
    def pid(self) -> int | None:
        """The process id of the script's rank 0, while it runs."""
        running = self._running
        return running.procs[0].pid if running is not None and running.procs else None

    # -- multi-GPU: the script's own ranks ---------------------------------------------------

    def enable_distributed(self, rank: int, world_size: int) -> None:
        """Not used: the script runs as ``ranks`` processes of its own (torchrun semantics)."""
        raise NotImplementedError(
            "a script runs its own ranks: build its trainer with ranks=N instead"
        )

    def broadcast_weights(self, src: int = 0) -> None:
        """Not used: ``fltui.client`` on the script's rank 0 broadcasts each model."""
        raise NotImplementedError("fltui.client on the script's rank 0 broadcasts each model")

    # -- weights ----------------------------------------------------------------------------

    def get_weights(self, *, copy: bool = True) -> dict[str, np.ndarray]:
        """Every variable, in the initial model's order (``copy=False``: the arrays themselves,
        to be read and dropped before the next :meth:`train` or :meth:`set_weights`)."""
        with self._lock:
            if copy:
                return {name: array.copy() for name, array in self._weights.items()}
            return dict(self._weights)

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Loads some or all variables (names not given keep their values).

        Raises:
            ValueError: a name is not a variable of the model, a shape does not match or a
                value is not numeric; then nothing has been changed.
        """
        with self._lock:
            checked = _checked(self._weights, weights)
            self._metrics = None  # they described the model these weights replace
            for name, array in checked.items():
                target = self._weights[name]
                if not target.flags.writeable:
                    target = self._weights[name] = target.copy()
                np.copyto(target, array, casting="unsafe")

    def best_weights(self) -> dict[str, np.ndarray] | None:
        """The trained model with the best key metric, else the last trained one, else the one
        an earlier run saved in ``best_model.pt``, else None."""
        with self._lock:
            best = self._best_model().weights()
            if best is None and self._trained is not None:
                best = {name: array.copy() for name, array in self._trained.items()}
            return best

    # -- training ---------------------------------------------------------------------------

    def abort(self) -> None:
        """Stops a running :meth:`train` or :meth:`validate` (thread-safe); the script's
        ``is_running()`` turns false at once. Made while nothing runs, it stops the next one."""
        self._abort.set()
        running = self._running
        if running is not None:
            running.post({"op": "abort", "reason": "aborted by the site"})

    def train(self) -> int:
        """One round: the script trains the current weights and sends its model back.

        Returns:
            The ``n_iter`` the script sent.

        Raises:
            TrainingAborted: :meth:`abort` was called; the weights are as they were.
            ScriptError: the script failed, ended, timed out or sent an unusable model.
        """
        with self._lock:
            self._n_iter, self._metrics, self._logs, self._total = 0, None, 0, 0
            self._rounds += 1
            current, total = self._round()
            running = self._start()
            what = f"round {current + 1}'s model"
            self._hand(running, "train", self._weights, current, total, what)
            header, arrays = self._await(running, "send", None, f"the result of {what}")
            if self._abort.is_set():
                # The abort came while the script was sending: its model is not taken.
                self._abort.clear()
                running.post({"op": "abort", "reason": "aborted by the site"})
                raise TrainingAborted(
                    f"training aborted on site {self.site_name!r} as {self.script.path} sent {what}"
                )
            if isinstance(header.get("evaluates"), bool):
                self._evaluates = header["evaluates"]
            if header.get("task") != "train":
                raise self._fail(f"{self.script.path} answered a training task as an evaluation")
            try:
                trained = _checked(self._weights, arrays)
            except ValueError as exc:
                hint = ""
                if any(name.startswith("module.") for name in arrays):
                    hint = " (that is a DDP wrapper's state_dict: send the wrapped model's)"
                raise self._fail(
                    f"{self.script.path} sent an unusable model: {exc}{hint}"
                ) from None
            n_iter = _n_iter(header.get("n_iter"), self._total)
            metrics = _floats(header.get("metrics"))
            running.post({"op": "ack"})
            for name, array in trained.items():
                np.copyto(self._weights[name], array, casting="unsafe")
            self._trained = {name: array.copy() for name, array in self._weights.items()}
            key = header.get("key_metric")
            if isinstance(key, str) and key in metrics:
                self._key = key
            elif metrics and self._key not in metrics:
                self._key = next(iter(metrics))
            self._metrics, self._n_iter = metrics, n_iter
            return n_iter

    def validate(
        self, weights: Mapping[str, np.ndarray] | None = None, *, after_training: bool = True
    ) -> dict[str, float]:
        """Metrics on this site's data, as the script measures them.

        Without ``weights`` right after training (``after_training``): the metrics the script
        sent with its trained model, whose key metric may make it the best local model. Without
        ``weights`` otherwise (a global model just loaded): the script evaluates the current
        weights. With ``weights`` (another site's model; names not given are the current
        weights'): the script evaluates those. A script that never asks ``is_evaluate()`` is
        not asked to evaluate; then the result is empty.

        Raises:
            ValueError: ``weights`` has an unknown name or a wrong shape.
            TrainingAborted, ScriptError: as :meth:`train`.
        """
        with self._lock:
            if weights is None and after_training and self._metrics is not None:
                metrics = dict(self._metrics)
                if self._key in metrics and self._trained is not None:
                    self._offer(metrics[self._key])
                self._save_metrics(metrics)
                return metrics
            if weights is None:
                target = self._weights
            else:
                target = {**self._weights, **_checked(self._weights, weights)}
            if self._evaluates is False:
                self._no_evaluation()
                return {}
            current, total = self._round()
            running = self._start()
            self._hand(running, "evaluate", target, current, total, "a model to evaluate")
            header, _ = self._await(running, "send", None, "the evaluation's metrics")
            running.post({"op": "ack"})
            if header.get("task") != "evaluate" or not header.get("asked", True):
                self._no_evaluation()
                return {}
            metrics = _floats(header.get("metrics"))
            if weights is None:
                self._save_metrics(metrics)
            return metrics

    def close(self, outcome: str = "") -> None:
        """Tells the script the run is over and waits for it to end (then ends it).

        A script told to stop sees ``is_running()`` false; one that does not end within the
        grace (shorter after an abort) is terminated, then killed.
        """
        with self._lock:
            self._closed = True
            running, self._running = self._running, None
        if running is None:
            return
        aborted = outcome == "aborted" or self._abort.is_set()
        running.post({"op": "stop", "reason": outcome or "the run is over"})
        codes = running.end(ABORT_STOP_GRACE if aborted else STOP_GRACE)
        for rank, code in enumerate(codes):
            if code not in (0, None) and self._failure is None and not aborted:
                log.warning("%s rank %d ended with exit code %s", self.script.path, rank, code)

    # -- the script -------------------------------------------------------------------------

    def _round(self) -> tuple[int, int]:
        if self._round_info is None:
            return self._rounds - 1 if self._rounds else 0, 0
        current, total = self._round_info()
        return int(current), int(total)

    def _start(self) -> _Script:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise ScriptError(f"{self.script.path}: the run is over")
        if self._running is None:
            self._running = _Script(self, self.ranks)
        return self._running

    def _hand(
        self,
        running: _Script,
        task: str,
        weights: Mapping[str, np.ndarray],
        current: int,
        total: int,
        what: str,
    ) -> None:
        deadline = time.monotonic() + self.script.timeout
        header, _ = self._await(running, "receive", deadline, what)
        if header.get("evaluates"):
            self._evaluates = True
        meta = {
            "site_name": self.site_name,
            "local_epochs": self.local_epochs,
            "steps_aggregation": self.steps_aggregation,
        }
        running.post(
            {
                "op": "task",
                "task": task,
                "current_round": current,
                "total_rounds": total,
                "meta": meta,
            },
            weights,
        )

    def _await(
        self, running: _Script, op: str, deadline: float | None, what: str
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The script's next ``op`` request; meanwhile abort, exits and the deadline count."""
        while True:
            if self._abort.is_set():
                self._abort.clear()
                raise TrainingAborted(
                    f"training aborted on site {self.site_name!r} while waiting for {what} "
                    f"from {self.script.path}"
                )
            try:
                got, header, arrays = running.requests.get(timeout=_POLL)
            except queue.Empty:
                problem = running.problem(what)
                if problem is not None:
                    raise self._fail(problem) from None
                if deadline is not None and time.monotonic() > deadline:
                    raise self._fail(self._timeout(running, what)) from None
                continue
            if got == op:
                return header, arrays
            raise self._fail(
                f"{self.script.path} broke the protocol: {got!r} while the worker waited for {what}"
            )

    def _timeout(self, running: _Script, what: str) -> str:
        where = f"script_timeout in {self.script.file}" if self.script.file else "script_timeout"
        wait = f"{self.script.timeout:g} s"
        if not running.connected.is_set():
            return (
                f"{self.script.path} did not connect within {wait}: it must call "
                f"fltui.client.init() and receive() ({where})"
            )
        return (
            f"{self.script.path} did not ask for {what} within {wait}: it must call "
            f"fltui.client.receive() ({where})"
        )

    def _fail(self, reason: str) -> ScriptError:
        """Ends the script and keeps the reason: every later call fails with it."""
        error = ScriptError(reason)
        self._failure = error
        running, self._running = self._running, None
        if running is not None:
            running.post({"op": "abort", "reason": reason})
            running.end(ABORT_STOP_GRACE)
        log.error("%s", reason)
        return error

    def _no_evaluation(self) -> None:
        self._evaluates = False
        if not self._told_no_evaluation:
            self._told_no_evaluation = True
            log.warning(
                "%s does not answer evaluation tasks (it never asks fltui.client.is_evaluate()):"
                " the global model's metrics and cross-site validation stay empty",
                self.script.path,
            )

    # -- reports from the script (its reader thread) ----------------------------------------

    def _logged(self, metrics: dict[str, float], step: int | None) -> None:
        self._logs += 1
        for name in ("train_loss", "loss"):
            if name in metrics:
                self._last_loss = metrics[name]
                break
        if self._on_epoch_end is not None:
            self._on_epoch_end(step if step is not None else self._logs, metrics)

    def _progressed(self, step: int, total: int, loss: float | None) -> None:
        self._total = total
        if loss is not None:
            self._last_loss = loss
        if self._on_progress is not None:
            self._on_progress(step, total, self._logs + 1, self._last_loss)

    # -- best model and metrics -------------------------------------------------------------

    def _best_model(self) -> Any:
        if self._best is None:
            from engine.training.weights import BestModel  # deferred: torch saves the model

            self._best = BestModel(self.ckpt_dir, self.higher_is_better)
        return self._best

    def _offer(self, value: float) -> None:
        import torch  # deferred: the best model is saved as torch tensors

        best = self._best_model()
        best.higher_is_better = self.higher_is_better
        best.offer(value, {name: torch.from_numpy(a) for name, a in self._weights.items()})

    def _save_metrics(self, metrics: Mapping[str, float]) -> None:
        save_validation_metrics(
            self.eval_dir,
            site=self.site_name,
            metric=self._key,
            metrics=metrics,
            best_metric=self.best_metric,
            local_rounds=self._rounds,
        )


class _Script:
    """One start of the script: its ranks, their output, and rank 0's connection."""

    def __init__(self, trainer: ScriptTrainer, ranks: int) -> None:
        self.trainer = trainer
        self.spec = trainer.script
        self.requests: queue.Queue[tuple[str, dict[str, Any], dict[str, np.ndarray]]] = (
            queue.Queue()
        )
        self.connected = threading.Event()
        self.conn: Connection | None = None
        self.protocol_error: str | None = None
        self._send_lock = threading.Lock()
        self._ended = False
        self.tails: list[collections.deque[str]] = []
        self._outputs: list[threading.Thread] = []
        authkey = secrets.token_bytes(32)
        self.listener = Listener(("127.0.0.1", 0), authkey=authkey)
        host, port = self.listener.address
        env = _script_env(trainer.site_name)
        # What torchrun gives each rank on one machine (a fresh port: not the worker group's).
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
            WORLD_SIZE=str(ranks),
            LOCAL_WORLD_SIZE=str(ranks),
        )
        self.procs: list[subprocess.Popen[bytes]] = []
        command = [sys.executable, "-u", self.spec.path, *self.spec.args]
        try:
            for rank in range(ranks):
                rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0"}
                if rank == 0:
                    # Only rank 0 talks to the worker: the others learn nothing of it.
                    rank_env[ADDRESS_ENV] = f"{host}:{port}"
                    rank_env[AUTHKEY_ENV] = authkey.hex()
                # In the worker's process group (no new session): the executor's abort reaches
                # the script and anything it starts.
                proc = subprocess.Popen(
                    command,
                    cwd=trainer.mmar_root,
                    env=rank_env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
                self.procs.append(proc)
                tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
                self.tails.append(tail)
                label = self.spec.path if ranks == 1 else f"{self.spec.path}[rank {rank}]"
                reader = threading.Thread(
                    target=_pump, args=(proc, tail, label), name=f"script-out-{rank}", daemon=True
                )
                reader.start()
                self._outputs.append(reader)
        except OSError as exc:
            self.end(0)
            raise ScriptError(f"{self.spec.path} could not be started: {exc}") from exc
        _LIVE.add(self)
        log.info(
            "%s: started %s (pid %s%s)",
            trainer.site_name,
            self.spec.path,
            self.procs[0].pid,
            f", {ranks} ranks" if ranks > 1 else "",
        )
        self._reader = threading.Thread(target=self._serve, name="script-conn", daemon=True)
        self._reader.start()

    # -- rank 0's connection ----------------------------------------------------------------

    def _serve(self) -> None:
        try:
            conn = self.listener.accept()
        except Exception:  # closed (the script ended first) or a caller without the key
            return
        finally:
            # One-time: whatever happened, nobody else connects with this key.
            with contextlib.suppress(OSError):
                self.listener.close()
        self.conn = conn
        try:
            header, _ = recv_message(conn)
            if header.get("op") != "hello" or header.get("version") != PROTOCOL_VERSION:
                raise WireError(
                    f"expected hello of protocol {PROTOCOL_VERSION}, got {header!r}; is "
                    "fltui.client of the same fltui as the site?"
                )
            self.connected.set()
            while True:
                header, arrays = recv_message(conn)
                self._dispatch(header, arrays)
        except (EOFError, OSError):
            return  # the script ended or closed its side: its exit says the rest
        except WireError as exc:
            self.protocol_error = f"{self.spec.path} broke the fltui.client protocol: {exc}"
            with contextlib.suppress(OSError):
                conn.close()

    def _dispatch(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        op = header["op"]
        try:
            if op == "log":
                step = header.get("step")
                self.trainer._logged(
                    _floats(header.get("metrics")), step if isinstance(step, int) else None
                )
                return
            if op == "progress":
                step, total, loss = header.get("step"), header.get("total"), header.get("loss")
                if isinstance(step, int) and isinstance(total, int):
                    self.trainer._progressed(
                        step, total, float(loss) if isinstance(loss, (int, float)) else None
                    )
                return
        except Exception:  # a broken subscriber must not stop the conversation
            log.exception("%s: a report of the script could not be delivered", self.spec.path)
            return
        if op in ("receive", "send"):
            self.requests.put((op, header, arrays))
        else:
            raise WireError(f"unknown message {op!r}")

    def post(self, header: dict[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> bool:
        """Sends to rank 0 (False when it is not there to take it)."""
        conn = self.conn
        if conn is None or self._ended:
            return False
        try:
            with self._send_lock:
                send_message(conn, header, arrays)
        except (OSError, ValueError):
            return False
        return True

    # -- the processes ----------------------------------------------------------------------

    def problem(self, what: str) -> str | None:
        """Why waiting for ``what`` is pointless now (a rank ended, the protocol broke)."""
        if self.protocol_error is not None:
            return self.protocol_error
        for rank, proc in enumerate(self.procs):
            code = proc.poll()
            if code is None or (rank > 0 and code == 0):
                continue
            self._outputs[rank].join(timeout=2)  # the whole traceback, not half of it
            if rank == 0:
                self._reader.join(timeout=2)
                if not self.requests.empty():
                    return None  # it asked before it ended: take that first
            return self._ended_early(rank, code, what)
        return None

    def _ended_early(self, rank: int, code: int, what: str) -> str:
        name = self.spec.path if len(self.procs) == 1 else f"{self.spec.path} (rank {rank})"
        if code == 0:
            return (
                f"{name} ended (exit code 0) before {what} was exchanged: its loop must run "
                "while fltui.client.is_running() and send() each result"
            )
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"{name} was killed by {signal.Signals(-code).name} during {what}"
        failure = _traceback(list(self.tails[rank]), self.trainer.mmar_root)
        if failure is None:
            return f"{name} failed (exit code {code}) during {what}; see the run's log"
        trace, where, error = failure
        log.error("%s raised:\n%s", name, "\n".join(trace))
        return f"{name} failed at {where}: {error} (exit code {code})"

    def end(self, grace: float) -> list[int | None]:
        """Waits up to ``grace`` for every rank, then SIGTERM, then SIGKILL; returns the codes."""
        self._ended = True
        deadline = time.monotonic() + grace
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
        alive = [p for p in self.procs if p.poll() is None]
        for proc in alive:
            with contextlib.suppress(OSError):
                proc.terminate()
        for proc in alive:
            try:
                proc.wait(TERM_GRACE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        with contextlib.suppress(OSError):
            self.listener.close()
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.close()
        for reader in self._outputs:
            reader.join(timeout=2)
        _LIVE.discard(self)
        return [p.returncode for p in self.procs]


def _pump(proc: subprocess.Popen[bytes], tail: collections.deque[str], label: str) -> None:
    """A rank's output, line by line, into the run's log (and a tail for its traceback)."""
    assert proc.stdout is not None
    with proc.stdout:
        for raw in proc.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip()
            tail.append(line)
            if line:
                log.info("%s: %s", label, line)


def _script_env(site_name: str) -> dict[str, str]:
    """The script's environment: the worker's, less anything of fltui's or of a launcher's."""
    dropped = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FLTUI_")
        and k not in dropped
        and k not in ("MASTER_ADDR", "MASTER_PORT")
    }
    # fltui.client must be importable by the script, installed or not: our distribution's
    # folder goes last on its path (it never shadows the script's own modules).
    home = str(Path(__file__).resolve().parents[2])
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if home not in paths:
        paths.append(home)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env[SITE_ENV] = site_name
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _traceback(lines: list[str], root: Path) -> tuple[list[str], str, str] | None:
    """The last Python traceback of a script's output: its lines, where (the innermost frame in
    the MMAR's own files, ``custom/train.py:12``) and the error line."""
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call")]
    if not starts:
        return None
    trace = lines[starts[-1] :]
    frames = [(m["file"], m["line"], m["func"] or "") for m in map(_FRAME.match, trace[1:]) if m]
    # The error is the last unindented line (after the frames, their source and ^^^ markers).
    ends = [line for line in trace[1:] if line and not line.startswith(" ")]
    error = ends[-1] if ends else "an exception"
    where = "an unknown line"
    own = []
    for file, line_no, func in frames:
        path = Path(file)
        if not path.is_absolute():
            path = root / path
        with contextlib.suppress(ValueError, OSError):
            own.append((path.resolve().relative_to(root).as_posix(), line_no, func))
    chosen = own[-1] if own else (frames[-1] if frames else None)
    if chosen is not None:
        where = f"{chosen[0]}:{chosen[1]}" + (f" (in {chosen[2]})" if chosen[2] else "")
    return trace, where, error


def _checked(current: Mapping[str, np.ndarray], given: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``given`` checked against the model: known names, same shapes, numbers."""
    unknown = [name for name in given if name not in current]
    if unknown:
        raise ValueError(
            f"unknown variable {unknown[0]!r}: the model has no such variable "
            f"({len(unknown)} unknown of {len(given)} given; the model has {len(current)}, "
            f"e.g. {next(iter(current), '')!r})"
        )
    out: dict[str, np.ndarray] = {}
    for name, value in given.items():
        array = np.asarray(value)
        if tuple(array.shape) != tuple(current[name].shape):
            raise ValueError(
                f"variable {name!r}: shape {tuple(array.shape)} given, but the model's is "
                f"{tuple(current[name].shape)}"
            )
        if array.dtype.kind not in "biufc":
            raise ValueError(f"variable {name!r}: dtype {array.dtype} is not numeric")
        out[name] = array
    return out


def _floats(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        return {}
    return {
        str(k): float(v)
        for k, v in value.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _n_iter(value: Any, total: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if total > 0:
        return total  # the round's steps, as the script's progress() said
    log.warning("the script sent no n_iter: FedAvg weighs this site's update as 1 step")
    return 1


_LIVE: weakref.WeakSet[_Script] = weakref.WeakSet()


@atexit.register
def _end_all() -> None:
    # A trainer nobody closed (a test that failed, an interrupted run): no script outlives us.
    for running in list(_LIVE):
        running.end(0)
