"""NVML GPU sampler: lazy init, N/A values as None, never raises into callers."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.events import EventBus, GpuSampled

__all__ = [
    "HISTORY_LEN",
    "REASON_DRIVER_NOT_LOADED",
    "REASON_NO_DRIVER",
    "REASON_NO_GPU",
    "REASON_NO_LIBRARY",
    "REASON_NO_PERMISSION",
    "REASON_VERSION_MISMATCH",
    "GpuInfo",
    "GpuProcess",
    "GpuSampler",
    "SimulatedGpuSampler",
    "own_process_tree",
    "simulated_feed",
]

_log = logging.getLogger("engine.gpu")

REASON_NO_LIBRARY = "no NVML library (pynvml not importable)"
REASON_NO_DRIVER = "NVML library found but no NVIDIA driver (libnvidia-ml.so not loaded)"
REASON_DRIVER_NOT_LOADED = "NVIDIA driver installed but not loaded (kernel module not running)"
REASON_NO_GPU = "NVIDIA driver loaded, no GPU"
REASON_VERSION_MISMATCH = "NVIDIA driver/library version mismatch (reload the driver or reboot)"
REASON_NO_PERMISSION = "no permission to use NVML (check the /dev/nvidia* device permissions)"

HISTORY_LEN = 120
"""Samples kept per GPU for sparklines (about two minutes at one sample a second)."""

# NVML error codes, used where the nvml module at hand does not define the constant.
_ERR_DRIVER_NOT_LOADED = 9
_ERR_NO_PERMISSION = 4
_ERR_UNINITIALIZED = 1
_ERR_LIBRARY_NOT_FOUND = 12
_ERR_FUNCTION_NOT_FOUND = 13
_ERR_LIB_RM_VERSION_MISMATCH = 18
_VALUE_NOT_AVAILABLE = 2**64 - 1

History = list[tuple[float, float | None, int | None]]


@dataclass(frozen=True)
class GpuProcess:
    """A process with a compute context on a GPU.

    Attributes:
        pid: the process id, as NVML reports it.
        used_memory: GPU memory it holds, in bytes; None where NVML cannot tell.
        ours: whether it is this site's process or one of its workers.
    """

    pid: int
    used_memory: int | None = None
    ours: bool = False


@dataclass(frozen=True)
class GpuInfo:
    """One GPU at one moment; every reading is None where NVML could not give it (N/A).

    Attributes:
        index: NVML device index.
        name: product name, for example "NVIDIA A100-SXM4-80GB".
        uuid: NVML UUID ("GPU-…"), empty when unknown.
        utilization: GPU utilisation in percent.
        memory_used: bytes in use.
        memory_total: bytes on the device.
        temperature: GPU core temperature in °C.
        power: power draw in W.
        power_limit: enforced power limit in W.
        processes: compute processes on the GPU, ours first.
    """

    index: int
    name: str
    uuid: str = ""
    utilization: float | None = None
    memory_used: int | None = None
    memory_total: int | None = None
    temperature: float | None = None
    power: float | None = None
    power_limit: float | None = None
    processes: tuple[GpuProcess, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (processes as a list of dicts)."""
        data = dataclasses.asdict(self)
        data["processes"] = [dataclasses.asdict(p) for p in self.processes]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GpuInfo:
        """Rebuilds a GpuInfo from ``to_dict()`` output; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names and k != "processes"}
        procs = tuple(
            GpuProcess(
                pid=int(p.get("pid", 0)),
                used_memory=p.get("used_memory"),
                ours=bool(p.get("ours", False)),
            )
            for p in data.get("processes") or ()
        )
        return cls(**values, processes=procs)

    @property
    def memory_fraction(self) -> float | None:
        """memory_used / memory_total, or None when either is unknown."""
        if self.memory_used is None or not self.memory_total:
            return None
        return self.memory_used / self.memory_total


def own_process_tree() -> set[int]:
    """This process and all its descendants (the site and its training workers).

    Reads ``/proc`` on Linux; elsewhere only this process is known.
    """
    me = os.getpid()
    children: dict[int, list[int]] = {}
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return {me}
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and fields[1].isdigit():
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    ours = {me}
    todo = [me]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in ours:
                ours.add(child)
                todo.append(child)
    return ours


def _decode(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _error_text(exc: BaseException) -> str:
    # pynvml's NVMLError.__str__ may itself call into the library; it must not raise here.
    try:
        text = str(exc)
    except Exception:
        text = ""
    return text or type(exc).__name__


class _SamplerBase:
    """The thread, publishing and history shared by the real and the simulated sampler."""

    def __init__(self, *, history_len: int = HISTORY_LEN, republish_s: float = 30.0) -> None:
        self._history_len = history_len
        self._republish_s = republish_s
        self._history: dict[int, deque[tuple[float, float | None, int | None]]] = {}
        self._history_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_event: GpuSampled | None = None

    def sample(self, site: str = "") -> GpuSampled:  # pragma: no cover - overridden
        raise NotImplementedError

    def shutdown(self) -> None:
        """Releases whatever the sampler holds (NVML); a later sample starts again."""

    @property
    def last_event(self) -> GpuSampled | None:
        """The latest sample, for a subscriber that attaches late (None before the first)."""
        return self._last_event

    def history(self, index: int) -> History:
        """The last samples of GPU ``index``: ``(ts, utilization %, memory used bytes)``.

        Bounded to ``history_len`` entries; empty for an unknown index.
        """
        with self._history_lock:
            return list(self._history.get(index, ()))

    def _record(self, event: GpuSampled) -> None:
        self._last_event = event
        if not event.available:
            return
        with self._history_lock:
            for gpu in event.gpus:
                ring = self._history.setdefault(
                    int(gpu.get("index", 0)), deque(maxlen=self._history_len)
                )
                ring.append((event.ts, gpu.get("utilization"), gpu.get("memory_used")))

    @property
    def running(self) -> bool:
        """Whether the sampling thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, bus: EventBus, site: str, interval: float = 1.0) -> None:
        """Samples in a daemon thread about every ``interval`` seconds, publishing GpuSampled.

        While GPUs are visible every sample is published. While there are none, an event is
        published when the reason changes and again every ``republish_s`` seconds, so a
        headless log is not flooded with the same "no GPU" line. Calling start twice is a no-op.

        Args:
            bus: where the events go.
            site: the site name carried by the events.
            interval: seconds between samples.
        """
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(bus, site, interval), name="gpu-sampler", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> bool:
        """Stops the sampling thread and shuts NVML down.

        Args:
            timeout: seconds to wait for the thread (an NVML call can hang on a sick GPU; the
                daemon thread is then left behind rather than blocking the caller).

        Returns:
            True when the thread has ended (or never ran).
        """
        self._stop.set()
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        stopped = not thread.is_alive()
        if stopped:
            self._thread = None
        return stopped

    def _run(self, bus: EventBus, site: str, interval: float) -> None:
        last_published: tuple[bool, str] | None = None
        last_publish_at = 0.0
        try:
            while not self._stop.is_set():
                began = time.monotonic()
                event = self.sample(site)
                key = (event.available, event.reason)
                if (
                    event.available
                    or key != last_published
                    or began - last_publish_at >= self._republish_s
                ):
                    try:
                        bus.publish(event)
                    except Exception:  # the bus already guards subscribers; belt and braces
                        _log.exception("publishing a GPU sample failed")
                    last_published, last_publish_at = key, began
                self._stop.wait(max(0.05, interval - (time.monotonic() - began)))
        finally:
            self.shutdown()


