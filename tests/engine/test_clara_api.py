"""The lineage's client API kept to the letter: what a Clara 3.1 user calls does what it says.

Each test is one difference a Clara user tripped over (the direct client's privacy and order of
arguments, the communicator's own arguments and channels, client-state processors, Clara's
import paths for bring-your-own code, ``get_status_message``), over a real server on loopback.
"""

from __future__ import annotations

import inspect
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.json_format import MessageToDict

from engine import clara_compat
from engine.client.communicator import Communicator
from engine.client.data_processors import (
    ClientStateProcessor,
    DataContext,
    DataProcessor,
    build_client_state_processors,
    build_processors,
)
from engine.client.direct_client import DirectFederatedClient
from engine.client.fl_context import FLContext
from engine.client.model_manager import ClientModelManager
from engine.config import ComponentSpec, ConfigError, load_mmar_client_config
from engine.privacy import PercentileProtocol, PrivacyProtocol, build_privacy
from engine.rpc import FederatedStub
from engine.server import FederatedServer
from protos import federated_pb2 as pb
from tests.conftest import TASK, DictModel, endpoint

# ------------------------------------------------------------------------------ helpers


class AddOne(DataProcessor):
    """A post-processor that shows it ran: every float tensor + 1."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def process(self, data_ctx: DataContext, app_ctx: dict[str, Any]) -> None:
        self.seen.append(type(data_ctx.header).__name__)
        data_ctx.model = {k: v + 1 for k, v in data_ctx.model.items()}


class Recording(DataProcessor):
    """A pre-processor that records what it was given and marks the contribution."""

    def __init__(self) -> None:
        self.models: list[dict[str, np.ndarray]] = []
        self.n_iter: list[int] = []

    def process(self, data_ctx: DataContext, app_ctx: dict[str, Any]) -> None:
        self.models.append({k: np.array(v) for k, v in data_ctx.model.items()})
        self.n_iter.append(int(data_ctx.header.n_iter))
        data_ctx.header.meta_data.update({"recorded": True})


class CountingPrivacy(PercentileProtocol):
    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.calls = 0

    def apply(self, model_diff: dict[str, Any], train_ctx: Any = None) -> dict[str, Any]:
        self.calls += 1
        return super().apply(model_diff, train_ctx)


def _init() -> dict[str, np.ndarray]:
    return {
        "w": np.zeros(8, np.float32),
        "head": np.full(3, 5.0, np.float32),
    }


def _delta() -> dict[str, np.ndarray]:
    return {
        "w": np.array([0.5, -0.02, 0.003, -0.9, 0.04, 2.0, -0.3, 0.07], np.float32),
        "head": np.full(3, 100.0, np.float32),
    }


@pytest.fixture
def states(start_server: Any) -> Iterator[tuple[Any, list[pb.ClientState]]]:
    """A one-round server that records every ClientState it authenticates."""
    server: FederatedServer = start_server(_init(), min_num_clients=1, num_rounds=1)
    seen: list[pb.ClientState] = []
    real = server._authenticate

    def spy(state: pb.ClientState, context: Any) -> Any:
        seen.append(pb.ClientState.FromString(state.SerializeToString()))
        return real(state, context)

    server._authenticate = spy  # type: ignore[method-assign]
    yield server, seen


# --------------------------------------------------------------- 9. DirectFederatedClient


def test_direct_client_positional_arguments_follow_the_lineage() -> None:
    expected = [
        "client_id",
        "client_args",
        "secure_train",
        "server_args",
        "exclude_vars",
        "privacy",
        "retry_timeout",
        "train_context",
        "model_reader_writer",
        "pre_processors",
        "post_processors",
        "client_state_processors",
        "req_processors",
        "handlers",
        "train_options",
    ]
    params = inspect.signature(DirectFederatedClient.__init__).parameters
    positional = [
        n for n, p in params.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    ][1:]
    assert positional == expected
    ctx = {"total_steps": 4}
    ep = endpoint_for(1)
    client = DirectFederatedClient("site-a", {}, False, [ep], None, None, 30, ctx)
    assert client.train_context is ctx and client.cross_site_validate is False


def endpoint_for(port: int) -> Any:
    from engine.config import ServerEndpoint

    return ServerEndpoint(name=TASK, target=f"127.0.0.1:{port}")


def test_direct_client_push_applies_exclude_vars_privacy_and_pre_processors(
    start_server: Any,
) -> None:
    server = start_server(_init(), min_num_clients=1, num_rounds=1)
    privacy = CountingPrivacy(percentile=50, gamma=0.25)
    pre = Recording()
    client = DirectFederatedClient(
        "site-a",
        {},
        False,
        [endpoint(server)],
        "^head$",  # exclude_vars
        privacy,
        5,
        {"total_steps": 2},  # train_context: n_iter when the push gives none
        None,
        [pre],
    )
    client.connect_to_server({"heart_beat": False})
    pulled = client.pull_models_from_server()
    assert list(pulled) == ["w"]  # an excluded variable stays local: not handed out
    delta = _delta()
    client.push_models_to_server(delta)
    expected = PercentileProtocol(percentile=50, gamma=0.25).apply(
        {"w": delta["w"]}, {"total_steps": 2}
    )
    assert privacy.calls == 1
    # the pre-processor saw the filtered Δ, without the excluded variable, with n_iter = T
    assert list(pre.models[0]) == ["w"] and pre.n_iter == [2]
    np.testing.assert_array_equal(pre.models[0]["w"], expected["w"])
    assert 0 < np.count_nonzero(expected["w"]) < len(delta["w"])  # it did filter
    np.testing.assert_allclose(server.global_model["w"], expected["w"], rtol=1e-6)
    np.testing.assert_array_equal(server.global_model["head"], _init()["head"])


def test_direct_client_pull_runs_the_post_processors(start_server: Any) -> None:
    server = start_server(_init(), min_num_clients=1, num_rounds=1)
    post = AddOne()
    client = DirectFederatedClient(
        "site-a", {}, False, [endpoint(server)], retry_timeout=5, post_processors=[post]
    )
    client.connect_to_server({"heart_beat": False})
    got = client.pull_models_from_server()
    np.testing.assert_array_equal(got["w"], _init()["w"] + 1)
    np.testing.assert_array_equal(got["head"], _init()["head"] + 1)
    assert post.seen == ["CurrentModel"]  # once: the communicator runs them, nobody else


def test_direct_client_retry_with_the_same_id_sends_the_same_bytes(start_server: Any) -> None:
    server = start_server(_init(), min_num_clients=1, num_rounds=2)
    privacy = CountingPrivacy(percentile=50, gamma=1.0)
    client = DirectFederatedClient(
        "site-a", {}, False, [endpoint(server)], privacy=privacy, retry_timeout=5
    )
    client.connect_to_server({"heart_beat": False})
    client.pull_models_from_server()
    first = client.push_models_to_server(_delta(), {"contribution_id": "site-a-r0"})
    again = client.push_models_to_server(_delta(), {"contribution_id": "site-a-r0"})
    assert privacy.calls == 1  # the retry is the same contribution, not a second draw
    assert "duplicate" in again and "duplicate" not in first


# ---------------------------------------------------------------------- 10. Communicator


def _manager() -> tuple[ClientModelManager, DictModel]:
    rw = DictModel({k: v.copy() for k, v in _init().items()})
    return ClientModelManager([TASK], model_reader_writer=rw), rw


def test_communicator_uses_its_model_manager_and_processors(start_server: Any) -> None:
    """The lineage's calls, with the lineage's arguments: getModel runs the post-processors,
    submitUpdate assembles the contribution (Δ, privacy, pre-processors) from the model
    manager when the caller packed nothing."""
    server = start_server(_init(), min_num_clients=1, num_rounds=1)
    manager, rw = _manager()
    manager.privacy = PercentileProtocol(percentile=50, gamma=10)
    pre, post = Recording(), AddOne()
    comm = Communicator(manager, pre_processors=[pre], post_processors=[post], retry_timeout=5)
    servers = {TASK: endpoint(server)}
    token = comm.client_registration("site-a", servers, TASK)
    remote = comm.getModel(servers, TASK, token, {"current_round": 0})
    np.testing.assert_array_equal(remote.params["w"], _init()["w"] + 1)
    manager.assign_current_model({TASK: remote})
    rw.weights["w"] = rw.weights["w"] + _delta()["w"]
    reply = comm.submitUpdate(servers, TASK, token, FLContext(), {"current_round": 0}, "site-a")
    assert reply.comment
    expected = PercentileProtocol(percentile=50, gamma=10).apply(
        {"w": _delta()["w"], "head": np.zeros(3, np.float32)}, {}
    )
    np.testing.assert_allclose(pre.models[0]["w"], expected["w"], rtol=1e-6)
    np.testing.assert_allclose(
        server.global_model["w"], _init()["w"] + expected["w"], rtol=1e-6, atol=1e-7
    )
    comm.close()


def test_submit_update_without_anything_to_send_says_so() -> None:
    comm = Communicator()
    with pytest.raises(ValueError, match="no model_manager"):
        comm.submitUpdate({TASK: endpoint_for(1)}, TASK, "t", None, {}, "site-a")


def test_set_up_channel_gives_the_caller_its_own_channel(start_server: Any) -> None:
    """``with comm.set_up_channel(...) as channel:`` (the lineage's form) closes that channel
    only; the communicator's own calls go on."""
    server = start_server(_init(), min_num_clients=1, num_rounds=1)
    comm = Communicator(retry_timeout=5)
    servers = {TASK: endpoint(server)}
    token = comm.client_registration("site-a", servers, TASK)
    target = {"target": f"127.0.0.1:{server.port}", "options": []}
    with comm.set_up_channel(target, token) as channel:
        reply = FederatedStub(channel).Heartbeat(comm.get_client_state(TASK, token), timeout=5)
        assert reply.comment == "ok"  # the token travelled with the call
    other = comm.set_up_channel(endpoint(server))
    assert other is not channel
    other.close()
    assert comm.send_heartbeat(servers, TASK, token).comment == "ok"  # still works
    # without the token, the server does not know who calls
    with comm.set_up_channel(target) as bare, pytest.raises(grpc.RpcError):
        FederatedStub(bare).Heartbeat(pb.ClientState(meta=pb.ModelMetaData(task=TASK)), timeout=5)
    comm.close()


@pytest.mark.parametrize("bad", ["gzip", "zstd", "NoCompression", 3])
def test_an_unknown_compression_is_a_clear_error(bad: Any) -> None:
    with pytest.raises(ValueError) as err:
        Communicator(compression=bad)
    assert repr(bad) in str(err.value) and "'Gzip', 'Deflate'" in str(err.value)
    with pytest.raises(ValueError, match=repr(bad)):
        DirectFederatedClient("s", {}, False, [endpoint_for(1)], compression=bad)


@pytest.mark.parametrize("good", [None, "Gzip", "Deflate", grpc.Compression.Gzip])
def test_the_compressions_the_lineage_knows_are_accepted(good: Any) -> None:
    assert Communicator(compression=good).compression == good


def test_submit_best_local_model_reads_it_from_the_model_manager() -> None:
    manager, _ = _manager()

    class Fitter:
        def best_weights(self) -> dict[str, np.ndarray]:
            return {"w": np.full(8, 7.0, np.float32)}

    manager.set_fitter(Fitter())
    comm = Communicator(manager)
    sent: list[Any] = []

    def upload(*args: Any) -> pb.FederatedSummary:
        sent.append(args)
        return pb.FederatedSummary(comment="ok")

    comm._upload = upload  # type: ignore[method-assign,assignment]
    assert comm.submit_best_local_model("site-a", {TASK: endpoint_for(1)}, TASK, "t") == "ok"
    np.testing.assert_array_equal(sent[0][5]["w"], 7.0)
    comm.submit_best_local_model("site-a", {TASK: endpoint_for(1)}, TASK, "t", disable=True)
    assert sent[1][5] == {}


# ------------------------------------------------------------ 11. client_state_processors

_STATE_PROCESSOR = """
from fed_learn.client.fed_privacy import PrivacyProtocol  # noqa: F401 (Clara's own imports)


class SiteInfo:
    def __init__(self, hospital="?"):
        self.hospital = hospital

    def process(self, client_state, app_ctx):
        client_state.meta_data.update(
            {"hospital": self.hospital, "round_seen": app_ctx.get("current_round", -1)}
        )
        return client_state
"""


def _mmar_with(tmp_path: Path, client: dict[str, Any], custom: dict[str, str]) -> Path:
    mmar = tmp_path / "mmar"
    (mmar / "config").mkdir(parents=True)
    (mmar / "custom").mkdir()
    for name, text in custom.items():
        (mmar / "custom" / name).write_text(textwrap.dedent(text))
    (mmar / "config" / "config_fed_client.json").write_text(
        json.dumps({"servers": [{"name": TASK}], "client": client})
    )
    return mmar


def test_client_state_processors_from_the_config_are_built_and_run(
    tmp_path: Path, states: tuple[Any, list[pb.ClientState]]
) -> None:
    server, seen = states
    mmar = _mmar_with(
        tmp_path,
        {
            "client_state_processors": [
                {"path": "site_info_mod.SiteInfo", "args": {"hospital": "St Elsewhere"}}
            ]
        },
        {"site_info_mod.py": _STATE_PROCESSOR},
    )
    config = load_mmar_client_config(mmar)
    processors = build_client_state_processors(config.client_state_processors, [mmar / "custom"])
    assert len(processors) == 1
    client = DirectFederatedClient(
        "site-a",
        {},
        False,
        [endpoint(server)],
        retry_timeout=5,
        client_state_processors=processors,
    )
    client.connect_to_server({"heart_beat": False})
    client.pull_models_from_server()
    client.heartbeat()
    assert seen, "the server authenticated no ClientState"
    for state in seen:
        meta = MessageToDict(state.meta_data)
        assert meta["hospital"] == "St Elsewhere" and "round_seen" in meta


def test_a_client_state_processor_we_do_not_have_or_without_process_is_refused(
    tmp_path: Path,
) -> None:
    mmar = _mmar_with(
        tmp_path,
        {
            "client_state_processors": [
                {"name": "MetadataGenerator", "args": {}},
                {"path": "no_process.Thing", "args": {}},
            ]
        },
        {"no_process.py": "class Thing:\n    pass\n"},
    )
    config = load_mmar_client_config(mmar)
    with pytest.raises(ConfigError) as err:
        build_client_state_processors(config.client_state_processors[:1], [mmar / "custom"])
    assert err.value.key == "client.client_state_processors[0].name"
    assert "unknown client state processor 'MetadataGenerator'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        build_client_state_processors(config.client_state_processors[1:], [mmar / "custom"])
    assert err.value.key == "client.client_state_processors[1].path"
    assert "no process(client_state, app_ctx) method" in str(err.value)
    assert issubclass(ClientStateProcessor, object)


def test_the_site_builds_the_mmars_client_state_processors(tmp_path: Path) -> None:
    from engine.demo import prepare_workspace
    from engine.events import EventBus
    from engine.site.paths import SitePaths
    from engine.site.site_engine import SiteEngine, check_mmar

    prepare_workspace(tmp_path, num_sites=1, num_rounds=1)
    paths = SitePaths(tmp_path / "site-1")
    (paths.startup / "site_policy.json").write_text(json.dumps({"allow_byoc": True}))
    mmar = paths.mmar(1, "site-1")
    (mmar / "custom" / "site_info_mod.py").write_text(_STATE_PROCESSOR)
    cfg_path = mmar / "config" / "config_fed_client.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["client"]["client_state_processors"] = [
        {"path": "site_info_mod.SiteInfo", "args": {"hospital": "H"}}
    ]
    cfg_path.write_text(json.dumps(cfg))
    engine = SiteEngine(paths.root, EventBus())
    communicator = engine.build().communicator
    state = communicator.get_client_state("demo_federation", "t", {"current_round": 3})
    assert MessageToDict(state.meta_data) == {"hospital": "H", "round_seen": 3}
    # one we do not have is refused when the MMAR is checked, naming the key
    cfg["client"]["client_state_processors"] = [{"name": "MetadataGenerator"}]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as err:
        check_mmar(mmar)
    assert err.value.key == "client.client_state_processors[0].name"


