"""Trusted libraries are not the MMAR's code; config expressions are (issue 17, items 1 and 4).

Each case is tried as an attacker would: a path that looks like a trusted package's, a package
of the MMAR's own that shadows a trusted one, an entry point of a trusted package that runs
code anyway, an expression hidden in a bundle's config; and the policy edited while the site
runs.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from engine import components
from engine.admin_defs import Message, MsgHeader, ReturnCode, Topic
from engine.components import (
    check_config_code,
    check_expression,
    code_in_config,
    expression_in_config,
    is_expression,
    own_code,
    resolve_component,
    set_code_policy,
)
from engine.config import ComponentSpec, ConfigError
from engine.demo import prepare_workspace
from engine.events import EventBus
from engine.site.deploy import code_refusal, make_mmar_zip
from engine.site.policy import (
    LivePolicy,
    SitePolicy,
    load_site_policy,
    write_default_policy,
)
from engine.site.site_service import SiteService
from fltui.check_config import check_path

DEMO_MMAR = Path(__file__).resolve().parents[2] / "engine" / "training" / "demo_mmar"
OUTPUT_TRANSFORM = "lambda x: (x['pred'], x['label'])"


@pytest.fixture
def code_policy() -> Iterator[None]:
    """Puts back this process's code policy (set_code_policy is per process, as in a worker)."""
    before = components._code_policy
    yield
    components._code_policy = before


@pytest.fixture
def service(tmp_path: Path) -> Iterator[SiteService]:
    prepare_workspace(tmp_path, num_sites=1, num_rounds=1)
    svc = SiteService(tmp_path / "site-1", EventBus(), executor="thread")
    yield svc
    svc.interface.close()


def _spec(path: str, args: dict[str, Any] | None = None) -> ComponentSpec:
    return ComponentSpec(name=None, path=path, args=args or {}, key="model")


def _mmar(tmp_path: Path, name: str = "m") -> Path:
    folder = tmp_path / name
    shutil.copytree(DEMO_MMAR, folder)
    return folder


def _set_model(folder: Path, model: dict[str, Any]) -> None:
    path = folder / "config" / "config_train.json"
    data = json.loads(path.read_text())
    data["model"] = model
    path.write_text(json.dumps(data))


def _with_expression(folder: Path) -> None:
    """Clara's PyTorch form (the segmentation MMAR's), its train metric with an
    output_transform lambda: a config that is otherwise fine to deploy."""
    seg = Path(__file__).resolve().parents[2] / "engine" / "training" / "seg_mmar" / "config"
    data = json.loads((seg / "config_train.json").read_text())
    data["train"]["metrics"] = [
        {
            "name": "Accuracy",
            "log_label": "train_acc",
            "args": {"output_transform": OUTPUT_TRANSFORM},
        }
    ]
    (folder / "config" / "config_train.json").write_text(json.dumps(data))
    shutil.copy(seg / "environment.json", folder / "config" / "environment.json")


def _deploy(svc: SiteService, folder: Path, run: str = "3") -> tuple[bool, str]:
    req = Message(
        Topic.DEPLOY, make_mmar_zip(folder), {MsgHeader.USER_NAME: "admin@test", "run_number": run}
    )
    reply = svc.agent.process(req)
    return reply.get_header(MsgHeader.RETURN_CODE) != ReturnCode.ERROR, str(reply.body)


def _write_policy(svc: SiteService, **values: Any) -> None:
    path = svc.paths.startup / "site_policy.json"
    path.write_text(json.dumps({**SitePolicy().to_dict(), **values}))


# ------------------------------------------------------------------ what is a library's code


@pytest.mark.parametrize(
    "path",
    [
        "torch.nn.Module",
        "torch.nn.Linear",
        "torch.optim.Adam",
        "monai.networks.nets.UNet",
        "monai.losses.DiceLoss",
        "ignite.metrics.Accuracy",
        "numpy.float32",
    ],
)
def test_a_path_into_an_installed_trusted_package_is_not_own_code(path: str) -> None:
    assert own_code(_spec(path), trusted=components.DEFAULT_TRUSTED_PACKAGES) is None
    assert code_in_config({"model": {"path": path, "args": {}}}) is None


