"""Holes found by an outside attack, each tried as the attacker did: code run and files written
against the site policy, secrets read through links or `env`, and what the audit log keeps."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.admin_defs import Message, MsgHeader, ReturnCode, Topic
from engine.demo import prepare_workspace
from engine.events import EventBus
from engine.site.deploy import DeployError, code_refusal, deploy_mmar, make_mmar_zip
from engine.site.policy import AuditLog
from engine.site.site_service import SiteService
from fltui.check_config import check_path

DEMO_MMAR = Path(__file__).resolve().parents[2] / "engine" / "training" / "demo_mmar"
MB = 1 << 20


@pytest.fixture
def service(tmp_path: Path) -> Iterator[SiteService]:
    prepare_workspace(tmp_path, num_sites=1, num_rounds=1)
    svc = SiteService(tmp_path / "site-1", EventBus(), executor="thread")
    yield svc
    svc.interface.close()


@pytest.fixture
def code_policy() -> Iterator[None]:
    """Puts back this process's code policy (set_code_policy is per process, as in a worker)."""
    from engine import components

    before = components._code_policy
    yield
    components._code_policy = before


def _request(topic: str, body: str | bytes = "", **headers: str) -> Message:
    return Message(topic, body, {MsgHeader.USER_NAME: "admin@test", **headers})


def _reply(svc: SiteService, req: Message) -> tuple[bool, str]:
    reply = svc.agent.process(req)
    return reply.get_header(MsgHeader.RETURN_CODE) != ReturnCode.ERROR, str(reply.body)


def _mmar(tmp_path: Path, name: str = "m") -> Path:
    folder = tmp_path / name
    shutil.copytree(DEMO_MMAR, folder)
    return folder


def _edit(folder: Path, file: str, change: Any) -> None:
    path = folder / "config" / file
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _probe(folder: Path, module: str, marker: Path) -> None:
    """A module under custom/ that leaves ``marker`` behind when it is imported."""
    (folder / "custom" / f"{module}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass X:\n    def __init__(self, **kw): pass\n"
    )


# ------------------------------------------------------------------ 1. code with allow_byoc false

BYPASSES = {
    # custom/README.py was not counted as code, and a "name" key without "args" made the
    # config walk skip the component
    "readme": ({"name": None, "path": "README.X"}, True, "custom/README.py"),
    "readme-empty-name": ({"name": "", "path": "README.X"}, True, "custom/README.py"),
    # any importable function ran the same way, with no file under custom/ at all
    "getpid": ({"name": None, "path": "os.getpid"}, False, "'os.getpid'"),
    "getpid-empty-name": ({"name": "", "path": "os.getpid"}, False, "'os.getpid'"),
    "both": ({"name": "IteratorNumberGenerator", "path": "os.getpid"}, False, "'os.getpid'"),
}


@pytest.mark.parametrize(("component", "readme", "cause"), list(BYPASSES.values()), ids=BYPASSES)
def test_the_byoc_bypass_is_refused_at_deploy_start_and_check_config(
    service: SiteService, tmp_path: Path, component: dict[str, Any], readme: bool, cause: str
) -> None:
    marker = tmp_path / "ran"
    folder = _mmar(tmp_path)
    if readme:
        _probe(folder, "README", marker)
    _edit(
        folder, "config_fed_client.json", lambda c: c["client"]["pre_processors"].append(component)
    )
    zipped = make_mmar_zip(folder)

    ok, text = _reply(service, _request(Topic.DEPLOY, zipped, run_number="3"))
    assert not ok and "allow_byoc" in text and cause in text, text
    assert not (service.paths.root / "run_3").exists()

    # The same files already on disk (deployed before this fix): start refuses, nothing runs.
    mmar = service.paths.mmar(1, "site-1")
    shutil.rmtree(mmar)
    shutil.copytree(folder, mmar)
    ok, text = _reply(service, _request(Topic.START, run_number="1"))
    assert not ok and "allow_byoc is false" in text and cause in text, text
    assert service.session.status == 0 and not service.executor.is_running()
    assert not marker.exists()

    report = check_path(service.paths.root)
    found = "\n".join(str(p) for p in report.problems)
    assert "allow_byoc is false" in found, found
    assert not marker.exists()  # check-config never imports code by path


