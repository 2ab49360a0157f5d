"""kiln-container's settings, keys and nginx configuration, with no server running."""

import re
import subprocess
from pathlib import Path

import pytest

from kiln.deploy import container as kc
from kiln.deploy import contract, front
from kiln.deploy.metrics_exporter import Exporter
from kiln.deploy.server import ModelServing, ServerSettings

KEY = "Abc+def/ghi.jkl_mno-pq="  # 23 characters, every kind of punctuation a key may hold


def test_defaults_are_the_contracts():
    s = kc.parse_args([], environ={})
    assert (s.model_store, s.keys_file, s.run_dir) == (
        Path(contract.MODEL_STORE), Path(contract.KEYS_FILE), Path(contract.RUN_DIR))
    assert (s.grace_s, s.drain_delay_s, s.listen) == (30.0, 5.0, "0.0.0.0")
    assert s.public_ports() == contract.PUBLIC_PORTS
    assert s.internal_ports() == contract.INTERNAL_PORTS


def test_flags_win_over_the_environment():
    env = {contract.ENV["grace_s"]: "12", contract.ENV["drain_delay_s"]: "2",
           contract.ENV["models"]: "a, b", contract.ENV["run_dir"]: "/env/run"}
    s = kc.parse_args(["--grace-seconds", "9", "--run-dir", "/flag/run"], environ=env)
    assert (s.grace_s, s.drain_delay_s, s.models, s.run_dir) == (
        9.0, 2.0, ("a", "b"), Path("/flag/run"))


def test_port_offset_shifts_every_port():
    s = kc.parse_args(["--port-offset", "1000"], environ={})
    assert s.public_ports() == {k: v + 1000 for k, v in contract.PUBLIC_PORTS.items()}
    assert s.internal_ports().management == contract.INTERNAL_PORTS.management + 1000


@pytest.mark.parametrize("args", [["--drain-delay-seconds", "30"], ["--grace-seconds", "0"],
                                  ["--port-offset", "60000"]])
def test_bad_settings_fail_at_once(args, capsys):
    with pytest.raises(SystemExit):
        kc.parse_args(args, environ={})
    assert "kiln-container: error:" in capsys.readouterr().err


def container_server(tmp_path, **given):
    settings = kc.Settings(model_store=tmp_path, models=("tiny",), run_dir=tmp_path / "run",
                           **given)
    server = kc.server_settings(settings)
    server.serving = {"tiny": ModelServing()}
    return settings, server


def test_torchserve_in_the_container_has_auth_off_and_internal_ports(tmp_path):
    settings, server = container_server(tmp_path)
    assert (server.token_auth, server.console_logs, server.ports) == (
        False, True, contract.INTERNAL_PORTS)
    assert server.log_config.name == "log4j2-console.xml"
    server.models_setting = lambda: {}
    props = server.config_properties()
    assert "disable_token_authorization=true\n" in props
    assert f"management_address=http://127.0.0.1:{contract.INTERNAL_PORTS.management}\n" in props
    assert "enable_model_api=false\n" in props


def test_a_mounted_versions_file_is_what_the_plugin_nginx_and_the_exporter_read(tmp_path):
    mounted = tmp_path / "configmap" / "versions.json"
    s = kc.parse_args([], environ={contract.ENV["versions_file"]: str(mounted)})
    assert (kc.Settings().versions_file, s.versions_file) == (
        Path(contract.VERSIONS_FILE), mounted)
    settings, server = container_server(tmp_path, versions_file=mounted)
    server.models_setting = lambda: {}
    # No file: no version to register, the model API stays off.
    assert "enable_model_api=false\n" in server.config_properties()
    mounted.parent.mkdir()
    mounted.write_text("{}")
    settings, server = container_server(tmp_path, versions_file=mounted)
    server.models_setting = lambda: {}
    props = server.config_properties()
    assert "enable_model_api=true\n" in props  # on loopback: management_address above
    assert f"-Dkiln.route.state={mounted} " in props
    assert kc.front_settings(settings, server, tmp_path / "run").route_state == mounted
    assert kc.Entrypoint(settings).server.exporter.versions_file == mounted


def test_kiln_serve_keeps_token_auth(tmp_path):
    settings = ServerSettings(tmp_path, tmp_path, [])
    assert "disable_token_authorization" not in settings.config_properties()