# -------------------------------------------------- 12. Clara's import paths for BYO code

_BYO = """
from fed_learn.client.fed_privacy import PrivacyProtocol
from fed_learn.components.data_processor import DataProcessor


class MyPrivacyProtocol(PrivacyProtocol):
    \"\"\"Clara's BYO example, in Clara's form: apply(model_diff, train_ctx=None).\"\"\"

    def __init__(self, scale=0.5):
        self.scale = scale

    def apply(self, model_diff, train_ctx=None):
        return {k: v * self.scale for k, v in model_diff.items()}


class Tagger(DataProcessor):
    def process(self, data_ctx, app_ctx):
        data_ctx.fl_ctx.set_prop("tagged", True)
"""


def test_clara_byo_code_loads_unchanged_and_runs(tmp_path: Path) -> None:
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "clara_byo_mod.py").write_text(_BYO)
    spec = ComponentSpec(
        name=None,
        path="clara_byo_mod.MyPrivacyProtocol",
        args={"scale": 0.25},
        key="client.privacy",
    )
    protocol = build_privacy(spec, [custom])
    assert isinstance(protocol, PrivacyProtocol)  # Clara's base class is ours
    out = protocol.apply({"w": np.ones(3)})
    np.testing.assert_array_equal(out["w"], 0.25)
    [tagger] = build_processors(
        [ComponentSpec(name=None, path="clara_byo_mod.Tagger", key="client.pre_processors[0]")],
        [custom],
    )
    assert isinstance(tagger, DataProcessor)
    ctx = DataContext(model={})
    tagger.process(ctx, {})
    assert ctx.fl_ctx.get_prop("tagged") is True