@pytest.mark.parametrize(
    ("component", "words"),
    [
        ({"name": None, "path": "README.X"}, 'got "name" and "path"'),
        ({"name": "", "path": "README.X"}, 'got "name" and "path"'),
        ({"name": "BestMetricGenerator", "path": "README.X"}, 'got "name" and "path"'),
        ({"path": None}, "expected a non-empty string"),
        ({"name": ""}, "expected a non-empty string"),
        ({"args": {}}, "got neither"),
    ],
)
def test_a_component_is_exactly_one_of_name_or_path(
    tmp_path: Path, component: dict[str, Any], words: str
) -> None:
    from engine.config import ConfigError, load_mmar_client_config

    folder = _mmar(tmp_path)
    _edit(
        folder, "config_fed_client.json", lambda c: c["client"]["pre_processors"].append(component)
    )
    with pytest.raises(ConfigError) as err:  # ConfigProblems too: a subclass
        load_mmar_client_config(folder)
    text = str(err.value)
    assert "client.pre_processors[2]" in text and words in text, text


def test_the_worker_gates_every_import_by_the_site_policy(
    tmp_path: Path, code_policy: None
) -> None:
    """Whatever reaches the builders in a worker whose site has no BYOC, nothing is imported."""
    from engine.client.data_processors import build_processors
    from engine.components import set_code_policy
    from engine.config import ComponentSpec, ConfigError

    marker = tmp_path / "ran"
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "probe.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass X: pass\n")
    set_code_policy(False, "startup/site_policy.json")
    for path in ("probe.X", "os.getpid", "subprocess.getoutput"):
        spec = ComponentSpec(name=None, path=path, key="client.pre_processors[0]")
        with pytest.raises(ConfigError, match="refused by site policy") as err:
            build_processors([spec], [custom])
        assert "nothing was imported" in str(err.value)
    assert not marker.exists()
    # Clara's own module paths name our built-ins: still fine
    clara = ComponentSpec(
        name=None, path="fed_learn.client.processors.IteratorNumberGenerator", key="k"
    )
    assert build_processors([clara], [custom])
    set_code_policy(True, "startup/site_policy.json")
    build_processors([ComponentSpec(name=None, path="probe.X", key="k")], [custom])
    assert marker.exists()  # the gate was what stopped it


# ------------------------------------------------------------------ 2. files written outside


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("MMAR_CKPT_DIR", "/tmp/fltui-escape-ckpt"),
        ("MMAR_CKPT_DIR", "../../escape"),
        ("MMAR_EVAL_OUTPUT_PATH", "/tmp/fltui-escape-eval"),
        ("MMAR_EVAL_OUTPUT_PATH", "eval/../../../escape"),
    ],
)
def test_paths_the_site_writes_stay_inside_the_mmar(
    service: SiteService, tmp_path: Path, key: str, value: str
) -> None:
    folder = _mmar(tmp_path)
    _edit(folder, "environment.json", lambda env: env.update({key: value}))
    ok, text = _reply(service, _request(Topic.DEPLOY, make_mmar_zip(folder), run_number="4"))
    assert not ok and key in text and "outside the MMAR" in text, text
    assert not (service.paths.root / "run_4").exists()
    with pytest.raises(DeployError, match=key):
        deploy_mmar(make_mmar_zip(folder), tmp_path / "ws", 1, "s", max_bytes=MB, allow_byoc=True)

    # on disk already: start refuses it naming the key, and nothing is created outside
    mmar = service.paths.mmar(1, "site-1")
    shutil.copy(folder / "config" / "environment.json", mmar / "config" / "environment.json")
    ok, text = _reply(service, _request(Topic.START, run_number="1"))
    assert not ok and key in text, text
    escaped = [
        Path("/tmp/fltui-escape-ckpt"),
        Path("/tmp/fltui-escape-eval"),
        service.paths.root.parent / "escape",
        service.paths.root / "escape",
    ]
    assert not any(p.exists() for p in escaped)
    assert key in "\n".join(str(p) for p in check_path(mmar).problems)


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_written_path_is_refused_not_the_working_folder(
    tmp_path: Path, value: str
) -> None:
    """An empty MMAR_CKPT_DIR was Path(""): the worker wrote best_model.pt wherever the service
    had been started."""
    folder = _mmar(tmp_path)
    _edit(folder, "environment.json", lambda env: env.update({"MMAR_EVAL_OUTPUT_PATH": value}))
    with pytest.raises(DeployError, match="MMAR_EVAL_OUTPUT_PATH: is empty"):
        deploy_mmar(make_mmar_zip(folder), tmp_path / "ws", 1, "s", max_bytes=MB, allow_byoc=False)
    assert not (tmp_path / "ws").exists()