@pytest.mark.parametrize(
    "path",
    [
        "os.system",
        "subprocess.getoutput",
        "builtins.exec",
        "torchvision_evil.x",  # a prefix of a trusted name is not that package
        "torch_evil.nn.Linear",
        "monaix.networks.UNet",
        "torch",  # a package alone is not module.Name
        ".torch.nn.Linear",
        "torch..nn.Linear",
        "torch.nn.Linear.",
        " torch.nn.Linear",
        "torch.nn.Linear ",
        "torch.nn/Linear",
        "\uff54orch.nn.Linear",  # a full-width t: not ASCII, not torch
        "torch.nn.Linear\n",
        "{EVIL}",  # a placeholder filled later could be anything
        "torch._C._nn.linear",  # a private part
        "torch.nn.__class__",
    ],
)
def test_a_path_that_only_looks_trusted_is_own_code(path: str) -> None:
    assert own_code(_spec(path), trusted=components.DEFAULT_TRUSTED_PACKAGES) == path
    assert code_in_config({"model": {"path": path}}) == path


@pytest.mark.parametrize("path", [5, None, ["torch.nn.Linear"], {"torch": "nn"}, True])
def test_a_path_that_is_not_a_string_is_own_code(path: Any) -> None:
    assert code_in_config({"model": {"path": path}}) == json.dumps(path)


@pytest.mark.parametrize(
    "path",
    [
        "torch.hub.load",
        "torch.hub.load_state_dict_from_url",
        "torch.load",
        "torch.serialization.load",
        "torch.jit.load",
        "torch.package.PackageImporter",
        "torch.utils.cpp_extension.load_inline",
        "torch.utils.collect_env.run",
        "torch.utils.model_zoo.load_url",
        "torch.ops.load_library",
        "torch.distributed.run.main",
        "torch.multiprocessing.spawn",
        "numpy.load",
        "numpy.lib.npyio.load",
        "numpy.ctypeslib.load_library",
        "numpy.f2py.compile",
        "monai.bundle.ConfigParser",
        "monai.bundle.scripts.run",
        "monai.fl.client.MonaiAlgo",
        "monai.utils.module.instantiate",
        "monai.utils.optional_import",
        "monai.utils.misc.run_cmd",
        "monai.apps.utils.download_and_extract",
        "monai.apps.auto3dseg.AutoRunner",
        "ignite.distributed.Parallel",
        "torch.some.eval",
        "numpy.some.exec_thing",
        "monai.some.subprocess_helper",
        "torch.x.unpickler",
    ],
)
def test_a_trusted_packages_entry_points_that_run_code_are_own_code(path: str) -> None:
    assert components.denied_callable(path) is not None
    assert own_code(_spec(path), trusted=components.DEFAULT_TRUSTED_PACKAGES) == path
    assert code_in_config({"handlers": [{"path": path, "args": {}}]}) == path


@pytest.mark.parametrize(
    ("component", "found"),
    [
        (
            {"path": "monai.data.PersistentDataset", "args": {"weights_only": False}},
            "weights_only=false",
        ),
        ({"path": "numpy.float32", "args": {"allow_pickle": True}}, "allow_pickle=true"),
        ({"name": "Dataset", "args": {"allow_pickle": "{AP}"}}, 'allow_pickle="{AP}"'),
        ({"_target_": "PersistentDataset", "weights_only": 0}, "weights_only=0"),
        ({"_target_": "UNet", "_mode_": "debug"}, '_mode_="debug"'),
        ({"_target_": "UNet", "_debug_": True}, "_debug_=true"),
        ({"path": "torch.nn.Linear", "args": {"trust_repo": True}}, "trust_repo=true"),
    ],
)
def test_arguments_that_make_a_loader_unpickle_are_code(
    component: dict[str, Any], found: str
) -> None:
    assert code_in_config({"train": {"dataset": component}}) == found


def test_safe_loader_arguments_are_not_code() -> None:
    safe = {"path": "monai.data.PersistentDataset", "args": {"weights_only": True}}
    assert code_in_config({"dataset": safe}) is None
    assert code_in_config({"dataset": {"_target_": "UNet", "_mode_": "callable"}}) is None


