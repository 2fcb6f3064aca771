"""The admin agent and its processors: refusals, policy, audit, and nothing written or run."""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from pathlib import Path

import pytest

from engine.admin_defs import Message, MsgHeader, ReturnCode, Topic
from engine.demo import prepare_workspace
from engine.events import AdminRequestHandled, EventBus
from engine.site.policy import AuditLog
from engine.site.site_service import SiteService
from tests.conftest import Recorder


def _start_service(workspace: Path) -> SiteService:
    prepare_workspace(workspace, num_sites=1, num_rounds=1)
    bus = EventBus()
    svc = SiteService(workspace / "site-1", bus, executor="thread")
    svc.recorder = Recorder(bus)  # type: ignore[attr-defined]
    return svc


@pytest.fixture
def service(tmp_path: Path):
    svc = _start_service(tmp_path)
    yield svc
    svc.interface.close()


def _request(topic: str, body: str | bytes = "", **headers: str) -> Message:
    return Message(topic, body, {MsgHeader.USER_NAME: "admin@test", **headers})


def _zip(entries: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    """A zip of ``entries``, and of symbolic links (``links``: entry name -> link target)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16
            zf.writestr(info, target)
    return buf.getvalue()


GOOD = {"config/config_fed_client.json": b"{}", "config/config_train.json": b"{}"}


def _refused(svc: SiteService, req: Message, words: str) -> str:
    reply = svc.agent.process(req)
    assert reply.get_header(MsgHeader.RETURN_CODE) == ReturnCode.ERROR, reply.body
    assert reply.get_header(MsgHeader.REF_MSG_ID) == req.id
    assert words in reply.body, reply.body
    return str(reply.body)


def _bad_zip(kind: str, outside: Path) -> tuple[bytes, list[str], str]:
    """A hostile MMAR zip whose entries name places under ``outside``; its entry names (for
    links, also the link's target), and the words of the refusal."""
    if kind == "dotdot":
        # From the MMAR folder (and the temporary folder beside it) up to the scenario root is 4
        # levels: every depth from 1 to 4 (deeper ones, extracted from a folder nearer the root,
        # still land in the test's own folder, which is compared too).
        names = [f"{'../' * k}{outside.name}/evil-{k}.py" for k in range(1, 5)]
        return _zip({**GOOD, **dict.fromkeys(names, b"x")}), names, ".."
    if kind == "absolute":
        name = str(outside / "abs-evil.py")
        return _zip({**GOOD, name: b"x"}), [name], "absolute"
    if kind == "symlink":
        target = str(outside / "linked")
        return _zip(GOOD, links={"config/link": target}), ["config/link", target], "link"
    assert kind == "bomb"
    return _zip({**GOOD, "big.bin": b"\0" * (3 << 20)}), ["big.bin"], "limit"


def _tree(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if "logs" not in p.parts}


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "bomb"])
def test_bad_deploys_are_refused_and_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Nothing anywhere: the whole scenario lives under ``tmp_path`` (the federation's
    workspace in ``root/fed/``, the places the entries aim at in ``root/outside-*/``, and the
    system's temporary folder), all of which is compared before and after; and each path an
    entry names is looked up where it would land if the site had extracted it as named."""
    from dataclasses import replace

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    root = tmp_path / "root"
    outside = root / f"outside-{kind}"
    outside.mkdir(parents=True)
    service = _start_service(root / "fed")
    try:
        service.interface.policy = replace(service.policy.current(), max_deploy_bytes=2 << 20)
        data, names, words = _bad_zip(kind, outside)
        before = _tree(tmp_path)
        _refused(service, _request(Topic.DEPLOY, data, run_number="7"), words)
        assert _tree(tmp_path) == before
        dest = service.paths.mmar(7, "site-1")
        assert not dest.parent.exists()  # not even the run folder
        for name in names:
            for base in (dest, service.paths.root, root / "fed", root, Path("/")):
                landed = Path(os.path.normpath(base / name.lstrip("/")))
                assert not landed.exists() and not landed.is_symlink(), landed
        assert list(outside.iterdir()) == []
        assert not [p for p in tmp_path.rglob("*") if p.is_symlink()]
    finally:
        service.interface.close()


@pytest.mark.parametrize(
    ("command", "words"),
    [
        ("cat ../../etc/passwd", ".."),
        ("ls; rm -rf /", ";"),
        ("grep -r x /", "-r"),
        ("rm -rf logs", "rm"),
    ],
)
def test_shell_requests_are_revalidated_by_the_site(service, command: str, words: str) -> None:
    _refused(service, _request(Topic.SHELL, command), words)
    assert (service.paths.root / "logs").exists()


def test_unknown_topic_and_policy_refusals_are_replied_and_audited(service) -> None:
    _refused(service, _request("train.self_destruct"), "train.self_destruct")
    from dataclasses import replace

    service.interface.policy = replace(
        service.policy.current(), allowed_commands=frozenset({"check_status"})
    )
    service.agent.app_ctx = service.interface
    _refused(service, _request(Topic.SHELL, "pwd"), "shell")
    ok = service.agent.process(_request(Topic.CHECK_STATUS))
    assert ok.get_header(MsgHeader.RETURN_CODE) != ReturnCode.ERROR
    assert "status: training not started" in ok.body
    lines = AuditLog.read(service.paths.logs / "audit.jsonl")
    assert [(a["origin"], a["topic"], a["outcome"]) for a in lines] == [
        ("admin@test", "train.self_destruct", "refused"),
        ("admin@test", "sys.shell", "refused"),
        ("admin@test", "train.check_status", "ok"),
    ]
    events = service.recorder.of(AdminRequestHandled)
    assert [e.outcome for e in events] == ["refused", "refused", "ok"]


def test_byoc_code_is_refused_when_the_site_policy_forbids_it(service) -> None:
    mmar = service.paths.mmar(1, "site-1")
    (mmar / "custom" / "steal.py").write_text("import os\n")
    text = _refused(service, _request(Topic.START, run_number="1"), "allow_byoc is false")
    assert "custom/steal.py" in text
    assert service.session.status == 0  # nothing started


def test_a_processor_exception_becomes_an_error_reply(service) -> None:
    def boom() -> str:
        raise KeyError("lost")

    service.interface.client_status = boom  # type: ignore[method-assign]
    _refused(service, _request(Topic.CHECK_STATUS), "exception_occurred: KeyError")


def test_sys_info_reports_the_machine_and_why_there_is_no_gpu(service) -> None:
    reply = service.agent.process(_request(Topic.SYS_INFO))
    info = json.loads(reply.body)
    assert info["site"] == "site-1" and info["cpu_count"] >= 1 and "memtotal" in info
    assert info["gpu_count"] == 0 or "gpu_device_0" in info


def test_code_named_by_path_in_a_config_is_refused_without_byoc(service) -> None:
    evil = {
        "format_version": 1,
        "servers": [{"name": "demo_federation"}],
        "client": {
            "post_processors": [
                {"path": "subprocess.getoutput", "args": {"cmd": "touch /tmp/fltui-pwned"}}
            ]
        },
    }
    data = _zip({**GOOD, "config/config_fed_client.json": json.dumps(evil).encode()})
    _refused(service, _request(Topic.DEPLOY, data, run_number="5"), "names code by path")
    assert not (service.paths.root / "run_5").exists()
    # the same config already on disk: start refuses it before importing anything
    mmar = service.paths.mmar(1, "site-1")
    (mmar / "config" / "config_fed_client.json").write_text(json.dumps(evil))
    _refused(service, _request(Topic.START, run_number="1"), "allow_byoc is false")
    assert not Path("/tmp/fltui-pwned").exists()


def test_clara_module_paths_are_built_ins_not_own_code(tmp_path: Path) -> None:
    from engine.site.deploy import code_refusal

    mmar = tmp_path / "mmar"
    (mmar / "config").mkdir(parents=True)
    clara = {
        "client": {
            "privacy": {
                "path": "fed_learn.client.fed_privacy.SVTProtocol",
                "args": {"fraction": 0.1, "epsilon": 0.1, "noise_var": 0.1, "gamma": 1e-5},
            },
            "pre_processors": [
                {"path": "nvmidl.apps.fed_learn.client.processors.IteratorNumberGenerator"}
            ],
        }
    }
    config = mmar / "config" / "config_fed_client.json"
    config.write_text(json.dumps(clara))
    assert code_refusal(mmar, allow_byoc=False) is None  # written as Clara wrote it: accepted
    clara["client"]["post_processors"] = [{"path": "fed_learn_evil.Thing", "args": {}}]
    config.write_text(json.dumps(clara))
    assert "fed_learn_evil.Thing" in str(code_refusal(mmar, allow_byoc=False))


def test_a_clara_path_we_do_not_have_is_refused_by_name_never_imported(tmp_path: Path) -> None:
    """A Clara module path passes the BYOC check, so it must never reach an import: not even
    of a compiled module hidden under custom/ (which the BYOC check refuses too, .py or not)."""
    import py_compile

    from engine.components import resolve_component
    from engine.config import ComponentSpec, ConfigError
    from engine.site.deploy import code_refusal

    mmar = tmp_path / "mmar"
    (mmar / "config").mkdir(parents=True)
    source = tmp_path / "pwn.py"
    marker = tmp_path / "pwned"
    source.write_text(f"open({str(marker)!r}, 'w').close()\nclass Evil: pass\n")
    hidden = mmar / "custom" / "fed_learn" / "client"
    hidden.mkdir(parents=True)
    py_compile.compile(str(source), cfile=str(hidden / "pwn.pyc"))
    assert "custom/fed_learn/client/pwn.pyc" in str(code_refusal(mmar, allow_byoc=False))
    spec = ComponentSpec(name=None, path="fed_learn.client.pwn.Evil", key="client.privacy")
    with pytest.raises(ConfigError, match="Clara component 'Evil' is not one we have built in"):
        resolve_component(
            spec, {"SVTProtocol": object}, "privacy protocol", custom_dir=mmar / "custom"
        )
    assert not marker.exists()


def test_the_session_token_file_cannot_be_read_remotely(service) -> None:
    (service.paths.root / "client_token.txt").write_text("secret")
    for command in (
        "cat client_token.txt",
        "grep -i s client_token.txt",
        "head startup/client.key",
    ):
        _refused(service, _request(Topic.SHELL, command), "secret")


def test_a_bad_app_name_is_refused(service) -> None:
    data = _zip(GOOD)
    _refused(
        service, _request(Topic.DEPLOY, data, run_number="4", app_name="[bold]x[/b]"), "app name"
    )
