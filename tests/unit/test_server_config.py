"""The rendered TorchServe configuration keeps Kiln's secure defaults and carries each served
model's workers and batching."""

import json
import zipfile
from pathlib import Path

import pytest

from kiln.deploy import plugins
from kiln.deploy.server import ModelServing, Ports, ServerError, ServerSettings


def parse(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line)


def test_config_binds_loopback_and_keeps_secure_defaults(tmp_path):
    store = tmp_path / "store"
    for name in ("lenet", "binary"):
        fake_archive(store, name)
    settings = ServerSettings(run_dir=tmp_path / "run", model_store=store,
                              models=["lenet", "binary"], ports=Ports(1, 2, 3, 4, 5))
    cfg = parse(settings.config_properties())
    assert cfg["inference_address"] == "http://127.0.0.1:1"
    assert cfg["management_address"] == "http://127.0.0.1:2"
    assert cfg["metrics_address"] == "http://127.0.0.1:3"
    assert (cfg["grpc_inference_address"], cfg["grpc_inference_port"]) == ("127.0.0.1", "4")
    assert (cfg["grpc_management_address"], cfg["grpc_management_port"]) == ("127.0.0.1", "5")
    assert cfg["load_models"] == "lenet.mar,binary.mar"
    assert cfg["enable_model_api"] == "false"
    assert cfg["allowed_urls"] == f"file://{store.resolve()}/[^/]+\\\\.mar"
    assert cfg["metrics_mode"] == "prometheus"
    assert cfg["model_metrics_auto_detect"] == "true"  # Kiln's handler metrics
    assert cfg["max_request_size"] == str(4 * 1024 * 1024)
    assert cfg["enable_envvars_config"] == "false"
    assert "disable_token_authorization" not in cfg  # token auth stays on


def test_model_api_only_when_asked(tmp_path):
    fake_archive(tmp_path, "mlp")
    settings = ServerSettings(tmp_path, tmp_path, ["mlp"], enable_model_api=True)
    assert parse(settings.config_properties())["enable_model_api"] == "true"


def test_default_ports_are_torchserve_s_and_free_ports_are_distinct():
    assert Ports() == Ports(8080, 8081, 8082, 7070, 7071)
    free = Ports.free()
    assert len(set(vars(free).values())) == 8


def test_run_folder_isolates_the_pid_file(tmp_path):
    from kiln.deploy.server import Server

    server = Server(ServerSettings(tmp_path / "run", tmp_path, ["mlp"]))
    env = server._env()
    assert Path(env["TMPDIR"]) == (tmp_path / "run" / "tmp").resolve()
    assert server.pid() is None


@pytest.mark.parametrize(("fronted", "token_auth", "access_log", "variable"), [
    (False, True, True, "info"),  # nothing else logs the requests
    (True, True, True, "off"),  # kiln serve: the front proxy's JSON log
    (False, False, True, "off"),  # the container: its front proxy's JSON log
    (False, True, False, "off")])
def test_torchserve_s_access_log_only_where_no_front_proxy_writes_kiln_s(
        tmp_path, fronted, token_auth, access_log, variable):
    from kiln.deploy.server import Server

    settings = ServerSettings(tmp_path / "run", tmp_path, ["mlp"], access_log=access_log,
                              token_auth=token_auth,
                              internal_ports=Ports.free() if fronted else None)
    assert Server(settings)._env()["KILN_ACCESS_LOG"] == variable


# --- per-model serving settings: config.properties' `models` -------------------------------

BUILTIN = Path(__file__).resolve().parents[2] / "training" / "models"


def fake_archive(store: Path, name: str, version: str = "1.0") -> Path:
    """What config rendering reads of an archive: its manifest."""
    store.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(store / f"{name}.mar", "w") as z:
        z.writestr("MAR-INF/MANIFEST.json",
                   json.dumps({"model": {"modelName": name, "modelVersion": version}}))
    return store / f"{name}.mar"


def declared_model(folder: Path, name: str, serving: str) -> Path:
    """A declaration of Kiln's binary model under another name, with a [serving] table."""
    text = (BUILTIN / "binary.toml").read_text().split("[[examples]]")[0]
    text = text.replace('file = "binary.py"', f'file = "{BUILTIN / "binary.py"}"')
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.toml").write_text(text + "\n[serving]\n" + serving)
    return folder


