"""The rendered TorchServe configuration keeps Kiln's secure defaults."""

from pathlib import Path

from kiln.deploy.server import Ports, ServerSettings


def parse(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line)


def test_config_binds_loopback_and_keeps_secure_defaults(tmp_path):
    store = tmp_path / "store"
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
    settings = ServerSettings(tmp_path, tmp_path, ["mlp"], enable_model_api=True)
    assert parse(settings.config_properties())["enable_model_api"] == "true"


def test_default_ports_are_torchserve_s_and_free_ports_are_distinct():
    assert Ports() == Ports(8080, 8081, 8082, 7070, 7071)
    free = Ports.free()
    assert len(set(vars(free).values())) == 6


def test_run_folder_isolates_the_pid_file(tmp_path):
    from kiln.deploy.server import Server

    server = Server(ServerSettings(tmp_path / "run", tmp_path, ["mlp"]))
    env = server._env()
    assert Path(env["TMPDIR"]) == (tmp_path / "run" / "tmp").resolve()
    assert server.pid() is None
