"""Kiln's metrics exporter as Server runs it: a detached process on a Unix socket, started on
an emptied folder, found again by its pid file, stopped."""

import http.client
import os
import socket
import subprocess
import sys

import pytest

from kiln.deploy import versions
from kiln.deploy.metrics_exporter import MAX_SOCKET_PATH, Exporter, ExporterError

RECORD = """
import os
from kiln.handlers import metrics
metrics.recorder_for("tiny", os.environ, version="1.0").record_batch(5)
"""


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(str(self.path))


def get(exporter, path="/metrics"):
    connection = UnixHTTPConnection(exporter.socket)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        return answer.status, answer.getheader("Content-Type"), answer.read().decode()
    finally:
        connection.close()


@pytest.fixture
def exporter(tmp_path):
    exporter = Exporter(tmp_path)
    try:
        yield exporter
    finally:
        exporter.stop()


def test_started_on_an_emptied_folder_it_serves_what_workers_recorded(exporter):
    exporter.folder.mkdir()
    (exporter.folder / "counter_1.db").write_bytes(b"left by a server before")
    exporter.start()
    assert exporter.pid() is not None
    assert list(exporter.folder.iterdir()) == []
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(exporter.folder))
    subprocess.run([sys.executable, "-c", RECORD], env=env, check=True, timeout=60)

    status, content_type, page = get(exporter)

    assert (status, content_type.split(";")[0]) == (200, "text/plain")
    assert 'kiln_batch_size_requests_sum{model_name="tiny",version="1.0"} 5.0' in page.splitlines()
    assert get(exporter, "/other")[0] == 404


def default_versions(page: str) -> list[str]:
    return [line for line in page.splitlines() if line.startswith("kiln_version_default{")]


def test_it_says_each_model_s_default_version_as_versions_json_does_at_each_scrape(exporter):
    exporter.start()
    assert default_versions(get(exporter)[2]) == []  # no versions.json: nothing
    state = versions.state_file(exporter.run_dir)
    for default in ("1.0", "2.0"):
        with versions.transaction(exporter.run_dir) as entries:
            for v in ("1.0", "2.0"):
                if "lenet" not in entries or v not in entries["lenet"]["versions"]:
                    versions.add(entries, "lenet", v, f"lenet-{v}.mar", digest=v)
                    versions.mark_ready(entries, "lenet", v)
            if entries["lenet"]["default"] != default:
                versions.promote(entries, "lenet", default)
        assert state.exists()
        assert default_versions(get(exporter)[2]) == [
            f'kiln_version_default{{model_name="lenet",version="{default}"}} 1.0']


def test_stop_ends_it_and_forgets_it(exporter):
    exporter.start()
    pid = exporter.pid()
    assert exporter.stop() is True
    assert exporter.pid() is None and not exporter.socket.exists()
    assert not exporter.process.pid_file.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert exporter.stop() is False


def test_a_socket_path_too_long_for_unix_is_refused(tmp_path):
    deep = tmp_path / ("d" * (MAX_SOCKET_PATH - len(str(tmp_path))))
    with pytest.raises(ExporterError, match="longer than a Unix socket path may be"):
        Exporter(deep).start()
