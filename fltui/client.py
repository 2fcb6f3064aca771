"""The client API for a research team's own training script: five lines federate a PyTorch loop.

::

    import fltui.client as flc                        # (1)
    flc.init()                                        # (2)
    while flc.is_running():                           # (3)
        net.load_state_dict(flc.receive().params)     # (4)
        ...  # the loop as it was
        flc.send(net.state_dict(), n_iter=steps, metrics={"accuracy": acc})  # (5)

The site's training worker runs the script an MMAR names (``config_fed_client.json``:
``"script": "custom/train.py"``) and is its only peer: a loopback connection with a one-time key,
never the server, the session token or the certificates. The semantics follow NVFlare's Client
API (``flare.init`` / ``receive`` / ``send`` / ``is_running``):

- :func:`is_running` fetches the next task when none is held (blocking until the federation
  has one) and says whether there is one; false once the run is over or aborted. Called again
  while a task is held (inside a training loop, say), it turns false at once on an abort.
- :func:`receive` returns the held task (fetching it if needed): an :class:`FLModel` with the
  global model as a torch ``state_dict`` in ``params``, or None once the run is over.
- :func:`send` returns the result: after training, the trained ``state_dict`` with ``n_iter``
  (the steps taken: FedAvg weighs by it) and ``metrics`` of that model (the key metric,
  ``key_metric=`` or the first, picks the site's best local model); for an evaluation task
  (:func:`is_evaluate`), ``metrics`` alone. A script that asks :func:`is_evaluate` is also
  given each new global model and, for cross-site validation, other sites' models to evaluate;
  one that never asks is given training tasks only.
- :func:`log` and :func:`progress` become the site's events (the console, ``--no-ui``).

Multi-GPU (``torchrun`` semantics, started by the site for N ranks): every rank calls the same
functions in the same order. Only rank 0 talks to the worker; :func:`is_running` and
:func:`receive`, when they fetch a task, broadcast it from rank 0 to every rank through
``torch.distributed`` (initialise the process group first: ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` are set), so every rank gets the same model and the same
answer. :func:`send`, :func:`log` and :func:`progress` do nothing on the other ranks.

This module imports no console code and no torch until it handles tensors.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection
from typing import Any

import numpy as np

from engine.training.script_wire import (
    ADDRESS_ENV,
    AUTHKEY_ENV,
    PROTOCOL_VERSION,
    SITE_ENV,
    WireError,
    parse_address,
    recv_message,
    send_message,
)

__all__ = [
    "FLModel",
    "init",
    "is_evaluate",
    "is_running",
    "is_train",
    "log",
    "progress",
    "rank",
    "receive",
    "send",
    "site_name",
]


@dataclass
class FLModel:
    """A task from the federation: a model to train or to evaluate.

    Attributes:
        params: the model as a torch ``state_dict`` (CPU tensors; load it with
            ``net.load_state_dict``).
        current_round: the federation's round, 0-based (NVFlare's convention).
        total_rounds: the federation's rounds.
        task: ``"train"`` or ``"evaluate"``.
        meta: ``site_name``, and the round's budget from ``config_fed_client.json``:
            ``local_epochs`` (None: the script's own) and ``steps_aggregation`` (0: epochs).
    """

    params: dict[str, Any]
    current_round: int
    total_rounds: int
    task: str = "train"
    meta: dict[str, Any] = field(default_factory=dict)


class _Session:
    """This process's side of the conversation with the worker (one per process)."""

    def __init__(self) -> None:
        self.rank = int(os.environ.get("RANK", "0") or 0)
        self.world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.conn: Connection | None = None
        self.current: FLModel | None = None
        self.over = False
        self.aborted = False
        self.asked = False  # the current task's kind was asked (is_train / is_evaluate)
        self.evaluates = False  # ... ever: the script tells evaluation tasks apart
        self._tasks: queue.Queue[tuple[dict[str, Any], dict[str, np.ndarray]] | None] = (
            queue.Queue()
        )
        self._acks: queue.Queue[bool] = queue.Queue()
        self._send_lock = threading.Lock()
        if self.rank != 0:
            return
        address = os.environ.get(ADDRESS_ENV)
        key = os.environ.get(AUTHKEY_ENV)
        if not address or not key:
            raise RuntimeError(
                f"fltui.client: this script was not started by a fltui site ({ADDRESS_ENV} is "
                "not set): name it in the MMAR's config_fed_client.json as "
                '"script": "custom/<name>.py" and start the site'
            )
        self.conn = Client(parse_address(address), authkey=bytes.fromhex(key))
        # The key was for this one connection: nothing the script starts inherits it.
        os.environ.pop(AUTHKEY_ENV, None)
        self._post({"op": "hello", "version": PROTOCOL_VERSION, "pid": os.getpid()})
        threading.Thread(target=self._read, name="fltui-client", daemon=True).start()

    # -- rank 0: the worker's messages ------------------------------------------------------

    def _read(self) -> None:
        assert self.conn is not None
        try:
            while True:
                header, arrays = recv_message(self.conn)
                op = header.get("op")
                if op == "task":
                    self._tasks.put((header, arrays))
                elif op == "ack":
                    self._acks.put(True)
                elif op in ("stop", "abort"):
                    self.over = True
                    self.aborted = self.aborted or op == "abort"
                    self._wake()
        except (EOFError, OSError, WireError):
            self.over = True  # the worker is gone: the run is over for this script
            self._wake()

    def _wake(self) -> None:
        self._tasks.put(None)
        self._acks.put(False)

    def _post(self, header: dict[str, Any], arrays: Mapping[str, Any] | None = None) -> bool:
        if self.conn is None:
            return False
        try:
            with self._send_lock:
                send_message(self.conn, header, arrays)
        except (OSError, ValueError):
            self.over = True  # the worker is gone
            return False
        return True

    # -- tasks ------------------------------------------------------------------------------

    def fetch(self) -> FLModel | None:
        """The held task, or the next one (every rank, in step); None once the run is over."""
        if self.current is not None:
            return self.current
        payload = None
        if self.rank == 0 and not self.over:
            self._post({"op": "receive", "evaluates": self.evaluates})
            item = self._tasks.get()
            # A task that arrived as the run ended (stop, abort) is not started.
            payload = None if self.over else item
        if self.world_size > 1:
            payload = _broadcast(payload, self.rank, self.world_size)
        if payload is None:
            self.over = True
            return None
        header, arrays = payload
        self.asked = False
        self.current = FLModel(
            params=_tensors(arrays),
            current_round=int(header.get("current_round", 0)),
            total_rounds=int(header.get("total_rounds", 0)),
            task=str(header.get("task", "train")),
            meta=dict(header.get("meta") or {}),
        )
        return self.current

    def running(self) -> bool:
        if self.aborted or self.over:
            return False
        if self.current is not None:
            return True
        return self.fetch() is not None

    def kind(self) -> str:
        model = self.fetch()
        self.asked = self.evaluates = True
        return model.task if model is not None else ""

    def send(
        self,
        state_dict: Mapping[str, Any] | None,
        n_iter: int | None,
        metrics: Mapping[str, Any] | None,
        key_metric: str | None,
    ) -> None:
        model = self.current
        if model is None:
            if self.over:
                return  # the run ended (or was aborted) while the script worked: nothing to do
            raise RuntimeError("fltui.client.send() without a task: call receive() first")
        self.current = None
        values = _metrics(metrics)
        if key_metric is not None and key_metric not in values:
            raise ValueError(f"key_metric {key_metric!r} is not one of the metrics sent")
        if n_iter is not None and (
            isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1
        ):
            raise ValueError(f"n_iter must be a positive integer (steps taken), got {n_iter!r}")
        if model.task == "train" and state_dict is None:
            raise ValueError("send() after training needs the trained model's state_dict")
        if self.rank != 0 or self.over:
            return  # rank 0 sends for every rank; a run that ended takes nothing
        arrays = _arrays(state_dict) if model.task == "train" and state_dict is not None else {}
        header = {
            "op": "send",
            "task": model.task,
            "current_round": model.current_round,
            "n_iter": n_iter,
            "metrics": values,
            "key_metric": key_metric,
            "asked": self.asked,
            "evaluates": self.evaluates,
        }
        if self._post(header, arrays):
            self._acks.get()  # taken, or the run ended (abort, stop) meanwhile

    def report(self, header: dict[str, Any]) -> None:
        if self.rank == 0 and not self.over:
            self._post(header)


_session: _Session | None = None
_session_lock = threading.Lock()


def _get() -> _Session:
    global _session
    with _session_lock:
        if _session is None:
            _session = _Session()
        return _session


def init() -> None:
    """Connects this script to its site's training worker (rank 0; other ranks: nothing to
    connect). Safe to call twice; :func:`is_running` and :func:`receive` call it if needed.

    Raises:
        RuntimeError: the script was not started by a fltui site.
    """
    _get()


def is_running() -> bool:
    """Whether the federation has a task for this script (fetching the next one if none is
    held; every rank in step). False once the run is over, and at once on an abort."""
    return _get().running()


def receive() -> FLModel | None:
    """The current task (fetching the next one if none is held); None once the run is over."""
    return _get().fetch()


def send(
    state_dict: Mapping[str, Any] | None = None,
    *,
    n_iter: int | None = None,
    metrics: Mapping[str, Any] | None = None,
    key_metric: str | None = None,
) -> None:
    """Returns the current task's result and ends the task.

    Args:
        state_dict: after training, the trained model's ``state_dict`` (tensors or arrays; the
            variables the site sent, by the same names and shapes). Not for evaluation tasks.
        n_iter: the optimizer steps taken (FedAvg weighs each site by it); default: the last
            :func:`progress` total.
        metrics: numbers measured on the model (after training: the trained model's).
        key_metric: which of ``metrics`` picks the best local model (default: the first);
            a name with loss, error, distance... in it counts as lower-is-better.

    Raises:
        RuntimeError: there is no task to answer.
        ValueError: a bad ``n_iter``, ``key_metric`` or value.
    """
    _get().send(state_dict, n_iter, metrics, key_metric)


def is_train() -> bool:
    """Whether the current task (fetched if none is held) is training."""
    return _get().kind() == "train"


def is_evaluate() -> bool:
    """Whether the current task (fetched if none is held) is to evaluate ``params`` and
    :func:`send` only ``metrics``: each new global model, and other sites' models in
    cross-site validation."""
    return _get().kind() == "evaluate"


def log(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Reports metrics (e.g. each epoch's ``{"train_loss": ...}``) as the site's events;
    ``step`` is the epoch (or step) they belong to (default: how many logs this round)."""
    _get().report({"op": "log", "metrics": _metrics(metrics), "step": step})


def progress(step: int, total: int, *, loss: float | None = None) -> None:
    """Reports training progress (the console's progress bar): ``step`` of ``total`` this
    round, with the running loss if known. Cheap enough for every step; the site thins it."""
    _get().report(
        {
            "op": "progress",
            "step": int(step),
            "total": int(total),
            "loss": None if loss is None else float(loss),
        }
    )


def site_name() -> str:
    """The name of the site running this script."""
    return os.environ.get(SITE_ENV, "")


def rank() -> int:
    """This process's rank (0 unless the site runs the script as several ranks)."""
    return int(os.environ.get("RANK", "0") or 0)


# -- conversions ---------------------------------------------------------------------------------


def _tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    import torch  # deferred: torch loads when a model arrives, not with this module

    return {name: torch.from_numpy(array) for name, array in arrays.items()}


def _arrays(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, value in state_dict.items():
        if hasattr(value, "detach"):  # a torch tensor
            tensor = value.detach()
            if str(tensor.dtype) == "torch.bfloat16":
                tensor = tensor.float()  # numpy has no bfloat16
            out[str(name)] = tensor.cpu().numpy()
        else:
            array = np.asarray(value)
            if array.dtype.kind not in "biufc":
                raise ValueError(f"state_dict[{name!r}] is not a tensor or numeric array")
            out[str(name)] = array
    return out


def _metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in (metrics or {}).items():
        try:
            out[str(name)] = float(value)  # numbers, numpy and 1-element torch scalars
        except (TypeError, ValueError):
            raise ValueError(f"metric {name!r} is not a number: {value!r}") from None
    return out


def _broadcast(payload: Any, rank: int, world_size: int) -> Any:
    """Rank 0's task (or None) to every rank, through the script's torch.distributed group."""
    import torch.distributed as dist  # deferred: only scripts that run as several ranks

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"fltui.client: rank {rank} of {world_size}: initialise torch.distributed "
            "(dist.init_process_group) before is_running() or receive(): rank 0 broadcasts "
            "each model to the other ranks through it"
        )
    box = [payload if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
