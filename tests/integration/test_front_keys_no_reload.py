"""Key changes reach a running front proxy without a reload (issue 18): under load from
kept-alive clients, rotations close no connection and nginx keeps its master and its worker; a
key the front no longer holds is refused, and a new one accepted, on the next request after the
change returns, on a connection opened before it."""

import subprocess
import sys
import time

import pytest
import requests

from kiln.deploy import front
from kiln.deploy.server import Ports, Server, ServerSettings
from kiln.loadtests.studies import reload_keepalive
from kiln.workspace import Workspace


@pytest.fixture(scope="module")
def served(archives, tmp_path_factory):
    srv = Server(ServerSettings(run_dir=tmp_path_factory.mktemp("keys-live"),
                                model_store=Workspace.current().model_store,
                                models=[reload_keepalive.MODEL], ports=Ports.free(),
                                internal_ports=Ports.free()))
    with srv.running(timeout=240):
        yield srv


def status(session: requests.Session, server: Server, authorization: str) -> int:
    # Answered by nginx itself once the key is checked: the check alone, no model.
    return session.get(f"{server.url('inference')}/kiln-oip",
                       headers={"Authorization": authorization}, timeout=10).status_code


def test_rotations_under_kept_alive_load_close_nothing_and_reload_nothing(served):
    figures = reload_keepalive.measure(served, seconds=6, rotations=4)
    print(figures)
    assert figures["wrk_socket_errors"] == 0
    assert list(figures["wrk_statuses"]) == [200]
    assert figures["idle_ok"] > 0
    assert (figures["idle_failed"], figures["idle_closed_by_server"]) == (0, 0)
    assert figures["nginx_pids_unchanged"]
    keys = front.read_keys(served.front.keys_file)
    assert len(keys) == 5  # each rotation was taken: the newest key is the fourth one made
    with requests.Session() as session:
        assert status(session, served, f"Bearer {keys[-1].value}") == 200


def kiln_keys(server: Server, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "kiln.cli", "keys", *args, "--run-dir",
                           str(server.run_dir)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_revoked_key_is_refused_and_a_new_one_accepted_once_kiln_keys_returns(served):
    pids = reload_keepalive.nginx_pids(served)
    old = served.keys()["inference"]
    with requests.Session() as kept_alive:
        assert status(kept_alive, served, f"Bearer {old}") == 200
        kiln_keys(served, "rotate", "--overlap", "3600")
        new = served.keys()["inference"]
        assert status(kept_alive, served, f"Bearer {new}") == 200
        assert status(kept_alive, served, f"Bearer {old}") == 200  # its overlap
        kiln_keys(served, "revoke", old)
        assert status(kept_alive, served, f"Bearer {old}") == 401
        assert status(kept_alive, served, f"Bearer {new}") == 200
        newest = front.Key(front.new_key())
        started = time.monotonic()
        served.front.apply([newest])  # what kiln keys does, without a command's start
        print(f"nginx took the keys {1000 * (time.monotonic() - started):.0f} ms after the "
              f"change began")
        assert status(kept_alive, served, f"Bearer {new}") == 401
        assert status(kept_alive, served, f"Bearer {newest.value}") == 200
    assert reload_keepalive.nginx_pids(served) == pids
    assert front.read_keys(served.front.keys_file) == [newest]


def test_the_key_is_the_whole_header_and_case_sensitive(served):
    key = served.keys()["inference"]
    wrong_case = key.swapcase() if key.swapcase() != key else key + "a"
    answers = {header: 200 for header in (f"Bearer {key}", f"bearer {key}")}
    answers |= {header: 401 for header in (
        f"BEARER {key}", f"Bearer {wrong_case}", f"Bearer  {key}", f"Bearer {key}x",
        f"Bearer {key[:-1]}", key, f"Basic {key}", f"Bearer {key} 1.5", "Bearer")}
    with requests.Session() as session:
        assert {h: status(session, served, h) for h in answers} == answers
