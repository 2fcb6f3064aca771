"""Random MMAR configs against a site without BYOC: nothing outside the trusted set is imported.

Each example builds an MMAR from random components (``name`` / ``path`` / ``args`` in every
combination, null and empty values, processors nested in lists and sections) with probe modules
under ``custom/`` that leave a file behind when imported, then takes it through everything a
site does with an MMAR: deploy, the start check, the worker's builders under the site's code
policy, and ``check-config``. Whatever each step accepts or refuses, no probe may run and
``engine.components.import_path`` (the one place code named by path is imported) is never called.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import components
from engine.config import ConfigError
from engine.site.deploy import DeployError, code_refusal, deploy_mmar, make_mmar_zip

DEMO_MMAR = Path(__file__).resolve().parents[2] / "engine" / "training" / "demo_mmar"

PROBES = ("README", "probe", "pkg.mod")  # modules under custom/ that leave a marker behind
NAMES = st.sampled_from(
    [None, "", " ", "IteratorNumberGenerator", "BestMetricGenerator", "SVTProtocol", "os.getpid"]
)
PATHS = st.sampled_from(
    [
        None,
        "",
        "README.X",
        "probe.X",
        "pkg.mod.X",
        "os.getpid",
        "subprocess.getoutput",
        "builtins.exec",
        "fed_learn.client.fed_privacy.SVTProtocol",
        "fed_learn.client.pkg.mod.X",
        "nvmidl.apps.fed_learn.client.processors.IteratorNumberGenerator",
        "torch.nn.Linear",
        "{EVIL}",
    ]
)
ARGS = st.one_of(
    st.none(), st.just({}), st.just({"cmd": "touch /tmp/fltui-fuzz-pwned"}), st.just([1])
)


# Mostly well-formed components (so that many examples reach the builders), the rest malformed
# in each way a config reader must refuse.
SHAPES = st.sampled_from(
    ["path", "path", "path", "path", "name", "name", "both", "neither", "null-name", "empty-path"]
)


@st.composite
def component(draw: st.DrawFn) -> dict[str, Any]:
    shape = draw(SHAPES)
    out: dict[str, Any] = {}
    if shape in ("name", "both"):
        out["name"] = draw(NAMES)
    if shape in ("path", "both"):
        out["path"] = draw(PATHS.filter(bool))
    if shape == "null-name":
        out.update(name=draw(st.sampled_from([None, ""])), path=draw(PATHS))
    if shape == "empty-path":
        out["path"] = draw(st.sampled_from([None, "", 5]))
    if draw(st.integers(0, 3)) == 0:
        out["args"] = draw(ARGS)
    return out


def nested(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A component, or one buried in lists and objects (sections, handlers, nested processors)."""
    return st.recursive(
        inner,
        lambda kids: st.one_of(
            st.lists(kids, max_size=3), st.dictionaries(st.sampled_from(["a", "handlers"]), kids)
        ),
        max_leaves=4,
    )


