"""The NVML sampler: the real library on this machine, a FakeNvml for GPUs, the SIMULATED feed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from engine.events import Event, EventBus, GpuSampled, event_from_dict
from engine.gpu import (
    REASON_NO_DRIVER,
    REASON_NO_GPU,
    REASON_NO_LIBRARY,
    GpuInfo,
    GpuProcess,
    GpuSampler,
    own_process_tree,
    simulated_feed,
)
from tests.fake_nvml import (
    NVML_ERROR_DRIVER_NOT_LOADED,
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_LIBRARY_NOT_FOUND,
    FakeGpu,
    FakeNvml,
    fake_two_gpus,
)

GIB = 2**30
OUR_PID = 1000


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fake_sampler(nvml: FakeNvml, **kwargs: Any) -> GpuSampler:
    return GpuSampler(nvml, our_pids=lambda: {OUR_PID, OUR_PID + 1}, **kwargs)


# -- the real library on this machine -----------------------------------------------------


def test_real_nvml_on_this_machine_never_raises_and_says_why() -> None:
    sampler = GpuSampler()
    for _ in range(3):
        event = sampler.sample("site-1")
        assert isinstance(event, GpuSampled) and event.site == "site-1"
    if event.available:  # a GPU machine: real readings
        assert event.gpus and all(g["name"] for g in event.gpus)
    else:  # this CI machine: pynvml is installed, libnvidia-ml.so is not
        assert event.gpus == []
        assert event.reason in {REASON_NO_DRIVER, REASON_NO_LIBRARY, REASON_NO_GPU}
        assert event.summary() == f"no GPU: {event.reason}"
    sampler.shutdown()
    sampler.shutdown()  # twice is harmless


def test_without_the_driver_the_reason_names_the_driver() -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver")
    event = GpuSampler().sample()
    assert not event.available
    assert event.reason == REASON_NO_DRIVER


def test_without_pynvml_the_reason_names_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    event = GpuSampler().sample()
    assert not event.available and event.reason == REASON_NO_LIBRARY
    assert "no GPU: no NVML library" in event.summary()


def test_a_module_that_is_not_nvml_at_all_gives_a_reason_not_an_exception() -> None:
    event = GpuSampler(nvml=object()).sample()
    assert not event.available and event.reason.startswith("NVML init failed")


# -- FakeNvml: two FAKE GPUs -----------------------------------------------------------------


def test_fake_two_gpus_values_names_as_bytes_or_str_and_not_supported() -> None:
    nvml = fake_two_gpus(OUR_PID)
    event = fake_sampler(nvml).sample("site-1")
    assert event.available and event.reason == "" and not event.simulated
    a100, a6000 = (GpuInfo.from_dict(g) for g in event.gpus)

    assert a100.name == "NVIDIA A100-SXM4-80GB"  # came back as bytes
    assert a6000.name == "NVIDIA RTX A6000"  # came back as str
    assert a100.uuid == "GPU-fake-0000" and a6000.uuid == "GPU-fake-0001"
    assert (a100.index, a100.utilization, a100.memory_used, a100.memory_total) == (
        0,
        87.0,
        30 * GIB,
        80 * GIB,
    )
    assert (a100.temperature, a100.power, a100.power_limit) == (65.0, 250.0, 400.0)
    assert a100.memory_fraction == pytest.approx(30 / 80)
    # NotSupported readings are None (N/A), the others still come through
    assert (a6000.temperature, a6000.power, a6000.power_limit) == (None, None, None)
    assert a6000.utilization == 12.0 and a6000.memory_total == 48 * GIB
    assert nvml.init_calls == 1


def test_processes_are_marked_ours_by_pid_and_listed_ours_first() -> None:
    event = fake_sampler(fake_two_gpus(OUR_PID)).sample()
    a100, a6000 = (GpuInfo.from_dict(g) for g in event.gpus)
    assert a100.processes == (
        GpuProcess(pid=OUR_PID, used_memory=20 * GIB, ours=True),
        GpuProcess(pid=4321, used_memory=2 * GIB, ours=False),
    )
    assert a6000.processes == (GpuProcess(pid=OUR_PID + 1, used_memory=None, ours=True),)


def test_processes_fall_back_to_v2_when_the_driver_lacks_v3() -> None:
    nvml = fake_two_gpus(OUR_PID)
    nvml.no_v3 = True
    event = fake_sampler(nvml).sample()
    assert [p["pid"] for p in event.gpus[0]["processes"]] == [OUR_PID, 4321]


def test_every_reading_unsupported_still_gives_a_gpu() -> None:
    every = {"name", "uuid", "util", "used", "temp", "power_mw", "limit_mw", "processes"}
    nvml = FakeNvml([FakeGpu(name="x", uuid="y", unsupported=every)])
    (gpu,) = (GpuInfo.from_dict(g) for g in fake_sampler(nvml).sample().gpus)
    assert gpu == GpuInfo(index=0, name="GPU 0")
    assert "0 GPU 0 N/A N/A/N/A GiB N/A N/A" in fake_sampler(nvml).sample().summary()


def test_summary_line() -> None:
    text = fake_sampler(fake_two_gpus(OUR_PID)).sample().summary()
    assert text == (
        "2 GPUs: 0 A100-SXM4-80GB 87% 30.0/80.0 GiB 65°C 250 W; "
        "1 RTX A6000 12% 3.0/48.0 GiB N/A N/A"
    )


def test_driver_loaded_but_no_gpu() -> None:
    event = fake_sampler(FakeNvml([])).sample()
    assert not event.available and event.reason == REASON_NO_GPU


def test_library_not_found_and_driver_not_loaded_reasons() -> None:
    assert fake_sampler(FakeNvml([], NVML_ERROR_LIBRARY_NOT_FOUND)).sample().reason == (
        REASON_NO_DRIVER
    )
    reason = fake_sampler(FakeNvml([], NVML_ERROR_DRIVER_NOT_LOADED)).sample().reason
    assert "driver" in reason and "not loaded" in reason


def test_init_failure_is_retried_only_after_the_interval_then_recovers() -> None:
    clock = Clock()
    nvml = fake_two_gpus(OUR_PID)
    nvml.init_error = NVML_ERROR_DRIVER_NOT_LOADED
    sampler = fake_sampler(nvml, clock=clock, retry_init_s=30.0)

    assert not sampler.sample().available
    assert nvml.init_calls == 1
    nvml.init_error = None  # the operator loads the driver
    clock.now += 10
    event = sampler.sample()
    assert not event.available and "not loaded" in event.reason
    assert nvml.init_calls == 1  # no retry within 30 s: sampling once a second stays cheap
    clock.now += 21
    event = sampler.sample()
    assert event.available and len(event.gpus) == 2
    assert nvml.init_calls == 2 and sampler.initialized


def test_nvml_uninitialised_under_us_is_initialised_again() -> None:
    nvml = fake_two_gpus(OUR_PID)
    sampler = fake_sampler(nvml)
    assert sampler.sample().available
    nvml.initialized = False  # someone else called nvmlShutdown
    event = sampler.sample()
    assert not event.available and "Uninitialized" in event.reason
    assert sampler.sample().available and nvml.init_calls == 2


def test_a_lost_gpu_and_a_broken_our_pids_do_not_raise() -> None:
    nvml = fake_two_gpus(OUR_PID)
    nvml.count_error = NVML_ERROR_GPU_IS_LOST
    event = GpuSampler(nvml).sample()
    assert not event.available and event.reason == "NVML error: GPU is lost"
    nvml.count_error = None

    def broken() -> set[int]:
        raise RuntimeError("boom")

    event = GpuSampler(nvml, our_pids=broken).sample()
    assert event.available and not any(p["ours"] for g in event.gpus for p in g["processes"])


def test_shutdown_then_sample_initialises_again() -> None:
    nvml = fake_two_gpus(OUR_PID)
    sampler = fake_sampler(nvml)
    sampler.sample()
    sampler.shutdown()
    assert nvml.shutdown_calls == 1 and not sampler.initialized
    assert sampler.sample().available and nvml.init_calls == 2


def test_history_is_bounded() -> None:
    nvml = fake_two_gpus(OUR_PID)
    sampler = fake_sampler(nvml, history_len=5)
    for util in range(8):
        nvml.gpus[0].util = util
        sampler.sample()
    history = sampler.history(0)
    assert [u for _, u, _ in history] == [3.0, 4.0, 5.0, 6.0, 7.0]
    assert all(mem == 30 * GIB for _, _, mem in history)
    assert sampler.history(7) == []


# -- the thread ----------------------------------------------------------------------------


def test_thread_publishes_on_the_bus_and_stops_cleanly() -> None:
    nvml = fake_two_gpus(OUR_PID)
    sampler = fake_sampler(nvml)
    bus = EventBus()
    got: list[GpuSampled] = []
    two = threading.Event()

    def on_event(event: Event) -> None:
        if isinstance(event, GpuSampled):
            got.append(event)
            if len(got) >= 2:
                two.set()

    bus.subscribe(on_event)
    sampler.start(bus, "site-1", interval=0.05)
    sampler.start(bus, "site-1", interval=0.05)  # a second start is a no-op
    try:
        assert two.wait(60), "no two GPU samples within 60 s"
    finally:
        assert sampler.stop(timeout=60)
    assert not sampler.running  # the thread has ended: nothing can be published after stop
    assert got[0].site == "site-1" and got[0].available
    assert nvml.shutdown_calls == 1  # the thread released NVML on its way out
    assert sampler.last_event is not None


def test_thread_publishes_no_gpu_once_not_every_second(monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.gpu

    # time stands still for the thread, so however slow this machine, republish_s never passes
    monkeypatch.setattr(engine.gpu, "time", SimpleNamespace(monotonic=Clock(), time=time.time))
    sampler = fake_sampler(FakeNvml([]), republish_s=30.0)
    bus = EventBus()
    got: list[Event] = []
    bus.subscribe(got.append)
    samples = 0
    five = threading.Event()
    real_sample = sampler.sample

    def counted(site: str = "") -> GpuSampled:
        nonlocal samples
        event = real_sample(site)
        samples += 1
        if samples >= 5:
            five.set()
        return event

    monkeypatch.setattr(sampler, "sample", counted)
    sampler.start(bus, "site-1", interval=0.01)
    try:
        assert five.wait(60), f"the thread sampled {samples} times in 60 s, not 5"
    finally:
        assert sampler.stop(timeout=60)
    assert samples >= 5  # five "no GPU" samples, one event
    assert len(got) == 1 and isinstance(got[0], GpuSampled)
    assert got[0].reason == REASON_NO_GPU


class _RecordedStop(threading.Event):
    """The sampler's stop event, recording how long the thread asks to sleep between samples."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[float] = []
        self.waiting = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is not None:
            self.timeouts.append(timeout)
            self.waiting.set()
        return super().wait(timeout)


