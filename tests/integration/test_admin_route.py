"""The admin route (issue 18): `kiln serve --admin-port`, admin keys that are not inference
keys, the version actions over HTTP on a real TorchServe behind the real front proxy."""

import concurrent.futures
import http.client
import json
import shutil
import stat
import time
from pathlib import Path

import psutil
import pytest
import requests

from kiln.cli.main import main
from kiln.deploy import versions
from kiln.deploy.front import Front
from kiln.deploy.ports import Ports
from kiln.handlers.handler import VERSION_HEADER
from kiln.keys import ADMIN_KEYS_FILE, KEYS_FILE, Key, current, read_keys, write_keys
from kiln.training import train

NAME = "lenet"
SEVEN = Path(__file__).resolve().parent.parent / "fixtures" / "digits" / "7.png"
WAIT_S = 60  # the most a state is waited for
# ... and a deploy's export (parity-gated on lenet's test split) and archive, on 2 cores that
# other tests share.
DEPLOY_WAIT_S = 600


class Admin:
    def __init__(self, ws: Path, flags: list[str], ports: Ports, admin_port: int):
        self.ws, self.flags, self.ports = ws, flags, ports
        self.run = ws / "run"
        self.url = f"http://127.0.0.1:{admin_port}"
        self.port = admin_port

    def key(self) -> str:
        return current(read_keys(self.run / ADMIN_KEYS_FILE)).value

    def inference_key(self) -> str:
        return current(read_keys(self.run / KEYS_FILE)).value

    def post(self, path: str, body=None, key: str | None = None) -> requests.Response:
        return requests.post(f"{self.url}{path}", json=body, timeout=600,
                             headers={"Authorization": f"Bearer {key or self.key()}"})

    def get(self, path: str, key: str | None = None) -> requests.Response:
        return requests.get(f"{self.url}{path}", timeout=60,
                            headers={"Authorization": f"Bearer {key or self.key()}"})

    def predict(self, key: str | None = None) -> requests.Response:
        return requests.post(f"http://127.0.0.1:{self.ports.inference}/predictions/{NAME}",
                             data=SEVEN.read_bytes(), timeout=30,
                             headers={"Authorization": f"Bearer {key or self.inference_key()}",
                                      "Content-Type": "image/png"})

    def audit(self) -> list[dict]:
        path = self.run / "admin_audit.log"
        return [json.loads(line) for line in path.read_text().splitlines()] \
            if path.exists() else []


def kiln(ws, *argv) -> int:
    return main(["--workspace", str(ws), *argv])


@pytest.fixture(scope="module")
def admin(archives, tmp_path_factory):
    """`kiln serve lenet --enable-model-api --no-build --admin-port P` from a workspace whose
    store holds the trained lenet.mar and whose artifacts/lenet holds other weights (2.0)."""
    ws = tmp_path_factory.mktemp("admin-workspace")
    (ws / "model_store").mkdir()
    shutil.copy(archives[NAME], ws / "model_store" / f"{NAME}.mar")
    train.train(train.config_for([NAME, "--out", str(ws / "artifacts" / NAME), "--log-dir",
                                  str(ws / "runs"), "--dry-run", "--seed", "1"]))
    ports, admin_port = Ports.free(), Ports.free().inference
    flags = ["--run-dir", str(ws / "run"), "--store", str(ws / "model_store"),
             *[arg for api, port in vars(ports).items()
               for arg in (f"--{api.replace('_', '-')}-port", str(port))]]
    assert kiln(ws, "serve", NAME, "--enable-model-api", "--no-build", "--admin-port",
                str(admin_port), *flags) == 0
    try:
        yield Admin(ws, flags, ports, admin_port)
    finally:
        kiln(ws, "stop", "--run-dir", str(ws / "run"))


def listening_ports(pid: int) -> set[int]:
    return {c.laddr.port for c in psutil.Process(pid).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN}


def test_the_admin_route_is_off_unless_asked(server):
    """kiln serve without --admin-port: nginx listens on the five public ports only, and no
    admin service runs or admin key is made."""
    p = server.ports
    assert listening_ports(server.front.pid()) == {p.inference, p.oip, p.grpc_inference,
                                                   p.oip_grpc, p.metrics}
    assert server.admin.pid() is None
    assert not (server.run_dir / ADMIN_KEYS_FILE).exists()
    assert not server.admin.socket.exists()