@st.composite
def mmar_configs(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    client = json.loads((DEMO_MMAR / "config" / "config_fed_client.json").read_text())
    train = json.loads((DEMO_MMAR / "config" / "config_train.json").read_text())
    c = client["client"]
    for key in ("pre_processors", "post_processors", "client_state_processors"):
        if draw(st.booleans()):
            c[key] = draw(st.lists(component(), max_size=3))
    if draw(st.booleans()):
        c["privacy"] = draw(component())
    for key in ("model", "loss", "optimizer"):
        if draw(st.booleans()):
            train[key] = draw(component())
    if draw(st.booleans()):
        train["extra"] = draw(nested(component()))
    env = {"EVIL": draw(st.sampled_from(["probe.X", "os.getpid"]))}
    return client, train, env


def _write(
    folder: Path, configs: tuple[dict[str, Any], ...], probes: set[str], marker_dir: Path
) -> None:
    shutil.copytree(DEMO_MMAR, folder)
    client, train, env = configs
    config = folder / "config"
    (config / "config_fed_client.json").write_text(json.dumps(client))
    (config / "config_train.json").write_text(json.dumps(train))
    old_env = json.loads((config / "environment.json").read_text())
    (config / "environment.json").write_text(json.dumps({**old_env, **env}))
    for module in probes:
        file = folder / "custom" / (module.replace(".", "/") + ".py")
        file.parent.mkdir(parents=True, exist_ok=True)
        if file.parent != folder / "custom":
            (file.parent / "__init__.py").write_text("")
        file.write_text(
            f"open({str(marker_dir / module)!r}, 'w').close()\n"
            "class X:\n    def __init__(self, *a, **kw): pass\n"
        )


def _build_as_the_worker_does(mmar: Path) -> None:
    """Every component the worker would build, one by one (a refusal of one does not stop the
    others), with whatever code policy this process has."""
    from engine.client.data_processors import build_processors
    from engine.config import read_mmar_client_config
    from engine.privacy import build_privacy
    from engine.site.site_engine import check_mmar
    from engine.training.components import resolve_component
    from engine.training.config import read_train_config

    with contextlib.suppress(ConfigError):
        check_mmar(mmar)  # the start check
    config, _ = read_mmar_client_config(mmar)
    custom = [mmar / "custom"]
    builds: list[Any] = []
    if config is not None:
        if config.privacy is not None:
            builds.append(lambda: build_privacy(config.privacy, custom))
        for spec in (*config.pre_processors, *config.post_processors):
            builds.append(lambda spec=spec: build_processors([spec], custom))
    specs, _ = read_train_config(mmar)
    train = mmar / "config" / "config_train.json"
    builds += [lambda spec=spec: resolve_component(spec, train, mmar / "custom") for spec in specs]
    for build in builds:
        with contextlib.suppress(ConfigError):  # refused with its reason
            build()


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(configs=mmar_configs(), probes=st.sets(st.sampled_from(PROBES)), on_disk=st.booleans())
def test_random_mmars_import_nothing_outside_the_trusted_set_without_byoc(
    configs: tuple[dict[str, Any], dict[str, Any], dict[str, Any]],
    probes: set[str],
    on_disk: bool,
) -> None:
    from fltui.check_config import check_path

    imported: list[str] = []
    real_import_path = components.import_path

    def spy(dotted: str, custom_dir: Path | None = None) -> Any:
        imported.append(dotted)
        return real_import_path(dotted, custom_dir)

    before = components._code_policy
    components.import_path = spy  # type: ignore[assignment]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            markers = root / "markers"
            markers.mkdir()
            folder = root / "mmar"
            # The probes are code under custom/: deploy refuses them, so some examples put the
            # MMAR on disk as it is, as an earlier deploy (or an operator) could have.
            _write(folder, configs, probes if on_disk else set(), markers)
            mmar, accepted = folder, on_disk
            with contextlib.suppress(DeployError):
                mmar = deploy_mmar(
                    make_mmar_zip(folder), root / "ws", 1, "s", max_bytes=64 << 20, allow_byoc=False
                )
                accepted = True
            accepted = accepted and code_refusal(mmar, allow_byoc=False) is None

            # 1. The worker's gate alone: built even where deploy or start would refuse.
            components.set_code_policy(False, "site_policy.json (fuzz)")
            _build_as_the_worker_does(mmar)
            assert (_untrusted(imported), _ran(markers)) == ([], [])

            # 2. The checks alone: what deploy and start let through holds no code, so even a
            # process without the gate imports nothing from it; check-config never imports.
            components.set_code_policy(True, "site_policy.json (fuzz)")
            if accepted:
                _build_as_the_worker_does(mmar)
            check_path(mmar)
            assert (_untrusted(imported), _ran(markers)) == ([], [])
    finally:
        components.import_path = real_import_path  # type: ignore[assignment]
        components._code_policy = before


def _untrusted(imported: list[str]) -> list[str]:
    """What was imported by path outside the site's trusted packages (torch.nn.Linear is a
    library's class, not the MMAR's code)."""
    return [
        p
        for p in imported
        if p.partition(".")[0] not in components.DEFAULT_TRUSTED_PACKAGES
        or components.denied_callable(p)
    ]


def _ran(markers: Path) -> list[str]:
    return sorted(p.name for p in markers.iterdir())