def test_the_default_interval_is_about_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.gpu

    clock = Clock()  # time stands still for the thread: its sample takes no time at all
    monkeypatch.setattr(engine.gpu, "time", SimpleNamespace(monotonic=clock, time=time.time))
    sampler = fake_sampler(fake_two_gpus(OUR_PID))
    stop = _RecordedStop()
    monkeypatch.setattr(sampler, "_stop", stop)
    bus = EventBus()
    got: list[Event] = []
    bus.subscribe(got.append)
    sampler.start(bus, "site-1")
    try:
        assert stop.waiting.wait(60), "the thread never waited for its next sample"
    finally:
        assert sampler.stop(timeout=60)
    # one sample, then a sleep of a second: about one a second, not a busy loop
    assert len(got) == 1 and isinstance(got[0], GpuSampled)
    assert stop.timeouts == [1.0]


# -- the event -------------------------------------------------------------------------------


def test_gpu_sampled_round_trips_through_json() -> None:
    event = fake_sampler(fake_two_gpus(OUR_PID)).sample("site-1")
    back = event_from_dict(json.loads(json.dumps(event.to_dict())))
    assert back == event and isinstance(back, GpuSampled)
    assert [GpuInfo.from_dict(g) for g in back.gpus] == [GpuInfo.from_dict(g) for g in event.gpus]
    empty = GpuSampled(site="s", available=False, reason=REASON_NO_DRIVER)
    assert event_from_dict(json.loads(json.dumps(empty.to_dict()))) == empty


