"""Command line: ``fltui [--no-ui] [--json] [--workspace DIR]``, ``fltui demo``, ``fltui server``.

Exit codes: 0 the federation finished; 1 it failed or was aborted; 2 bad usage or configuration;
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from fltui import __version__

__all__ = ["EXIT_CONFIG", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130


def _common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    parser.add_argument(
        "--no-ui", action="store_true", default=d(False), help="run headless: print events"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=d(False),
        help="with --no-ui: one JSON object per line",
    )
    parser.add_argument(
        "--workspace", type=Path, default=d(None), metavar="DIR", help="the workspace folder"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fltui",
        description="A site operator's terminal app for federated learning.",
        epilog="Without a command: run this site from its workspace (DIR, $FLTUI_WORKSPACE or .).",
    )
    parser.add_argument("--version", action="version", version=f"fltui {__version__}")
    parser.add_argument(
        "--theme",
        default="dark",
        help="colour theme of the console: dark, light or high_contrast (default dark)",
    )
    _common(parser, suppress=False)
    parser.add_argument(
        "--run",
        type=int,
        default=None,
        metavar="N",
        help="train deployed run N (default: the latest)",
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="stay up and wait for the federation's admin commands instead of training at once",
    )
    parser.add_argument(
        "--executor",
        choices=("process", "thread"),
        default="process",
        help="run training in a child process group (default) or in a thread",
    )
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="run a demo federation on this machine (server + 3 sites)")
    _common(demo, suppress=True)
    demo.add_argument("--sites", type=int, default=3, help="sites in the federation (default 3)")
    demo.add_argument(
        "--rounds", type=int, default=5, help="rounds of federated averaging (default 5)"
    )
    admin = sub.add_parser(
        "admin",
        help="the federation admin's console (interactive, or one command: "
        "fltui admin --workspace KIT check_status client site-1)",
    )
    _common(admin, suppress=True)
    admin.add_argument("words", nargs=argparse.REMAINDER, help="one command to run, then exit")
    server = sub.add_parser("server", help="run the reference FL server from a server workspace")
    _common(server, suppress=True)
    server.add_argument(
        "--mmar", type=Path, default=None, help="build the initial model from this MMAR"
    )
    return parser


def _workspace(args: argparse.Namespace) -> Path:
    if args.workspace is not None:
        return Path(args.workspace)
    env = os.environ.get("FLTUI_WORKSPACE")
    return Path(env) if env else Path.cwd()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.no_ui and args.command in (None, "demo"):
        return _run_console(args)
    if args.command == "admin":
        from fltui.admin import run_admin

        return run_admin(_workspace(args), list(args.words), json_out=args.json)
    from engine.events import EventBus
    from fltui.headless import HeadlessPrinter

    bus = EventBus()
    # Human lines: the events say what happened; info-level log lines would repeat them.
    printer = HeadlessPrinter(
        json_lines=args.json, min_log_level="INFO" if args.json else "WARNING"
    )
    bus.subscribe(printer)
    if not args.no_ui and args.command == "server":
        printer.say("note: the server has no console; running headless.")
    logging.getLogger("engine").setLevel(logging.INFO)
    try:
        if args.command == "demo":
            return _run_demo(args, bus, printer)
        if args.command == "server":
            return _run_server(args, bus, printer)
        return _run_site(args, bus, printer)
    except KeyboardInterrupt:
        printer.say("interrupted")
        return EXIT_INTERRUPTED


def _run_console(args: argparse.Namespace) -> int:
    """The full-screen console (the engine runs in this process, torch in its workers)."""
    from fltui.app import create_app
    from fltui.themes import load_themes

    themes = load_themes()
    if args.theme not in themes:
        print(f"fltui: unknown theme {args.theme!r} (themes: {', '.join(themes)})", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "demo":
        if args.workspace is not None:
            root = Path(args.workspace).resolve()
            root.mkdir(parents=True, exist_ok=True)
        else:
            root = Path(tempfile.mkdtemp(prefix="fltui-demo-"))
        app = create_app(
            root, demo=True, theme=args.theme, demo_sites=args.sites, demo_rounds=args.rounds
        )
    else:
        app = create_app(_workspace(args), theme=args.theme)
    app.run()
    return EXIT_OK


def _config_error(printer: object, exc: Exception) -> int:
    print(f"fltui: {exc}", file=sys.stderr)
    return EXIT_CONFIG


def _on_sigterm(stop: threading.Event) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def _run_site(args: argparse.Namespace, bus: object, printer: object) -> int:
    from engine.config import ConfigError
    from engine.site import SiteService, attach_workspace_logs

    root = _workspace(args)
    stop = threading.Event()
    _on_sigterm(stop)
    while True:
        try:
            service = SiteService(root, bus, executor=args.executor)  # type: ignore[arg-type]
        except ConfigError as exc:
            return _config_error(printer, exc)
        detach = attach_workspace_logs(root, bus, service.site)  # type: ignore[arg-type]
        from engine.gpu import GpuSampler

        # What the console's GPU panel shows, --no-ui prints (GpuSampled events).
        sampler = GpuSampler()
        sampler.start(bus, service.site)  # type: ignore[arg-type]
        try:
            outcome = service.run(auto_start=not args.serve, run_number=args.run)
        except ConfigError as exc:
            return _config_error(printer, exc)
        except KeyboardInterrupt:
            service.request_stop()
            service.stop()
            return EXIT_INTERRUPTED
        finally:
            sampler.stop()
            detach()
        if service.restart_requested:
            printer.say(f"{service.site}: restarting the site engine")  # type: ignore[attr-defined]
            continue
        if args.serve:
            return EXIT_OK
        return EXIT_OK if outcome == "completed" else EXIT_FAILED


def _run_demo(args: argparse.Namespace, bus: object, printer: object) -> int:
    from engine.config import ConfigError
    from engine.demo import DemoFederation

    if args.workspace is not None:
        root = Path(args.workspace).resolve()
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = Path(tempfile.mkdtemp(prefix="fltui-demo-"))
    printer.say(f"demo workspace: {root}")  # type: ignore[attr-defined]
    if args.sites < 1 or args.rounds < 1:
        print("fltui: --sites and --rounds must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    demo = DemoFederation(root, bus, num_sites=args.sites, num_rounds=args.rounds)  # type: ignore[arg-type]
    stop = threading.Event()
    _on_sigterm(stop)
    try:
        result = demo.run()
    except ConfigError as exc:
        return _config_error(printer, exc)
    except KeyboardInterrupt:
        demo.abort()
        return EXIT_INTERRUPTED
    summary = ", ".join(f"{site}: {outcome}" for site, outcome in sorted(result.outcomes.items()))
    printer.say(f"demo {'finished' if result.ok else 'FAILED'} ({summary}); files under {root}")  # type: ignore[attr-defined]
    return EXIT_OK if result.ok else EXIT_FAILED


def _run_server(args: argparse.Namespace, bus: object, printer: object) -> int:
    from engine.config import ConfigError, load_server_config
    from engine.fileio import load_npz
    from engine.server import FederatedServer
    from engine.site import attach_workspace_logs

    root = _workspace(args)
    try:
        candidates = [root / "config_fed_server.json", root / "config" / "config_fed_server.json"]
        path = next((p for p in candidates if p.exists()), candidates[0])
        config = load_server_config(path)
        if args.mmar is not None:
            from engine.training import build_fitter

            initial = build_fitter(args.mmar, site_name="server").get_weights()
        else:
            model_path = root / "models" / "initial_model.npz"
            if not model_path.exists():
                raise ConfigError(
                    model_path, "", "no initial model (give --mmar PATH to build one)"
                )
            initial = load_npz(model_path)
    except ConfigError as exc:
        return _config_error(printer, exc)
    detach = attach_workspace_logs(root, bus, "server")  # type: ignore[arg-type]
    server = FederatedServer(config, root, initial, bus)  # type: ignore[arg-type]
    stop = threading.Event()
    _on_sigterm(stop)
    try:
        server.start()
        printer.say(f"server listening on port {server.port}")  # type: ignore[attr-defined]
        # Ctrl-C stays responsive: wait in short steps.
        while not server.wait_all_left(timeout=1.0):
            pass
        printer.say("all rounds done and every site has left; server stopping")  # type: ignore[attr-defined]
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        server.stop(grace=2)
        detach()
