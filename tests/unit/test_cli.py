"""Every subcommand explains its flags; the client encodes files by their type."""

import argparse
import json
import subprocess
import sys

import pytest

from kiln import client as http
from kiln import workspace
from kiln.cli.main import build_parser, main
from kiln.cli.predict import describe
from kiln.deploy import front

SUBCOMMANDS = {
    "train": ["--epochs", "--optimizer", "--seed", "--resume", "--dry-run", "--device"],
    "export": ["--artifacts"],
    "archive": ["--backend", "--response-timeout", "--top-k"],
    "serve": ["--backend", "--no-build", "--enable-model-api", "--inference-port", "--workers",
              "--batch-size", "--max-batch-delay"],
    "stop": ["--run-dir"],
    "predict": ["--url", "--token", "--expect", "--json"],
}


@pytest.mark.parametrize("command,flags", SUBCOMMANDS.items())
def test_help_explains_every_flag(command, flags, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in flags:
        assert flag in text
    # argparse prints no help text for a flag without one; each of ours has a default noted.
    assert "(default:" in text


@pytest.mark.parametrize("argv", [["predict", "lenet", "x.png", "--bogus"],
                                  ["stop", "--bogus", "1"], ["train", "lenet", "--bogus"]])
def test_a_wrong_flag_gets_the_subcommand_s_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: kiln {argv[0]} [-h]")
    bogus = " ".join(argv[argv.index("--bogus"):])
    assert err.endswith(f"kiln {argv[0]}: error: unrecognized arguments: {bogus}\n")


def test_console_script_runs():
    done = subprocess.run([sys.executable, "-m", "kiln.cli", "--help"],
                          capture_output=True, text=True, check=True)
    assert "predict" in done.stdout and "serve" in done.stdout


def test_encode_file_by_suffix(tmp_path):
    png = tmp_path / "a.PNG"
    png.write_bytes(b"\x89PNG")
    assert http.encode_file(png) == (b"\x89PNG", "image/png")
    j = tmp_path / "row.json"
    j.write_text(json.dumps([1, 2]))
    assert http.encode_file(j) == (b"[1, 2]", "application/json")
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        http.encode_file(tmp_path / "x.txt")


def test_read_token(tmp_path):
    assert http.read_token(tmp_path) is None
    (tmp_path / "key_file.json").write_text(json.dumps(
        {"management": {"key": "m"}, "inference": {"key": "i"}, "API": {"key": "a"}}))
    assert http.read_token(tmp_path) == "i"
    assert http.read_token(tmp_path, "management") == "m"


def test_describe_answers():
    body = {"label": "7", "probability": 0.5,
            "top_k": [{"label": "7", "probability": 0.5}, {"label": "1", "probability": 0.25}]}
    assert describe("lenet", body) == "lenet: 7  (p=0.5000)   top-k: 7 0.5000, 1 0.2500"
    assert describe("binary", {"label": "benign", "probability": 0.75}) == \
        "binary: benign  (p=0.7500)"


def test_every_port_flag_reaches_the_server_settings(tmp_path):
    import dataclasses

    from kiln.cli.serve import _server
    from kiln.deploy import plugins

    given = {"inference": 18180, "management": 18181, "metrics": 18182, "grpc_inference": 17170,
             "grpc_management": 17171, "oip": 18185, "kiln_grpc": 17172, "oip_grpc": 18186}
    argv = ["serve", "--run-dir", str(tmp_path)]
    for api, port in given.items():
        argv += [f"--{api.replace('_', '-')}-port", str(port)]
    args = build_parser("serve").parse_args(argv)
    server = _server(args, ["binary"])
    assert vars(server.ports) == given
    settings = dataclasses.replace(server.settings, models=[])  # no archive needed
    config = settings.config_properties()
    # The front proxy takes the public ports; TorchServe listens behind it on its own, but
    # keeps the management ones (not proxied).
    assert dict(server.front_settings().public) == {"http": 18180, "oip": 18185,
                                                     "grpc": 17170, "oip-grpc": 18186,
                                                     "metrics": 18182}
    internal = server.settings.internal_ports
    vmargs = next(line for line in config.splitlines() if line.startswith("vmargs="))
    assert f"-D{plugins.OIP_ADDRESS_PROPERTY}=127.0.0.1:{internal.oip}" in vmargs.split()
    # Public gRPC goes to the plugin's gRPC server (versions), not to TorchServe's own.
    assert f"-D{plugins.GRPC_ADDRESS_PROPERTY}=127.0.0.1:{internal.kiln_grpc}" in vmargs.split()
    assert server.front_settings().upstream["grpc"] == internal.kiln_grpc
    # OIP over gRPC: the plugin's own server, behind the proxy's oip-grpc port.
    assert f"-D{plugins.OIP_GRPC_ADDRESS_PROPERTY}=127.0.0.1:{internal.oip_grpc}" in \
        vmargs.split()
    assert server.front_settings().upstream["oip-grpc"] == internal.oip_grpc
    assert f"inference_address=http://127.0.0.1:{internal.inference}\n" in config
    assert "management_address=http://127.0.0.1:18181\n" in config
    assert "grpc_management_port=17171\n" in config
    assert not set(vars(internal).values()) & set(given.values())
    # Archives are extracted under the run folder, never in a read-only root's /tmp.
    assert f"-Djava.io.tmpdir={tmp_path.resolve() / 'tmp'} " in config


def test_a_rotation_before_any_serve_makes_a_private_run_folder(tmp_path):
    run = tmp_path / "new" / "run"
    assert main(["keys", "rotate", "--run-dir", str(run)]) == 0
    assert (run.stat().st_mode & 0o777, (run / "keys").stat().st_mode & 0o777) == (0o700, 0o600)
    assert len(front.read_keys(run / "keys")) == 1


@pytest.mark.parametrize("run_dir", ["elsewhere/run", None])
def test_the_banner_s_hints_repeat_the_run_folder(run_dir, tmp_path, monkeypatch):
    """A server run from another folder than run/ is found only with --run-dir (its keys and
    ports are there): every hint says it, and `make stop` (the default run's) is not offered."""
    from kiln import declaration
    from kiln.cli.serve import how_to_call
    from kiln.deploy.server import Ports, Server, ServerSettings

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(workspace.ENV, raising=False)  # the current folder is the workspace
    folder = tmp_path / (run_dir or "run")
    server = Server(ServerSettings(run_dir=folder, model_store=tmp_path, models=["binary"],
                                   ports=Ports(inference=18180), internal_ports=Ports.free()))
    example = declaration.get("binary").examples[0]
    flag = f" --run-dir {run_dir}" if run_dir else ""
    lines = how_to_call(server).splitlines()
    assert f"  KEY=$(kiln keys show{flag})" in lines
    assert lines[-3:] == [
        f"  kiln predict binary {example.file} --expect {example.expect}{flag}",
        "",
        f"Stop it with: kiln stop{flag}" if run_dir else
        "Stop it with: make stop   (or: kiln stop)",
    ]


@pytest.mark.parametrize("command", ["predict", "batch", "loadtest"])
def test_token_help_says_what_is_sent(command, capsys):
    """The key of the front proxy, as read_token reads it: TorchServe's own inference token
    behind the proxy gets 401."""
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("--token TOKEN key sent as the Bearer token (default: the newest of the front "
            "proxy's keys in --run-dir, as kiln keys show prints it; TorchServe's own inference "
            "token in key_file.json for a server without Kiln's front proxy)") in text


def test_every_run_dir_default_is_the_same(tmp_path, monkeypatch):
    # kiln batch --via server reads the key and port from it: a default of its own got 401.
    monkeypatch.setenv(workspace.ENV, str(tmp_path))
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    defaults = {name: parser.get_default("run_dir") for name, parser in sub.choices.items()
                if any(a.dest == "run_dir" for a in parser._actions)}
    assert set(defaults) >= {"serve", "stop", "keys", "predict", "batch", "loadtest"}
    assert defaults == dict.fromkeys(defaults, tmp_path.resolve() / "run")


@pytest.mark.parametrize("argv,lacking,missing,installed,code", [
    (["loadtest", "lenet", "--start-server"], "locust", "the Python module locust",
     "pip install 'kiln[loadtest]'", 2),
    (["bench", "lenet"], "wrk", "the program wrk", "apt-get install wrk", 1),
    (["tune", "lenet", "--p99-ms", "50"], "wrk", "the program wrk", "apt-get install wrk", 1)])
def test_a_missing_test_bench_part_is_named_before_anything_starts(argv, lacking, missing,
                                                                   installed, code, monkeypatch,
                                                                   caplog):
    # What `make serve` leaves out: locust is looked up, never imported; wrk found on PATH.
    import importlib.util
    import shutil

    from kiln.loadtests import bench, run, tune

    find_spec, which = importlib.util.find_spec, shutil.which
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == lacking else find_spec(name, *a))
    monkeypatch.setattr(shutil, "which", lambda name, *a, **kw: None if name == lacking
                        else which(name, *a, **kw))
    for module in (run, bench, tune):  # the command itself, which would start servers
        monkeypatch.setattr(module, "run", lambda args: pytest.fail("the command ran"))
    assert main(argv) == code
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("ERROR", f"kiln {argv[0]} needs {missing}, which is not installed: run make "
                  f"install-test in Kiln's repository, or {installed}")]
