"""Hypothesis fuzzing of everything that decodes bytes from the network.

Model chunk streams (client and server side, the server over loopback), admin messages and
console commands, config files (startup kits, MMAR configs deployed by the admin, server and
project files) and certificates: every input decodes or is refused with the module's own clear
error; no other exception, no hang, and nothing half-written.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import serde
from engine.admin_defs import Message, MessageError
from engine.config import (
    ConfigError,
    load_client_kit,
    load_mmar_client_config,
    load_server_config,
)
from engine.provision import load_project
from engine.rpc import TOKEN_HEADER, FederatedStub
from engine.server.admin_console import AdminConsoleService
from engine.site.policy import load_site_policy
from engine.tls import KitError, _identity_from_pem, load_certificate
from fltui.admin import load_admin_kit
from protos import admin_pb2 as apb
from protos import federated_pb2 as pb
from tests.conftest import TASK, direct_client

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

MODEL = {
    "w": np.arange(12, dtype=np.float32).reshape(3, 4),
    "b": np.array([1, -2, 3], dtype=np.int64),
    "s": np.array(7.5, dtype=np.float64),
}
EXPECTED = {k: (v.dtype.name, tuple(v.shape)) for k, v in MODEL.items()}


def _frames(header: Any, chunk_bytes: int = 16, batch: bool = False) -> list[bytes]:
    return list(serde.encode_model_stream(header, MODEL, chunk_bytes=chunk_bytes, batch=batch))


# One edit of a valid stream: (operation, frame index, position, byte value).
_EDIT = st.tuples(
    st.sampled_from(["flip", "truncate", "drop", "duplicate", "swap", "insert", "extend"]),
    st.integers(0, 64),
    st.integers(0, 256),
    st.binary(min_size=1, max_size=24),
)


def _mutate(frames: list[bytes], edits: list[tuple[str, int, int, bytes]]) -> list[bytes]:
    out = list(frames)
    for op, i, pos, data in edits:
        if not out:
            out.append(data)
            continue
        i %= len(out)
        frame = out[i]
        if op == "flip" and frame:
            p = pos % len(frame)
            out[i] = frame[:p] + bytes([data[0] ^ (frame[p] or 1)]) + frame[p + 1 :]
        elif op == "truncate":
            out[i] = frame[: pos % (len(frame) + 1)]
        elif op == "drop":
            del out[i]
        elif op == "duplicate":
            out.insert(i, frame)
        elif op == "swap":
            j = pos % len(out)
            out[i], out[j] = out[j], out[i]
        elif op == "insert":
            out.insert(i, data)
        elif op == "extend":
            out[i] = frame + data
    return out


def _check_decoded(params: dict[str, np.ndarray]) -> None:
    # Whatever decodes has exactly the model's variables, dtypes and shapes (the server's check).
    assert {k: (v.dtype.name, tuple(v.shape)) for k, v in params.items()} == EXPECTED


# ---------------------------------------------------------------------------- model streams


@FUZZ
@given(st.lists(st.binary(max_size=96), max_size=10))
def test_random_frames_decode_or_are_refused(frames: list[bytes]) -> None:
    for header_type in (pb.CurrentModel, pb.Contribution):
        try:
            out = list(serde.decode_model_streams(frames, header_type, max_total_bytes=1 << 20))
        except serde.SerdeError as exc:
            assert str(exc)
        else:
            assert all(isinstance(item, (bool, tuple)) for item in out)


@FUZZ
@given(st.lists(_EDIT, min_size=1, max_size=4), st.booleans())
def test_edited_model_streams_decode_or_are_refused(edits: list, batch: bool) -> None:
    header = pb.CurrentModel(meta=pb.ModelMetaData(task="t", current_round=1), owner="server")
    frames = _mutate(_frames(header, batch=batch), edits)
    try:
        _, params = serde.decode_model_stream(frames, pb.CurrentModel, EXPECTED)
    except serde.SerdeError as exc:
        assert str(exc)
        return
    _check_decoded(params)


_DTYPES = st.sampled_from(["float32", "int64", "uint8", "bool", "complex128", "float128", "", "O"])
_SHAPES = st.lists(st.one_of(st.integers(0, 5), st.integers(-3, 2**62)), max_size=5)


@FUZZ
@given(
    st.lists(st.tuples(st.text(max_size=8), _DTYPES, _SHAPES, st.binary(max_size=4)), max_size=4),
    st.lists(
        st.tuples(st.integers(0, 6), st.integers(0, 2**40), st.binary(max_size=40)), max_size=6
    ),
    st.tuples(st.integers(0, 2**40), st.integers(0, 8), st.integers(0, 8)),
)
def test_hostile_headers_and_chunks_never_allocate_past_the_limit_or_crash(
    tensors: list, chunks: list, totals: tuple
) -> None:
    header = pb.Contribution()
    for name, dtype, shape, inline in tensors:
        header.data.params.add(name=name, array=pb.NDArray(dtype=dtype, shape=shape, data=inline))
    frames = [serde._encode_message_frame(1, header)]
    frames += [
        b"".join(serde._chunk_frame_pieces(index, offset, memoryview(payload)))
        for index, offset, payload in chunks
    ]
    end = pb.StreamEnd(total_bytes=totals[0], num_tensors=totals[1], num_chunks=totals[2])
    frames.append(serde._encode_message_frame(3, end))
    for expected in (None, EXPECTED):
        try:
            _, params = serde.decode_model_stream(
                frames, pb.Contribution, expected, max_total_bytes=1 << 16
            )
        except serde.SerdeError as exc:
            assert str(exc)
        else:
            assert sum(v.nbytes for v in params.values()) <= 1 << 16


def test_an_unchanged_stream_still_decodes_exactly() -> None:
    header = pb.CurrentModel(meta=pb.ModelMetaData(task="t"), owner="server")
    _, params = serde.decode_model_stream(_frames(header), pb.CurrentModel, EXPECTED)
    for k, v in MODEL.items():
        np.testing.assert_array_equal(params[k], v)


def test_the_server_refuses_edited_uploads_cleanly_and_keeps_its_model(start_server: Any) -> None:
    server = start_server(
        {k: v.copy() for k, v in MODEL.items()}, min_num_clients=10_000, max_num_clients=10_000
    )
    before = {k: v.copy() for k, v in server.global_model.items()}
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = FederatedStub(channel)
    state: dict[str, Any] = {"accepted": 0, "n": 0, "client": None}

    @settings(max_examples=120, deadline=None)
    @given(st.lists(_EDIT, min_size=1, max_size=3), st.booleans())
    def upload(edits: list, batch: bool) -> None:
        if state["client"] is None:
            state["n"] += 1
            state["client"] = direct_client(server, f"fuzz-{state['n']}")
        client = state["client"]
        header = pb.Contribution(
            client=pb.ClientState(
                client_name=client.client_name,
                token=client.token,
                meta=pb.ModelMetaData(task=TASK, current_round=0),
            ),
            n_iter=1,
            contribution_id=f"c-{client.client_name}-{state['accepted']}-{id(edits)}",
        )
        frames = _mutate(
            list(serde.encode_model_stream(header, MODEL, chunk_bytes=16, batch=batch)), edits
        )
        try:
            stub.SubmitUpdate(iter(frames), metadata=((TOKEN_HEADER, client.token),), timeout=10)
        except grpc.RpcError as exc:
            # Refused with a reason; UNKNOWN would mean the server crashed on the input.
            assert exc.code() != grpc.StatusCode.UNKNOWN, exc.details()
            assert exc.details()
        else:
            state["accepted"] += 1
            state["client"] = None  # this site has contributed; the next example uses a new one
        assert len(server._round.contributions) == state["accepted"]
        assert not server._round.receiving  # nothing left half-received
        for k, v in before.items():
            np.testing.assert_array_equal(server.global_model[k], v)

    try:
        upload()
    finally:
        channel.close()
    # The server still serves an honest site.
    honest = direct_client(server, "honest")
    honest.pull_models_from_server()
    assert "Received" in honest.push_models_to_server(
        {k: np.zeros_like(v) for k, v in MODEL.items()}
    )


# ---------------------------------------------------------------------------- admin messages


@FUZZ
@given(st.binary(max_size=200))
def test_admin_messages_from_the_wire_decode_or_are_refused(data: bytes) -> None:
    try:
        messages = apb.Messages.FromString(data)
    except DecodeError:
        return
    for msg in messages.message:
        try:
            decoded = Message.from_proto(msg)
        except MessageError as exc:
            assert msg.id in str(exc) or not msg.id
        else:
            assert decoded.topic == msg.topic


@FUZZ
@given(
    st.text(alphabet=string.printable + "äö\u202e\x00", max_size=60),
    st.text(max_size=12),
    st.binary(max_size=64),
)
def test_console_commands_always_get_a_reply(command: str, user: str, attachment: bytes) -> None:
    console = _console()
    reply = console.Execute(
        apb.ConsoleCommand(user=user, command=command, attachment=attachment), None
    )
    assert isinstance(reply, apb.ConsoleReply)
    assert reply.ok or reply.text
    if reply.json:
        json.loads(reply.json)


_CONSOLE: list[AdminConsoleService] = []


def _console() -> AdminConsoleService:
    if not _CONSOLE:
        import tempfile

        from engine.config import ServerConfig
        from engine.server import FederatedServer

        server = FederatedServer(
            ServerConfig(task_name=TASK), Path(tempfile.mkdtemp()), {"w": np.zeros(1)}
        )
        _CONSOLE.append(server.console)
    return _CONSOLE[0]


# ---------------------------------------------------------------------------- configs

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)

# Each of these loads as it is (test_the_valid_configs_load): a refusal of an edited one is
# then the edit's, so the key it names can be checked against the edit.
_VALID_KIT = {
    "servers": [
        {
            "name": "t",
            "service": {"target": "h:1", "options": [["grpc.max_receive_message_length", 1024]]},
        }
    ],
    "client": {
        "client_name": "site-1",
        "retry_timeout": 30,
        "ssl_root_cert": "rootCA.pem",
        "ssl_cert": "client.crt",
        "ssl_private_key": "client.key",
        "secure_train": True,
    },
}
_VALID_MMAR = {
    "servers": [{"name": "t"}],
    "client": {
        "local_epochs": 1,
        "exclude_vars": "bn",
        "privacy": {"name": "PercentileProtocol", "args": {"percentile": 75}},
        "pre_processors": [{"name": "X", "args": {}}],
    },
}
_VALID_SERVER = {
    "servers": [
        {
            "name": "t",
            "service": {"target": "h:1"},
            "min_num_clients": 1,
            "fl_clients": ["a"],
            "ssl_cert": "s.crt",
        }
    ],
    "aggregator": {"name": "ModelAggregator", "args": {"aggregation_weights": {"a": 1}}},
}
_VALID_PROJECT = {
    "name": "p",
    "server": {"name": "fl", "host_names": ["10.0.0.1"], "port": 1},
    "fl_clients": [{"name": "a"}],
    "admin_clients": [{"name": "b"}],
}
_VALID_ADMIN = {"admin": {"name": "a", "target": "h:1", "ssl_cert": "c.crt"}}
_VALID_POLICY = {"allow_byoc": False, "allowed_commands": ["start"], "shell_timeout": 5}


def _loaders(root: Path) -> list[tuple[Any, Path, dict[str, Any]]]:
    (root / "config").mkdir(exist_ok=True)
    (root / "startup").mkdir(exist_ok=True)
    return [
        (load_client_kit, root / "fed_client.json", _VALID_KIT),
        (
            lambda p: load_mmar_client_config(p.parent.parent),
            root / "config" / "config_fed_client.json",
            _VALID_MMAR,
        ),
        (load_server_config, root / "config_fed_server.json", _VALID_SERVER),
        (load_project, root / "project.json", _VALID_PROJECT),
        (
            lambda p: load_admin_kit(p.parent.parent),
            root / "startup" / "fed_admin.json",
            _VALID_ADMIN,
        ),
        (load_site_policy, root / "site_policy.json", _VALID_POLICY),
    ]


def _key_parts(key: str) -> list[str]:
    """``servers[0].service.target`` -> ``["servers", "[0]", "service", "target"]``."""
    return re.findall(r"[^.\[\]]+|\[\d+\]", key)


def _check_refusal(exc: ConfigError, path: Path, edited: str | None) -> None:
    """A refusal names the file, and the key the edit put a bad value at.

    ``edited`` is the dotted key of the edited node ("" for the whole document), or None when
    the edit is not known (random bytes): then only the file is checked, and that any key named
    is in the message. Every problem of the refusal must name the edited key, a key inside it
    (a bad object: its missing or bad member) or one that holds it (a list that lost its
    shape); "" only where the whole document was edited or is not JSON at all.
    """
    assert exc.path == path, (exc.path, path)
    assert str(path) in str(exc), str(exc)
    for problem in getattr(exc, "problems", [exc]):
        assert problem.path == path, (problem.path, path)
        if problem.key:
            assert problem.key in str(exc), (problem.key, str(exc))
        if edited is None:
            continue
        assert problem.key or not edited, f"the edit of {edited!r} refused without a key: {exc}"
        named, at = _key_parts(problem.key), _key_parts(edited)
        n = min(len(named), len(at))
        assert named[:n] == at[:n], f"the edit of {edited!r} refused naming {problem.key!r}: {exc}"


def _load_all(root: Path, write: Any) -> None:
    """Each loader on its file as ``write(path, valid_doc)`` wrote it; ``write`` returns the
    dotted key it edited, or None when unknown."""
    for load, path, valid in _loaders(root):
        edited = write(path, valid)
        try:
            load(path)
        except ConfigError as exc:
            _check_refusal(exc, path, edited)


def _replace_at(doc: Any, path: list[int], value: Any, key: str = "") -> tuple[Any, str]:
    """``doc`` with the node chosen by ``path`` (indices into keys/items) replaced by ``value``,
    and that node's dotted key ("" for the whole document)."""
    if not path or not isinstance(doc, (dict, list)) or not doc:
        return value, key
    if isinstance(doc, dict):
        name = list(doc)[path[0] % len(doc)]
        new, where = _replace_at(doc[name], path[1:], value, f"{key}.{name}" if key else name)
        return {**doc, name: new}, where
    i = path[0] % len(doc)
    new, where = _replace_at(doc[i], path[1:], value, f"{key}[{i}]")
    return [*doc[:i], new, *doc[i + 1 :]], where


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _write_edited(where: list[int], value: Any) -> Any:
    def write(path: Path, valid: dict[str, Any]) -> str:
        doc, edited = _replace_at(valid, where, value)
        text = json.dumps(doc)
        path.write_text(text)
        try:  # Python writes Infinity; strict JSON (our parser) refuses the file as a whole
            json.loads(text, parse_constant=_not_json)
        except ValueError:
            return ""
        return edited

    return write


