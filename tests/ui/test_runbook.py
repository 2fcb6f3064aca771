"""The runbook: stand-ins and the fixed clock, and a regenerated scenario against docs/runbook/."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from engine.events import (
    GpuSampled,
    HeartbeatAcknowledged,
    LogRecord,
    ModelTransferred,
    RunChanged,
    SiteConfigured,
)
from fltui import runbook
from fltui.runbook import FixedClock, RunbookBridge, StandIns, SteppedGpu
from fltui.runbook.cli import _only
from fltui.runbook.standins import MB_PER_S, RTT_MS
from tests.ui import replay

DOCS = Path(__file__).resolve().parents[2] / "docs" / "runbook"


def test_stand_ins_replace_what_differs_between_runs(tmp_path: Path) -> None:
    stand_ins = StandIns(tmp_path / "fed", console_pid=4321)
    stand_ins.ports.add(39213)
    say = stand_ins.text
    assert say(f"no site service runs for {tmp_path}/fed/site-1: (pid 4321)") == (
        "no site service runs for /srv/fl/site-1: (pid 1000)"
    )
    assert say("site-1: worker started (pid 22210, 1 rank)") == (
        "site-1: worker started (pid 1101, 1 rank)"
    )
    assert say("worker pid 22210 again, then pid 555") == "worker pid 1101 again, then pid 1201"
    assert say("site-1 registered with 127.0.0.1:39213") == "site-1 registered with 127.0.0.1:8002"
    assert say("127.0.0.1:392130 is another port") == "127.0.0.1:392130 is another port"
    assert say("gave up after 7 attempts in 29.6 s (retry_timeout 30 s)") == (
        "gave up after N attempts in T s (retry_timeout 30 s)"
    )
    assert say("token: 92516be2...\tstatus") == "token: 0123abcd...\tstatus"

    event = stand_ins.event(
        RunChanged(running=True, run_number=1, mmar="m", executor="p", pid=9), 5
    )
    assert (event.ts, event.pid) == (5, 1102)  # the second worker seen
    assert stand_ins.event(HeartbeatAcknowledged(rtt_ms=3.7), 1).rtt_ms == RTT_MS
    moved = stand_ins.event(ModelTransferred(direction="up", round=1, nbytes=52520, seconds=0.2), 1)
    assert moved.mb_per_s == pytest.approx(MB_PER_S)
    one = ModelTransferred(direction="download", round=1, nbytes=52520, seconds=0.0)
    assert stand_ins.event(one, 1).rate == "in one message"  # not measured: no made-up speed
    gpu = GpuSampled(available=True, gpus=[{"index": 0, "processes": [{"pid": 4321}]}])
    assert stand_ins.event(gpu, 1).gpus[0]["processes"][0]["pid"] == 1000
    configured = SiteConfigured(
        server="127.0.0.1:39213", tls=False, workspace=f"{tmp_path}/fed/site-1"
    )
    assert stand_ins.event(configured, 1).workspace == "/srv/fl/site-1"


def test_every_event_the_console_gets_carries_the_fixed_clock(tmp_path: Path) -> None:
    clock = FixedClock(1000.0)
    inner = replay.ReplayBridge(
        [LogRecord(site="site-1", level="INFO", logger="x", message="one"), *replay.training()]
    )
    bridge = RunbookBridge(inner, clock, StandIns(tmp_path))
    first = bridge.drain()
    assert first and {e.ts for e in first if not isinstance(e, GpuSampled)} == {1000.0}
    # GPU samples a millisecond apart: the GPU panel keeps one history entry per sample
    assert [e.ts for e in first if isinstance(e, GpuSampled)] == [1000.001]
    clock.advance(5)
    inner.events = [LogRecord(site="site-1", level="INFO", logger="x", message="two")]
    assert [e.ts for e in bridge.drain()] == [1005.0]
    assert "runbook: fixed clock, stand-ins" in bridge.label


def test_gpus_are_sampled_only_when_the_runbook_says() -> None:
    from engine.events import EventBus
    from engine.gpu import simulated_feed

    bus, got = EventBus(), list[Any]()
    bus.subscribe(got.append)
    gpu = SteppedGpu(simulated_feed(2, seed=0))
    gpu.start(bus, "site-1")
    assert got == []
    gpu.tick(3)
    assert len(got) == 3 and all(e.simulated for e in got)
    again = SteppedGpu(simulated_feed(2, seed=0))
    again.start(bus, "site-1")
    assert [g["utilization"] for g in again.tick(3).gpus] == [  # type: ignore[union-attr]
        g["utilization"] for g in got[-1].gpus
    ]


class RecordedNoGpu:
    """The no-GPU sample the committed runbook recorded (NVML's reason on that machine), so that
    the regenerated pictures compare on any machine. Not a GPU sampler: it only repeats."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def sample(self, site: str = "") -> GpuSampled:
        return GpuSampled(site=site, available=False, reason=self.reason)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.slow
def test_a_regenerated_scenario_matches_the_committed_runbook(tmp_path: Path) -> None:
    manifest = json.loads((DOCS / "runbook.json").read_text())
    recorded = manifest["gpu"]
    if manifest["simulate_gpus"] or recorded is None or recorded["available"]:
        pytest.skip("the committed runbook shows GPUs: its pictures cannot be made again here")
    out = tmp_path / "runbook"
    pages = runbook.generate(
        out, only=[7], sampler=lambda: RecordedNoGpu(recorded["reason"]), say=lambda _: None
    )
    assert [p.name for p in pages] == ["07-refused-request.md"]
    for page in pages:
        assert page.read_text() == (DOCS / page.name).read_text(), f"{page.name} differs"
        made = sorted(p.name for p in (out / page.stem).iterdir())
        committed = sorted(p.name for p in (DOCS / page.stem).iterdir())
        assert made == committed
        for name in made:
            new, old = out / page.stem / name, DOCS / page.stem / name
            if name.endswith(".svg"):
                # An exact match: run `fltui runbook --out docs/runbook` after a deliberate change.
                assert new.read_text() == old.read_text(), f"{page.stem}/{name} differs"
            else:  # pixels depend on the machine's fonts: the same size, a real PNG
                assert _png_size(new) == _png_size(old)


def test_the_index_links_every_scenario_page() -> None:
    index = (DOCS / "README.md").read_text()
    for scenario in runbook.SCENARIOS:
        name = f"{scenario.number:02d}-{scenario.slug}"
        assert f"({name}.md)" in index
        page = (DOCS / f"{name}.md").read_text()
        steps = [line for line in page.splitlines() if line.startswith("[![")]
        assert steps, f"{name}.md has no pictures"
        for line in steps:
            png = line.split("](", 1)[1].split(")", 1)[0]
            assert (DOCS / png).is_file() and (DOCS / png).with_suffix(".svg").is_file()


def test_only_takes_numbers_or_names() -> None:
    assert _only("1,lost-server,service-died") == [1, 6, 9]
    with pytest.raises(Exception, match="no scenario"):
        _only("99")


def test_a_service_scenario_reads_the_service_on_the_fixed_clock(tmp_path: Path) -> None:
    """Attached to a site service: its age moves only with the clock, its state is restamped."""
    from engine.events import ServiceLink, SitePulse, StateSnapshot
    from engine.gpu import simulated_feed

    clock = FixedClock(1000.0)
    inner = replay.ReplayBridge([])
    gpu = SteppedGpu(simulated_feed(1, seed=0))
    bridge = RunbookBridge(inner, clock, StandIns(tmp_path), gpu=gpu, site="site-1")
    inner.events = [
        StateSnapshot(
            site="site-1",
            state={"registered_at": 5.0, "worker_pid": 4242, "workspace": f"{tmp_path}/site-1"},
        ),
        SitePulse(site="site-1", worker_pid=4242, worker_alive=True, worker_seen=7.0),
        GpuSampled(site="site-1", available=False, reason="the service's own: dropped"),
        ServiceLink(site="site-1", connected=True, seen=123.0),
    ]
    gpu.tick(1)
    stepped, snapshot, pulse, link = bridge.drain()
    assert snapshot.state["registered_at"] == 1000.0 and snapshot.state["worker_pid"] == 1101
    assert snapshot.state["workspace"] == "/srv/fl/site-1"
    assert stepped.simulated  # the runbook's stepped sample, not the service's
    assert (pulse.worker_pid, pulse.worker_seen) == (1101, 1000.0)
    assert link.seen == 1000.0
    clock.advance(4)  # the service killed: its last word stays where the clock was
    inner.events = [ServiceLink(site="site-1", connected=False, seen=123.0)]
    assert bridge.drain()[0].seen == 1000.0
