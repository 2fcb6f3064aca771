"""Plays the scenarios against their federations and writes the runbook's pages."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from engine.events import GpuSampled
from engine.gpu import GpuSampler, simulated_feed
from engine.training import demo_mmar_path
from fltui.bridge import LocalBridge, RemoteBridge
from fltui.runbook.bridge import RunbookBridge, SteppedGpu
from fltui.runbook.harness import ROOT, Federation, Run
from fltui.runbook.pages import Page, write_index
from fltui.runbook.scenarios import SCENARIOS, Scenario
from fltui.runbook.standins import SIZE, FixedClock, StandIns


def _gpu_note(sample: GpuSampled | None, simulated: int) -> str:
    if simulated:
        return (
            f"GPUs: {simulated} SIMULATED (`--simulate-gpus {simulated}`), labelled so on screen."
        )
    if sample is None or not sample.available:
        reason = sample.reason if sample is not None else "no sample"
        return f"GPUs: none on the machine that made the pictures ({reason})."
    return f"GPUs: the real GPUs of the machine that made the pictures ({len(sample.gpus)})."


@contextlib.contextmanager
def _utc() -> Iterator[None]:
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old
        time.tzset()


async def _play(
    scenario: Scenario,
    out: Path,
    work: Path,
    initial_model: Path | None,
    sampler: Any,
    theme: str,
) -> tuple[Page, GpuSampled | None]:
    from fltui.app import create_app  # deferred: textual, loaded once a scenario plays

    root = work / f"{scenario.number:02d}-{scenario.slug}"
    fed = Federation(
        root,
        # The demo model's start is made once for every scenario; another task's by its own.
        initial_model if scenario.task == "classification" else None,
        sites=scenario.sites,
        rounds=scenario.rounds,
        heartbeat_interval=scenario.heartbeat_interval,
        retry_timeout=scenario.retry_timeout,
        policy=scenario.policy,
        task=scenario.task,
    )
    page = Page(scenario.number, scenario.slug, scenario.title, scenario.intro)
    clock = FixedClock()
    gpu = SteppedGpu(sampler)
    stand_ins = StandIns(root)
    try:
        fed.start_server()
        stand_ins.ports.add(fed.port)
        fed.lockstep = scenario.peers_lockstep
        fed.start_peers()
        if scenario.service:
            # This site as a service in a process of its own; the console attaches to it, as
            # `fltui --workspace DIR` does where a service runs.
            fed.start_service()
            remote = RemoteBridge(fed.site, fed.names[0])
            bridge = RunbookBridge(remote, clock, stand_ins, gpu=gpu, site=fed.names[0])
        else:
            inner = LocalBridge(fed.site, gpu_sampler=gpu)
            bridge = RunbookBridge(inner, clock, stand_ins)
        app = create_app(fed.site, theme=theme, bridge=bridge, clock=clock, gpu_sampler=gpu)
        app.animation_level = "none"  # a picture never catches a bar or a notice half-way
        notify = app.notify

        def lasting_notify(message: str, **kwargs: Any) -> None:
            # A notice stays until its step's picture is taken (a timeout would make whether it
            # shows depend on timing); the runbook clears them after each picture.
            kwargs["timeout"] = 3600
            notify(message, **kwargs)

        app.notify = lasting_notify  # type: ignore[method-assign]
        failure: list[BaseException] = []

        async def drive(pilot: Any) -> None:
            run = Run(app, pilot, bridge, fed, gpu, page, out)
            try:
                await run.until(lambda: run.dash, "the dashboard", 30)
                for name in fed.peers:  # every peer has joined (and is paused, in lockstep)
                    await run.until(functools.partial(fed.joined, name), f"{name} joined", 120)
                await scenario.play(run)
            except BaseException as exc:  # reported after the app has closed
                failure.append(exc)
            finally:
                app.exit()

        await app.run_async(headless=True, size=SIZE, auto_pilot=drive)
        if failure:
            raise failure[0]
        sample = next((e for e in reversed(bridge.seen) if isinstance(e, GpuSampled)), None)
        return page, sample
    finally:
        fed.close()


def _initial_model(work: Path) -> Path:
    """The demo model's seeded start, made once (in a child process: no torch here)."""
    out = work / "initial_model.npz"
    if not out.exists():
        scratch = work / "initial_mmar"
        shutil.copytree(demo_mmar_path(), scratch, dirs_exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "engine.training.initial_model", str(scratch), str(out)],
            check=True,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    return out


def generate(
    out: Path,
    only: list[int] | None = None,
    simulate_gpus: int = 0,
    sampler: Callable[[], Any] | None = None,
    theme: str = "dark",
    keep: Path | None = None,
    say: Callable[[str], None] = print,
) -> list[Path]:
    """Plays the scenarios (all, or the numbers in ``only``) and writes the runbook to ``out``.

    ``out/README.md`` (the index of every scenario) and ``out/runbook.json`` are written too.

    Args:
        simulate_gpus: show N SIMULATED GPUs (labelled so) instead of this machine's.
        sampler: makes the GPU sampler each scenario steps (tests); default NVML's, or the
            simulated one (a fresh one per scenario: one scenario's pictures do not depend on
            which ran before it).
        keep: keep the federations' workspaces under this folder (else a temporary one).

    Returns:
        the Markdown pages written.

    Raises:
        StepTimeout: a scenario did not reach a state it waits for.
    """
    chosen = [s for s in SCENARIOS if not only or s.number in only]
    if sampler is None:

        def sampler() -> Any:
            return simulated_feed(simulate_gpus, seed=0) if simulate_gpus else GpuSampler()

    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fltui-runbook-", dir=keep))
    pages: list[Path] = []
    samples: list[GpuSampled | None] = []
    try:
        with _utc():
            model = _initial_model(work)
            for scenario in chosen:
                started = time.monotonic()
                folder = out / f"{scenario.number:02d}-{scenario.slug}"
                if folder.exists():
                    shutil.rmtree(folder)  # no picture of an older run stays behind
                page, sample = asyncio.run(_play(scenario, out, work, model, sampler(), theme))
                samples.append(sample)
                note = _gpu_note(sample, simulate_gpus)
                path = out / f"{page.name}.md"
                path.write_text(page.markdown(note), encoding="utf-8")
                pages.append(path)
                say(f"{page.name}: {len(page.steps)} steps in {time.monotonic() - started:.0f} s")
        # The index lists every scenario, whichever were played now (--only).
        sample = next((s for s in samples if s is not None), None)
        write_index(out, SCENARIOS, _gpu_note(sample, simulate_gpus), simulate_gpus, sample)
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return pages
