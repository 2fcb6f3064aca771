"""One site, one engine: tools pointed at a demo site attach to it; a second engine is refused.

A real `fltui demo --no-ui` (site-1 in the demo's process, site-2 a service of its own); `ctl`
pointed at either site's workspace finds it; a service started there, or on a copy of a site's
workspace (the same site, the same server), is refused before it registers, naming the pid.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _fltui(*words: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fltui", *words],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        stdin=subprocess.DEVNULL,
    )


def test_demo_sites_are_found_and_a_second_engine_is_refused(tmp_path: Path) -> None:
    ws = tmp_path / "demo"
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fltui",
            "demo",
            "--no-ui",
            "--workspace",
            str(ws),
            "--sites",
            "2",
            "--rounds",
            "200",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            info = ws / "site-2" / ".fltui" / "service.json"
            if info.exists() and (ws / "site-1" / ".fltui" / "service.json").exists():
                break
            assert demo.poll() is None, "the demo ended early"
            assert time.monotonic() < deadline, "the demo's sites did not describe themselves"
            time.sleep(0.3)

        # ctl pointed at site-1 (in the demo's process) and site-2 (a service) attaches.
        one = _fltui("ctl", "--workspace", str(ws / "site-1"), "--json", "status")
        assert one.returncode == 0, one.stderr
        status = json.loads(one.stdout)["result"]
        assert status["site"] == "site-1" and status["pid"] == demo.pid, status
        two = _fltui("ctl", "--workspace", str(ws / "site-2"), "status")
        assert two.returncode == 0 and "site-2 (service pid" in two.stdout, two

        # A second engine on site-1's workspace: refused (4), naming the demo's pid.
        again = _fltui("--no-ui", "--workspace", str(ws / "site-1"))
        assert again.returncode == 4, again
        assert f"pid {demo.pid}" in again.stderr, again.stderr

        # A copy of site-2's workspace: the same site with the same server from this machine.
        copy = tmp_path / "copy"
        copy.mkdir()
        shutil.copytree(ws / "site-2" / "startup", copy / "startup")
        taken = _fltui("--no-ui", "--serve", "--workspace", str(copy))
        assert taken.returncode == 4, taken
        site_2_pid = json.loads((ws / "site-2" / ".fltui" / "service.json").read_text())["pid"]
        assert "already has a live session" in taken.stderr, taken.stderr
        assert f"pid {site_2_pid}" in taken.stderr, taken.stderr
    finally:
        demo.terminate()
        try:
            demo.wait(timeout=30)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait()
    # Gone with the demo: site-1's workspace is free again, and says so.
    gone = _fltui("ctl", "--workspace", str(ws / "site-1"), "status")
    assert gone.returncode == 5, gone