def test_an_admin_key_is_not_an_inference_key_nor_the_other_way(admin):
    assert admin.inference_key() != admin.key()
    assert stat.S_IMODE((admin.run / ADMIN_KEYS_FILE).stat().st_mode) == 0o600
    r = requests.get(f"{admin.url}/models", timeout=30)
    assert (r.status_code, r.json()) == (401, {"error": "missing or unknown admin key"})
    r = admin.get("/models", key=admin.inference_key())
    assert (r.status_code, r.json()) == (401, {"error": "missing or unknown admin key"})
    r = admin.predict(key=admin.key())
    assert (r.status_code, r.json()) == (401, {"error": "missing or unknown key", "code": 401})
    assert admin.predict().status_code == 200
    r = admin.get("/models")
    assert (r.status_code, r.json()) == (200, {"versions": [], "shadows": []})


def wait_for(check, what: str, wait_s: float = WAIT_S):
    deadline = time.monotonic() + wait_s
    while not (found := check()):
        assert time.monotonic() < deadline, f"no {what} within {wait_s} s"
        time.sleep(0.01)
    return found


def test_deploy_through_the_admin_route_and_a_second_action_meanwhile_is_refused(admin):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        deploying = pool.submit(admin.post, f"/models/{NAME}/deploy", {"version": "2.0"})
        # The deploy holds versions.json's lock from its start until its version is warm.
        wait_for(lambda: deploying.done() or versions.load(admin.run).get(NAME, {})
                 .get("versions", {}).get("2.0", {}).get("state") == versions.WARMING,
                 "2.0 warming", DEPLOY_WAIT_S)
        assert not deploying.done(), deploying.result().text
        r = admin.post(f"/models/{NAME}/route", {"weights": {"1.0": 100}})
        assert (r.status_code, r.json()) == (409, {"error": versions.Busy().args[0]})
        done = deploying.result()
    assert (done.status_code, done.json()) == (200, {
        "result": "lenet 2.0 deployed and warm (lenet-2.0.mar); the default is still 1.0"})
    state = versions.load(admin.run)[NAME]
    assert ({v: i["state"] for v, i in state["versions"].items()}, state["route"]) == (
        {"1.0": "ready", "2.0": "ready"}, None)
    listing = admin.get("/models").json()
    assert [(r["version"], r["state"], r["role"], r["weight"]) for r in listing["versions"]] \
        == [("1.0", "ready", "default", 100), ("2.0", "ready", "", 0)]


def test_a_route_through_the_admin_route_reaches_the_routed_answers(admin):
    r = admin.post(f"/models/{NAME}/route", {"weights": {"2.0": 100}})
    assert (r.status_code, r.json()) == (200, {"result": "lenet: unpinned requests follow 2.0=100"})
    assert versions.load(admin.run)[NAME]["route"] == {"2.0": 100.0}
    # The OIP plugin reads versions.json again within 100 ms: from then on, every answer.
    wait_for(lambda: admin.predict().headers[VERSION_HEADER] == "2.0", "answer of 2.0")
    assert [admin.predict().headers[VERSION_HEADER] for _ in range(10)] == ["2.0"] * 10
    r = admin.post(f"/models/{NAME}/route", {"weights": None})
    assert (r.status_code, r.json()) == (200, {"result": "lenet: unpinned requests follow default"})
    wait_for(lambda: admin.predict().headers[VERSION_HEADER] == "1.0", "answer of 1.0")


