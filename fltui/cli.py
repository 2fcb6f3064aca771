"""Command line: ``fltui [--no-ui] [--json] [--workspace DIR]``, ``fltui demo``, ``fltui server``,
``fltui ctl``, ``fltui admin``, ``fltui provision``, ``fltui check-config``, ``fltui runbook``,
``fltui screenshot``.

Exit codes: 0 the federation finished (or the service was asked to stop); 1 it failed or was
aborted, or a ``ctl`` action was refused; 2 bad usage or configuration; 3 refused by TLS or
authentication; 4 the workspace already has a running service; 5 no site service runs for the
workspace (``ctl``); 130 interrupted.
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

from engine.procs import watch_parent
from fltui import __version__
from fltui.exits import (
    EXIT_BUSY,
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NO_SERVICE,
    EXIT_OK,
)

__all__ = [
    "EXIT_BUSY",
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_NO_SERVICE",
    "EXIT_OK",
    "main",
]


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


class _AdminParser(argparse.ArgumentParser):
    """``fltui admin``'s parser: its help ends with every command and a line each."""

    def format_help(self) -> str:
        from fltui.admin import command_list  # deferred: gRPC; only when help is asked

        self.epilog = command_list()
        return super().format_help()


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
        help="run as the site's service: stay up for the federation's and the consoles' "
        "commands (with --run N: train run N first)",
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
    demo.add_argument(
        "--secure",
        action="store_true",
        help="provision certificates into the demo workspace and use mutual TLS everywhere",
    )
    demo.add_argument(
        "--task",
        choices=("classification", "segmentation"),
        default="classification",
        help="classification (default): the built-in model on synthetic data; segmentation: a "
        "MONAI 3D UNet (Clara's PyTorch MMAR form) on synthetic NIfTI volumes made per site",
    )
    demo.add_argument(
        "--mmar",
        type=Path,
        default=None,
        metavar="PATH",
        help="federate this MMAR instead (deployed to every site unchanged; its "
        "servers[0].name is the task)",
    )
    # The console starts the demo this way: a service with a control socket, site-1 staying up.
    demo.add_argument("--service", action="store_true", help=argparse.SUPPRESS)
    ctl = sub.add_parser(
        "ctl",
        help="control the site service of a workspace from scripts",
        description="Talks to the running site service of a workspace (see `fltui --no-ui`).",
        epilog="Exit codes: 0 done; 1 the service refused or the action failed; 2 bad usage; "
        "5 no service runs for the workspace.",
    )
    ctl.add_argument(
        "--workspace", type=Path, default=argparse.SUPPRESS, metavar="DIR", help="the workspace"
    )
    ctl.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="one JSON object"
    )
    ctl.add_argument(
        "action",
        choices=("status", "deploy", "start", "abort", "restart", "validate", "shutdown"),
    )
    ctl.add_argument("mmar", nargs="?", help="deploy: an MMAR name in transfer/, or a path")
    ctl.add_argument("--run", type=int, default=None, metavar="N", help="deploy/start: run N")
    ctl.add_argument("--gpus", type=int, default=1, metavar="N", help="start: train on N GPUs")
    # The admin's parser lists every command in its help, read only when help is asked.
    default_class, sub._parser_class = sub._parser_class, _AdminParser  # type: ignore[attr-defined]
    admin = sub.add_parser(
        "admin",
        help="the federation admin's console (interactive, or one command: "
        "fltui admin --workspace KIT check_status client site-1)",
        description="The federation admin's console. Without a command: interactive, with line\n"
        "editing, history and Tab completion of commands and site names (Ctrl-D or Ctrl-C\n"
        "leaves). With one: runs it and exits 0 when every site answered ok, 1 when not,\n"
        "2 for an unknown command or a bad kit, 3 when refused by TLS or authentication.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub._parser_class = default_class  # type: ignore[attr-defined]
    admin.add_argument(
        "--workspace",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="KIT",
        help="the admin kit (startup/fed_admin.json, transfer/); default $FLTUI_WORKSPACE or .",
    )
    admin.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="one command's result as JSON (e.g. validate's {data_site: {model_owner: metrics}})",
    )
    admin.add_argument("words", nargs=argparse.REMAINDER, help="one command to run, then exit")
    sub.add_parser(  # dispatched before parsing (see main); here for --help
        "provision",
        help="make a federation's certificate authority, certificates and startup kits "
        "(fltui provision --project project.json --out DIR)",
        add_help=False,
    )
    sub.add_parser(  # dispatched before parsing (see main); here for --help
        "runbook",
        help="write the operator runbook: screenshots (SVG, PNG) and Markdown pages of the "
        "console driven through scenarios (fltui runbook --out DIR [--only N] "
        "[--simulate-gpus N])",
        add_help=False,
    )
    sub.add_parser(  # dispatched before parsing (see main); here for --help
        "screenshot",
        help="save the running site service's dashboard as SVG and PNG "
        "(fltui screenshot [--workspace DIR] [--out FILE])",
        add_help=False,
    )
    sub.add_parser(  # dispatched before parsing (see main); here for --help
        "check-config",
        help="check a workspace, startup kit, MMAR or server config (Clara 3.1 forms); "
        "every problem at once",
        add_help=False,
    )
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
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["check-config"]:  # its own parser, --help included
        from fltui.check_config import main as check_config  # deferred: loads when the command runs

        return check_config(words[1:])
    if words[:1] == ["provision"]:
        from fltui.provision import main as provision  # deferred: loads when the command runs

        return provision(words[1:])
    if words[:1] == ["runbook"]:
        from fltui.runbook import main as runbook  # deferred: loads when the command runs

        return runbook(words[1:])
    if words[:1] == ["screenshot"]:
        from fltui.screenshot import main as screenshot  # deferred: loads when the command runs

        return screenshot(words[1:])
    args = build_parser().parse_args(words)
    if not args.no_ui and args.command in (None, "demo"):
        return _run_console(args)
    if args.command == "admin":
        try:
            from fltui.admin import run_admin  # deferred: gRPC, X.509; not for --help

            return run_admin(_workspace(args), list(args.words), json_out=args.json)
        except KeyboardInterrupt:  # while starting: leave without a traceback
            print("\nfltui admin: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
    if args.command == "ctl":
        from fltui.ctl import run_ctl  # deferred: loads when the command runs

        return run_ctl(_workspace(args), args)
    from engine.events import EventBus  # deferred: the engine; not for --help
    from fltui.headless import HeadlessPrinter  # deferred: --no-ui's; not for --help

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
    from fltui.app import create_app  # deferred: textual; not for --help or --no-ui
    from fltui.themes import load_themes  # deferred: textual; not for --help or --no-ui

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
            root,
            demo=True,
            theme=args.theme,
            demo_sites=args.sites,
            demo_rounds=args.rounds,
            demo_secure=args.secure,
            demo_task=args.task,
            demo_mmar=args.mmar.resolve() if args.mmar is not None else None,
        )
    else:
        from engine.site.lock import ServiceError  # deferred: not for --help or --no-ui

        try:
            app = create_app(_workspace(args), theme=args.theme)
        except ServiceError as exc:
            print(f"fltui: {exc}", file=sys.stderr)
            return EXIT_NO_SERVICE
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
    """The site service: the engine, the workspace lock and the control socket."""
    from engine.config import ConfigError  # deferred: the engine; not for --help
    from engine.gpu import GpuSampler  # deferred: the engine; not for --help
    from engine.site.lock import (  # deferred: the engine; not for --help
        ServiceError,
        WorkspaceBusy,
    )
    from engine.site.runner import SiteRunner  # deferred: the engine; not for --help

    root = _workspace(args)
    stop = threading.Event()
    _on_sigterm(stop)
    try:
        # What the console's GPU panel shows, --no-ui prints (GpuSampled events).
        runner = SiteRunner(root, bus, executor=args.executor, gpu_sampler=GpuSampler())  # type: ignore[arg-type]
        info = runner.open()
    except ConfigError as exc:
        return _config_error(printer, exc)
    except WorkspaceBusy as exc:
        print(f"fltui: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except ServiceError as exc:
        return _config_error(printer, exc)
    printer.say(  # type: ignore[attr-defined]
        f"{runner.site}: site service pid {info.pid}; attach a console with "
        f"`fltui --workspace {root}`"
    )
    try:
        # --serve: stay up for commands (and with --run N, train run N first).
        outcome = runner.run(
            auto_start=not args.serve or args.run is not None,
            run_number=args.run,
            stay=args.serve,
        )
    except ConfigError as exc:
        return _config_error(printer, exc)
    except KeyboardInterrupt:
        runner.request_stop()
        if runner.service is not None:
            runner.service.stop()
        return EXIT_INTERRUPTED
    finally:
        runner.close()
    if runner.stopping:
        return EXIT_OK  # stopped on request (ctl shutdown, a console's stop key)
    failure = getattr(runner.service, "failure", None)
    if failure is not None:  # registration failed: refused by TLS/authentication, or not reached
        from engine.tls import EXIT_REFUSED  # deferred: gRPC, X.509; not for --help

        return EXIT_REFUSED if failure.security else EXIT_FAILED
    if args.serve:
        return EXIT_OK
    return EXIT_OK if outcome == "completed" else EXIT_FAILED


def _run_demo(args: argparse.Namespace, bus: object, printer: object) -> int:
    from engine.config import ConfigError  # deferred: the engine; not for --help
    from engine.demo import DemoFederation  # deferred: gRPC, numpy; not for --help

    if args.workspace is not None:
        root = Path(args.workspace).resolve()
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = Path(tempfile.mkdtemp(prefix="fltui-demo-"))
    printer.say(f"demo workspace: {root}")  # type: ignore[attr-defined]
    if args.sites < 1 or args.rounds < 1:
        print("fltui: --sites and --rounds must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    demo = DemoFederation(
        root,
        bus,  # type: ignore[arg-type]
        num_sites=args.sites,
        num_rounds=args.rounds,
        torch_in_subprocess=args.service,
        site_1_stays=args.service,
        secure=args.secure,
        task=args.task,
        mmar=args.mmar.resolve() if args.mmar is not None else None,
    )
    from engine.gpu import GpuSampler  # deferred: the engine; not for --help
    from engine.site.actions import SiteActions  # deferred: the engine; not for --help
    from engine.site.lock import (  # deferred: the engine; not for --help
        ServiceError,
        WorkspaceBusy,
        WorkspaceLock,
    )
    from engine.site.runner import ServiceHost  # deferred: the engine; not for --help

    # site-1 runs in this process: its control socket serves the demo's root, and site-1's
    # own workspace points at it, so `fltui ctl|screenshot --workspace ROOT/site-1` and a
    # console there attach to this site-1 rather than start a second one.
    actions = SiteActions(
        root / "site-1",
        lambda: demo.site_service.interface if demo.site_service is not None else None,
        lambda: "site-1",
    )
    host = ServiceHost(root, bus, "site-1", "demo", actions, on_shutdown=demo.abort)  # type: ignore[arg-type]
    alias = WorkspaceLock(root / "site-1")
    try:
        info = host.open()
        try:
            alias.acquire_alias("site-1", "demo", info.socket)
        except BaseException:
            host.close()
            raise
        alias.publish()
    except WorkspaceBusy as exc:
        print(f"fltui: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except ServiceError as exc:
        return _config_error(printer, exc)
    sampler = None
    if args.service:
        printer.say(f"demo service pid {info.pid}, control socket {info.socket}")  # type: ignore[attr-defined]
        parent = os.environ.get("FLTUI_PARENT_PID", "")
        if parent.isdigit():
            watch_parent(int(parent), demo.abort)
        sampler = GpuSampler()
        sampler.start(bus, "site-1")  # type: ignore[arg-type]
    stop = threading.Event()
    _on_sigterm(stop)
    try:
        result = demo.run()
    except ConfigError as exc:
        return _config_error(printer, exc)
    except KeyboardInterrupt:
        demo.abort()
        return EXIT_INTERRUPTED
    finally:
        if sampler is not None:
            sampler.stop()
        alias.release()
        host.close()
    if args.service and demo.aborted:
        printer.say(f"demo stopped on request; files under {root}")  # type: ignore[attr-defined]
        return EXIT_OK
    summary = ", ".join(f"{site}: {outcome}" for site, outcome in sorted(result.outcomes.items()))
    printer.say(f"demo {'finished' if result.ok else 'FAILED'} ({summary}); files under {root}")  # type: ignore[attr-defined]
    return EXIT_OK if result.ok else EXIT_FAILED


def _run_server(args: argparse.Namespace, bus: object, printer: object) -> int:
    from engine.config import (  # deferred: the engine; not for --help
        ConfigError,
        load_server_config,
    )
    from engine.fileio import load_npz  # deferred: numpy; not for --help
    from engine.server import FederatedServer  # deferred: gRPC, numpy; not for --help
    from engine.site.logs import attach_workspace_logs  # deferred: the engine; not for --help

    root = _workspace(args)
    try:
        candidates = [root / "config_fed_server.json", root / "config" / "config_fed_server.json"]
        path = next((p for p in candidates if p.exists()), candidates[0])
        config = load_server_config(path)
        if args.mmar is not None:
            from engine.training.initial_model import initial_weights  # deferred: torch

            # The model component alone (or the MMAR's checkpoint): a server has no data.
            initial = initial_weights(args.mmar)
        else:
            model_path = root / "models" / "initial_model.npz"
            if not model_path.exists():
                raise ConfigError(
                    model_path, "", "no initial model (give --mmar PATH to build one)"
                )
            initial = load_npz(model_path)
        # Certificate problems (missing, readable key, expired) are ConfigErrors from here.
        server = FederatedServer(config, root, initial, bus)  # type: ignore[arg-type]
        del initial  # the server keeps it (a view, no copy): no second whole model here
    except ConfigError as exc:
        return _config_error(printer, exc)
    detach = attach_workspace_logs(root, bus, "server")  # type: ignore[arg-type]
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
