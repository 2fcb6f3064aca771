"""GpuPanel under Pilot: the no-GPU reason, FAKE GPUs updated in place, the SIMULATED label."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from textual.app import App, ComposeResult
from textual.pilot import Pilot
from textual.widgets import Static

from engine.events import GpuSampled
from engine.gpu import REASON_NO_DRIVER, REASON_NO_LIBRARY, GpuSampler, simulated_feed
from fltui.widgets.gpu_panel import GpuPanel, spark_text
from tests.fake_nvml import fake_two_gpus

OUR_PID = 1000


class PanelApp(App[None]):
    """A tiny app hosting one GpuPanel."""

    def compose(self) -> ComposeResult:
        yield GpuPanel(id="gpu")


def run(
    test: Callable[[PanelApp, GpuPanel, Pilot[None]], Awaitable[None]],
    size: tuple[int, int] = (80, 24),
) -> None:
    async def main() -> None:
        app = PanelApp()
        async with app.run_test(size=size) as pilot:
            await test(app, app.query_one(GpuPanel), pilot)

    asyncio.run(main())


def panel_text(panel: GpuPanel) -> str:
    """The plain text of every visible Static in the panel, one per line."""
    return "\n".join(
        str(w.render())
        for w in panel.query(Static)
        if w.display and all(a.display for a in w.ancestors if a is not panel.app)
    )


def screen_text(app: PanelApp) -> str:
    return app.export_screenshot().replace("&#160;", " ")


def fake_event(util0: int = 87) -> GpuSampled:
    nvml = fake_two_gpus(OUR_PID)
    nvml.gpus[0].util = util0
    return GpuSampler(nvml, our_pids=lambda: {OUR_PID, OUR_PID + 1}).sample("site-1")


def test_before_any_sample_it_says_it_waits() -> None:
    async def check(app: PanelApp, panel: GpuPanel, pilot: Pilot[None]) -> None:
        assert "Waiting for the first GPU sample" in panel_text(panel)
        assert panel.border_title == "GPUs"

    run(check)


def test_no_gpu_shows_the_reason_and_a_hint() -> None:
    async def check(app: PanelApp, panel: GpuPanel, pilot: Pilot[None]) -> None:
        panel.update_sample(GpuSampled(site="s", available=False, reason=REASON_NO_DRIVER))
        await pilot.pause()
        text = panel_text(panel)
        assert f"No GPU: {REASON_NO_DRIVER}" in text
        assert "Install the NVIDIA driver" in text
        assert panel.blocks == {}
        panel.update_sample(GpuSampled(site="s", available=False, reason=REASON_NO_LIBRARY))
        await pilot.pause()
        assert "no NVML library" in panel_text(panel)
        assert "nvidia-ml-py" in panel_text(panel)

    run(check)


def test_the_real_sampler_on_this_machine_gives_a_readable_panel() -> None:
    async def check(app: PanelApp, panel: GpuPanel, pilot: Pilot[None]) -> None:
        event = GpuSampler().sample("site-1")
        panel.update_sample(event)
        await pilot.pause()
        text = panel_text(panel)
        if event.available:
            assert all(str(g["index"]) in text for g in event.gpus)
        else:
            assert event.reason in text and "No GPU" in text

    run(check)


def test_two_fake_gpus_shown_and_widgets_reused() -> None:
    async def check(app: PanelApp, panel: GpuPanel, pilot: Pilot[None]) -> None:
        panel.update_sample(fake_event(87))
        await pilot.pause()
        first = dict(panel.blocks)
        statics = {i: list(b.query(Static)) for i, b in first.items()}
        text = panel_text(panel)
        assert "A100-SXM4-80GB" in text and "RTX A6000" in text
        assert "87%" in text and "12%" in text
        assert "30.0/80.0 GiB" in text and "65°C" in text and "250/400 W" in text
        assert "N/A" in text  # GPU 1 does not support temperature or power
        assert "Waiting" not in text and "No GPU" not in text

        second = fake_event(42)
        panel.update_sample(second)
        await pilot.pause()
        assert panel.blocks == first
        for index, box in panel.blocks.items():
            assert box is first[index]
            assert list(box.query(Static)) == statics[index]
        text = panel_text(panel)
        assert "42%" in text and "87%" not in text
        assert [round(v or 0) for v in panel.history(0)] == [87, 42]
        panel.update_sample(second)  # the same sample again adds no history
        assert len(panel.history(0)) == 2

    run(check)


def test_small_terminal_is_compact_and_large_one_lists_processes() -> None:
    async def small(app: PanelApp, panel: GpuPanel, pilot: Pilot[None]) -> None:
        panel.update_sample(fake_event())
        await pilot.pause()
        assert panel.has_class("-compact")
        assert panel.outer_size.height <= 2 * 2 + 2  # two lines a GPU plus the border
        assert "· ours 20.0 GiB" in panel_text(panel)

    async def large(app: PanelApp, panel: GpuPanel, pilot: Pilot[None]) -> None:
        panel.update_sample(fake_event())
        await pilot.pause()
        assert not panel.has_class("-compact")
        text = panel_text(panel)
        assert f"ours: pid {OUR_PID} (20.0 GiB) · others: 1 (2.0 GiB)" in text
        assert f"ours: pid {OUR_PID + 1}" in text
        assert "mem 30.0/80.0 GiB (38%)" in text

    run(small, (80, 24))
    run(large, (160, 50))


def test_sparkline_shows_the_history() -> None:
    async def check(app: PanelApp, panel: GpuPanel, pilot: Pilot[None]) -> None:
        for util in (0, 50, 100, 100):
            panel.update_sample(fake_event(util))
            await pilot.pause()
        await pilot.pause()
        spark = panel.blocks[0].query_one(".gpu-spark", Static)
        assert spark.size.width > 4
        assert str(spark.render()).endswith("▁▄██")

    run(check, (120, 30))


def test_spark_text_uses_a_fixed_scale() -> None:
    assert spark_text([0, 25, 50, 75, 100], 5) == "▁▂▄▆█"
    assert spark_text([100, None, 100], 5) == "  █ █"
    assert spark_text(list(range(50)), 3) == spark_text([47, 48, 49], 3)
    assert spark_text([1.0], 0) == ""


def test_simulated_feed_is_labelled_on_screen() -> None:
    async def check(app: PanelApp, panel: GpuPanel, pilot: Pilot[None]) -> None:
        feed = simulated_feed(2, seed=3)
        for _ in range(3):
            panel.update_sample(feed.sample("site-1"))
            await pilot.pause()
        assert panel.border_title == "GPUs · SIMULATED"
        assert panel.has_class("-simulated")
        assert "SIMULATED" in screen_text(app)
        assert len(panel.blocks) == 2
        # back to a real feed: the label goes away
        panel.update_sample(fake_event())
        await pilot.pause()
        assert panel.border_title == "GPUs" and "SIMULATED" not in screen_text(app)

    run(check)


def test_gpus_gone_then_back() -> None:
    async def check(app: PanelApp, panel: GpuPanel, pilot: Pilot[None]) -> None:
        panel.update_sample(fake_event())
        await pilot.pause()
        boxes = dict(panel.blocks)
        panel.update_sample(GpuSampled(site="s", available=False, reason="NVML error: GPU is lost"))
        await pilot.pause()
        assert "No GPU: NVML error: GPU is lost" in panel_text(panel)
        assert "A100" not in panel_text(panel)
        panel.update_sample(fake_event())
        await pilot.pause()
        assert panel.blocks == boxes and "A100" in panel_text(panel)
        assert "No GPU" not in panel_text(panel)

    run(check)


def test_update_before_mount_is_shown_on_mount() -> None:
    class EarlyApp(PanelApp):
        def compose(self) -> ComposeResult:
            panel = GpuPanel(id="gpu")
            panel.update_sample(fake_event())
            yield panel

    async def main() -> None:
        app = EarlyApp()
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            assert "A100-SXM4-80GB" in panel_text(app.query_one(GpuPanel))

    asyncio.run(main())