def test_kiln_route_with_admin_url(admin, monkeypatch, capsys, caplog, tmp_path):
    """The CLI acts through the admin route, printing what it prints locally; no run folder
    of the server is needed."""
    elsewhere = ["--run-dir", str(tmp_path / "no-run")]
    monkeypatch.setenv("KILN_ADMIN_KEY", admin.key())
    assert kiln(admin.ws, "route", NAME, "1.0=50", "2.0=50", "--admin-url", admin.url,
                *elsewhere) == 0
    assert capsys.readouterr().out == "lenet: unpinned requests follow 1.0=50, 2.0=50\n"
    assert versions.load(admin.run)[NAME]["route"] == {"1.0": 50.0, "2.0": 50.0}
    assert kiln(admin.ws, "models", "--admin-url", admin.url, *elsewhere) == 0
    remote = capsys.readouterr().out
    assert kiln(admin.ws, "models", *admin.flags) == 0
    assert remote == capsys.readouterr().out
    # model, version, state, (workers), role, weight, archive
    rows = [line.split() for line in remote.splitlines()[1:]]
    assert [row[:3] + row[4:] for row in rows] == [
        ["lenet", "1.0", "ready", "default", "50", "lenet.mar"],
        ["lenet", "2.0", "ready", "50", "lenet-2.0.mar"]]
    monkeypatch.delenv("KILN_ADMIN_KEY")
    key_file = tmp_path / "admin.key"
    key_file.write_text(admin.key() + "\n")
    key_file.chmod(0o644)
    assert kiln(admin.ws, "route", NAME, "--admin-url", admin.url, "--admin-key-file",
                str(key_file), *elsewhere) == 1
    assert f"{key_file} may be read or changed by others (mode 644)" in caplog.text
    assert versions.load(admin.run)[NAME]["route"] == {"1.0": 50.0, "2.0": 50.0}
    key_file.chmod(0o600)
    assert kiln(admin.ws, "route", NAME, "--admin-url", admin.url, "--admin-key-file",
                str(key_file), *elsewhere) == 0
    assert capsys.readouterr().out == "lenet: unpinned requests follow default\n"
    assert versions.load(admin.run)[NAME]["route"] is None
    # A refusal is the local command's, exit 1.
    assert kiln(admin.ws, "route", NAME, "1.0=60", "--admin-url", admin.url,
                "--admin-key-file", str(key_file), *elsewhere) == 1
    assert "the admin route refused it (400): lenet's weights add up to 60, not 100" \
        in caplog.text


def nginx_pids(admin) -> tuple[int, list[int]]:
    front = Front(admin.run / "nginx", admin.run / KEYS_FILE)
    master = psutil.Process(front.pid())
    return master.pid, sorted(p.pid for p in master.children())


def test_a_rotated_revoked_or_expired_admin_key_is_refused_without_a_reload(admin, capsys):
    before = nginx_pids(admin)
    old = admin.key()
    assert kiln(admin.ws, "keys", "--admin", "rotate", "--overlap", "0", *admin.flags[:2]) == 0
    new = admin.key()
    assert new != old
    # --overlap 0 ends the old key at the next whole second (kiln.keys.rotate): what nginx
    # does for the inference keys.
    wait_for(lambda: admin.get("/models", key=old).status_code == 401, "refusal of the old key")
    assert admin.get("/models", key=new).status_code == 200
    # An expired key, beside a valid one.
    spare = Key("s" * 43)
    write_keys(admin.run / ADMIN_KEYS_FILE, [Key(new, expires=time.time() - 1), spare])
    assert admin.get("/models", key=new).status_code == 401
    assert admin.get("/models", key=spare.value).status_code == 200
    write_keys(admin.run / ADMIN_KEYS_FILE, [Key(new), spare])
    assert admin.get("/models", key=new).status_code == 200
    capsys.readouterr()
    assert kiln(admin.ws, "keys", "--admin", "revoke", new[:6], *admin.flags[:2]) == 0
    assert capsys.readouterr().out == f"{'s' * 6}...  in use\nrevoked: {new[:6]}... is " \
                                      f"refused from now on\n"
    assert admin.get("/models", key=new).status_code == 401
    assert admin.get("/models", key=spare.value).status_code == 200
    assert nginx_pids(admin) == before
    # The inference keys are not touched by any of it.
    assert admin.predict().status_code == 200


def raw(admin, method: str, path: str, body: bytes = b"", headers=None) -> tuple[int, dict]:
    """The request exactly as written (requests would normalise the path)."""
    conn = http.client.HTTPConnection("127.0.0.1", admin.port, timeout=30)
    try:
        conn.request(method, path, body=body or None, headers={
            "Authorization": f"Bearer {admin.key()}", **(headers or {})})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