def test_models_setting_has_each_model_s_workers_and_batching(tmp_path):
    store = tmp_path / "store"
    fake_archive(store, "lenet")
    fake_archive(store, "binary", "2.5")
    settings = ServerSettings(tmp_path, store, ["lenet", "binary"], cores=2, serving={
        "binary": ModelServing(workers=2, batch_size=4, max_batch_delay_ms=7)})
    cfg = parse(settings.config_properties())
    assert cfg["load_models"] == "lenet.mar,binary.mar"
    assert json.loads(cfg["models"]) == {
        # lenet declares no [serving]: derived for 2 cores and 2 models
        "lenet": {"1.0": {"defaultVersion": True, "marName": "lenet.mar", "minWorkers": 1,
                          "maxWorkers": 1, "batchSize": 16, "maxBatchDelay": 1}},
        # keyed by the version inside the archive, which is what TorchServe matches
        "binary": {"2.5": {"defaultVersion": True, "marName": "binary.mar", "minWorkers": 2,
                           "maxWorkers": 2, "batchSize": 4, "maxBatchDelay": 7}},
    }
    assert "\\" not in cfg["models"]  # Java properties would read a backslash as an escape
    assert settings.served_workers() == 3


def test_precedence_flag_over_declaration_over_defaults():
    declared = {"workers": 2, "batch_size": 4, "response_timeout_s": 60}  # timeout: archive's
    assert ModelServing.resolve(declared) == ModelServing(2, 4, 1)
    assert ModelServing.resolve(declared, workers=None, batch_size=16, max_batch_delay_ms=5) \
        == ModelServing(2, 16, 5)
    assert ModelServing.resolve({}) == ModelServing(1, 16, 1)
    derived = ModelServing.derived(cores=8, models=2)
    assert ModelServing.resolve({}, derived) == ModelServing(4, 8, 1)
    assert ModelServing.resolve({"batch_size": 4}, derived, workers=1) == ModelServing(1, 4, 1)


@pytest.mark.parametrize("cores,models,expected", [
    (2, 4, ModelServing(1, 16, 1)),   # make serve's default set on 2 cores: one worker each
    (2, 1, ModelServing(2, 8, 1)),    # one model takes both cores, its batches halve
    (8, 4, ModelServing(2, 8, 1)),
    (8, 3, ModelServing(2, 8, 1)),    # whole workers: 6 of 8 cores, never oversubscribed
    (1, 1, ModelServing(1, 16, 1)),
    (64, 1, ModelServing(64, 8, 1)),  # never below 8: a burst still fills every worker's
    (3, 5, ModelServing(1, 16, 1)),   # more models than cores: one worker each all the same
])
def test_defaults_derived_from_cores_and_models(cores, models, expected):
    assert ModelServing.derived(cores, models) == expected


def test_a_server_s_defaults_follow_its_cores_and_models(tmp_path):
    for name in ("lenet", "mlp", "rnn", "binary"):
        fake_archive(tmp_path, name)
    on_8 = ServerSettings(tmp_path, tmp_path, ["lenet", "mlp", "rnn", "binary"], cores=8)
    assert on_8.serving_defaults() == ModelServing(2, 8, 1)
    assert on_8.served_workers() == 8
    alone = ServerSettings(tmp_path, tmp_path, ["lenet"], cores=2)
    assert json.loads(parse(alone.config_properties())["models"])["lenet"]["1.0"][
        "minWorkers"] == 2


def test_a_declaration_s_serving_reaches_config_properties(tmp_path):
    models = declared_model(tmp_path / "models", "tiny", "batch_size = 4\nworkers = 2\n")
    fake_archive(tmp_path / "store", "tiny")
    settings = ServerSettings(tmp_path, tmp_path / "store", ["tiny"], models_dirs=[models],
                              cores=8)
    assert json.loads(parse(settings.config_properties())["models"])["tiny"]["1.0"] == {
        "defaultVersion": True, "marName": "tiny.mar", "minWorkers": 2, "maxWorkers": 2,
        "batchSize": 4, "maxBatchDelay": 1}


def test_kiln_serve_flags_win_over_the_declaration(tmp_path):
    from kiln.cli.main import build_parser
    from kiln.cli.serve import _serving

    models = declared_model(tmp_path / "models", "tiny", "batch_size = 4\nworkers = 2\n")
    args = build_parser("serve").parse_args(
        ["serve", "tiny", "--models-dir", str(models), "--batch-size", "16"])
    # on 6 cores, lenet (no [serving]) gets 6 // 2 workers; tiny keeps its declared 2
    assert _serving(args, ["tiny", "lenet"], cores=6) == {"tiny": ModelServing(2, 16, 1),
                                                          "lenet": ModelServing(3, 16, 1)}
    args.max_batch_delay = 0
    with pytest.raises(ValueError, match="use 1 or more"):
        _serving(args, ["tiny"])


@pytest.mark.parametrize("given", [dict(workers=0), dict(batch_size=True),
                                   dict(max_batch_delay_ms=-1), dict(batch_size=2.0)])