@pytest.mark.parametrize(
    ("target", "code"),
    [
        ("UNet", False),  # MONAI's own name, found among MONAI's modules
        ("monai.networks.nets.UNet", False),
        ("torch.nn.Linear", False),
        ("ConfigParser", True),  # MONAI's, but it evaluates a config
        ("MonaiAlgo", True),
        ("os.system", True),
        ("scripts.net.Net", True),  # a bundle's own scripts/
        ("$torch.nn.Linear", True),
        ("run", True),
    ],
)
def test_a_bundles_target_is_judged_like_a_path(target: str, code: bool) -> None:
    config = {"network_def": {"_target_": target, "spatial_dims": 2}}
    assert (code_in_config(config) == target) is code


def test_the_sites_trusted_packages_decide(tmp_path: Path) -> None:
    unet = _spec("monai.networks.nets.UNet")
    assert own_code(unet, trusted=("torch",)) == "monai.networks.nets.UNet"
    assert own_code(unet, trusted=("torch", "monai")) is None
    # trusted but not installed: nothing to trust
    assert own_code(_spec("fltui_not_installed_pkg.X"), trusted=("fltui_not_installed_pkg",))
    assert code_in_config({"m": {"path": "monai.networks.nets.UNet"}}, trusted=()) is not None


# ------------------------------------------------------------------ shadowing a trusted name


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in trusted package, installed (on sys.path) and not yet imported."""
    site = tmp_path / "site-packages"
    (site / "fltuitrusted").mkdir(parents=True)
    (site / "fltuitrusted" / "__init__.py").write_text("class Net:\n    pass\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "fltuitrusted", raising=False)
    return site


def _shadow(folder: Path, marker: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fltuitrusted.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass Net:\n    pass\n"
    )


def test_custom_code_cannot_shadow_a_trusted_package(
    tmp_path: Path, installed: Path, code_policy: None
) -> None:
    marker = tmp_path / "ran"
    custom = tmp_path / "mmar" / "custom"
    _shadow(custom, marker)
    spec = _spec("fltuitrusted.Net")
    trusted = ("fltuitrusted",)
    assert own_code(spec, trusted=trusted) is None  # the installed one, on its own
    assert own_code(spec, trusted=trusted, custom_dir=custom) == "fltuitrusted.Net"
    assert code_in_config({"m": {"path": "fltuitrusted.Net"}}, trusted=trusted, custom_dir=custom)
    # custom/ goes first on sys.path: the worker's gate refuses before anything is imported
    set_code_policy(False, "startup/site_policy.json", trusted=trusted)
    with pytest.raises(ConfigError, match="refused by site policy"):
        resolve_component(spec, {}, "component", custom_dir=custom)
    assert not marker.exists()
    # a package folder shadows the same way
    shutil.rmtree(custom)
    (custom / "fltuitrusted").mkdir(parents=True)
    assert own_code(spec, trusted=trusted, custom_dir=custom) == "fltuitrusted.Net"
    # and deploy, start and check-config refuse the MMAR outright: custom/ holds code
    (custom / "fltuitrusted" / "__init__.py").write_text("")
    assert "custom code" in str(code_refusal(tmp_path / "mmar", allow_byoc=False))


def test_a_shadow_anywhere_on_the_import_path_is_refused_at_import(
    tmp_path: Path, installed: Path, code_policy: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only custom/: the worker's working folder (``python -m`` puts it first) too."""
    marker = tmp_path / "ran"
    here = tmp_path / "cwd"
    _shadow(here, marker)
    monkeypatch.chdir(here)
    monkeypatch.setattr(sys, "path", ["", *sys.path])
    set_code_policy(False, "startup/site_policy.json", trusted=("fltuitrusted",))
    with pytest.raises(ConfigError, match="not the installed package"):
        resolve_component(_spec("fltuitrusted.Net"), {}, "component")
    assert not marker.exists()
    monkeypatch.chdir(tmp_path)  # the shadow gone, the installed package is used
    assert resolve_component(_spec("fltuitrusted.Net"), {}, "component").__name__ == "Net"


# ------------------------------------------------------------------ the worker's gate


