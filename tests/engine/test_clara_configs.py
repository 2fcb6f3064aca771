"""Clara Train 3.1 configs as they were written: read whole, refused precisely, checked at once.

The files are under tests/fixtures/clara31 (written from the Clara 3.1 forms; see its README).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.client.data_processors import DataCompressor, DataDeCompressor, build_processors
from engine.config import (
    CLARA_REQUEST_PROCESSORS,
    REQUEST_PROCESSORS,
    ConfigError,
    ConfigProblems,
    load_client_kit,
    load_environment,
    load_mmar_client_config,
    load_server_config,
)
from engine.privacy import LaplacianProtocol, PercentileProtocol, SVTProtocol, build_privacy
from engine.site.processors import request_processors
from engine.training import TrainConfigError, build_fitter
from fltui.check_config import main as check_config

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "clara31"


def _copy(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def _with_client_config(mmar: Path, variant: str) -> Path:
    """Makes ``config_fed_client_w_<variant>.json`` the MMAR's config, as Clara's docs did."""
    config = mmar / "config"
    shutil.copy(config / f"config_fed_client_w_{variant}.json", config / "config_fed_client.json")
    return mmar


# ------------------------------------------------------------------------- the client block


def test_every_field_of_the_clara_client_block_is_read(tmp_path: Path) -> None:
    mmar = _copy("mmar", tmp_path)
    c = load_mmar_client_config(mmar)
    assert c.task_name == "clara_federation"
    assert (c.local_epochs, c.steps_aggregation) == (2, 4)
    assert c.exclude_vars == "dummy" and c.cross_site_validate is False
    assert c.privacy is None  # "privacy": {} disables it
    assert [s.name for s in c.pre_processors] == [
        "IteratorNumberGenerator",
        "BestMetricGenerator",
        "DataCompressor",
    ]
    assert c.pre_processors[0].args == {"field": "n_iter"}
    assert [s.name for s in c.post_processors] == ["DataDeCompressor"]
    assert c.req_processors == CLARA_REQUEST_PROCESSORS
    assert (c.model_reader_writer, c.model_validator) == ("PTModelReaderWriter", "PTModelValidator")
    assert c.retry_timeout == 30
    # ssl_* relative to the MMAR root, as Clara resolved an MMAR's paths
    assert c.ssl_private_key == mmar / "resources" / "certs" / "client1.key"
    assert c.ssl_cert == mmar / "resources" / "certs" / "client1.crt"
    assert c.ssl_root_cert == mmar / "resources" / "certs" / "rootCA.pem"
    # compression null, but DataCompressor listed: the channel compresses (Clara zipped bytes)
    assert c.compression is None and c.wire_compression == "Gzip"
    assert c.server_options("clara_federation") == [
        ("grpc.max_send_message_length", 1000000000),
        ("grpc.max_receive_message_length", 1000000000),
    ]
    processors = build_processors(c.pre_processors + c.post_processors)
    assert isinstance(processors[2], DataCompressor)
    assert isinstance(processors[3], DataDeCompressor)


def test_the_startup_kit_reads_req_processors_and_certificates_relative_to_startup() -> None:
    kit = load_client_kit(FIXTURES / "startup" / "fed_client.json")
    assert kit.client_name == "client1" and kit.secure_train is False
    assert kit.req_processors == CLARA_REQUEST_PROCESSORS
    assert kit.servers[0].options[0] == ("grpc.max_send_message_length", 1000000000)
    # the registered processors are exactly the listed ones (Clara's ten: no start_mgpu)
    names = [type(p).__name__ for p in request_processors(kit.req_processors)]
    assert names == list(CLARA_REQUEST_PROCESSORS)
    assert "StartClientMGpuProcessor" in [type(p).__name__ for p in request_processors(None)]
    # the config's list and the processors module cannot drift apart
    assert {type(p).__name__ for p in request_processors(None)} == set(REQUEST_PROCESSORS)


@pytest.mark.parametrize(
    ("variant", "cls", "expected"),
    [
        ("percentile", PercentileProtocol, {"percentile": 75.0, "gamma": 50.0}),
        (
            "SVT",
            SVTProtocol,
            {"fraction": 0.1, "epsilon": 0.1, "noise_var": 0.1, "gamma": 1e-5, "tau": 1e-6},
        ),
        # Laplacian's "fraction": 50 is a percentage: half of the values
        ("laplacian", LaplacianProtocol, {"fraction": 50.0, "_q": 0.5, "epsilon": 2.0}),
    ],
)
def test_each_privacy_protocol_in_its_clara_argument_form(
    tmp_path: Path, variant: str, cls: type, expected: dict[str, float]
) -> None:
    mmar = _with_client_config(_copy("mmar", tmp_path), variant)
    config = load_mmar_client_config(mmar)
    protocol = build_privacy(config.privacy, [mmar / "custom"])
    assert type(protocol) is cls
    for attr, value in expected.items():
        assert getattr(protocol, attr) == pytest.approx(value), attr
    # and it works on an update: what is shared is bounded by the protocol's own rules
    rng = np.random.default_rng(0)
    delta = {"w": rng.normal(0, 1e-3, 4000).astype(np.float32), "b": np.zeros(8, np.float32)}
    out = protocol.apply(delta, {"total_steps": 4})
    shared = sum(int(np.count_nonzero(v)) for v in out.values()) / 4008
    limit = {"percentile": 0.26, "SVT": 0.101, "laplacian": 0.5}[variant]
    assert 0 < shared <= limit


def test_a_laplacian_fraction_over_100_percent_names_the_key(tmp_path: Path) -> None:
    mmar = _with_client_config(_copy("mmar", tmp_path), "laplacian")
    path = mmar / "config" / "config_fed_client.json"
    data = json.loads(path.read_text())
    data["client"]["privacy"]["args"]["fraction"] = 150
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        build_privacy(load_mmar_client_config(mmar).privacy)
    assert str(err.value).startswith(f"{path}: client.privacy.args.fraction: ")
    assert "(0, 100]" in str(err.value)


def test_clara_module_paths_of_built_ins_mean_the_built_ins(tmp_path: Path) -> None:
    mmar = _with_client_config(_copy("mmar", tmp_path), "SVT")
    path = mmar / "config" / "config_fed_client.json"
    data = json.loads(path.read_text())
    data["client"]["privacy"] = {
        "path": "fed_learn.client.fed_privacy.PercentileProtocol",
        "args": {"percentile": 90, "gamma": 1.0},
    }
    path.write_text(json.dumps(data))
    protocol = build_privacy(load_mmar_client_config(mmar).privacy)
    assert isinstance(protocol, PercentileProtocol) and protocol.percentile == 90


# ------------------------------------------------------------------------------ refusals


def test_tensorflow_components_are_refused_naming_each_and_its_replacement() -> None:
    mmar = FIXTURES / "mmar_tf"
    with pytest.raises(ConfigProblems) as err:
        load_mmar_client_config(mmar)
    lines = str(err.value).splitlines()
    path = mmar / "config" / "config_fed_client.json"
    assert lines == [
        f"{path}: client.model_reader_writer.name: TFModelReaderWriter is a TensorFlow-only "
        "component of Clara; use PTModelReaderWriter (the torch fitter reads and writes the "
        "model's state_dict) instead",
        f"{path}: client.model_validator.name: TFModelValidator is a TensorFlow-only component "
        "of Clara; use PTModelValidator (the torch fitter validates on config_train.json's "
        "validation_data) instead",
    ]
    # the first problem is also the error's own file and key
    assert (err.value.path, err.value.key) == (path, "client.model_reader_writer.name")


def test_a_tensorflow_training_config_is_refused_before_torch_builds_anything() -> None:
    with pytest.raises(TrainConfigError) as err:
        build_fitter(FIXTURES / "mmar_tf", site_name="client1", device="cpu")
    text = str(err.value)
    assert err.value.key == "train"
    assert "a Clara 3.1 TensorFlow training config" in text.splitlines()[0]
    for key, name, replacement in [
        ("train.model", "SegAhnet", "model: a torch.nn.Module"),
        ("train.loss", "Dice", "loss: a MONAI or torch.nn loss"),
        ("train.image_pipeline", "SegmentationImagePipelineWithCache", "DatalistDataset"),
        ("validate.metrics[0]", "ComputeAverageDice", "validation.metric"),
        ("validate.inferer", "TFScanWindowInferer", "forward pass"),
    ]:
        [line] = [ln for ln in text.splitlines() if f": {key}: " in ln]
        assert f"TensorFlow component {name!r}" in line and replacement in line


def test_tensorflow_code_by_path_and_clara_imports_in_custom_code_are_named(
    tmp_path: Path,
) -> None:
    mmar = _copy("mmar_byo", tmp_path)
    path = mmar / "config" / "config_fed_client.json"
    data = json.loads(path.read_text())
    data["client"]["privacy"] = {"path": "tensorflow.keras.Model", "args": {}}
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"client.privacy.path: 'tensorflow.keras.Model' is "):
        load_mmar_client_config(mmar)
    # Clara's own BYO example imports fed_learn: it loads unchanged (engine.clara_compat)
    (mmar / "custom" / "clara_byo.py").write_text(
        "from fed_learn.client.fed_privacy import PrivacyProtocol\n"
        "class MyPrivacyProtocol(PrivacyProtocol):\n"
        "    def apply(self, model_diff, train_ctx=None):\n        return model_diff\n"
    )
    data["client"]["privacy"] = {"path": "clara_byo.MyPrivacyProtocol", "args": {}}
    path.write_text(json.dumps(data))
    config = load_mmar_client_config(mmar)
    assert build_privacy(config.privacy, [mmar / "custom"]).apply({"w": 1}) == {"w": 1}
    # a Clara module we do not provide is named, as the module that imports it
    (mmar / "custom" / "clara_more.py").write_text(
        "from fed_learn.client.fed_utils import something\n"
    )
    data["client"]["privacy"] = {"path": "clara_more.MyPrivacyProtocol", "args": {}}
    path.write_text(json.dumps(data))
    config = load_mmar_client_config(mmar)
    with pytest.raises(ConfigError) as err:
        build_privacy(config.privacy, [mmar / "custom"])
    assert err.value.key == "client.privacy.path"
    assert "module 'clara_more'" in str(err.value)
    assert "imports 'fed_learn.client.fed_utils'" in str(err.value)


def test_a_config_with_many_mistakes_reports_all_of_them(tmp_path: Path) -> None:
    mmar = _copy("mmar", tmp_path)
    path = mmar / "config" / "config_fed_client.json"
    data = json.loads(path.read_text())
    data["client"].update(
        {
            "local_epoch": 3,  # misspelt
            "steps_aggregation": -1,
            "exclude_vars": "(",
            "compression": "zip",
            "req_processors": [{"name": "StartClientProcesor"}, {"path": "mine.Proc"}],
        }
    )
    data["servers"][0]["service"]["options"].append(["grpc.max_send_message_length", 1e9])
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigProblems) as err:
        load_mmar_client_config(mmar)
    keys = [p.key for p in err.value.problems]
    assert keys == [
        "servers[0].service.options[2]",
        "client.local_epoch",
        "client.steps_aggregation",
        "client.exclude_vars",
        "client.compression",
        "client.req_processors[0].name",
        "client.req_processors[1].path",
    ]
    text = str(err.value)
    assert "did you mean 'local_epochs'" in text
    assert "did you mean 'StartClientProcessor'" in text
    assert "expected an integer or a string value" in text


# ------------------------------------------------------------------------- environment.json


def test_environment_variables_are_honoured_by_the_torch_fitter(tmp_path: Path) -> None:
    mmar = _copy("mmar", tmp_path)
    env_path = mmar / "config" / "environment.json"
    env = json.loads(env_path.read_text())
    env.update({"MMAR_CKPT_DIR": "checkpoints", "MMAR_EVAL_OUTPUT_PATH": "out/eval"})
    env_path.write_text(json.dumps(env))
    environment = load_environment(mmar)
    assert environment.dataset_json == mmar.resolve() / "config" / "dataset_0.json"
    assert environment.data_root == mmar.resolve() / "data"

    fitter = build_fitter(mmar, site_name="client1", device="cpu")
    # DATASET_JSON / DATA_ROOT: the datalist's .npy files, 32 training and 12 validation
    assert len(fitter._train_loader.dataset) == 32
    assert len(fitter._validation_loader.dataset) == 12
    # "{LEARNING_RATE}" became the number 0.05
    assert fitter._optimizer.param_groups[0]["lr"] == 0.05
    fitter.train()
    metrics = fitter.validate()
    # MMAR_CKPT_DIR and MMAR_EVAL_OUTPUT_PATH
    assert (mmar / "checkpoints" / "best_model.pt").is_file()
    assert not (mmar / "models" / "best_model.pt").exists()
    written = json.loads((mmar / "out" / "eval" / "validation_metrics.json").read_text())
    assert written["metrics"] == metrics and written["site"] == "client1"


def test_an_undefined_placeholder_and_a_bad_variable_name_their_keys(tmp_path: Path) -> None:
    mmar = _copy("mmar", tmp_path)
    train = mmar / "config" / "config_train.json"
    data = json.loads(train.read_text())
    data["train_data"]["args"]["data_list_file_path"] = "{DATASET_JSN}"
    train.write_text(json.dumps(data))
    with pytest.raises(TrainConfigError) as err:
        build_fitter(mmar, site_name="client1", device="cpu")
    assert err.value.key == "train_data.args.data_list_file_path"
    assert "{DATASET_JSN} is not defined in" in str(err.value)
    assert "DATASET_JSON" in str(err.value)

    (mmar / "config" / "environment.json").write_text('{"DATA_ROOT": ["a"], "MMAR_ROOT": "x"}')
    with pytest.raises(ConfigProblems) as problems:
        load_environment(mmar)
    assert [p.key for p in problems.value.problems] == ["DATA_ROOT", "MMAR_ROOT"]


# ---------------------------------------------------------------------- config_fed_server.json


def test_the_server_reads_every_clara_key() -> None:
    path = FIXTURES / "mmar" / "config" / "config_fed_server.json"
    c = load_server_config(path)
    assert (c.task_name, c.min_num_clients, c.max_num_clients) == ("clara_federation", 2, 100)
    assert (c.start_round, c.num_rounds, c.heart_beat_timeout) == (0, 2, 600)
    assert c.wait_after_min_clients == 10 and c.num_server_workers == 32
    # servers[0].exclude_vars and the aggregator's are both applied
    assert c.exclude_vars == r"(?:dummy)|(?:^net\.2\.bias$)"
    assert c.aggregation_weights == {"client1": 1.0, "client2": 1.5}
    assert c.compression == "Gzip"  # DataCompressor / DataDeCompressor listed
    assert ("grpc.max_send_message_length", 1000000000) in c.options
    # certificates relative to the MMAR root, as for the client
    assert c.ssl_cert == FIXTURES / "mmar" / "resources" / "certs" / "server.crt"


def test_server_mistakes_are_all_reported(tmp_path: Path) -> None:
    path = tmp_path / "config_fed_server.json"
    data = json.loads((FIXTURES / "mmar" / "config" / "config_fed_server.json").read_text())
    data["servers"][0].update({"validate_on_server": True, "num_round": 3, "start_round": 9})
    data["aggregator"] = {"path": "BYO_aggregator.CustomModelAggregator", "args": {}}
    data["model_saver"] = {"name": "TFModelSaver"}
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigProblems) as err:
        load_server_config(path)
    keys = [p.key for p in err.value.problems]
    assert keys == [
        "servers[0].num_round",
        "servers[0].start_round",
        "servers[0].validate_on_server",
        "aggregator.path",
        "model_saver.name",
    ]
    assert "use PTModelSaver" in str(err.value)


# --------------------------------------------------------------------------- check-config


def test_check_config_prints_every_problem_with_file_key_and_expectation(
    capsys: pytest.CaptureFixture[str],
) -> None:
    mmar = FIXTURES / "mmar_tf"
    assert check_config([str(mmar)]) == 1
    out = capsys.readouterr().out.splitlines()
    problems, summary = out[:-1], out[-1]
    assert summary == f"{len(problems)} problems in 3 files"
    files = {line.split(": ", 1)[0] for line in problems}
    assert files == {
        str(mmar / "config" / name)
        for name in ("config_fed_client.json", "config_fed_server.json", "config_train.json")
    }
    # every line: file, key, what is expected
    assert all(len(line.split(": ")) >= 3 for line in problems)
    expected_keys = {
        "client.model_reader_writer.name",
        "model_saver.name",
        "servers[0].ssl_cert",
        "train.model",
        "validate.inferer",
    }
    assert expected_keys <= {line.split(": ")[1] for line in problems}


def test_check_config_of_clara_style_kits_and_mmars_that_are_fine(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for path in ("mmar", "mmar_byo", "startup", "startup/fed_client.json"):
        assert check_config([str(FIXTURES / path)]) == 0, capsys.readouterr().out
    assert check_config([str(REPO / "engine" / "training" / "demo_mmar")]) == 0
    assert "no problems (4 files checked)" in capsys.readouterr().out


def test_check_config_finds_a_missing_custom_module_without_running_custom_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mmar = _copy("mmar_byo", tmp_path)
    (mmar / "custom" / "byo_net.py").unlink()
    # custom code that would fail if it were imported: check-config must not import it
    (mmar / "custom" / "byo_processors.py").write_text("raise SystemExit('imported!')\n")
    assert check_config([str(mmar)]) == 1
    out = capsys.readouterr().out
    assert f"{mmar / 'config' / 'config_train.json'}: model.path: no module 'byo_net'" in out
    assert "imported!" not in out


def test_check_config_usage_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert check_config([str(tmp_path / "nowhere")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert check_config([str(tmp_path)]) == 2
    assert "not a site workspace" in capsys.readouterr().err
    assert check_config([]) == 2


def test_check_config_runs_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fltui.check_config", str(FIXTURES / "mmar_tf" / "config")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # an MMAR's config/ folder: the MMAR is checked, the three files with problems
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1].endswith("problems in 3 files")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fltui.check_config",
            str(FIXTURES / "mmar_tf" / "config" / "config_fed_client.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "TFModelReaderWriter is a TensorFlow-only component" in result.stdout


def test_components_from_installed_packages_pass_the_check_without_being_imported(
    tmp_path: Path,
) -> None:
    import sys

    from engine.config import ComponentSpec
    from engine.training.components import check_component
    from engine.training.errors import TrainConfigError

    file = tmp_path / "config" / "config_train.json"
    custom = tmp_path / "custom"
    had_torch = "torch" in sys.modules
    check_component(ComponentSpec(name=None, path="torch.nn.Linear", key="model"), file, custom)
    check_component(ComponentSpec(name=None, path="numpy.linalg.norm", key="loss"), file, None)
    assert ("torch" in sys.modules) == had_torch  # found on disk, nothing imported
    with pytest.raises(TrainConfigError, match=r"no module 'torch.nope'.*nor installed"):
        check_component(ComponentSpec(name=None, path="torch.nope.Net", key="model"), file, custom)
    with pytest.raises(TrainConfigError, match=r"no module 'my_nets'"):
        check_component(ComponentSpec(name=None, path="my_nets.Net", key="model"), file, custom)


def test_lower_case_environment_variables_are_substituted_too() -> None:
    from engine.config import MMAREnvironment

    env = MMAREnvironment(
        path=Path("environment.json"), mmar_root=Path("/m"), variables={"data_dir": "/d", "N": 3}
    )
    out, problems = env.substitute(
        {"a": "{data_dir}/x", "b": "{N}", "c": "ckpt_{epoch}.pt", "d": "{MISSING}"},
        Path("config_train.json"),
    )
    assert out == {"a": "/d/x", "b": 3, "c": "ckpt_{epoch}.pt", "d": "{MISSING}"}
    assert [p.key for p in problems] == ["d"]


def test_a_deployed_mmar_may_not_loosen_the_server_certificate_check(tmp_path: Path) -> None:
    from engine.config import ConfigError

    mmar = _copy("mmar", tmp_path)
    path = mmar / "config" / "config_fed_client.json"
    data = json.loads(path.read_text())
    data["servers"][0].setdefault("service", {})["options"] = [
        ["grpc.ssl_target_name_override", "evil.example.org"],
        ["grpc.max_send_message_length", 1000000],
    ]
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"grpc.ssl_target_name_override changes which server"):
        load_mmar_client_config(mmar)


def test_service_options_replace_our_channel_defaults_on_both_channels() -> None:
    from engine.client.communicator import RECONNECT_OPTIONS, channel_options

    configured = [["grpc.max_reconnect_backoff_ms", 500], ["grpc.max_send_message_length", 9]]
    got = channel_options(
        configured, [("grpc.max_send_message_length", 8 << 20), *RECONNECT_OPTIONS]
    )
    # one value per name (gRPC would take the first of two), the config's where it names one
    assert dict(got) == {
        "grpc.max_send_message_length": 9,
        "grpc.initial_reconnect_backoff_ms": 250,
        "grpc.max_reconnect_backoff_ms": 500,
    }
    assert len(got) == 3
    assert channel_options(None, RECONNECT_OPTIONS) == RECONNECT_OPTIONS
