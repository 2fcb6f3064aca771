"""Screenshots for support tickets: the console's `p` key and `fltui screenshot`."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from engine.demo import prepare_workspace
from engine.site.lock import find_service
from fltui.app import create_app
from fltui.bridge import LocalBridge
from fltui.pictures import svg_to_png
from fltui.screens.dashboard import Dashboard
from fltui.screenshot import main as screenshot_main
from tests.ui import replay

PNG = b"\x89PNG\r\n\x1a\n"


def _text(svg: Path) -> str:
    return svg.read_text().replace("&#160;", " ")


def test_p_saves_the_screen_as_svg_and_png_and_says_where(tmp_path: Path) -> None:
    app = create_app(
        tmp_path,
        gpu_sampler=replay.NoSampler(),
        bridge=replay.ReplayBridge(replay.training()),
        clock=replay.clock,
    )

    async def main() -> None:
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause(0.6)
            dash = app.screen
            assert isinstance(dash, Dashboard)
            await pilot.press("p")
            deadline = time.monotonic() + 20
            while "screenshot saved" not in dash.last_action and time.monotonic() < deadline:
                await pilot.pause(0.1)
            assert "screenshot saved" in dash.last_action, dash.last_action
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(replay.clock()))
            svg = tmp_path / "screenshots" / f"fltui-site-1-{stamp}.svg"
            assert str(svg) in dash.last_action  # the operator is told where it went
            assert "round 3 of 5" in _text(svg)
            assert svg.with_suffix(".png").read_bytes()[:8] == PNG

    asyncio.run(main())


def test_svg_to_png_draws_text() -> None:
    svg = (
        '<svg xmlns="http://www.w3.org/2000/svg" width="200" height="40">'
        '<rect width="200" height="40" fill="#000"/>'
        '<text x="5" y="30" fill="#fff" style="font-family: monospace; font-size: 24px">'
        "site-1</text></svg>"
    )
    png = svg_to_png(svg)
    assert png[:8] == PNG
    blank = svg_to_png(svg.replace("site-1", ""))
    assert png != blank  # the text was drawn: a font was found


def test_screenshot_without_a_service_says_so(tmp_path: Path, capsys) -> None:
    prepare_workspace(tmp_path, num_sites=1, num_rounds=1)
    assert screenshot_main(["--workspace", str(tmp_path / "site-1")]) == 5
    assert "no site service runs" in capsys.readouterr().err


def test_fltui_screenshot_draws_the_running_service(tmp_path: Path, capsys) -> None:
    prepare_workspace(tmp_path, num_sites=1, num_rounds=1)
    site = tmp_path / "site-1"
    service = LocalBridge(site, gpu_sampler=replay.NoSampler())  # serves the control socket
    service.start()
    try:
        deadline = time.monotonic() + 30
        while find_service(site) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        out = tmp_path / "ticket" / "shot"
        code = screenshot_main(["--workspace", str(site), "--out", str(out), "--size", "100x30"])
        printed = capsys.readouterr()
        assert code == 0, printed.err
        svg = out.with_suffix(".svg")
        assert f"saved {svg}" in printed.out
        text = _text(svg)
        assert "site-1" in text and "attached" in text  # drawn through the service's socket
        assert out.with_suffix(".png").read_bytes()[:8] == PNG
    finally:
        service.stop()