def test_an_mmar_cannot_route_the_sites_traffic(tmp_path: Path) -> None:
    """Only sizes, keepalive and reconnect pacing may come from a deployed MMAR's options."""
    from engine.config import ConfigError, load_mmar_client_config

    folder = _mmar(tmp_path)
    options = [
        ["grpc.max_receive_message_length", 2000000000],
        ["grpc.keepalive_time_ms", 30000],
        ["grpc.http_proxy", "http://attacker.example:3128"],
        ["grpc.service_config", "{}"],
    ]
    _edit(
        folder,
        "config_fed_client.json",
        lambda c: c["servers"][0]["service"].update(options=options),
    )
    with pytest.raises(ConfigError) as err:
        load_mmar_client_config(folder)
    text = str(err.value)
    assert "servers[0].service.options[2]" in text and "grpc.http_proxy" in text, text
    assert "servers[0].service.options[3]" in text and "options[1]" not in text, text


def test_a_link_inside_the_mmar_cannot_carry_its_writes_out(tmp_path: Path) -> None:
    from engine.config import ConfigError, load_environment

    folder = _mmar(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.rmtree(folder / "models")
    (folder / "models").symlink_to(outside)
    with pytest.raises(ConfigError, match=r"MMAR_CKPT_DIR: .* outside the MMAR"):
        load_environment(folder)


# ------------------------------------------------------------------ 6. the audit of a read


def test_the_audit_keeps_the_command_line_and_not_what_was_read(service: SiteService) -> None:
    log = service.paths.logs / "fltui.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("patient 0042 MRN 778899\n" * 3)
    ok, text = _reply(service, _request(Topic.SHELL, "grep -n MRN logs/fltui.log"))
    assert ok and "778899" in text
    ok, text = _reply(service, _request(Topic.SHELL, "cat startup/client.key"))
    assert not ok
    lines = AuditLog.read(service.paths.logs / "audit.jsonl")
    read, refused = lines[-2], lines[-1]
    assert read["outcome"] == "ok" and read["origin"] == "admin@test"
    size = len("\n".join(f"{i}:patient 0042 MRN 778899" for i in (1, 2, 3)) + "\n")
    assert read["detail"] == f'command "grep -n MRN logs/fltui.log": {size} bytes of output'
    assert "778899" not in json.dumps(lines)
    assert refused["outcome"] == "error"
    assert refused["detail"].startswith('command "cat startup/client.key": ')
    assert "may hold a secret" in refused["detail"]


# ------------------------------------------------------------------ the one rule, everywhere


def test_every_file_under_custom_is_code(tmp_path: Path) -> None:
    folder = _mmar(tmp_path)
    assert code_refusal(folder, allow_byoc=False) is None  # only an empty .gitkeep there
    for name in ("README.py", "README.md", "notes.txt", "x.cpython-311.so", "pkg/__init__.pyc"):
        path = folder / "custom" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
        assert name in str(code_refusal(folder, allow_byoc=False))
        path.unlink()
    assert code_refusal(folder, allow_byoc=True) is None


def test_the_zip_check_and_the_disk_check_agree(tmp_path: Path) -> None:
    """A path component nested anywhere (train sections, lists of lists) is found in the zip
    and on disk alike."""
    folder = _mmar(tmp_path)
    _edit(
        folder,
        "config_train.json",
        lambda c: c.update({"extra": {"handlers": [[{"path": "os.system", "name": "x"}]]}}),
    )
    assert "os.system" in str(code_refusal(folder, allow_byoc=False))
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as zf:
        for path in folder.rglob("*"):
            if path.is_file():
                zf.write(path, path.relative_to(folder).as_posix())
    with pytest.raises(DeployError, match=r"os\.system"):
        deploy_mmar(data.getvalue(), tmp_path / "ws", 1, "s", max_bytes=MB, allow_byoc=False)
