"""kiln-container with a mounted versions file (issue 18): it serves the versions the file
records, routes as it says, and follows a change of the file without a restart, as a
Kubernetes ConfigMap mounted as a folder is swapped.

(Its 2.0 is 1.0's archive under another version: what is checked is which version answers.)"""

import json
import shutil
import time
from pathlib import Path

import pytest
import requests
from container_harness import KEY_1, Container

from kiln.client import encode_file
from kiln.handlers.handler import VERSION_HEADER
from kiln.model_store import with_version
from kiln.model_store.build import ensure_built

MODEL = "lenet"
SEVEN = Path(__file__).resolve().parents[1] / "fixtures" / "digits" / "7.png"


def state(route: dict | None, recorded=("1.0", "2.0")) -> dict:
    archives = {"1.0": f"{MODEL}.mar", "2.0": f"{MODEL}-2.0.mar"}
    return {MODEL: {"versions": {v: {"archive": archives[v], "digest": "", "state": "ready"}
                                 for v in recorded},
                    "default": "1.0", "previous": None, "route": route, "shadows": {}}}


def mount(path: Path, content: dict) -> None:
    """As the kubelet updates a mounted ConfigMap: the new file replaces the old at once."""
    tmp = path.with_name(".versions.tmp")
    tmp.write_text(json.dumps(content))
    tmp.replace(path)


@pytest.fixture(scope="module")
def versioned(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    shutil.copy(ensure_built(MODEL), store / f"{MODEL}.mar")
    with_version(store / f"{MODEL}.mar", store / f"{MODEL}-2.0.mar", "2.0")
    mounted = tmp_path_factory.mktemp("configmap") / "versions.json"
    mount(mounted, state({"2.0": 100}))
    box = Container(tmp_path_factory.mktemp("container"), store=store,
                    args=("--versions-file", str(mounted)), model=MODEL)
    try:
        box.wait_ready(timeout=240)
        yield box, mounted
    finally:
        box.kill()


def predict(box: Container, path: str) -> requests.Response:
    body, content_type = encode_file(SEVEN)
    return requests.post(box.url("http", path), data=body, timeout=30,
                         headers={"Content-Type": content_type,
                                  "Authorization": f"Bearer {KEY_1}"})


def answered_by(box: Container, path: str) -> str:
    r = predict(box, path)
    assert r.status_code == 200, r.text
    return r.headers[VERSION_HEADER]


def eventually(check, timeout: float = 5.0) -> None:
    """The plugin rereads the file every 100 ms at most."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the file's change was not followed"


def test_the_versions_the_file_records_are_served_and_routed_as_it_says(versioned):
    box, _ = versioned
    assert [answered_by(box, f"/predictions/{MODEL}") for _ in range(20)] == ["2.0"] * 20
    assert answered_by(box, f"/predictions/{MODEL}/1.0") == "1.0"
    page = requests.get(box.url("metrics", "/metrics"), timeout=10).text
    assert f'kiln_version_default{{model_name="{MODEL}",version="1.0"}} 1.0' in page.splitlines()


def test_a_change_of_the_mounted_file_is_followed_without_a_restart(versioned):
    box, mounted = versioned
    pid = box.process.pid
    try:
        mount(mounted, state(None, recorded=("1.0",)))
        eventually(lambda: answered_by(box, f"/predictions/{MODEL}") == "1.0")
        r = predict(box, f"/predictions/{MODEL}/2.0")
        assert (r.status_code, r.json()["error"]) == (
            404, f"model '{MODEL}' version '2.0' is not served: it is not in the versions file "
                 "(retired)")
        assert box.process.poll() is None and box.process.pid == pid
    finally:
        mount(mounted, state({"2.0": 100}))
