"""The committed generated code in protos/ is what the .proto files generate today."""

from __future__ import annotations

from pathlib import Path

from protos.generate import generate

ROOT = Path(__file__).resolve().parent.parent


def test_generated_protos_are_current(tmp_path: Path) -> None:
    generate(tmp_path, ROOT)
    fresh = sorted(p.name for p in (tmp_path / "protos").iterdir() if p.is_file())
    assert fresh == sorted(
        f"{stem}{suffix}"
        for stem in ("admin", "federated")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
    )
    stale = [
        name
        for name in fresh
        if (tmp_path / "protos" / name).read_bytes() != (ROOT / "protos" / name).read_bytes()
    ]
    assert not stale, f"regenerate with `python -m protos.generate`; stale: {stale}"
