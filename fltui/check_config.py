"""``fltui check-config PATH [MMAR]``: every problem of a startup kit, MMAR or workspace, at once.

PATH may be a site workspace (``startup/fed_client.json`` and its deployed ``run_<N>/mmar_<site>``
and offered ``transfer/*`` MMARs), a startup kit folder or its ``fed_client.json``, an MMAR (a
folder with ``config/``) or one of its config files, or a server folder or its
``config_fed_server.json``. Each problem is one line: ``FILE: KEY: what is wrong and expected``.
A site's own code (``custom/``) is never imported here: only its presence is checked. With a
second path (``check-config KIT MMAR``), the pair too: the MMAR's task (``servers[0].name``)
must be a federation of the kit, as deploy and start require. A workspace's MMARs are checked
against its kit the same way.

Exit status: 0 no problem, 1 problems found (all printed), 2 bad usage (no such path, or not a
kit, MMAR or workspace).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from engine import he
from engine.client.data_processors import build_client_state_processors, build_processors
from engine.components import missing_module, own_code
from engine.config import (
    ComponentSpec,
    ConfigError,
    environment_problems,
    existing_files,
    load_client_kit,
    local_environment_file,
    read_client_kit,
    read_mmar_client_config,
    read_server_config,
)
from engine.privacy import build_privacy
from engine.site.deploy import policy_refusal
from engine.site.paths import SitePaths
from engine.site.policy import load_site_policy
from engine.site.site_engine import served_endpoint
from engine.training.components import check_component
from engine.training.config import TRAIN_CONFIG, is_bundle, read_train_config
from engine.training.script import script_model_problem

__all__ = ["Report", "check_pair", "check_path", "main"]

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2

_MMAR_FILES = ("config_fed_client.json", "config_fed_server.json", "config_train.json")


@dataclass
class Report:
    """What was checked and what is wrong."""

    checked: list[Path] = field(default_factory=list)
    problems: list[ConfigError] = field(default_factory=list)

    def add(self, problems: Iterable[ConfigError]) -> None:
        for problem in problems:
            # One error may carry several (ConfigProblems); each is its own line.
            for one in getattr(problem, "problems", [problem]):
                if str(one) not in {str(p) for p in self.problems}:
                    self.problems.append(one)


class UsageError(Exception):
    """PATH is not something check-config knows how to check."""


def check_path(path: Path) -> Report:
    """Checks whatever ``path`` is (workspace, kit, MMAR, server folder or one of their files).

    Raises:
        UsageError: the path does not exist or is none of those.
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file or folder")
    report = Report()
    if path.is_file():
        _check_file(path, report)
        return report
    if (path / "startup" / "fed_client.json").is_file():
        _check_workspace(path, report)
    elif (path / "fed_client.json").is_file():
        _check_kit(path / "fed_client.json", report)
    elif (path / "config").is_dir() or is_bundle(path):
        _check_mmar(path, report)  # an MMAR, or a MONAI bundle deployed as it is
    elif path.name == "config" and any((path / name).is_file() for name in _MMAR_FILES):
        _check_mmar(path.parent, report)  # an MMAR's config/ folder: its MMAR
    elif (path / "config_fed_server.json").is_file():
        _check_server(path / "config_fed_server.json", report)
    else:
        raise UsageError(
            f"{path}: not a site workspace (startup/fed_client.json), startup kit "
            "(fed_client.json), MMAR (config/) or server folder (config_fed_server.json)"
        )
    return report


def _kit_file(path: Path) -> Path | None:
    """The ``fed_client.json`` that ``path`` (a workspace, a kit folder or the file) names."""
    for candidate in (path / "startup" / "fed_client.json", path / "fed_client.json", path):
        if candidate.is_file() and candidate.name == "fed_client.json":
            return candidate
    return None