def test_the_valid_configs_load(tmp_path: Path) -> None:
    for load, path, valid in _loaders(tmp_path):
        path.write_text(json.dumps(valid))
        load(path)


@FUZZ
@given(st.binary(max_size=120))
def test_config_files_of_random_bytes_are_refused_with_file_named(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    root = tmp_path_factory.mktemp("cfg")

    def write(path: Path, valid: dict[str, Any]) -> None:
        path.write_bytes(data)  # what key the bytes edit is not known

    _load_all(root, write)


@FUZZ
@given(st.lists(st.integers(0, 8), max_size=4), _JSON)
def test_config_files_with_any_value_anywhere_parse_or_name_the_file_and_key(
    tmp_path_factory: pytest.TempPathFactory, where: list[int], value: Any
) -> None:
    root = tmp_path_factory.mktemp("cfg")
    _load_all(root, _write_edited(where, value))


def test_an_edit_is_refused_naming_its_key(tmp_path: Path) -> None:
    # The property above in examples whose refusal is certain (it holds for what parses too).
    for where, value, loader, key in (
        ([1, 1], "thirty", 0, "client.retry_timeout"),
        ([0, 0, 1, 0], 5, 0, "servers[0].service.target"),
        ([0, 0, 2], "many", 2, "servers[0].min_num_clients"),
        ([1, 2], -4, 3, "server.port"),
        ([0, 1], 7, 4, "admin.target"),
        ([2], "forever", 5, "shell_timeout"),
    ):
        load, path, valid = _loaders(tmp_path)[loader]
        assert _write_edited(where, value)(path, valid) == key
        with pytest.raises(ConfigError) as info:
            load(path)
        _check_refusal(info.value, path, key)
        assert info.value.key == key, str(info.value)


def test_deeply_nested_json_is_refused_not_a_crash(tmp_path: Path) -> None:
    def write(path: Path, valid: dict[str, Any]) -> str:
        path.write_text("[" * 100_000 + "]" * 100_000)
        return ""

    _load_all(tmp_path, write)


# ---------------------------------------------------------------------------- certificates


@FUZZ
@given(st.binary(max_size=300), st.sampled_from([b"", b"-----BEGIN CERTIFICATE-----\n"]))
def test_certificates_of_random_bytes_are_refused(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, prefix: bytes
) -> None:
    path = tmp_path_factory.mktemp("pem") / "c.pem"
    path.write_bytes(prefix + data)
    with pytest.raises(KitError, match=r"c\.pem"):
        load_certificate(path)
    assert _identity_from_pem(prefix + data) is None
