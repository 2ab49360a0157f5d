"""A real TorchServe on free loopback ports, serving archives built the way `make serve` does,
and a real Prometheus scraping it."""

import logging
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from kiln import client as http
from kiln import declaration
from kiln.deploy.server import Ports, Server, ServerSettings
from kiln.model_store.build import ensure_built
from kiln.workspace import Workspace

MODELS = declaration.default_set()
log = logging.getLogger("kiln.tests")

PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")
SCRAPE_INTERVAL = "1s"


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def archives():
    """Train, export and archive what is missing (reuses what `make serve` built)."""
    return {name: ensure_built(name) for name in MODELS}


@pytest.fixture(scope="session")
def server(archives, tmp_path_factory):
    # As kiln serve runs it: Kiln's front proxy on the public ports, TorchServe behind it;
    # derived for as many cores as models (one worker each on any machine: tests find a
    # model's worker by its pid).
    srv = Server(ServerSettings(run_dir=tmp_path_factory.mktemp("torchserve"),
                                model_store=Workspace.current().model_store,
                                models=MODELS, ports=Ports.free(),
                                internal_ports=Ports.free(), cores=len(MODELS)))
    with srv.running(timeout=240):
        yield srv


@pytest.fixture(scope="session")
def client(server):
    return http.Client(server.url("inference"), server.keys()["inference"])


# --- a Prometheus of our own ------------------------------------------------------------


def install_prometheus():
    """Debian's prometheus package (prometheus and promtool), installed when missing."""
    if PROMETHEUS.exists() and PROMTOOL.exists():
        return
    log.info("installing Debian's prometheus package")
    root = [] if os.geteuid() == 0 else ["sudo", "-n"]
    for command in (["apt-get", "update"],
                    ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]):
        done = subprocess.run([*root, "env", "DEBIAN_FRONTEND=noninteractive", *command],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed; install the prometheus package:\n"
                        f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
    if Path("/run/systemd/system").exists():
        # The package also starts a system-wide Prometheus on port 9090 of every interface.
        subprocess.run([*root, "systemctl", "disable", "--now", "prometheus"],
                       capture_output=True, timeout=60)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape_config(target, labels=None):
    """`labels`: added to every series, as Kubernetes service discovery adds namespace and pod."""
    host_port = target.split("://", 1)[1]
    extra = "".join(f"          {k}: '{v}'\n" for k, v in (labels or {}).items())
    return (f"global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  scrape_timeout: {SCRAPE_INTERVAL}\n"
            f"scrape_configs:\n  - job_name: torchserve\n"
            f"    static_configs:\n      - targets: ['{host_port}']\n"
            + (f"        labels:\n{extra}" if extra else ""))


class Prometheus:
    def __init__(self, folder, target, labels=None):
        (folder / "prometheus.yml").write_text(scrape_config(target, labels))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = folder / "prometheus.log"
        with open(self.log_path, "w") as out:
            self.process = subprocess.Popen(
                [str(PROMETHEUS), f"--config.file={folder / 'prometheus.yml'}",
                 f"--storage.tsdb.path={folder / 'data'}",
                 f"--web.listen-address={self.url.split('://')[1]}"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        pytest.fail(f"prometheus not ready after {timeout}s")

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def query(self, expr, at=None):
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        r = requests.get(f"{self.url}/api/v1/query", params=params, timeout=10)
        body = r.json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expr, at):
        """The one number `expr` gives at `at` (a sample's timestamp, so nothing is stale)."""
        result = self.query(expr, at)
        assert len(result) == 1, f"{expr}: {result}"
        return float(result[0]["value"][1])

    def scrape_after(self, moment, timeout=15):
        """The timestamp of the first successful scrape of TorchServe at or after `moment`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.query('timestamp(up{job="torchserve"})')
            if result and float(result[0]["value"][1]) >= moment:
                scraped = float(result[0]["value"][1])
                assert self.value('up{job="torchserve"}', scraped) == 1.0
                return scraped
            time.sleep(0.2)
        pytest.fail(f"no scrape of TorchServe after {moment} within {timeout}s")


@pytest.fixture(scope="session")
def promtool():
    install_prometheus()
    return PROMTOOL


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    """A Prometheus of the test module's own, scraping the fixture server every second."""
    install_prometheus()
    prom = Prometheus(tmp_path_factory.mktemp("prometheus"), server.url("metrics"))
    try:
        prom.wait_ready()
        yield prom
    finally:
        prom.stop()