def check_pair(kit_path: Path, mmar: Path) -> Report:
    """Checks a startup kit, an MMAR, and that the kit's federation serves the MMAR's task.

    Raises:
        UsageError: ``kit_path`` is no kit or workspace, or ``mmar`` no MMAR.
    """
    kit_path, mmar = Path(kit_path), Path(mmar)
    kit = _kit_file(kit_path)
    if kit is None:
        raise UsageError(
            f"{kit_path}: not a startup kit (fed_client.json) or site workspace "
            "(startup/fed_client.json)"
        )
    if mmar.is_file() or not ((mmar / "config").is_dir() or is_bundle(mmar)):
        raise UsageError(f"{mmar}: not an MMAR (a folder with config/) or a MONAI bundle")
    if not mmar.exists():
        raise UsageError(f"{mmar}: no such file or folder")
    report = check_path(kit_path)
    _check_mmar(mmar, report)
    _check_task(kit, mmar, report)
    return report


def _check_task(kit: Path, mmar: Path, report: Report) -> None:
    """The MMAR's task must be one of the kit's federations (what deploy and start check)."""
    try:
        config = load_client_kit(kit)
    except ConfigError:
        return  # reported with the kit
    mmar_config, _ = read_mmar_client_config(mmar)
    if mmar_config is None:
        return  # reported with the MMAR
    try:
        served_endpoint(config, mmar_config)
    except ConfigError as exc:
        report.add([exc])


def _check_file(path: Path, report: Report) -> None:
    if path.parent.name == "config" and (
        path.name in _MMAR_FILES or path.name == "environment.json"
    ):
        _check_mmar(path.parent.parent, report)
    elif path.name == "config_fed_server.json":
        _check_server(path, report)
    elif path.name == "fed_client.json":
        _check_kit(path, report)
    else:
        raise UsageError(
            f"{path}: expected fed_client.json, config_fed_server.json, or a file in an MMAR's "
            f"config/ ({', '.join((*_MMAR_FILES, 'environment.json'))})"
        )


def _check_workspace(root: Path, report: Report) -> None:
    kit = root / "startup" / "fed_client.json"
    _check_kit(kit, report)
    try:
        site = load_client_kit(kit).client_name
    except ConfigError:
        site = ""
    mmars = SitePaths(root).deployed_mmars(site)
    mmars += sorted(p for p in (root / "transfer").glob("*") if (p / "config").is_dir())
    for mmar in mmars:
        _check_mmar(mmar, report)
        _check_task(kit, mmar, report)
    _check_site_he_context(root, mmars, report)


_HE_PROCESSORS = ("ModelEncryptor", "ModelDecryptor")


def _he_problem(path: Path, role: str) -> ConfigError | None:
    """The HE context at ``path`` cannot serve ``role`` ("site": needs the secret key;
    "server": must not hold it), in words; None when it can."""
    try:
        he.load_context(path, role)
    except he.HEError as exc:
        return ConfigError(path, "", str(exc).removeprefix(f"{path}: "))
    return None


def _check_site_he_context(root: Path, mmars: list[Path], report: Report) -> None:
    """A site's HE context holds the federation's secret key, owner-only; an MMAR that lists
    ModelEncryptor or ModelDecryptor has one to use."""
    path = root / "startup" / he.CLIENT_CONTEXT
    if path.exists():
        report.checked.append(path)
        problem = _he_problem(path, "site")
        if problem is not None:
            report.add([problem])
        return
    for mmar in mmars:
        config, _ = read_mmar_client_config(mmar)
        if config is None:
            continue
        specs = [*config.pre_processors, *config.post_processors]
        named = sorted({s.name for s in specs if s.name in _HE_PROCESSORS})
        if named:
            report.add(
                [
                    ConfigError(
                        path,
                        "",
                        f"missing: {mmar.name} lists {' and '.join(named)} (homomorphic "
                        "encryption), which needs this site's context with the federation's "
                        "secret key: copy client_context.tenseal from the site's provisioned "
                        'kit (fltui provision with "homomorphic_encryption")',
                    )
                ]
            )
            return


def _check_tls_files(file: Path, config: Any, prefix: str, missing: str, report: Report) -> None:
    """The three ssl_* files exist where named, and are named where TLS is on."""
    files = {
        "ssl_root_cert": config.ssl_root_cert,
        "ssl_cert": config.ssl_cert,
        "ssl_private_key": config.ssl_private_key,
    }
    report.add(existing_files(file, {prefix + k: v for k, v in files.items()}))
    if config.secure_train:
        report.add([ConfigError(file, prefix + k, missing) for k, v in files.items() if v is None])


