"""kiln deploy, promote, rollback, retire and a restart, on a real TorchServe serving lenet
(its 1.0 the workspace's trained weights, its 2.0 a one-batch run with another seed)."""

import concurrent.futures
import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from kiln.cli.main import main
from kiln.deploy import lifecycle, versions
from kiln.deploy.ports import INTERNAL_PORTS_FILE, Ports
from kiln.deploy.server import Server, ServerSettings
from kiln.handlers import limits
from kiln.model_store import archived_digest
from kiln.training import export, train

NAME = "lenet"


@pytest.fixture(scope="module")
def served(archives, tmp_path_factory):
    """`kiln serve lenet --enable-model-api --no-build` from a workspace of its own whose
    store holds the trained lenet.mar and whose artifacts/lenet holds other weights."""
    ws = tmp_path_factory.mktemp("workspace")
    (ws / "model_store").mkdir()
    shutil.copy(archives[NAME], ws / "model_store" / f"{NAME}.mar")
    train.train(train.config_for([NAME, "--out", str(ws / "artifacts" / NAME), "--log-dir",
                                  str(ws / "runs"), "--dry-run", "--seed", "1"]))
    ports = Ports.free()
    flags = ["--run-dir", str(ws / "run"), "--store", str(ws / "model_store"),
             *[arg for api, port in vars(ports).items()
               for arg in (f"--{api.replace('_', '-')}-port", str(port))]]
    assert kiln(ws, "serve", NAME, "--enable-model-api", "--no-build", *flags) == 0
    try:
        yield ws, flags
    finally:
        kiln(ws, "stop", "--run-dir", str(ws / "run"))


def kiln(ws, *argv) -> int:
    return main(["--workspace", str(ws), *argv])


def management(ws):
    server = Server(ServerSettings(ws / "run", ws / "model_store", [NAME],
                                   Ports.saved(ws / "run")))
    token = server.torchserve_keys()["management"]
    return lambda path: requests.get(f"{server.url('management')}{path}", timeout=10,
                                     headers={"Authorization": f"Bearer {token}"}).json()


def served_versions(ws) -> dict[str, str]:
    """{version: the archive TorchServe serves it from}, and under "default" the default."""
    ask = management(ws)
    out = {d["modelVersion"]: d["modelUrl"] for d in ask(f"/models/{NAME}/all")}
    return {**out, "default": ask(f"/models/{NAME}")[0]["modelVersion"]}


def test_a_deploy_failing_its_parity_gate_changes_nothing(served, monkeypatch, caplog):
    ws, flags = served
    real = export.run_onnx
    monkeypatch.setitem(export.RUNNERS, "onnx",
                        lambda path, xs, names: real(path, xs, names) + 2e-4)
    before = served_versions(ws)
    assert kiln(ws, "deploy", NAME, "--version", "2.0", *flags) == 1
    assert "the parity gate failed: onnx: max |diff| 0.0002" in caplog.text
    assert "nothing was deployed" in caplog.text
    assert served_versions(ws) == before == {"1.0": "lenet.mar", "default": "1.0"}
    assert not versions.state_file(ws / "run").exists()
    assert sorted(p.name for p in (ws / "model_store").iterdir()) == ["lenet.mar"]
    assert sorted(p.name for p in (ws / "artifacts" / NAME).iterdir()) == [
        "checkpoint.pt", "meta.json", "state_dict.pt"]


def test_deploy_registers_and_warms_the_new_version_beside_the_default(served, capsys,
                                                                        caplog):
    ws, flags = served
    assert kiln(ws, "deploy", NAME, "--version", "2.0", *flags) == 0
    assert "lenet 2.0 deployed and warm (lenet-2.0.mar); the default is still 1.0" in \
        capsys.readouterr().out
    assert served_versions(ws) == {"1.0": "lenet.mar", "2.0": "lenet-2.0.mar",
                                   "default": "1.0"}
    store = ws / "model_store"
    state = versions.load(ws / "run")
    assert state == {NAME: {
        "versions": {
            "1.0": {"archive": "lenet.mar", "digest": archived_digest(store / "lenet.mar"),
                    "state": "ready"},
            "2.0": {"archive": "lenet-2.0.mar",
                    "digest": archived_digest(store / "lenet-2.0.mar"), "state": "ready"}},
        "default": "1.0", "previous": None, "route": None, "shadows": {}}}
    # Another seed: other weights, so another digest.
    assert state[NAME]["versions"]["1.0"]["digest"] != state[NAME]["versions"]["2.0"]["digest"]
    # Deploying the same weights again changes nothing.
    assert kiln(ws, "deploy", NAME, "--version", "2.0", *flags) == 0
    assert "already deployed with these weights: nothing to do" in capsys.readouterr().out
    assert versions.load(ws / "run") == state
    # The declaration's version, 1.0, is served with the trained weights, not these.
    assert kiln(ws, "deploy", NAME, *flags) == 1
    assert "lenet 1.0 is already served with other weights" in caplog.text
    assert versions.load(ws / "run") == state
    assert sorted(p.name for p in store.iterdir()) == ["lenet-2.0.mar", "lenet.mar"]