def test_the_worker_builds_trusted_paths_and_refuses_the_rest(
    tmp_path: Path, code_policy: None
) -> None:
    set_code_policy(False, "startup/site_policy.json")
    linear = resolve_component(_spec("torch.nn.Linear"), {}, "component")
    assert linear.__name__ == "Linear"
    for path in ("torch.hub.load", "torch.load", "numpy.load", "os.system", "torch..nn.Linear"):
        with pytest.raises(ConfigError, match="allow_byoc is false"):
            resolve_component(_spec(path), {}, "component")
    # what was imported is judged by what it is: a name under torch that is another package's
    with pytest.raises(ConfigError, match=r"collections\.OrderedDict, which is not in a trusted"):
        resolve_component(_spec("torch.nn.modules.module.OrderedDict"), {}, "component")
    with pytest.raises(ConfigError, match="weights_only"):
        resolve_component(
            _spec("torch.nn.Linear", {"weights_only": False}), {}, "component", custom_dir=None
        )
    # the site's own list: torch is not trusted here
    set_code_policy(False, "startup/site_policy.json", trusted=("monai",))
    with pytest.raises(ConfigError, match="allow_byoc is false"):
        resolve_component(_spec("torch.nn.Linear"), {}, "component")
    set_code_policy(True, "startup/site_policy.json", trusted=())
    assert resolve_component(_spec("torch.nn.Linear"), {}, "component").__name__ == "Linear"


# ------------------------------------------------------------------ expressions


@pytest.mark.parametrize(
    ("text", "expression"),
    [
        (OUTPUT_TRANSFORM, True),
        ("  lambda: 0", True),
        ("(lambda x: x)", True),
        ("lambda\tx: x", True),
        ("$@network_def.parameters()", True),
        ("$torch.device('cuda')", True),
        ("  $import os", True),
        ("@network_def", False),
        ("%configs/common.json#network", False),
        ("lambda_rate", False),
        ("lambdas", False),
        ("a lambda x: x", False),
        ("{DATA_ROOT}/images", False),
        ("", False),
    ],
)
def test_what_is_an_expression(text: str, expression: bool) -> None:
    assert is_expression(text) is expression


def test_the_first_expression_is_found_with_its_key() -> None:
    config = {
        "epochs": 2,
        "train": {
            "metrics": [
                {"name": "Accuracy", "args": {"output_transform": OUTPUT_TRANSFORM}},
            ]
        },
        "validate": {"inferer": {"args": {"roi": "$[96, 96]"}}},
    }
    found = expression_in_config(config)
    assert found == ("train.metrics[0].args.output_transform", OUTPUT_TRANSFORM)
    assert expression_in_config([{"a": "@x"}, {"b": ["%f.json#k", "$1 + 1"]}]) == (
        "[1].b[1]",
        "$1 + 1",
    )
    assert expression_in_config({"a": {"b": "@ref"}}) is None


def test_check_expression_is_the_workers_gate(code_policy: None) -> None:
    components._code_policy = None
    check_expression("k", OUTPUT_TRANSFORM, "config_train.json")  # no policy set: allowed
    set_code_policy(False, "startup/site_policy.json")
    with pytest.raises(ConfigError) as err:
        check_expression(
            "train.metrics[0].args.output_transform",
            OUTPUT_TRANSFORM,
            Path("config/config_train.json"),
        )
    text = str(err.value)
    assert err.value.key == "train.metrics[0].args.output_transform"
    assert "config/config_train.json" in text and "allow_expressions is false" in text
    assert "startup/site_policy.json" in text and "lambda x" in text
    set_code_policy(False, "startup/site_policy.json", allow_expressions=True)
    check_expression("k", OUTPUT_TRANSFORM, None)
    set_code_policy(True, "startup/site_policy.json")  # left out: as allow_byoc
    check_expression("k", OUTPUT_TRANSFORM, None)
    set_code_policy(True, "startup/site_policy.json", allow_expressions=False)
    with pytest.raises(ConfigError):
        check_expression("k", "$1", None)


def test_a_bundle_config_is_checked_whole_before_monai_reads_it(code_policy: None) -> None:
    bundle = {
        "network_def": {"_target_": "UNet", "spatial_dims": 2},
        "trainer": {"_target_": "os.system", "command": "touch /tmp/x"},
    }
    set_code_policy(False, "startup/site_policy.json", allow_expressions=True)
    with pytest.raises(ConfigError) as err:
        check_config_code(bundle, Path("configs/train.json"))
    assert err.value.key == "trainer._target_" and "'os.system'" in str(err.value)
    bundle["trainer"] = {"_target_": "SupervisedTrainer", "max_epochs": "$@epochs * 2"}
    check_config_code(bundle, Path("configs/train.json"))
    set_code_policy(False, "startup/site_policy.json")
    with pytest.raises(ConfigError, match="allow_expressions is false") as err:
        check_config_code(bundle, Path("configs/train.json"))
    assert err.value.key == "trainer.max_epochs"


