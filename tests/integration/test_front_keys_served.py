"""Keys through Kiln's front proxy, on a server of this module's own: rotation with an overlap in
which old and new keys both work on REST, OIP and gRPC, no restart and no dropped connection,
and clients that keep getting answers while keys that live one minute come and go."""

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from kiln import client as http
from kiln.deploy import front
from kiln.deploy.server import Ports, Server, ServerSettings
from kiln.grpc_client import GrpcClient
from kiln.workspace import Workspace

MODEL = "binary"
ROW = {"instances": [[0.1] * 30]}


@pytest.fixture(scope="module")
def keyed(archives, tmp_path_factory):
    srv = Server(ServerSettings(run_dir=tmp_path_factory.mktemp("keys"),
                                model_store=Workspace.current().model_store,
                                models=[MODEL], ports=Ports.free(), internal_ports=Ports.free()))
    with srv.running(timeout=240):
        yield srv


def rest(server, key, session=None):
    return (session or requests).post(f"{server.url('inference')}/predictions/{MODEL}",
                                      json=ROW, headers={"Authorization": f"Bearer {key}"},
                                      timeout=30).status_code


def oip(server, key):
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 30],
                        "data": [0.1] * 30}]}
    return requests.post(f"{server.url('oip')}/v2/models/{MODEL}/infer", json=body,
                         headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code


def grpc_status(server, key):
    client = GrpcClient(f"127.0.0.1:{server.ports.grpc_inference}", key, timeout=30)
    try:
        return client.predict(MODEL, *http.encode_json(ROW)).status
    finally:
        client.close()


def everywhere(server, key):
    return rest(server, key), oip(server, key), grpc_status(server, key)


def kiln_keys(server, *args):
    done = subprocess.run([sys.executable, "-m", "kiln.cli", "keys", *args, "--run-dir",
                           str(server.run_dir)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_kiln_makes_a_long_key_and_the_front_checks_it(keyed):
    keys = front.read_keys(keyed.run_dir / "keys")
    assert len(keys) == 1 and len(keys[0].value) == 43 and keys[0].expires is None
    assert (keyed.run_dir / "keys").stat().st_mode & 0o777 == 0o600
    assert everywhere(keyed, keys[0].value) == (200, 200, 200)
    wrong = keys[0].value[:-1] + ("A" if keys[0].value[-1] != "A" else "B")
    assert everywhere(keyed, wrong) == (401, 401, 401)
    # TorchServe's own token is the proxy's: a client cannot use it.
    assert rest(keyed, keyed.torchserve_keys()["inference"]) == 401


def test_rotation_keeps_the_old_key_for_the_overlap_then_refuses_it(keyed):
    old = http.read_token(keyed.run_dir)
    with requests.Session() as kept_alive:
        assert rest(keyed, old, kept_alive) == 200
        out = kiln_keys(keyed, "rotate", "--overlap", "4")
        new = http.read_token(keyed.run_dir)
        assert new != old and new not in out and "the others end in 4 s" in out
        rotated = time.monotonic()
        # Both work at once, on every protocol, on a connection opened before the reload too.
        assert everywhere(keyed, old) == (200, 200, 200)
        assert everywhere(keyed, new) == (200, 200, 200)
        assert rest(keyed, old, kept_alive) == 200
        assert time.monotonic() - rotated < 4, "too slow to check the overlap"
        # Its end: 4 s from the rotation, rounded up to a whole second.
        (ends,) = [k.expires for k in front.read_keys(keyed.run_dir / "keys") if k.value == old]
        time.sleep(max(0.0, ends - time.time() + 0.2))
        assert everywhere(keyed, old) == (401, 401, 401)
        assert everywhere(keyed, new) == (200, 200, 200)
        assert rest(keyed, new, kept_alive) == 200
    assert "expired" in kiln_keys(keyed)


def test_clients_keep_answers_while_one_minute_keys_come_and_go(keyed):
    """Keys live 60 s and are rotated every 20 s with a 40 s overlap (what a timer running
    `kiln keys rotate --lifetime 60 --overlap 40` does); a client that reads the keys file
    (kiln.client.KeyFile) sends requests for 70 s: the first key expires under it, and every
    request is answered."""
    path = keyed.run_dir / "keys"
    first = front.rotate(front.read_keys(path), time.time(), overlap_s=0, lifetime_s=60)[-1:]
    front.write_keys(path, first)
    keyed.front.reload()
    stop = threading.Event()
    rotations = []

    def rotate_every_20_s():
        while not stop.wait(20):
            kiln_keys(keyed, "rotate", "--lifetime", "60", "--overlap", "40")
            rotations.append(time.time())

    rotator = threading.Thread(target=rotate_every_20_s, daemon=True)
    rotator.start()
    client = http.Client(keyed.url("inference"), http.KeyFile(path))
    statuses = {}
    end = time.monotonic() + 70
    try:
        while time.monotonic() < end:
            status = client.predict_json(MODEL, ROW).status
            statuses[status] = statuses.get(status, 0) + 1
            time.sleep(0.05)
    finally:
        stop.set()
        rotator.join(timeout=60)
    assert list(statuses) == [200], statuses
    assert len(rotations) >= 3
    assert rest(keyed, first[0].value) == 401  # it lived its minute
    assert rest(keyed, http.read_token(keyed.run_dir)) == 200


def test_a_bad_keys_file_keeps_the_keys_nginx_has(keyed):
    good = http.read_token(keyed.run_dir)
    path = keyed.run_dir / "keys"
    saved = path.read_text()
    try:
        path.write_text("short\n")
        with pytest.raises(front.KeysError, match="too short"):
            keyed.front.reload()
        assert rest(keyed, good) == 200
    finally:
        path.write_text(saved)


def test_kiln_keys_show_prints_the_newest_key_and_list_prints_none(keyed):
    newest = http.read_token(keyed.run_dir)
    assert kiln_keys(keyed, "show") == f"{newest}\n"
    listed = kiln_keys(keyed).splitlines()
    values = [k.value for k in front.read_keys(keyed.run_dir / "keys")]
    assert [line.split()[0] for line in listed] == [f"{v[:6]}..." for v in values]
    assert "in use" in listed[-1]


def test_reading_keys_outside_the_run_folder_is_refused_without_a_file(tmp_path):
    assert http.read_token(Path(tmp_path)) is None
