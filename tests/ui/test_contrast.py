"""Every theme is readable (issue 18): WCAG 2 contrast of text >= 4.5 and of titles >= 3, both
in the theme files' colours and in what the dashboard actually draws with them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from textual.color import Color

from fltui.app import create_app
from fltui.screens.dashboard import Dashboard
from fltui.themes import load_themes
from tests.ui import replay

TEXT, TITLE = 4.5, 3.0
THEMES = load_themes()
# colours used for text in the panels (status lines, errors, a request's status)
TEXT_COLOURS = (
    "foreground",
    "error",
    "success",
    "warning",
    "status-idle",
    "status-busy",
    "status-ok",
    "status-bad",
    "status-stopped",
)
# colours used for the panels' titles (Client, GPUs, Round, Requests)
TITLE_COLOURS = ("primary", "secondary", "accent", "warning")


def _luminance(colour: Color) -> float:
    def channel(value: int) -> float:
        v = value / 255
        return v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4

    r, g, b = colour.rgb
    return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)


def contrast(a: Color, b: Color) -> float:
    """The WCAG 2 contrast ratio of two opaque colours (1 to 21)."""
    hi, lo = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def _colours(stem: str) -> dict[str, Color]:
    theme = THEMES[stem]
    named = {
        k: getattr(theme, k) for k in ("foreground", "background", "surface", "primary", "error")
    }
    named |= {k: getattr(theme, k) for k in ("secondary", "accent", "success", "warning")}
    named |= theme.variables
    return {k: Color.parse(v) for k, v in named.items() if v}


def test_contrast_formula() -> None:
    assert contrast(Color(0, 0, 0), Color(255, 255, 255)) == pytest.approx(21.0)
    assert contrast(Color(118, 118, 118), Color(255, 255, 255)) == pytest.approx(4.54, abs=0.01)


@pytest.mark.parametrize("stem", list(THEMES))
def test_theme_colours_are_readable_on_its_backgrounds(stem: str) -> None:
    colours = _colours(stem)
    low = []
    for ground in ("background", "surface"):
        for name in TEXT_COLOURS:
            ratio = contrast(colours[name], colours[ground])
            if ratio < TEXT:
                low.append(f"text ${name} on ${ground}: {ratio:.2f} < {TEXT}")
        for name in TITLE_COLOURS:
            ratio = contrast(colours[name], colours[ground])
            if ratio < TITLE:
                low.append(f"title ${name} on ${ground}: {ratio:.2f} < {TITLE}")
    assert not low, f"themes/{stem}.tcss: " + "; ".join(low)


@pytest.mark.parametrize("stem", list(THEMES))
def test_the_dashboard_draws_readable_titles_and_text(tmp_path: Path, stem: str) -> None:
    """What is on screen: each panel's title and text colour over what lies beneath it."""
    app = create_app(
        tmp_path,
        theme=stem,
        gpu_sampler=replay.NoSampler(),
        bridge=replay.ReplayBridge(replay.aborted()),
        clock=replay.clock,
    )
    low: list[str] = []

    async def main() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause(0.3)
            dash = app.screen
            assert isinstance(dash, Dashboard)
            ground = dash.styles.background
            for panel in ("#client", "#round", "#gpu", "#requests", "#logs"):
                widget = dash.query_one(panel)
                under = ground + widget.styles.background  # a panel's own colour over the screen
                title = under + widget.styles.border_title_color
                ratio = contrast(title, under)
                if ratio < TITLE:
                    low.append(f"{panel} title {title.hex} on {under.hex}: {ratio:.2f}")
                drawn = widget.rich_style  # the colours text is drawn in, inherited ones resolved
                text = Color.from_rich_color(drawn.color)
                under = Color.from_rich_color(drawn.bgcolor)
                ratio = contrast(text, under)
                if ratio < TEXT:
                    low.append(f"{panel} text {text.hex} on {under.hex}: {ratio:.2f}")

    asyncio.run(main())
    assert not low, f"theme {stem}: " + "; ".join(low)