def test_promote_then_a_restart_brings_the_versions_back(served, capsys):
    ws, flags = served
    assert kiln(ws, "promote", NAME, "2.0", *flags) == 0
    assert served_versions(ws)["default"] == "2.0"
    assert kiln(ws, "stop", "--run-dir", str(ws / "run")) == 0
    # No --enable-model-api: versions.json turns it on.
    assert kiln(ws, "serve", NAME, "--no-build", *flags) == 0
    assert served_versions(ws) == {"1.0": "lenet.mar", "2.0": "lenet-2.0.mar",
                                   "default": "2.0"}
    assert kiln(ws, "models", *flags) == 0
    table = capsys.readouterr().out.splitlines()[-2:]
    assert [line.split()[:6] for line in table] == [
        ["lenet", "1.0", "ready", "2/2", "previous", "0"],
        ["lenet", "2.0", "ready", "2/2", "default", "100"]]


IN_FLIGHT = 24


@contextlib.contextmanager
def in_flight(ws, v):
    """IN_FLIGHT requests pinned to version `v` (large images: they take a while), sent
    straight to TorchServe; inside the block at least one was answered and others are still
    in flight; after it, the answers (a request that was never answered raises)."""
    target = lifecycle.Target.of(ws / "run", ws / "model_store")
    # Under the pixels past which a worker in debt answers 503 (handlers/limits.py).
    side = int(limits.CHEAP_REQUEST_PIXELS ** 0.5) - 24
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side), dtype=np.uint8)
                    ).save(png, format="PNG")
    url = f"{target.inference_url}/predictions/{NAME}/{v}"
    headers = {"Authorization": f"Bearer {target.inference_token}",
               "Content-Type": "image/png"}
    answers = []
    with concurrent.futures.ThreadPoolExecutor(IN_FLIGHT) as pool:
        jobs = [pool.submit(requests.post, url, data=png.getvalue(), headers=headers,
                            timeout=30) for _ in range(IN_FLIGHT)]
        first = next(concurrent.futures.as_completed(jobs))
        assert first.result().status_code == 200
        assert not all(job.done() for job in jobs)
        yield answers
        answers.extend(job.result() for job in jobs)


def front_proxy(ws):
    """POST one image through the front proxy: path -> the answer."""
    server = Server(ServerSettings(ws / "run", ws / "model_store", [NAME],
                                   Ports.saved(ws / "run"),
                                   internal_ports=Ports.saved(ws / "run", INTERNAL_PORTS_FILE)))
    headers = {"Authorization": f"Bearer {server.keys()['inference']}",
               "Content-Type": "image/png"}
    body = (Path(__file__).resolve().parent.parent / "fixtures" / "digits" / "7.png").read_bytes()
    return lambda path: requests.post(f"{server.url('inference')}{path}", data=body,
                                      headers=headers, timeout=30)


def test_rollback_and_retire(served, caplog, monkeypatch):
    ws, flags = served
    post = front_proxy(ws)
    seen_while_draining = []
    real_drain = lifecycle.drain

    def drain(target, name, v):
        """What clients get once retire drains: the route no longer reaches 2.0 (a
        rollback just before left the plugin up to 100 ms of the old default) and requests
        pinned to it are refused."""
        unpinned = [post(f"/predictions/{NAME}") for _ in range(10)]
        seen_while_draining.extend({(r.status_code, r.headers.get("X-Kiln-Model-Version"))
                                    for r in unpinned})
        pinned = post(f"/predictions/{NAME}/{v}")
        seen_while_draining.append((pinned.status_code, pinned.json()["error"]))
        real_drain(target, name, v)

    monkeypatch.setattr(lifecycle, "drain", drain)
    assert kiln(ws, "rollback", NAME, *flags) == 0
    assert served_versions(ws)["default"] == "1.0"
    assert kiln(ws, "retire", NAME, "1.0", *flags) == 1
    assert "lenet 1.0 is the default: promote another version first" in caplog.text
    with in_flight(ws, "2.0") as answers:
        assert kiln(ws, "retire", NAME, "2.0", *flags) == 0
    # What 2.0 held when it was retired was answered, not dropped.
    assert [(a.status_code, a.text[:150]) for a in answers if a.status_code != 200] == []
    assert [a.status_code for a in answers] == [200] * IN_FLIGHT
    assert served_versions(ws) == {"1.0": "lenet.mar", "default": "1.0"}
    assert not (ws / "model_store" / "lenet-2.0.mar").exists()
    assert json.loads(versions.state_file(ws / "run").read_text())[NAME]["versions"].keys() \
        == {"1.0"}
    assert seen_while_draining == [(200, "1.0"), (404, "model 'lenet' version '2.0' is not "
                                   "served: it is not in the versions file (retired)")]
    assert kiln(ws, "retire", NAME, "1.0", *flags) == 1
    assert "its last version" in caplog.text
