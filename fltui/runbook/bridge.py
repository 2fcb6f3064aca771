"""The console's bridge and GPU sampler as the runbook steps them: fixed clock, stand-ins."""

from __future__ import annotations

import time
from typing import Any

from engine.events import Event, EventBus, GpuSampled, HeartbeatAcknowledged
from fltui.bridge import SiteBridge
from fltui.runbook.standins import FixedClock, StandIns

PERIODIC = (HeartbeatAcknowledged, GpuSampled)  # not activity: they come on a timer


class RunbookBridge(SiteBridge):
    """A real bridge seen through the fixed clock and the stand-ins (runbook mode only).

    Actions go to ``inner`` unchanged; every event drained is restamped with the clock and has
    its stand-ins put in. The header says so.
    """

    def __init__(self, inner: Any, clock: FixedClock, stand_ins: StandIns) -> None:
        self.inner = inner
        self.clock = clock
        self.stand_ins = stand_ins
        self.mode = inner.mode
        self.seen: list[Event] = []  # everything the console got, as it got it
        self.activity = time.monotonic()
        self._gpu_seq = 0
        self.inner_heartbeats: list[float] = []
        bus = getattr(inner, "bus", None)
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
        return f"{self.inner.label} · runbook: fixed clock, stand-ins"

    def drain(self) -> list[Event]:
        out = []
        for event in self.inner.drain():
            ts = self.clock()
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