def test_gpu_info_to_dict_is_json_ready() -> None:
    info = GpuInfo(index=1, name="g", processes=(GpuProcess(pid=5, used_memory=7, ours=True),))
    data = info.to_dict()
    assert data["processes"] == [{"pid": 5, "used_memory": 7, "ours": True}]
    assert GpuInfo.from_dict(json.loads(json.dumps(data))) == info


# -- the SIMULATED feed ----------------------------------------------------------------------


def test_simulated_feed_is_labelled_and_moves() -> None:
    feed = simulated_feed(3, seed=7)
    events = [feed.sample("site-1") for _ in range(20)]
    for event in events:
        assert event.simulated and event.available and len(event.gpus) == 3
        assert event.summary().startswith("SIMULATED 3 GPUs: ")
        for gpu in map(GpuInfo.from_dict, event.gpus):
            assert gpu.utilization is not None and 0 <= gpu.utilization <= 100
            assert gpu.memory_used is not None and gpu.memory_total is not None
            assert 0 < gpu.memory_used < gpu.memory_total
            assert gpu.power is not None and gpu.power_limit is not None
            assert 0 < gpu.power <= gpu.power_limit * 1.1
            assert any(p.ours for p in gpu.processes)
    assert len({e.gpus[0]["utilization"] for e in events}) > 3  # it moves
    back = event_from_dict(json.loads(json.dumps(events[0].to_dict())))
    assert isinstance(back, GpuSampled) and back.simulated  # the label travels
    # the same seed gives the same readings
    again = simulated_feed(3, seed=7)
    assert [again.sample().gpus for _ in range(20)] == [e.gpus for e in events]
    assert len(feed.history(0)) == 20


def test_simulated_feed_runs_in_the_thread() -> None:
    feed = simulated_feed(2, seed=1)
    bus = EventBus()
    got: list[Event] = []
    two = threading.Event()

    def on_event(event: Event) -> None:
        got.append(event)
        if len(got) >= 2:
            two.set()

    bus.subscribe(on_event)
    feed.start(bus, "site-1", interval=0.02)
    try:
        assert two.wait(60), "no two SIMULATED samples within 60 s"
    finally:
        assert feed.stop(timeout=60)
    assert len(got) >= 2 and all(isinstance(e, GpuSampled) and e.simulated for e in got)


# -- our processes ---------------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_own_process_tree_holds_this_process_and_its_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10)"])
    try:
        tree = own_process_tree()
        assert {child.pid, os.getpid()} <= tree
        assert 1 not in tree
    finally:
        child.kill()
        child.wait()