def test_nginx_config_is_complete_and_forwards_no_management_route(tmp_path):
    settings, server = container_server(tmp_path, port_offset=10)
    text = kc.nginx_config(settings, server, tmp_path / "run")
    assert not re.search(r"@[A-Z_]+@", text)
    assert f"client_max_body_size {server.max_request_size};" in text
    assert f"listen 0.0.0.0:{8080 + 10};" in text
    upstreams = set(re.findall(r"server 127\.0\.0\.1:(\d+);", text))
    ports = server.ports
    # gRPC goes to the plugin's servers (versions; OIP over gRPC), not to TorchServe's own.
    assert upstreams == {str(p) for p in (ports.inference, ports.oip, ports.metrics,
                                         ports.kiln_grpc, ports.oip_grpc)}
    assert str(ports.management) not in text and str(ports.grpc_management) not in text
    # The handlers' metrics: appended to TorchServe's /metrics, from the exporter's socket.
    socket = Exporter(server.run_dir.resolve()).socket
    assert f"proxy_pass http://unix:{socket}:/metrics;" in text
    assert "add_after_body /kiln-metrics;" in text


@pytest.mark.skipif(not Path(front.NGINX).exists(), reason="nginx is not installed")
def test_nginx_accepts_the_rendered_configuration(tmp_path):
    settings, server = container_server(tmp_path, port_offset=10)
    run = tmp_path / "run"
    (run / "nginx").mkdir(parents=True)
    (run / "nginx" / front.KEYS_LIST).write_text(front.keys_list([front.Key(KEY)]))
    conf = run / "nginx" / "nginx.conf"
    conf.write_text(kc.nginx_config(settings, server, run))
    done = subprocess.run([front.NGINX, "-e", "stderr", "-t", "-p", str(run / "nginx"),
                           "-c", str(conf)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def locations(text: str) -> dict[str, str]:
    """Each exact location of the rendered configuration, by path: its body (none nests)."""
    return {m.group(1): m.group(2)
            for m in re.finditer(r"location = (\S+) \{\n(.*?)\n        \}", text, re.S)}


def test_every_route_open_without_a_key_forwards_only_its_own_path(tmp_path):
    """The class of the /ping bypass: a location that skips the key check and forwards the
    client's URI (proxy_pass without a path forwards it raw) lets that URI reach TorchServe
    under the proxy's token. Each open one rewrites to a fixed path, query dropped."""
    settings, server = container_server(tmp_path, port_offset=10)
    text = kc.nginx_config(settings, server, tmp_path / "run")
    open_map = re.search(r"map \$uri \$kiln_open \{\n(.*?)\n    \}", text, re.S).group(1)
    open_paths = re.findall(r"^\s+(/\S+) 1;$", open_map, re.M)
    assert sorted(open_paths) == sorted([contract.READY_PATH, contract.LIVE_PATH, "/ping",
                                         "/v2/health/ready", "/v2/health/live"])
    found = locations(text)
    for path in [*open_paths, "/metrics", "/kiln-metrics"]:
        body = found[path]
        forwards = re.findall(r"(?:proxy|grpc)_pass (\S+);", body)
        assert forwards, (path, body)
        for target in forwards:
            fixed_in_target = re.fullmatch(r"http://unix:[^:]+:/\w+", target)
            assert fixed_in_target or re.search(r"rewrite \^ /[\w/]+\? break;", body), (path, body)


def test_paths_that_need_normalising_are_refused_on_every_listener(tmp_path):
    settings, server = container_server(tmp_path, port_offset=10)
    text = kc.nginx_config(settings, server, tmp_path / "run")
    servers = text.split("    server {")[1:]
    assert len(servers) == 4
    for block in servers:
        assert "if ($kiln_path_refused) {" in block, block[:200]
    odd = re.search(r'map \$request_uri \$kiln_odd_path \{.*?"~(.*?)" 1;', text, re.S).group(1)
    pattern = re.compile(odd.replace("\\\\\\\\", "\\\\"))
    for path in ["/a/../b", "/a/./b", "/a//b", "/..", "/a/.", "/a%2fb", "/a%2Eb", "/a%5cb",
                 "/a\\b", "/a/..?x=1"]:
        assert pattern.search(path), path
    for path in ["/predictions/lenet", "/predictions/lenet/1.0", "/ping?x=/../y", "/a..b",
                 "/v1/models/lenet:predict", "/a/.b", "/a?x=//"]:
        assert not pattern.search(path), path