def test_clara_module_paths_are_aliases_of_ours_and_nothing_else() -> None:
    clara_compat.install()
    from fed_learn.admin_defs import Message  # type: ignore[import-not-found]
    from fed_learn.client import FederatedClient  # type: ignore[import-not-found]
    from fed_learn.client.client_status import (  # type: ignore[import-not-found]
        ClientStatus as ClaraStatus,
    )
    from fed_learn.client.client_status import get_status_message as clara_get
    from fed_learn.model_meta import FLContext as ClaraContext  # type: ignore[import-not-found]

    import engine.admin_defs
    import engine.client.fed_client
    from engine.status import ClientStatus

    assert FederatedClient is engine.client.fed_client.FederatedClient
    assert ClaraStatus is ClientStatus and clara_get(3) == "training stopped"
    assert Message is engine.admin_defs.Message and ClaraContext is FLContext
    with pytest.raises(ModuleNotFoundError, match=r"fed_learn\.client\.fed_privacy") as err:
        __import__("fed_learn.client.secret_sauce")
    assert err.value.name == "fed_learn.client.secret_sauce"
    assert not hasattr(sys.modules["fed_learn"], "__file__")  # no fed_learn/ directory anywhere


def test_an_mmar_cannot_shadow_clara_modules_with_its_own_fed_learn(tmp_path: Path) -> None:
    custom = tmp_path / "custom"
    (custom / "fed_learn" / "client").mkdir(parents=True)
    (custom / "fed_learn" / "__init__.py").write_text("")
    (custom / "fed_learn" / "client" / "__init__.py").write_text("")
    (custom / "fed_learn" / "client" / "fed_privacy.py").write_text(
        "class PrivacyProtocol:\n    pass\n"
    )
    (custom / "uses_it.py").write_text(_BYO)
    spec = ComponentSpec(name=None, path="uses_it.MyPrivacyProtocol", key="client.privacy")
    assert isinstance(build_privacy(spec, [custom]), PrivacyProtocol)


# -------------------------------------------------------------- 13. get_status_message


def test_get_status_message_is_a_module_function_too() -> None:
    from engine.client import get_status_message as from_package
    from engine.status import ClientStatus, get_status_message

    assert from_package is get_status_message
    assert get_status_message(ClientStatus.TRAINING_STARTED) == "training started"
    assert get_status_message(0) == "training not started"
    assert get_status_message(42) is None
    assert ClientStatus.get_status_message(42) == "unknown status 42"  # display form
