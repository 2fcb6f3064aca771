"""``fltui ctl --workspace DIR ACTION``: the console's actions, from scripts, on a site service.

Exit codes: 0 done; 1 the service refused the action or it failed; 2 bad usage; 5 no service
runs for the workspace (or its socket cannot be used).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from engine.site.control_client import ControlClient
from engine.site.lock import ActionError, ServiceError, find_service
from fltui.exits import EXIT_CONFIG as EXIT_USAGE
from fltui.exits import EXIT_FAILED, EXIT_NO_SERVICE, EXIT_OK

__all__ = ["run_ctl"]


def _status_lines(status: dict[str, Any]) -> list[str]:
    phase = status.get("phase") or "—"
    if "validation" in phase or "validation" in str(status.get("status", "")):
        # Validation has no rounds: say what it has done, not "round 0/0".
        done = sorted(status.get("validation") or {})
        rounds = f"cross-site validation, {len(done)} model{'s' if len(done) != 1 else ''} "
        rounds += f"validated ({', '.join(done)})" if done else "validated so far"
        phase = "validating"
    elif status.get("num_rounds"):
        rounds = f"round {status.get('round', 0)}/{status['num_rounds']}"
    else:
        rounds = "no round yet"
    who = f"{status.get('mode', '?')} pid {status.get('pid', '?')}"
    lines = [
        f"site       {status.get('site', '?')} ({who})",
        f"server     {status.get('server') or '?'} (TLS {'on' if status.get('tls') else 'off'}), "
        f"{status.get('connection', '?')}",
        f"status     {status.get('status', '?')}",
        f"run        {status.get('run_number') or '—'} {status.get('mmar') or ''}".rstrip(),
        f"progress   {rounds}, {phase}",
    ]
    if status.get("outcome"):
        lines.append(f"outcome    {status['outcome']}")
    if status.get("last_error"):
        lines.append(f"last error {status['last_error']}")
    return lines


def run_ctl(workspace: Path, args: argparse.Namespace) -> int:
    action = args.action
    if action == "deploy" and not args.mmar:
        print("fltui ctl: deploy needs an MMAR (a name in transfer/ or a path)", file=sys.stderr)
        return EXIT_USAGE
    if action != "deploy" and args.mmar:
        print(f"fltui ctl: {action} takes no MMAR argument (got {args.mmar!r})", file=sys.stderr)
        return EXIT_USAGE
    try:
        info = find_service(workspace)
    except ServiceError as exc:
        print(f"fltui ctl: {exc}", file=sys.stderr)
        return EXIT_NO_SERVICE
    if info is None:
        print(
            f"fltui ctl: no site service runs for {workspace} "
            f"(start one with `fltui --no-ui --serve --workspace {workspace}`)",
            file=sys.stderr,
        )
        return EXIT_NO_SERVICE
    client = ControlClient(info.socket)
    try:
        client.connect()
    except ServiceError as exc:
        print(f"fltui ctl: {exc}", file=sys.stderr)
        return EXIT_NO_SERVICE
    try:
        if action == "status":
            result: Any = client.call("status", timeout=10)
        elif action == "deploy":
            run = args.run if args.run is not None else (client.call("latest_run") or 0) + 1
            # A path the caller can see is sent absolute; anything else names an MMAR in the
            # site's transfer/ folder.
            local = Path(args.mmar)
            mmar = str(local.resolve()) if local.exists() else args.mmar
            result = client.call("deploy", mmar, run)
        elif action == "start":
            run = args.run if args.run is not None else client.call("latest_run")
            if run is None:
                print("fltui ctl: nothing is deployed; deploy an MMAR first", file=sys.stderr)
                return EXIT_FAILED
            result = client.call("start_training", run, args.gpus)
        else:
            result = client.call(action)
    except ActionError as exc:
        if args.json:
            print(json.dumps({"action": action, "ok": False, "error": str(exc)}))
        else:
            print(f"fltui ctl: {action}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        client.close()
    if args.json:
        print(json.dumps({"action": action, "ok": True, "result": result}, default=str))
    elif action == "status":
        print("\n".join(_status_lines(result)))
    else:
        print(f"{action}: {result}")
    return EXIT_OK