def test_bad_serving_settings_fail_at_construction(given):
    with pytest.raises(ValueError, match="must be a whole number"):
        ModelServing(**given)


def test_a_stock_model_gets_torchserve_s_defaults(tmp_path):
    from kiln.loadtests.stock import BenchSettings

    fake_archive(tmp_path, "m_stock")
    fake_archive(tmp_path, "m_noop")
    settings = BenchSettings(tmp_path, tmp_path, ["m_stock", "m_noop"],
                             serving={"m_noop": ModelServing()}, envelope="json")
    cfg = parse(settings.config_properties())
    assert cfg["load_models"] == "m_stock.mar,m_noop.mar"
    assert list(json.loads(cfg["models"])) == ["m_noop"]
    assert (cfg["number_of_gpu"], cfg["service_envelope"]) == ("0", "json")


def test_no_models_no_models_setting(tmp_path):
    cfg = parse(ServerSettings(tmp_path, tmp_path, []).config_properties())
    assert "models" not in cfg and "load_models" not in cfg


def test_a_missing_archive_is_named(tmp_path):
    with pytest.raises(ServerError, match="lenet.mar is missing .* run kiln archive lenet"):
        ServerSettings(tmp_path, tmp_path, ["lenet"]).config_properties()


def test_kiln_archive_takes_no_serve_time_settings():
    from kiln.cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser("archive").parse_args(["archive", "lenet", "--batch-size", "4"])


def test_free_ports_asked_for_twice_never_overlap():
    """Side-by-side servers ask for their ports before either binds them."""
    from dataclasses import astuple

    from kiln.deploy.server import Ports

    sets = [set(astuple(Ports.free())) for _ in range(50)]
    assert sum(len(s) for s in sets) == len(set().union(*sets)) == 50 * len(sets[0])


def test_free_ports_are_outside_the_range_outgoing_connections_draw_from():
    from dataclasses import astuple

    from kiln.deploy import ports

    low, high = ports.ephemeral_range()
    assert all(not low <= port <= high for _ in range(20) for port in astuple(ports.Ports.free()))


@pytest.mark.parametrize(("ephemeral", "expected"), [
    ((32768, 60999), range(10000, 32768)),  # Linux's default: the larger side is below
    ((15000, 30000), range(30001, 65536)),
])
def test_free_ports_are_looked_for_on_the_larger_side_of_the_ephemeral_range(ephemeral,
                                                                             expected):
    from kiln.deploy import ports

    assert ports.unclaimed_ports(ephemeral) == expected


def test_a_port_held_by_a_listener_is_not_bindable():
    import socket

    from kiln.deploy import ports

    with socket.socket() as held:
        held.bind((ports.HOST, 0))
        held.listen()
        assert not ports.bindable(held.getsockname()[1])


@pytest.mark.parametrize(("heap", "start"), [("1g", 128 * 1024**2), ("2G", 128 * 1024**2),
                                             ("64m", 64 * 1024**2)])
def test_the_frontend_heap_starts_at_a_fixed_size_never_above_its_maximum(tmp_path, heap,
                                                                         start):
    """Not the JVM's 1/64 of the host's memory: a flood touches all the heap it commits."""
    fake_archive(tmp_path, "mlp")
    settings = ServerSettings(run_dir=tmp_path / "run", model_store=tmp_path, models=["mlp"],
                              java_heap=heap)
    vmargs = parse(settings.config_properties())["vmargs"].split()
    assert vmargs[:3] == [f"-Xms{start}", f"-Xmx{heap}", "-XX:+UseSerialGC"]


@pytest.mark.parametrize("greedy", [True, False])
def test_the_frontend_runs_the_greedy_batching_agent_of_the_plugin_jar(tmp_path, greedy):
    fake_archive(tmp_path, "mlp")
    settings = ServerSettings(run_dir=tmp_path / "run", model_store=tmp_path, models=["mlp"],
                              greedy_batching=greedy)
    vmargs = parse(settings.config_properties())["vmargs"].split()
    agent = [f"-javaagent:{plugins.plugins_dir() / plugins.JAR_NAME}", "--add-exports",
             "java.base/jdk.internal.org.objectweb.asm=ALL-UNNAMED"]
    assert (vmargs[-3:] == agent) is greedy
    assert any(a.startswith("-javaagent") for a in vmargs) is greedy


def test_a_java_heap_that_is_no_jvm_size_fails_at_construction(tmp_path):
    with pytest.raises(ValueError, match="not a JVM memory size: '1 GB'"):
        ServerSettings(run_dir=tmp_path / "run", model_store=tmp_path, models=["mlp"],
                       java_heap="1 GB")