HOSTILE = [
    ("POST", "/models/lenet/../lenet/promote", b'{"version": "2.0"}', 400),
    ("POST", "/models/lenet/%2e%2e/lenet/promote", b'{"version": "2.0"}', 400),
    ("POST", "/models//lenet/promote", b'{"version": "2.0"}', 400),
    ("POST", "/models%2flenet%2fpromote", b'{"version": "2.0"}', 400),
    ("POST", "/models/lenet/promote/.", b'{"version": "2.0"}', 400),
    ("POST", "/models/lenet/promote%5c", b'{"version": "2.0"}', 400),
    ("POST", "/models/lenet/promote?" + "x" * 5000, b'{"version": "2.0"}', 414),
    ("POST", "/models/lenet/explode", b"{}", 404),
    ("POST", "/models/lenet", b'{"version": "2.0"}', 404),
    ("POST", "/admin", b"{}", 404),
    ("GET", "/models/lenet", b"", 404),
    ("DELETE", "/models/lenet/promote", b"", 405),
    ("POST", "/models/lenet/promote", b'{"version": "2.0", "pad": "' + b"x" * 100_000 + b'"}', 413),
    ("POST", "/models/lenet/promote", b'{"version": ', 400),
    ("POST", "/models/lenet/promote", b'["2.0"]', 400),
    ("POST", "/models/lenet/promote", b'{"version": "2.0", "force": true}', 400),
    ("POST", "/models/lenet/promote", b'{"version": 2}', 400),
    ("POST", "/models/lenet/promote", b'{"version": "../2.0"}', 400),
    ("POST", "/models/lenet/route", b'{"weights": {"1.0": "all"}}', 400),
    ("POST", "/models/lenet/shadow", b'{"version": "2.0", "fraction": 2}', 400),
    ("POST", "/models/nosuch/promote", b'{"version": "2.0"}', 400),
]


@pytest.mark.parametrize(("method", "path", "body", "expected"), HOSTILE,
                         ids=[f"{m} {p[:40]} {b[:20]!r}" for m, p, b, _ in HOSTILE])
def test_hostile_admin_requests_are_4xx_and_change_nothing(admin, method, path, body, expected):
    """Odd and long paths are refused by nginx as on the other ports, a large body too; the
    service refuses the rest, naming what is wrong."""
    before, audited = versions.state_file(admin.run).read_bytes(), len(admin.audit())
    status, answer = raw(admin, method, path, body, {"Content-Type": "application/json"})
    assert (status, type(answer["error"])) == (expected, str), answer
    assert versions.state_file(admin.run).read_bytes() == before
    # Never an action: at most a refusal is audited.
    assert all(line["status"] != 200 for line in admin.audit()[audited:])


def test_promote_rollback_and_retire_through_the_admin_route(admin):
    steps = [("promote", {"version": "2.0"}, 200, "lenet: 2.0 is the default (was 1.0)"),
             ("rollback", {}, 200, "lenet: rolled back to 1.0"),
             ("retire", {"version": "1.0"}, 400,
              "lenet 1.0 is the default: promote another version first"),
             ("shadow", {"version": "2.0", "fraction": 0.5}, 200,
              "lenet 2.0 shadows 0.5 of the routed requests"),
             ("retire", {"version": "2.0"}, 200, "lenet 2.0 retired")]
    got = []
    for action, body, _, _ in steps:
        r = admin.post(f"/models/{NAME}/{action}", body)
        got.append((action, body, r.status_code, r.json().get("result") or r.json()["error"]))
    assert got == steps
    assert list(versions.load(admin.run)[NAME]["versions"]) == ["1.0"]


def test_the_audit_log_says_each_action_and_holds_no_key(admin):
    path = admin.run / "admin_audit.log"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    lines = admin.audit()
    assert set(lines[0]) == {"time", "key", "action", "model", "arguments", "status", "outcome"}
    assert [(a["action"], a["status"]) for a in lines if a["status"] in (200, 409)][:3] == [
        ("route", 409), ("deploy", 200), ("route", 200)]
    assert lines[-1] == {**lines[-1], "key": admin.key()[:6], "action": "retire",
                         "model": NAME, "arguments": {"version": "2.0"}, "status": 200,
                         "outcome": "lenet 2.0 retired"}
    for key in read_keys(admin.run / ADMIN_KEYS_FILE) + read_keys(admin.run / KEYS_FILE):
        assert key.value not in text


def test_kiln_keys_revoke_ends_an_inference_key_at_once(admin, capsys):
    """The same revoke for the inference keys: the running front proxy takes it."""
    old = admin.inference_key()
    assert kiln(admin.ws, "keys", "rotate", *admin.flags[:2]) == 0
    new = admin.inference_key()
    capsys.readouterr()
    assert kiln(admin.ws, "keys", "revoke", old[:8], *admin.flags[:2]) == 0
    assert capsys.readouterr().out == f"{new[:6]}...  in use\nrevoked: {old[:6]}... is " \
                                      f"refused from now on\n"
    r = admin.predict(key=old)
    assert (r.status_code, r.json()) == (401, {"error": "missing or unknown key", "code": 401})
    assert admin.predict().status_code == 200
