"""The runbook's Markdown: each scenario's page of steps, and the index of them all."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from engine.events import GpuSampled
from fltui.runbook.standins import SIZE, T0, StandIns


@dataclass
class Step:
    slug: str
    title: str
    text: str
    files: list[str] = field(default_factory=list)
    extra: str = ""  # Markdown after the picture (a command's output, an audit trail)


@dataclass
class Page:
    number: int
    slug: str
    title: str
    intro: str
    steps: list[Step] = field(default_factory=list)
    outro: str = ""

    @property
    def name(self) -> str:
        return f"{self.number:02d}-{self.slug}"

    def markdown(self, gpu_note: str) -> str:
        lines = [f"# {self.number}. {self.title}", "", self.intro.strip(), ""]
        for i, step in enumerate(self.steps, 1):
            png = f"{self.name}/{i:02d}-{step.slug}.png"
            svg = f"{self.name}/{i:02d}-{step.slug}.svg"
            lines += [f"## Step {i}: {step.title}", ""]
            lines += [f"[![{step.title}]({png})]({svg})", ""]
            lines += [step.text.strip(), ""]
            if step.extra:
                lines += [step.extra.strip(), ""]
        if self.outro:
            lines += [self.outro.strip(), ""]
        lines += [
            "---",
            "",
            f"*Made by `fltui runbook` ([how](README.md#how-the-pictures-are-made)). {gpu_note}*",
            "",
        ]
        return "\n".join(lines)


class Listed(Protocol):
    """What the index says of a scenario."""

    @property
    def number(self) -> int: ...

    @property
    def slug(self) -> str: ...

    @property
    def title(self) -> str: ...


def write_index(
    out: Path,
    scenarios: Sequence[Listed],
    gpu_note: str,
    simulate_gpus: int,
    sample: GpuSampled | None,
) -> None:
    """Writes ``out/README.md`` (the index of ``scenarios``' pages) and ``out/runbook.json``."""
    lines = [
        "# Runbooks: the console, step by step",
        "",
        "Pictures of the real console (`fltui`) in the situations a site operator meets, taken "
        "by the app itself (`fltui runbook`) against a real federation on one machine: the "
        "reference server, this site's engine and a peer site, real training on the demo's "
        "synthetic data.",
        "",
    ]
    for s in scenarios:
        lines.append(f"{s.number}. [{s.title}]({s.number:02d}-{s.slug}.md)")
    lines += [
        "",
        "Each picture links to its SVG (Textual's own export; sharp at any size, and its text "
        "can be searched and copied).",
        "",
        "## How the pictures are made",
        "",
        "```sh",
        "fltui runbook --out docs/runbook              # every scenario (a few minutes)",
        "fltui runbook --out docs/runbook --only 7     # one scenario",
        "fltui runbook --out DIR --simulate-gpus 2     # with a SIMULATED GPU feed",
        "```",
        "",
        f"- The terminal is {SIZE[0]}×{SIZE[1]} and the theme `dark`.",
        "- The clock is fixed: each scenario starts at 09:00:00 UTC and the clock moves only "
        "between steps; every time on screen (log lines, requests, the token's and the last "
        "heartbeat's age) comes from it.",
        "- What differs on every run is shown as fixed stand-ins, and the header says "
        f"`runbook: fixed clock, stand-ins`: {StandIns(Path('/')).describe()}.",
        "- Steps are taken in states that do not depend on timing: the peer site is paused "
        "while this site waits for it, so each round is pictured after this site's "
        "contribution is in, and the contributions arrive in the same order on every run.",
        "- Where a scenario runs the site as a service process that the console attaches to "
        "(a killed service), how long the service has been gone is the fixed clock's moves, "
        "not waited for: its page says so at each such step.",
        f"- {gpu_note}",
        "",
        "So a second run gives the same SVGs, and a diff of this folder shows what changed in "
        "the console. PNGs are rendered from the SVGs by resvg (`resvg-py`) with DejaVu Sans "
        "Mono; their pixels depend on the machine's fonts. "
        "`tests/ui/test_runbook.py` regenerates one scenario and compares it with this folder.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")
    manifest = {
        "size": list(SIZE),
        "clock_start": T0,
        "simulate_gpus": simulate_gpus,
        "gpu": (
            None
            if sample is None
            else {
                "available": sample.available,
                "reason": sample.reason,
                "simulated": sample.simulated,
            }
        ),
        "scenarios": [{"number": s.number, "slug": s.slug, "title": s.title} for s in scenarios],
    }
    (out / "runbook.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