def _check_kit(kit: Path, report: Report) -> None:
    report.checked.append(kit)
    config, problems = read_client_kit(kit)
    report.add(problems)
    if config is None:
        return
    _check_tls_files(
        kit,
        config,
        "client.",
        "required when secure_train is true (a file relative to the kit)",
        report,
    )
    _check_kit_files(kit, config, report)


def _check_kit_files(kit: Path, config: Any, report: Report) -> None:
    """What the site checks before it connects: its key's mode, its certificate's dates/CA."""
    from engine.tls import (  # deferred: gRPC and X.509, for a kit with certificate files only
        KitError,
        SecurityFailure,
        check_private_key_file,
        preflight_certificate,
    )

    files = (config.ssl_root_cert, config.ssl_cert, config.ssl_private_key)
    if not all(f is not None and Path(f).is_file() for f in files):
        return  # reported above
    try:
        check_private_key_file(config.ssl_private_key)
        preflight_certificate(*files)
    except KitError as exc:
        report.add([ConfigError(exc.path, "client.ssl_private_key", exc.problem)])
    except SecurityFailure as exc:
        report.add([ConfigError(kit, "client.ssl_cert", exc.reason)])


def _check_server(path: Path, report: Report) -> None:
    report.checked.append(path)
    config, problems = read_server_config(path)
    report.add(problems)
    if config is None:
        return
    _check_tls_files(
        path,
        config,
        "servers[0].",
        'required: a server uses mutual TLS unless its config says "secure_train": false',
        report,
    )
    _check_server_he_context(path.parent / "startup", report)


def _check_server_he_context(startup: Path, report: Report) -> None:
    """The server's folder holds no HE secret key: no site context, and a server context
    without one (the server refuses to start otherwise)."""
    secret = startup / he.CLIENT_CONTEXT
    if secret.exists():
        report.add(
            [
                ConfigError(
                    secret,
                    "",
                    "a site's HE context with the federation's secret key is in the server's "
                    "folder; the server must never hold it: remove it (the server needs only "
                    "server_context.tenseal)",
                )
            ]
        )
    path = startup / he.SERVER_CONTEXT
    if path.exists():
        report.checked.append(path)
        problem = _he_problem(path, "server")
        if problem is not None:
            report.add([problem])


def _check_mmar(mmar: Path, report: Report) -> None:
    config_dir = mmar / "config"
    fed_client = config_dir / "config_fed_client.json"
    fed_server = config_dir / "config_fed_server.json"
    if not fed_client.is_file() and not fed_server.is_file() and not is_bundle(mmar):
        report.add(
            [
                ConfigError(
                    fed_client,
                    "",
                    "file not found; a federated MMAR needs config/config_fed_client.json "
                    "(and config/config_fed_server.json for its server)",
                )
            ]
        )
    report.checked.append(config_dir / "environment.json")
    # In a site workspace the site's own local/environment.json goes over the MMAR's variables
    # (as at start and in training): its problems are the site's, reported with it.
    local = local_environment_file(mmar)
    if local is not None and local.exists():
        report.checked.append(local)
    report.add(environment_problems(mmar, local))
    policy_file = _workspace_policy(mmar)
    if policy_file is not None:
        # The MMAR sits in a site workspace (run_<N>/ or transfer/): that site's policy decides
        # whether its own code and config expressions may run, by the same check as deploy,
        # start and the worker.
        try:
            policy = load_site_policy(policy_file)
        except ConfigError as exc:
            report.add([exc])
        else:
            refusal = policy_refusal(mmar, policy)
            if refusal:
                report.add([ConfigError(mmar, "", refusal)])
    if fed_client.is_file():
        _check_mmar_client(mmar, report)
    if fed_server.is_file():
        _check_server(fed_server, report)
    _check_train(mmar, report)


