"""The engine never imports the UI; importing fltui and the CLI never imports torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _loaded_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {m.split(".")[0] for m in out.split()}


def test_engine_imports_no_ui_package() -> None:
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in (ROOT / "engine").rglob("*.py")
        if p.name != "__init__.py" and "demo_mmar" not in p.parts
    )
    assert "engine.serde" in modules and "engine.client.communicator" in modules
    loaded = _loaded_after("\n".join(f"import {m}" for m in modules))
    assert not loaded & {"fltui", "textual", "rich"}


def test_fltui_and_its_cli_do_not_import_torch() -> None:
    loaded = _loaded_after("import fltui, fltui.cli, fltui.headless, engine.training")
    assert "torch" not in loaded
