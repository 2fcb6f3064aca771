"""The console's bridge and GPU sampler as the runbook steps them: fixed clock, stand-ins."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from engine.events import (
    Event,
    EventBus,
    GpuSampled,
    HeartbeatAcknowledged,
    ServiceLink,
    SitePulse,
)
from fltui.bridge import SiteBridge
from fltui.runbook.standins import FixedClock, StandIns

# Not activity: they come on a timer (a service's pulse, the console's look at its link).
PERIODIC = (HeartbeatAcknowledged, GpuSampled, SitePulse, ServiceLink)


class RunbookBridge(SiteBridge):
    """A real bridge seen through the fixed clock and the stand-ins (runbook mode only).

    Actions go to ``inner`` unchanged; every event drained is restamped with the clock and has
    its stand-ins put in. The header says so.

    ``inner`` is the console's engine (``LocalBridge``) or its link to a site service in
    another process (``RemoteBridge``). For the latter, pass ``gpu``: the runbook's stepped
    sampler stands in for the service's own timer-driven samples, and the link's "last heard
    from the service" is read on the fixed clock: the clock's reading when the console last
    got a message from the service (so the service's age moves only when the runbook moves the
    clock, and a dead service's age is the clock's moves since its last word).
    """

    def __init__(
        self,
        inner: Any,
        clock: FixedClock,
        stand_ins: StandIns,
        gpu: SteppedGpu | None = None,
        site: str = "",
    ) -> None:
        self.inner = inner
        self.clock = clock
        self.stand_ins = stand_ins
        self.mode = inner.mode
        self.seen: list[Event] = []  # everything the console got, as it got it
        self.activity = time.monotonic()
        self._gpu_seq = 0
        self.inner_heartbeats: list[float] = []
        self._seen_real: float | None = None  # the link's last "seen" (the service's clock)
        self.seen_fixed: float | None = None  # the same moment on the fixed clock
        self._gpu_events: list[Event] = []
        self.own_gpu = gpu is not None
        if gpu is not None:
            gpu_bus = EventBus()
            gpu_bus.subscribe(self._gpu_events.append)
            gpu.start(gpu_bus, site)
        bus = getattr(inner, "bus", None)
        self._watched = bus is not None  # else activity is what drain() hands over
        if bus is not None:
            bus.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        # On the engine's thread, as it happens (drain() runs only when the console refreshes).
        if isinstance(event, HeartbeatAcknowledged):
            self.inner_heartbeats.append(time.monotonic())
        if not isinstance(event, PERIODIC):
            self.activity = time.monotonic()

    @property
    def site(self) -> str:  # type: ignore[override]
        return str(self.inner.site)

    @property
    def label(self) -> str:
        return f"{self.stand_ins.text(self.inner.label)} · runbook: fixed clock, stand-ins"

    def _link(self, event: ServiceLink) -> ServiceLink:
        if event.seen is not None and event.seen != self._seen_real:
            self._seen_real, self.seen_fixed = event.seen, self.clock()
        return dataclasses.replace(event, seen=self.seen_fixed)

    def drain(self) -> list[Event]:
        out = []
        inner = self.inner.drain()
        if self.own_gpu:
            inner = [e for e in inner if not isinstance(e, GpuSampled)]
            gpu, self._gpu_events[:] = list(self._gpu_events), []
            inner = gpu + inner
        for event in inner:
            ts = self.clock()
            if not self._watched and not isinstance(event, PERIODIC):
                self.activity = time.monotonic()
            if isinstance(event, ServiceLink):
                event = self._link(event)
            if isinstance(event, GpuSampled):  # each sample its own instant (the panel's history)
                self._gpu_seq += 1
                ts += self._gpu_seq * 1e-3
            out.append(self.stand_ins.event(event, ts))
        self.seen.extend(out)
        return out

    def of(self, kind: type[Event]) -> list[Any]:
        return [e for e in self.seen if isinstance(e, kind)]

    def start(self) -> None:
        self.inner.start()

    def stop(self) -> None:
        self.inner.stop()

    def transfer_mmars(self) -> list[str]:
        return list(self.inner.transfer_mmars())

    def latest_run(self) -> int | None:
        found = self.inner.latest_run()
        return int(found) if found is not None else None

    def deploy(self, mmar: str, run_number: int) -> str:
        return self.stand_ins.text(str(self.inner.deploy(mmar, run_number)))

    def start_training(self, run_number: int, gpus: int = 1) -> str:
        return self.stand_ins.text(str(self.inner.start_training(run_number, gpus)))

    def abort(self) -> str:
        return self.stand_ins.text(str(self.inner.abort()))

    def restart(self) -> str:
        return self.stand_ins.text(str(self.inner.restart()))

    def validate(self) -> str:
        return self.stand_ins.text(str(self.inner.validate()))

    def shutdown(self) -> str:
        return self.stand_ins.text(str(self.inner.shutdown()))


class SteppedGpu:
    """A GPU sampler (NVML's, or the SIMULATED one) that samples when the runbook says.

    On a timer, how many samples a picture has seen would depend on timing; here each step
    takes the same number.
    """

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler
        self.bus: EventBus | None = None
        self.site = ""

    def start(self, bus: EventBus, site: str, interval: float = 1.0) -> None:
        self.bus, self.site = bus, site

    def stop(self, timeout: float = 2.0) -> bool:
        shutdown = getattr(self.sampler, "shutdown", None)
        if shutdown is not None:
            shutdown()
        return True

    def tick(self, samples: int = 1) -> GpuSampled | None:
        event = None
        for _ in range(samples):
            event = self.sampler.sample(self.site)
            if self.bus is not None:
                self.bus.publish(event)
        return event