def _check_mmar_client(mmar: Path, report: Report) -> None:
    path = mmar / "config" / "config_fed_client.json"
    report.checked.append(path)
    config, problems = read_mmar_client_config(mmar)
    report.add(problems)
    if config is None:
        return
    report.add(
        existing_files(
            path,
            {
                "client.ssl_root_cert": config.ssl_root_cert,
                "client.ssl_cert": config.ssl_cert,
                "client.ssl_private_key": config.ssl_private_key,
            },
        )
    )
    custom = mmar / "custom"
    specs: list[tuple[ComponentSpec, str]] = []
    if config.privacy is not None:
        specs.append((config.privacy, "privacy"))
    specs += [(s, "processor") for s in config.pre_processors]
    specs += [(s, "processor") for s in config.post_processors]
    specs += [(s, "state processor") for s in config.client_state_processors]
    for spec, kind in specs:
        code = own_code(spec)
        if code is not None:
            # Code by path (custom/ or any installed module): never imported here, only found;
            # whether the site lets it run is the policy check of _check_mmar.
            missing = missing_module(code, custom if custom.is_dir() else None)
            if missing:
                report.add([ConfigError(path, f"{spec.key}.path", missing)])
            continue
        try:
            if kind == "privacy":
                build_privacy(spec, [custom])
            elif kind == "state processor":
                build_client_state_processors([spec], [custom])
            else:
                build_processors([spec], [custom])
        except ConfigError as exc:
            report.add([exc])


def _workspace_policy(mmar: Path) -> Path | None:
    """``startup/site_policy.json`` of the workspace holding ``mmar`` (run_<N>/ or transfer/),
    or None for an MMAR outside a workspace."""
    workspace = mmar.resolve().parent.parent
    if not (workspace / "startup" / "fed_client.json").is_file():
        return None
    return workspace / "startup" / "site_policy.json"


def _check_train(mmar: Path, report: Report) -> None:
    client = (
        read_mmar_client_config(mmar)[0]
        if (mmar / "config" / "config_fed_client.json").is_file()
        else None
    )
    if client is not None and client.script is not None:
        # A research team's own script: no config_train.json, only the model to start from.
        problem = script_model_problem(mmar)
        report.add([problem] if problem is not None else [])
        return
    if is_bundle(mmar):
        from engine.training.bundle import bundle_problems  # deferred: torch and MONAI

        report.checked += [f for f in (mmar / "configs").glob("*.json")]
        report.add(bundle_problems(mmar))
        return
    file = mmar / TRAIN_CONFIG
    report.checked.append(file)
    specs, problems = read_train_config(mmar)
    report.add(problems)
    if not specs:
        return
    custom = mmar / "custom"
    # Each component that parsed is checked, even when others have problems.
    for spec in specs:
        try:
            check_component(spec, file, custom if custom.is_dir() else None)
        except ConfigError as exc:
            report.add([exc])


def print_report(report: Report, out: TextIO) -> None:
    """One line per problem, then a summary line."""
    for problem in report.problems:
        print(str(problem), file=out)
    files = {p.path for p in report.problems}
    if report.problems:
        n = len(report.problems)
        print(
            f"{n} problem{'s' if n != 1 else ''} in {len(files)} file"
            f"{'s' if len(files) != 1 else ''}",
            file=out,
        )
    else:
        checked = [str(p) for p in report.checked if p.exists()]
        n = len(checked)
        print(f"no problems ({n} file{'s' if n != 1 else ''} checked)", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    """``fltui check-config PATH [MMAR]``: the exit status (0 clean, 1 problems, 2 usage)."""
    parser = argparse.ArgumentParser(
        prog="fltui check-config",
        description="Check a site workspace, startup kit, MMAR or server config (Clara 3.1 "
        "forms) and print every problem at once, each with the file, the key and what is "
        "expected.",
    )
    parser.add_argument("path", type=Path, help="workspace, kit, MMAR, server folder or file")
    parser.add_argument(
        "mmar",
        type=Path,
        nargs="?",
        help="with a kit or workspace as PATH: an MMAR to check against it (its servers[0].name "
        "must be one of the kit's federations, as deploy and start require)",
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else EXIT_OK
    try:
        if args.mmar is not None:
            report = check_pair(args.path, args.mmar)
        else:
            report = check_path(args.path)
    except UsageError as exc:
        print(f"fltui check-config: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print_report(report, sys.stdout)
    return EXIT_PROBLEMS if report.problems else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
