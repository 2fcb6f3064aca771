"""SVG snapshots of the dashboard at 80×24 and 120×40, in the states an operator meets.

Regenerate after a deliberate change: ``pytest tests/ui/test_snapshots.py --snapshot-update``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.gpu import GpuSampler
from fltui.app import create_app
from tests.fake_nvml import fake_two_gpus
from tests.ui import replay


def _fake_gpu_feed():  # a FAKE NVML (this machine has no GPU): labelled so in the test name
    sampler = GpuSampler(nvml=fake_two_gpus(our_pid=4242), our_pids=lambda: {4242})
    return sampler.sample(replay.SITE)


STATES = {
    "not_started_no_gpu": lambda: replay.not_started(),
    "training_no_gpu": lambda: replay.training(),
    "aborted_no_gpu": lambda: replay.aborted(),
    "training_fake_nvml_gpus": lambda: replay.training(_fake_gpu_feed()),
}


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
@pytest.mark.parametrize("state", list(STATES))
def test_dashboard(snap_compare, tmp_path: Path, state: str, size: tuple[int, int]) -> None:
    app = create_app(
        tmp_path,
        gpu_sampler=replay.NoSampler(),
        bridge=replay.ReplayBridge(STATES[state]()),
        clock=replay.clock,
    )

    async def settle(pilot) -> None:
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=size, run_before=settle)
