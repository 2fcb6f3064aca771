"""Regenerates the committed Python code for protos/*.proto (run: python -m protos.generate)."""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_FILES = ("protos/federated.proto", "protos/admin.proto")


def generate(out_dir: Path, root: Path | None = None) -> None:
    """Writes *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every proto into ``out_dir/protos``.

    Args:
        out_dir: folder that receives a ``protos/`` subfolder with the generated files.
        root: repository root holding ``protos/`` (default: this file's parent's parent).
    """
    import grpc_tools
    from grpc_tools import protoc

    root = root or Path(__file__).resolve().parent.parent
    (out_dir / "protos").mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(root / p) for p in PROTO_FILES],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
    generate(target)
