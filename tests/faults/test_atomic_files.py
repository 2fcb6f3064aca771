"""Killing a writer in the middle of a write (SIGKILL, a real child process) loses nothing.

The child is stopped inside the real write functions, after part of the new file is on disk;
the previous file must still be whole, and a server on that workspace resumes from it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from engine.config import ServerConfig
from engine.events import EventBus, ServerResumed
from engine.fileio import load_npz, read_npz_meta, save_json_atomic, save_npz_atomic
from engine.server import FederatedServer
from tests.conftest import Recorder

ROOT = Path(__file__).resolve().parents[2]
TASK = "atomic_test"

# Writes the new file through the real function; once part of it is on disk, says MID and
# waits to be killed.
_CHILD = textwrap.dedent(
    """
    import sys, time
    from collections.abc import Mapping
    from pathlib import Path
    import numpy as np
    from engine.fileio import atomic_write, save_npz_atomic

    kind, target = sys.argv[1], Path(sys.argv[2])

    def mid() -> None:
        print("MID", flush=True)
        time.sleep(60)

    if kind == "npz":
        class Blocking(Mapping):
            # The first variable is written whole; then the writer "dies" mid-file.
            def __init__(self):
                self.d = {"a": np.full(1 << 20, 7, np.float32), "b": np.ones(4, np.float32)}
            def __getitem__(self, k): return self.d[k]
            def __len__(self): return len(self.d)
            def __iter__(self):
                yield "a"
                mid()
                yield "b"
        save_npz_atomic(target, Blocking(), meta={"task": "atomic_test", "round": 2})
    else:
        def write(f):
            f.write(b"new checkpoint " * 100_000)
            f.flush()
            mid()
            f.write(b"end")
        atomic_write(target, write)
    """
)


def _kill_midway(kind: str, target: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, kind, str(target)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "MID", f"the writer did not get midway: {line!r} {proc.stderr}"
        temps = list(target.parent.glob(f".{target.name}.*.tmp"))
        assert temps and temps[0].stat().st_size > 0, "no partial temp file: nothing was tested"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()


def test_global_model_write_killed_midway_leaves_the_previous_one_and_the_server_resumes(
    tmp_path: Path,
) -> None:
    ws = tmp_path / "server"
    initial = {"a": np.zeros(1 << 20, np.float32), "b": np.zeros(4, np.float32)}
    previous = {"a": np.full(1 << 20, 3, np.float32), "b": np.full(4, 3, np.float32)}
    model_path = ws / "models" / "global_model.npz"
    # What a server leaves after round 1 of 3: its state, then the model of round 1.
    save_json_atomic(
        ws / "state.json",
        {
            "task": TASK,
            "current_round": 1,
            "num_rounds": 3,
            "finished": False,
            "sites": ["site-1"],
            "history": [
                {
                    "round": 1,
                    "contributors": ["site-1"],
                    "missing": [],
                    "contributions": {"site-1": "site-1-c1"},
                }
            ],
        },
    )
    save_npz_atomic(model_path, previous, meta={"task": TASK, "round": 1})

    _kill_midway("npz", model_path)

    got = load_npz(model_path)
    assert {k: v.tobytes() for k, v in got.items()} == {
        k: v.tobytes() for k, v in previous.items()
    }, "the previous global model was damaged by the killed write"
    assert read_npz_meta(model_path) == {"task": TASK, "round": 1}

    bus = EventBus()
    recorder = Recorder(bus)
    server = FederatedServer(
        ServerConfig(task_name=TASK, target="127.0.0.1:0", num_rounds=3), ws, initial, bus
    )
    assert server.current_round == 1 and server.history[0]["contributors"] == ["site-1"]
    np.testing.assert_array_equal(server.global_model["a"], previous["a"])
    server.start()
    try:
        assert not list(model_path.parent.glob(".*.tmp")), "the dead writer's temp file stayed"
        resumed = recorder.of(ServerResumed)
        assert len(resumed) == 1 and resumed[0].round == 2 and resumed[0].sites == ["site-1"]
    finally:
        server.stop(grace=0)


def test_checkpoint_write_killed_midway_leaves_the_previous_one(tmp_path: Path) -> None:
    target = tmp_path / "models" / "best_model.pt"
    target.parent.mkdir()
    target.write_bytes(b"previous checkpoint")
    _kill_midway("bytes", target)
    assert target.read_bytes() == b"previous checkpoint"