class GpuSampler(_SamplerBase):
    """Reads GPUs through NVML; initialises lazily and turns every failure into data.

    ``sample()`` never raises: a missing library, driver or GPU gives ``available=False``
    with the reason in words; a reading a GPU does not support is None (shown as N/A).
    The sampler is thread-safe.

    Args:
        nvml: a pynvml-like module; by default ``pynvml`` (nvidia-ml-py) is imported on the
            first sample.
        our_pids: returns the pids of this site (the site process and its workers); by
            default this process and its descendants.
        clock: monotonic clock, for the init retry interval (tests inject one).
        retry_init_s: after a failed ``nvmlInit``, the next try waits at least this long.
        history_len: samples kept per GPU by ``history()``.
        republish_s: while no GPU is visible, how often the thread re-publishes that.
    """

    def __init__(
        self,
        nvml: Any = None,
        our_pids: Callable[[], set[int]] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        retry_init_s: float = 30.0,
        history_len: int = HISTORY_LEN,
        republish_s: float = 30.0,
    ) -> None:
        super().__init__(history_len=history_len, republish_s=republish_s)
        self._nvml = nvml
        self._import_failed = False
        self._our_pids = our_pids or own_process_tree
        self._clock = clock
        self._retry_init_s = retry_init_s
        self._lock = threading.Lock()
        self._initialized = False
        self._last_init_try: float | None = None
        self._init_reason = ""

    @property
    def initialized(self) -> bool:
        """Whether NVML is initialised now."""
        return self._initialized

    def sample(self, site: str = "") -> GpuSampled:
        """Reads every GPU once.

        Args:
            site: the site name carried by the event.

        Returns:
            A GpuSampled event; never raises.
        """
        ts = time.time()
        try:
            with self._lock:
                available, reason, gpus = self._sample_locked()
        except Exception as exc:  # whatever happens, the caller gets data, not an exception
            _log.debug("GPU sampling failed", exc_info=True)
            available, reason, gpus = False, f"GPU sampling failed: {_error_text(exc)}", []
        event = GpuSampled(
            site=site,
            ts=ts,
            available=available,
            reason=reason,
            gpus=[g.to_dict() for g in gpus],
        )
        self._record(event)
        return event

    def shutdown(self) -> None:
        """Shuts NVML down if it is initialised; the next sample initialises it again."""
        with self._lock:
            if self._initialized and self._nvml is not None:
                with contextlib.suppress(Exception):
                    self._nvml.nvmlShutdown()
            self._initialized = False
            self._last_init_try = None

    # -- internals (called with self._lock held) ------------------------------------------

    def _module(self) -> Any:
        if self._nvml is None and not self._import_failed:
            try:
                import pynvml  # deferred: NVML may be absent; importing the engine must not need it
            except Exception:  # ImportError, or a broken install raising something else
                self._import_failed = True
                _log.debug("pynvml import failed", exc_info=True)
            else:
                self._nvml = pynvml
        return self._nvml

    def _const(self, name: str, default: int) -> int:
        value = getattr(self._nvml, name, default)
        return value if isinstance(value, int) else default

    def _is_nvml_error(self, exc: BaseException) -> bool:
        error_type = getattr(self._nvml, "NVMLError", None)
        return isinstance(error_type, type) and isinstance(exc, error_type)

    def _code(self, exc: BaseException) -> int | None:
        value = getattr(exc, "value", None)
        return value if isinstance(value, int) else None

    def _ensure_init(self) -> str | None:
        """Initialises NVML when due; returns why it is not usable, or None when it is."""
        nvml = self._module()
        if nvml is None:
            return REASON_NO_LIBRARY
        if self._initialized:
            return None
        now = self._clock()
        if self._last_init_try is not None and now - self._last_init_try < self._retry_init_s:
            return self._init_reason
        self._last_init_try = now
        try:
            nvml.nvmlInit()
        except Exception as exc:
            self._init_reason = self._init_failure_reason(exc)
            _log.debug("nvmlInit failed: %s", self._init_reason)
            return self._init_reason
        self._initialized = True
        self._init_reason = ""
        return None

    def _init_failure_reason(self, exc: BaseException) -> str:
        if not self._is_nvml_error(exc):
            return f"NVML init failed: {_error_text(exc)}"
        code = self._code(exc)
        reasons = {
            self._const("NVML_ERROR_LIBRARY_NOT_FOUND", _ERR_LIBRARY_NOT_FOUND): REASON_NO_DRIVER,
            self._const(
                "NVML_ERROR_DRIVER_NOT_LOADED", _ERR_DRIVER_NOT_LOADED
            ): REASON_DRIVER_NOT_LOADED,
            self._const(
                "NVML_ERROR_LIB_RM_VERSION_MISMATCH", _ERR_LIB_RM_VERSION_MISMATCH
            ): REASON_VERSION_MISMATCH,
            self._const("NVML_ERROR_NO_PERMISSION", _ERR_NO_PERMISSION): REASON_NO_PERMISSION,
        }
        if code in reasons:
            return reasons[code]
        return f"NVML init failed: {_error_text(exc)}"

    def _sample_locked(self) -> tuple[bool, str, list[GpuInfo]]:
        reason = self._ensure_init()
        if reason is not None:
            return False, reason, []
        nvml = self._nvml
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            if self._code(exc) == self._const("NVML_ERROR_UNINITIALIZED", _ERR_UNINITIALIZED):
                # someone shut NVML down under us: initialise again on the next sample
                self._initialized = False
                self._last_init_try = None
            return False, f"NVML error: {_error_text(exc)}", []
        if count <= 0:
            return False, REASON_NO_GPU, []
        gpus = [self._read_gpu(i) for i in range(count)]
        if any(g.processes for g in gpus):
            ours = self._safe_our_pids()
            gpus = [
                dataclasses.replace(
                    g,
                    processes=tuple(
                        sorted(
                            (dataclasses.replace(p, ours=p.pid in ours) for p in g.processes),
                            key=lambda p: (not p.ours, -(p.used_memory or 0), p.pid),
                        )
                    ),
                )
                for g in gpus
            ]
        return True, "", gpus

    def _safe_our_pids(self) -> set[int]:
        try:
            return {int(p) for p in self._our_pids()}
        except Exception:
            _log.debug("our_pids() failed", exc_info=True)
            return {os.getpid()}

    def _read(self, fn: Callable[[], Any]) -> Any:
        """One NVML reading; any failure (NotSupported, NoPermission, GpuIsLost…) is None."""
        try:
            return fn()
        except Exception:
            return None

    def _read_gpu(self, index: int) -> GpuInfo:
        nvml = self._nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as exc:
            return GpuInfo(index=index, name=f"GPU {index} ({_error_text(exc)})")
        name = self._read(lambda: _decode(nvml.nvmlDeviceGetName(handle)))
        uuid = self._read(lambda: _decode(nvml.nvmlDeviceGetUUID(handle)))
        util = self._read(lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
        memory = self._read(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        used = self._read(lambda: int(memory.used)) if memory is not None else None
        total = self._read(lambda: int(memory.total)) if memory is not None else None
        sensor = self._const("NVML_TEMPERATURE_GPU", 0)
        temp = self._read(lambda: float(nvml.nvmlDeviceGetTemperature(handle, sensor)))
        power = self._read(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
        limit = self._read(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0)
        return GpuInfo(
            index=index,
            name=name or f"GPU {index}",
            uuid=uuid or "",
            utilization=util,
            memory_used=used,
            memory_total=total,
            temperature=temp,
            power=power,
            power_limit=limit,
            processes=self._processes(handle),
        )

    def _processes(self, handle: Any) -> tuple[GpuProcess, ...]:
        nvml = self._nvml
        not_found = self._const("NVML_ERROR_FUNCTION_NOT_FOUND", _ERR_FUNCTION_NOT_FOUND)
        tried: list[Any] = []  # the functions themselves: ids of bound methods get reused
        # The unversioned name is v3 in current nvidia-ml-py; a driver older than the binding
        # lacks the v3 symbol (FunctionNotFound), so fall back to v2.
        for attr in (
            "nvmlDeviceGetComputeRunningProcesses",
            "nvmlDeviceGetComputeRunningProcesses_v3",
            "nvmlDeviceGetComputeRunningProcesses_v2",
        ):
            fn = getattr(nvml, attr, None)
            if fn is None or any(fn == other for other in tried):
                continue
            tried.append(fn)
            try:
                infos = fn(handle)
            except Exception as exc:
                if self._code(exc) == not_found:
                    continue
                return ()
            procs = []
            for info in infos or ():
                pid = getattr(info, "pid", None)
                if not isinstance(pid, int):
                    continue
                used = getattr(info, "usedGpuMemory", None)
                if not isinstance(used, int) or used == _VALUE_NOT_AVAILABLE:
                    used = None
                procs.append(GpuProcess(pid=pid, used_memory=used))
            return tuple(procs)
        return ()


_SIM_MODELS = (
    ("NVIDIA A100-SXM4-80GB", 80 * 2**30, 400.0),
    ("NVIDIA H100 80GB HBM3", 80 * 2**30, 700.0),
    ("NVIDIA RTX A6000", 48 * 2**30, 300.0),
)


class SimulatedGpuSampler(_SamplerBase):
    """SIMULATED GPUs with plausible moving readings, for screenshots and demos.

    Every event it makes has ``simulated=True`` and a ``reason`` that says so; it never reads
    real hardware. Values move deterministically per ``seed`` from sample to sample.

    Args:
        n: how many GPUs to pretend.
        seed: seed of the random walk.
        our_pids: pids to show as our workers; by default this process.
        history_len: samples kept per GPU by ``history()``.
    """

    def __init__(
        self,
        n: int,
        seed: int = 0,
        our_pids: Callable[[], set[int]] | None = None,
        *,
        history_len: int = HISTORY_LEN,
    ) -> None:
        super().__init__(history_len=history_len)
        self._n = max(0, int(n))
        self._rng = random.Random(seed)
        self._our_pids = our_pids or (lambda: {os.getpid()})
        self._step = 0
        self._lock = threading.Lock()
        self._phase = [self._rng.uniform(0, 2 * math.pi) for _ in range(self._n)]
        self._util = [self._rng.uniform(40, 90) for _ in range(self._n)]

    def sample(self, site: str = "") -> GpuSampled:
        """Makes the next SIMULATED sample (never raises)."""
        with self._lock:
            self._step += 1
            try:
                pids = sorted(self._our_pids())
            except Exception:
                pids = [os.getpid()]
            gpus = [self._gpu(i, pids) for i in range(self._n)]
        event = GpuSampled(
            site=site,
            available=bool(gpus),
            reason="SIMULATED GPUs" if gpus else "SIMULATED: zero GPUs",
            gpus=[g.to_dict() for g in gpus],
            simulated=True,
        )
        self._record(event)
        return event

    def _gpu(self, i: int, pids: list[int]) -> GpuInfo:
        name, total, limit = _SIM_MODELS[i % len(_SIM_MODELS)]
        wave = 25 * math.sin(self._step / 9 + self._phase[i])
        self._util[i] = min(100.0, max(0.0, self._util[i] + self._rng.gauss(0, 6)))
        self._util[i] += (70 - self._util[i]) * 0.1  # pull back towards a busy mean
        util = round(min(100.0, max(0.0, self._util[i] + wave)))
        worker = int(total * (0.35 + 0.04 * i + 0.02 * math.sin(self._step / 30)))
        other = int(total * 0.05) if i % 2 else 0
        used = worker + other + 600 * 2**20  # the CUDA context of the driver
        procs = [GpuProcess(pid=pids[i % len(pids)] if pids else 0, used_memory=worker, ours=True)]
        if other:
            procs.append(GpuProcess(pid=31337 + i, used_memory=other, ours=False))
        return GpuInfo(
            index=i,
            name=name,
            uuid=f"GPU-SIMULATED-{i:04d}",
            utilization=float(util),
            memory_used=used,
            memory_total=total,
            temperature=float(round(38 + util * 0.35 + self._rng.uniform(-1, 1))),
            power=round(limit * (0.15 + 0.8 * util / 100) + self._rng.uniform(-5, 5), 1),
            power_limit=limit,
            processes=tuple(procs),
        )


def simulated_feed(
    n: int, seed: int = 0, our_pids: Callable[[], set[int]] | None = None
) -> SimulatedGpuSampler:
    """A SIMULATED sampler for ``n`` GPUs (``--simulate-gpus N``); its events say so.

    Args:
        n: how many GPUs to pretend.
        seed: seed of the random walk, for repeatable screenshots.
        our_pids: pids to show as our workers; by default this process.
    """
    return SimulatedGpuSampler(n, seed, our_pids)
