"""The bare proxy of kiln bench's floor row: a real nginx in front of a real HTTP server,
forwarding the client's request as it is with the upstream's key in place of the client's."""

import http.server
import json
import os
import stat
import threading

import pytest
import requests

from kiln.deploy import supervise
from kiln.loadtests.bare_proxy import BareProxy

pytestmark = pytest.mark.skipif(not os.access(supervise.NGINX, os.X_OK),
                                reason="needs Debian's nginx")


class Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        answer = json.dumps({"path": self.path, "body": body.decode(),
                             "authorization": self.headers.get("Authorization"),
                             "connection": self.headers.get("Connection")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


@pytest.fixture
def upstream():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_forwards_path_and_body_with_the_upstreams_key_over_kept_alive_connections(
        upstream, tmp_path):
    with BareProxy(tmp_path / "bare", upstream, "upstream-key") as proxy:
        with requests.Session() as s:
            answers = [s.post(f"{proxy.url}/predictions/lenet?x=1", data=f"body {i}",
                              headers={"Authorization": "Bearer client-key"}, timeout=10)
                       for i in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert [a.json() for a in answers] == [
            {"path": "/predictions/lenet?x=1", "body": f"body {i}",
             "authorization": "Bearer upstream-key", "connection": None} for i in range(3)]
        (worker,) = proxy.processes()[1:]
        assert proxy.processes()[0].pid == proxy.proc.pid and worker.ppid() == proxy.proc.pid
        # The key is in its config: the folder is its owner's alone.
        assert stat.S_IMODE((tmp_path / "bare").stat().st_mode) == 0o700
    assert proxy.proc.poll() is not None


def test_without_a_key_the_clients_header_passes(upstream, tmp_path):
    with BareProxy(tmp_path / "bare", upstream, None) as proxy:
        answer = requests.post(f"{proxy.url}/x", data="b",
                               headers={"Authorization": "Bearer client-key"}, timeout=10)
    assert answer.json()["authorization"] == "Bearer client-key"