# ------------------------------------------------------------------ deploy, start, check-config


def test_deploy_refuses_an_expression_with_the_rule_named(tmp_path: Path) -> None:
    folder = _mmar(tmp_path)
    _with_expression(folder)
    why = code_refusal(folder, False, Path("/ws/startup/site_policy.json"))
    assert why is not None
    assert why.startswith(
        "refused by site policy (startup/site_policy.json): config/config_train.json key "
        "train.metrics[0].args.output_transform is a Python expression (lambda x:"
    ), why
    assert why.endswith("and allow_expressions is false"), why
    assert code_refusal(folder, False, allow_expressions=True) is None
    assert code_refusal(folder, True) is None  # allow_expressions left out: as allow_byoc
    assert "allow_expressions is false" in str(code_refusal(folder, True, allow_expressions=False))


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("configs/train.json", json.dumps({"lr": "$1e-4 * 2"})),
        ("configs/sub/common.json", json.dumps({"net": {"x": ["@a", "$print(1)"]}})),
        ("configs/train.yaml", "lr: $1e-4 * 2\n"),
        ("configs/train.yml", "handlers:\n  - output_transform: lambda x: x\n"),
        ("configs/train.yaml", "trainer:\n  max_epochs: |\n    $@epochs\n"),
        ("config/dataset.json", json.dumps({"training": [{"image": "$os.getpid()"}]})),
    ],
)
def test_a_bundles_expressions_are_refused_in_any_config_file(
    tmp_path: Path, name: str, text: str
) -> None:
    folder = _mmar(tmp_path)
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    why = str(code_refusal(folder, False))
    assert name in why and "allow_expressions is false" in why, why


def test_a_yaml_bundle_target_is_code(tmp_path: Path) -> None:
    folder = _mmar(tmp_path)
    (folder / "configs").mkdir()
    (folder / "configs" / "train.yaml").write_text("trainer:\n  _target_: os.system\n")
    assert "'os.system'" in str(code_refusal(folder, False, allow_expressions=True))
    (folder / "configs" / "train.yaml").write_text("net:\n  _target_: UNet\n  '@x': 1\n")
    assert code_refusal(folder, False) is None


def test_a_trusted_path_passes_deploy_start_and_check_config_without_byoc(
    service: SiteService, tmp_path: Path
) -> None:
    """The issue's policy test: a trusted package by path is fine under allow_byoc false; code
    under custom/ and config expressions are not."""
    folder = _mmar(tmp_path)
    _set_model(folder, {"path": "torch.nn.Linear", "args": {"in_features": 32, "out_features": 10}})
    ok, text = _deploy(service, folder)
    assert ok, text
    mmar = service.paths.mmar(3, "site-1")
    assert code_refusal(mmar, allow_byoc=False) is None
    report = check_path(service.paths.root)
    assert not [p for p in report.problems if "site policy" in str(p)], report.problems

    custom = _mmar(tmp_path, "custom")
    (custom / "custom" / "net.py").write_text("class Net: pass\n")
    ok, text = _deploy(service, custom, "4")
    assert not ok and "allow_byoc" in text, text

    expression = _mmar(tmp_path, "expression")
    _with_expression(expression)
    ok, text = _deploy(service, expression, "5")
    assert not ok and "allow_expressions is false" in text and "output_transform" in text, text
    assert not (service.paths.root / "run_5").exists()
    # the same MMAR already on disk: start and check-config refuse it by the same rule
    shutil.rmtree(mmar)
    shutil.copytree(expression, mmar)
    start = Message(Topic.START, "", {MsgHeader.USER_NAME: "admin@test", "run_number": "3"})
    reply = service.agent.process(start)
    assert reply.get_header(MsgHeader.RETURN_CODE) == ReturnCode.ERROR
    assert "allow_expressions is false" in str(reply.body)
    found = "\n".join(str(p) for p in check_path(service.paths.root).problems)
    assert "train.metrics[0].args.output_transform" in found, found


