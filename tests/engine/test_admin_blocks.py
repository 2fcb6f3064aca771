"""Admin building blocks: messages, MMAR zip checks and deploy, the shell whitelist, site policy."""

from __future__ import annotations

import io
import json
import os
import re
import stat
import threading
import zipfile
from pathlib import Path

import pytest

from engine.admin_defs import (
    Message,
    MessageError,
    MsgHeader,
    ReturnCode,
    Topic,
    error_reply,
    new_message,
    ok_reply,
    reply_to,
)
from engine.config import ConfigError
from engine.shell import ShellCommandError, parse_shell_command
from engine.site.deploy import DeployError, check_zip, deploy_mmar, extract_zip, make_mmar_zip
from engine.site.policy import (
    COMMANDS,
    AuditLog,
    SitePolicy,
    command_of,
    load_site_policy,
    write_default_policy,
)
from engine.site.shell import run_shell_command
from protos import admin_pb2

MB = 1 << 20


def make_zip(entries: dict[str, bytes], level: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", level) as zf:
        for name, data in entries.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return buf.getvalue()


def zeros_zip(name: str, size: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf, zf.open(name, "w") as f:
        block = bytes(MB)
        for _ in range(size // MB):
            f.write(block)
    return buf.getvalue()


def mmar_folder(root: Path, custom: dict[str, str] | None = None, marker: str = "new") -> Path:
    (root / "config").mkdir(parents=True)
    (root / "config" / "config_fed_client.json").write_text('{"client": {}}')
    (root / "config" / "config_train.json").write_text(json.dumps({"marker": marker}))
    (root / "models").mkdir()
    for name, text in (custom or {}).items():
        (root / "custom").mkdir(exist_ok=True)
        (root / "custom" / name).write_text(text)
    return root


# --- messages -----------------------------------------------------------------------------


def test_message_proto_round_trip() -> None:
    msg = new_message(Topic.SHELL, "ls -l", {MsgHeader.USER_NAME: "admin@org"})
    back = Message.from_proto(admin_pb2.Message.FromString(msg.to_proto().SerializeToString()))
    assert back == msg and back.body == "ls -l" and back.body_type == "str"
    raw = Message(Topic.DEPLOY, b"\x00\xffzip")
    back = Message.from_proto(raw.to_proto())
    assert back.body == b"\x00\xffzip" and back.body_type == "bytes"
    odd = admin_pb2.Message(id="m1", topic="x", body_type="pickle", body=b"abc")
    assert Message.from_proto(odd).body_type == "unknown"


def test_bad_utf8_body_names_the_message() -> None:
    bad = admin_pb2.Message(id="msg-42", topic=Topic.SHELL, body_type="str", body=b"\xff\xfe")
    with pytest.raises(MessageError, match="msg-42"):
        Message.from_proto(bad)


def test_reply_helpers() -> None:
    req = new_message(Topic.CHECK_STATUS)
    ok = reply_to(req, ok_reply(body="fine"))
    assert ok.topic == "reply" and ok.get_header(MsgHeader.RETURN_CODE) == ReturnCode.OK
    assert ok.get_header(MsgHeader.REF_MSG_ID) == req.id
    err = error_reply("invalid_request")
    assert err.topic == "reply" and err.body == "invalid_request"
    assert err.get_header(MsgHeader.RETURN_CODE) == ReturnCode.ERROR
    assert new_message("a").id != new_message("a").id


# --- zips and deploy ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("../evil.txt", "'..'"),
        ("config/../../evil.txt", "'..'"),
        ("/etc/passwd", "absolute"),
        ("C:/x.txt", "absolute"),
        ("C:\\x.txt", "backslash"),
        ("\\\\server\\x", "backslash"),
    ],
)
def test_check_zip_refuses_bad_names(name: str, problem: str) -> None:
    data = make_zip({"ok.txt": b"1", name: b"2"})
    with pytest.raises(DeployError, match=problem) as err:
        check_zip(data, max_bytes=MB)
    assert repr(name) in str(err.value)


def test_check_zip_refuses_symlink_duplicates_and_non_zip() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        link = zipfile.ZipInfo("config/link.json")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(DeployError, match=r"'config/link\.json': symbolic links"):
        check_zip(buf.getvalue(), max_bytes=MB)
    with pytest.raises(DeployError, match="duplicates"):
        check_zip(make_zip({"a/b.txt": b"1", "a//./b.txt": b"2"}), max_bytes=MB)
    with pytest.raises(DeployError, match="not a zip"):
        check_zip(b"PK\x03\x04 this is not really a zip", max_bytes=MB)
    with pytest.raises(DeployError, match="at most 3"):
        check_zip(make_zip({f"{i}.txt": b"" for i in range(4)}), max_bytes=MB, max_files=3)


def test_zip_bombs_are_refused(tmp_path: Path) -> None:
    bomb = zeros_zip("zeros.bin", 50 * MB)
    assert len(bomb) < MB
    with pytest.raises(DeployError, match=r"'zeros.bin'.*over the limit"):
        check_zip(bomb, max_bytes=10 * MB)
    # Under the size limit, the ratio still gives it away.
    with pytest.raises(DeployError, match=r"'zeros.bin' looks like a zip bomb"):
        extract_zip(bomb, tmp_path / "out", max_bytes=100 * MB)
    assert not (tmp_path / "out").exists()


def test_extract_counts_real_bytes(tmp_path: Path) -> None:
    # Headers that understate the size: zipfile stops at the declared size and the CRC fails.
    data = bytearray(make_zip({"a.txt": b"x" * 1000}, zipfile.ZIP_STORED))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        info = zf.getinfo("a.txt")
    # Patch the central directory's uncompressed size (offset 24 in its record) to 10.
    cd = bytes(data).rindex(b"PK\x01\x02")
    data[cd + 24 : cd + 28] = (10).to_bytes(4, "little")
    with pytest.raises(DeployError, match=r"'a\.txt'"):
        extract_zip(bytes(data), tmp_path / "out", max_bytes=MB)
    assert info.file_size == 1000 and not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_deploy_replaces_old_deployment_only_on_success(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    first = make_mmar_zip(mmar_folder(tmp_path / "m1", marker="first"))
    dest = deploy_mmar(first, ws, 1, "site-1", max_bytes=MB, allow_byoc=False)
    assert dest == ws / "run_1" / "mmar_site-1"
    assert json.loads((dest / "config" / "config_train.json").read_text()) == {"marker": "first"}
    assert (dest / "models").is_dir()

    # Failing deploys (traversal, missing config, non-zip) leave the first deployment intact.
    bad = make_zip({"config/config_fed_client.json": b"{}", "../x.txt": b""})
    no_train = make_zip({"config/config_fed_client.json": b"{}"})
    for data, problem in [(bad, "'..'"), (no_train, "config_train.json"), (b"nope", "not a zip")]:
        with pytest.raises(DeployError, match=problem):
            deploy_mmar(data, ws, 1, "site-1", max_bytes=MB, allow_byoc=False)
        assert json.loads((dest / "config" / "config_train.json").read_text())["marker"] == "first"
    assert sorted(p.name for p in (ws / "run_1").iterdir()) == ["mmar_site-1"]
    assert not (ws / "x.txt").exists() and not (tmp_path / "x.txt").exists()
    # Nothing is written for a new run that fails.
    with pytest.raises(DeployError):
        deploy_mmar(no_train, ws, 2, "site-1", max_bytes=MB, allow_byoc=False)
    assert not (ws / "run_2").exists()

    # Zipped under one top folder (as `zip -r mmar.zip mmar/` makes it): the folder is stripped.
    second = mmar_folder(tmp_path / "wrap" / "mmar", marker="second")
    data = make_mmar_zip(tmp_path / "wrap")
    assert "mmar/config/config_train.json" in zipfile.ZipFile(io.BytesIO(data)).namelist()
    deploy_mmar(data, ws, 1, "site-1", max_bytes=MB, allow_byoc=False)
    assert json.loads((dest / "config" / "config_train.json").read_text()) == {"marker": "second"}
    assert second.exists() and sorted(p.name for p in (ws / "run_1").iterdir()) == ["mmar_site-1"]


def test_deploy_checks_run_number_and_site(tmp_path: Path) -> None:
    data = make_mmar_zip(mmar_folder(tmp_path / "m"))
    for run in (0, -1, True, "1"):
        with pytest.raises(DeployError, match="run number"):
            deploy_mmar(data, tmp_path, run, "s", max_bytes=MB, allow_byoc=False)  # type: ignore[arg-type]
    with pytest.raises(DeployError, match="site name"):
        deploy_mmar(data, tmp_path, 1, "../x", max_bytes=MB, allow_byoc=False)


def test_byoc_needs_the_policy(tmp_path: Path) -> None:
    folder = mmar_folder(tmp_path / "m", custom={"my_loss.py": "X = 1\n", "README.md": "hi"})
    data = make_mmar_zip(folder)
    with pytest.raises(DeployError) as err:
        deploy_mmar(data, tmp_path / "ws", 1, "s", max_bytes=MB, allow_byoc=False)
    # every file under custom/ is code: custom/ is on the import path (a README.py imports)
    assert str(err.value) == (
        "the MMAR contains custom code under custom/ (custom/README.md, custom/my_loss.py), "
        "which this site's policy (allow_byoc=false in startup/site_policy.json) does not allow"
    )
    assert not (tmp_path / "ws").exists()
    dest = deploy_mmar(data, tmp_path / "ws", 1, "s", max_bytes=MB, allow_byoc=True)
    assert (dest / "custom" / "my_loss.py").read_text() == "X = 1\n"
    # A custom/ holding only an empty .gitkeep holds nothing to run.
    for name in ("my_loss.py", "README.md"):
        (folder / "custom" / name).unlink()
    (folder / "custom" / ".gitkeep").write_text("")
    deploy_mmar(make_mmar_zip(folder), tmp_path / "ws", 2, "s", max_bytes=MB, allow_byoc=False)
    (folder / "custom" / ".gitkeep").write_text("import os\n")  # not empty: code like any other
    with pytest.raises(DeployError, match=r"custom/\.gitkeep"):
        deploy_mmar(make_mmar_zip(folder), tmp_path / "ws", 3, "s", max_bytes=MB, allow_byoc=False)


# --- shell --------------------------------------------------------------------------------


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    (ws / "logs").mkdir(parents=True)
    (ws / "logs" / "fltui.log").write_text("one\ntwo\nthree\n")
    outside = tmp_path / "secret.log"
    outside.write_text("outside the workspace\n")
    (ws / "link-out.log").symlink_to(outside)
    return ws


@pytest.mark.parametrize(
    ("command", "problem"),
    [
        ("cat ../../etc/passwd", "'..'"),
        ("ls; rm -rf /", "';'"),
        ("grep -r x /", "option -r is not allowed"),
        ("cat /etc/passwd", "absolute path '/etc/passwd'"),
        ("ls -la && id", "'&'"),
        ("cat $(id).log", "'$'"),
        ("cat `id`.log", "backtick"),
        ("cat a.log > b.log", "'>'"),
        ("rm -rf x", "command 'rm' is not allowed"),
        ("env -i", "takes no arguments"),
        ("cat a.log b.log", "exactly one file"),
        ("cat startup/client.key", "may hold a secret"),
        ("head -n -5 a.log", "positive whole number"),
        ("head -n 99999999 a.log", "positive whole number"),
        ("tail --follow a.log", "'--follow' is not allowed"),
        ("cat 'a b.log'", "may only hold"),
        ("", "empty"),
    ],
)
def test_shell_refusals(workspace: Path, command: str, problem: str) -> None:
    with pytest.raises(ShellCommandError, match=re.escape(problem)):
        run_shell_command(command, workspace)


def test_shell_parse_normalises() -> None:
    assert parse_shell_command("ls -la logs") == ["ls", "-l", "-a", "--", "logs"]
    assert parse_shell_command("head -n5 -c 10 a.log") == [
        "head",
        "-n",
        "5",
        "-c",
        "10",
        "--",
        "a.log",
    ]
    assert parse_shell_command("grep -n 'loss' logs/x.jsonl") == [
        "grep",
        "-n",
        "--",
        "loss",
        "logs/x.jsonl",
    ]
    assert parse_shell_command("pwd") == ["pwd"]


def test_shell_runs_inside_the_workspace(workspace: Path) -> None:
    assert run_shell_command("head -n 2 logs/fltui.log", workspace) == "one\ntwo\n"
    assert run_shell_command("grep -n three logs/fltui.log", workspace) == "3:three\n"
    assert "fltui.log" in run_shell_command("ls -l logs", workspace)
    assert run_shell_command("pwd", workspace) == f"{workspace}\n"
    with pytest.raises(ShellCommandError, match=r"'link-out\.log' resolves outside the workspace"):
        run_shell_command("tail -n 5 link-out.log", workspace)
    # A missing file is the tool's own error, returned as output.
    assert "No such file" in run_shell_command("cat logs/none.log", workspace)


def test_shell_timeout(workspace: Path) -> None:
    # Opening a FIFO with no writer blocks forever: the command must be stopped.
    os.mkfifo(workspace / "pipe.log")
    with pytest.raises(ShellCommandError, match=r"cat: timed out after 0\.5 s"):
        run_shell_command("cat pipe.log", workspace, timeout=0.5)


def test_shell_env_shows_only_allowed_values(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An allow-list: secrets hide behind names no deny-list foresees."""
    secrets = {
        "FLTUI_TOKEN": "s3cr3t",  # allowed prefix, but named like a secret
        "db_password": "hunter2",
        "DATABASE_URL": "postgres://u:pw@db/x",
        "GH_PAT": "ghp_abcdef123456",
        "AUTH_BEARER": "eyJhbGciOi",
        "PROXY_URL": "http://user:pw@proxy:3128",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FLTUI_SITE", "site-1")
    monkeypatch.setenv("LC_TIME", "C.UTF-8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    out = run_shell_command("env", workspace)
    assert "FLTUI_SITE=site-1\n" in out and "LC_TIME=C.UTF-8\n" in out
    assert "CUDA_VISIBLE_DEVICES=0,1\n" in out
    for name, value in secrets.items():
        assert f"{name}=[hidden]\n" in out  # listed by name, its value hidden
        assert value not in out
    # the policy may show more, by name or prefix; a secret-looking name stays hidden
    out = run_shell_command("env", workspace, env_shown=["PROXY_*", "FLTUI_TOKEN"])
    assert "PROXY_URL=http://user:pw@proxy:3128\n" in out
    assert "s3cr3t" not in out and "GH_PAT=[hidden]\n" in out


def test_shell_env_allow_list_comes_from_the_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "site_policy.json"
    path.write_text(json.dumps({"env_shown": ["HTTP_PROXY", "SLURM_*"]}))
    assert load_site_policy(path).env_shown == ("HTTP_PROXY", "SLURM_*")
    path.write_text(json.dumps({"env_shown": ["OK", "bad name"]}))
    with pytest.raises(ConfigError) as err:
        load_site_policy(path)
    assert err.value.key == "env_shown[1]" and "bad name" in str(err.value)
    path.write_text(json.dumps({"env_shown": "HOME"}))
    with pytest.raises(ConfigError, match="env_shown: expected a list"):
        load_site_policy(path)


def test_a_link_to_a_secret_is_the_secret(workspace: Path) -> None:
    """The secret-file rule holds for where a name resolves, not only for the name asked."""
    (workspace / "client_token.txt").write_text('{"token": "T0KEN-VALUE", "authkey": "ab"}')
    (workspace / "startup").mkdir(exist_ok=True)
    (workspace / "startup" / "client.key").write_text("-----BEGIN PRIVATE KEY-----\n")
    (workspace / "tok.txt").symlink_to("client_token.txt")
    (workspace / "k.txt").symlink_to("startup/client.key")
    (workspace / "s").symlink_to("startup")
    (workspace / "logs").mkdir(exist_ok=True)
    for command in ("cat tok.txt", "head -n 1 k.txt", "grep T0KEN tok.txt", "tail tok.txt"):
        with pytest.raises(ShellCommandError, match="may hold a secret"):
            run_shell_command(command, workspace)
    with pytest.raises(ShellCommandError, match="may hold a secret"):
        run_shell_command("cat s/client.key", workspace)
    # a hard link: to the token, to the service's session file, to a key in a subfolder
    (workspace / "session_token.json").write_text('{"token": "SESSION-SECRET"}')
    (workspace / "startup" / "old").mkdir()
    (workspace / "startup" / "old" / "client.key").write_text("-----BEGIN PRIVATE KEY-----\n")
    secrets = ("client_token.txt", "session_token.json", "startup/old/client.key")
    for i, secret in enumerate(secrets):
        os.link(workspace / secret, workspace / "logs" / f"hard{i}.log")
        with pytest.raises(ShellCommandError, match="hard link"):
            run_shell_command(f"cat logs/hard{i}.log", workspace)
    # a link to a file of a kind the readers may not read is refused by what it reaches
    (workspace / "startup" / "rootCA.pem").write_text("cert")
    (workspace / "ca.txt").symlink_to("startup/rootCA.pem")
    with pytest.raises(ShellCommandError, match="not one of the readable kinds"):
        run_shell_command("cat ca.txt", workspace)
    # an honest link still reads
    (workspace / "logs" / "fltui.log").write_text("hello\n")
    (workspace / "latest.log").symlink_to("logs/fltui.log")
    assert run_shell_command("cat latest.log", workspace) == "hello\n"


def test_shell_output_is_capped(workspace: Path) -> None:
    (workspace / "big.txt").write_text("x" * 99 + "\n" + "y" * 5000)
    out = run_shell_command("cat big.txt", workspace, max_output=100)
    assert out == "x" * 99 + "\n[output truncated at 100 bytes]\n"


# --- policy and audit ---------------------------------------------------------------------


def test_policy_defaults_and_missing_file(tmp_path: Path) -> None:
    policy = load_site_policy(tmp_path / "startup" / "site_policy.json")
    assert policy == SitePolicy() and policy.path is None
    assert not policy.allow_byoc and not policy.read_only
    assert policy.allowed_commands == frozenset(COMMANDS)
    assert policy.max_deploy_bytes == 2 << 30
    assert all(policy.refusal(t) is None for t in (Topic.START, Topic.SHELL, Topic.DEPLOY))
    assert "not a known admin command" in (policy.refusal("rm.everything") or "")


def test_command_of() -> None:
    assert command_of(Topic.START) == command_of(Topic.START_MGPU) == "start"
    assert command_of(Topic.DELETE_RUN) == "delete_run"
    assert command_of(Topic.SHELL) == "shell" and command_of(Topic.SYS_INFO) == "sys_info"
    assert command_of(Topic.VALIDATE) == "validate"
    assert command_of(Topic.CHECK_STATUS) == "check_status"
    with pytest.raises(KeyError):
        command_of("nope")


def test_policy_refusals(tmp_path: Path) -> None:
    path = tmp_path / "startup" / "site_policy.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"allowed_commands": ["check_status", "start"], "_note": "x"}))
    policy = load_site_policy(path)
    assert policy.refusal(Topic.START_MGPU) is None
    assert policy.refusal(Topic.SHELL) == (
        'refused by site policy (startup/site_policy.json): "shell" is not in allowed_commands'
    )
    path.write_text(json.dumps({"read_only": True}))
    policy = load_site_policy(path)
    assert policy.refusal(Topic.SHELL) is None
    assert policy.refusal(Topic.DEPLOY) == (
        "refused by site policy (startup/site_policy.json): read_only is true: "
        "only check_status, sys_info and shell may run"
    )


@pytest.mark.parametrize(
    ("doc", "key", "problem"),
    [
        ({"allow_byoc": "yes"}, "allow_byoc", "true or false"),
        ({"allowed_commands": ["start", "rm"]}, "allowed_commands[1]", "known: deploy, start"),
        ({"allowed_commands": "start"}, "allowed_commands", "list"),
        ({"max_deploy_bytes": True}, "max_deploy_bytes", "whole number"),
        ({"max_deploy_bytes": 0}, "max_deploy_bytes", ">= 1"),
        ({"shell_timeout": -1}, "shell_timeout", "0 < seconds"),
        ({"allow_byc": True}, "allow_byc", "unknown key"),
    ],
)
def test_policy_bad_keys_are_named(tmp_path: Path, doc: dict, key: str, problem: str) -> None:
    path = tmp_path / "site_policy.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=problem) as err:
        load_site_policy(path)
    assert err.value.key == key and err.value.path == path
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_site_policy(path)


def test_write_default_policy(tmp_path: Path) -> None:
    path = tmp_path / "startup" / "site_policy.json"
    write_default_policy(path)
    policy = load_site_policy(path)
    assert policy == SitePolicy(path=path)
    assert "_help" in json.loads(path.read_text())
    with pytest.raises(FileExistsError):
        write_default_policy(path)
    assert [p.name for p in path.parent.iterdir()] == ["site_policy.json"]


def test_audit_log(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "audit.jsonl"
    log = AuditLog(path)
    rec = log.append("admin@org", Topic.SHELL, "refused", "shell is not allowed")
    threads = [
        threading.Thread(target=lambda i=i: log.append("local", Topic.ABORT, "ok", f"n{i}"))
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = AuditLog.read(path)
    assert records[0] == rec and len(records) == 9
    assert set(rec) == {"time", "origin", "topic", "outcome", "detail"}
    assert rec["time"].endswith("+00:00")
    assert sorted(r["detail"] for r in records[1:]) == [f"n{i}" for i in range(8)]
    assert all(json.loads(line) for line in path.read_text().splitlines())
    assert os.stat(path).st_size == len(path.read_bytes())
    assert AuditLog.read(tmp_path / "none.jsonl") == []