# ------------------------------------------------------------------ the policy file


@pytest.mark.parametrize(
    ("value", "key", "words"),
    [
        ("torch", "trusted_packages", "expected a list"),
        ([5], "trusted_packages[0]", "expected a top-level package name"),
        (["torch.nn"], "trusted_packages[0]", "no dots"),
        ([""], "trusted_packages[0]", "expected a top-level package name"),
        (["monai", "os"], "trusted_packages[1]", "cannot be trusted"),
        (["subprocess"], "trusted_packages[0]", "cannot be trusted"),
        (["builtins"], "trusted_packages[0]", "cannot be trusted"),
        (["engine"], "trusted_packages[0]", "cannot be trusted"),
        (["_private"], "trusted_packages[0]", "cannot be trusted"),
    ],
)
def test_bad_trusted_packages_name_the_file_and_key(
    tmp_path: Path, value: Any, key: str, words: str
) -> None:
    path = tmp_path / "startup" / "site_policy.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"trusted_packages": value}))
    with pytest.raises(ConfigError) as err:
        load_site_policy(path)
    assert err.value.path == path and err.value.key == key and words in str(err.value)


def test_the_policy_keys_and_their_defaults(tmp_path: Path) -> None:
    path = tmp_path / "site_policy.json"
    write_default_policy(path)
    written = json.loads(path.read_text())
    assert written["trusted_packages"] == ["torch", "monai", "ignite", "numpy"]
    assert "allow_expressions" not in written  # left out: as allow_byoc
    assert {"trusted_packages", "allow_expressions"} <= set(written["_help"])
    policy = load_site_policy(path)
    assert policy.trusted_packages == ("torch", "monai", "ignite", "numpy")
    assert policy.expressions_allowed is False
    path.write_text(json.dumps({"allow_byoc": True, "trusted_packages": []}))
    policy = load_site_policy(path)
    assert policy.trusted_packages == () and policy.expressions_allowed is True
    path.write_text(json.dumps({"allow_byoc": True, "allow_expressions": False}))
    assert load_site_policy(path).expressions_allowed is False
    assert load_site_policy(path).to_dict()["allow_expressions"] is False
    path.write_text(json.dumps({"allow_expressions": "yes"}))
    with pytest.raises(ConfigError, match="allow_expressions: expected true or false"):
        load_site_policy(path)


# ------------------------------------------------------------------ a policy edit, no restart


def test_a_policy_change_takes_effect_without_restarting_the_site(
    service: SiteService, tmp_path: Path
) -> None:
    expression = _mmar(tmp_path, "expression")
    _with_expression(expression)
    ok, text = _deploy(service, expression, "3")
    assert not ok and "allow_expressions is false" in text, text

    _write_policy(service, allow_expressions=True)
    ok, text = _deploy(service, expression, "3")
    assert ok, text

    _write_policy(service, allowed_commands=["check_status"])
    ok, text = _deploy(service, expression, "4")
    assert not ok and '"deploy" is not in allowed_commands' in text, text

    # a broken edit refuses everything (fail closed), naming the file; a fix is seen at once
    policy_file = service.paths.startup / "site_policy.json"
    policy_file.write_text("{not json")
    ok, text = _deploy(service, expression, "4")
    assert not ok and "site_policy.json" in text and "not valid JSON" in text, text
    _write_policy(service, allow_byoc=True)
    ok, text = _deploy(service, expression, "4")
    assert ok, text


def test_a_live_policy_reads_as_the_file_says(tmp_path: Path) -> None:
    path = tmp_path / "startup" / "site_policy.json"
    live = LivePolicy(path)  # no file: the defaults
    assert live.allow_byoc is False and live.path is None
    path.parent.mkdir()
    path.write_text(json.dumps({"allow_byoc": True, "trusted_packages": ["torch"]}))
    assert live.allow_byoc is True and live.trusted_packages == ("torch",)
    assert replace(live.current(), read_only=True).read_only
    path.write_text(json.dumps({"allow_byoc": 1}))
    with pytest.raises(ConfigError, match="allow_byoc"):
        _ = live.allow_byoc
    assert "the policy cannot be used" in str(live.refusal(Topic.CHECK_STATUS))
    with pytest.raises(ConfigError):
        LivePolicy(path)  # a site does not start on a broken policy
