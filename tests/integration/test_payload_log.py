"""The sampled payload log and kiln replay (issue 19, goal 4) on a real TorchServe behind
Kiln's front proxy: what is logged on REST, OIP (JSON and binary) and gRPC, its bounds, a
full disk, and replay against the logged version and against another one."""

import base64
import json
import shutil
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from kiln.deploy import lifecycle
from kiln.deploy.server import Ports, Server, ServerSettings
from kiln.grpc_client import GrpcClient
from kiln.handlers import payload_log
from kiln.model_store import with_version
from kiln.workspace import Workspace

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
DIGITS = sorted((FIXTURES / "digits").glob("[0-9].png"))
MODEL = "lenet"
# Version 2.0 answers 1 where 1.0 answers 0 and 0 where it answers 1 (its last layer's rows
# for these two classes swapped), and agrees everywhere else.
SWAPPED = ("0", "1")


def swapped_archive(source: Path, store: Path) -> Path:
    """lenet 2.0: `source` as version 2.0 with classes 0 and 1 swapped in the last layer of
    its graph."""
    second = with_version(source, store / "second.tmp", "2.0")
    out = store / f"{MODEL}-2.0.mar"
    with zipfile.ZipFile(second) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            data = zin.read(item)
            zout.writestr(item, swap_classes(data) if item.filename == "model.onnx" else data)
    second.unlink()
    return out


def swap_classes(model_bytes: bytes) -> bytes:
    graph = onnx.load_from_string(model_bytes)
    last = [n for n in graph.graph.node if n.op_type == "Gemm"][-1]
    initializers = {i.name: i for i in graph.graph.initializer}
    for name in last.input[1:3]:  # the weight (transB: one row per class) and the bias
        tensor = initializers[name]
        values = onnx.numpy_helper.to_array(tensor).copy()
        values[[0, 1]] = values[[1, 0]]
        tensor.CopyFrom(onnx.numpy_helper.from_array(values, name))
    return graph.SerializeToString()


def logged_server(tmp_path_factory, store, **settings):
    return Server(ServerSettings(run_dir=tmp_path_factory.mktemp("payload-run"),
                                 model_store=store, models=[MODEL], ports=Ports.free(),
                                 internal_ports=Ports.free(), **settings))


def auth(srv):
    return {"Authorization": f"Bearer {srv.keys()['inference']}"}


def payload_counts(srv, version="1.0"):
    """{records, errors, dropped}: the payload log's counters on the metrics port."""
    page = requests.get(f"{srv.url('metrics')}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(page):
        for s in family.samples:
            if s.name.startswith("kiln_payload_log_") and s.labels.get("version") == version:
                short = s.name.removeprefix("kiln_payload_log_").removesuffix("_total")
                out[short] = out.get(short, 0) + s.value
    return out


def log_lines(folder: Path) -> list[dict]:
    """The records of a payload log folder, oldest first."""
    out = []
    for i in range(payload_log.DEFAULT_FILES, -1, -1):
        path = folder / payload_log.rotated_name(i)
        if path.exists():
            out += [json.loads(line) for line in path.read_text().splitlines()]
    return out


def pixels(png: Path):
    return np.asarray(Image.open(png), dtype=np.float32)


def rest(srv, body, content_type, request_id):
    r = requests.post(f"{srv.url('inference')}/predictions/{MODEL}", data=body, timeout=30,
                      headers={**auth(srv), "Content-Type": content_type,
                               "X-Request-ID": request_id})
    return r


def oip_json_body(png):
    return json.dumps({"inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "FP32",
                                   "data": pixels(png).ravel().tolist()}]}).encode()


def oip_binary_body(png):
    values = pixels(png).astype("<f4").tobytes()
    head = json.dumps({"inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(values)}}]}).encode()
    return head + values, len(head)


def oip_label(answer):
    return next(t["data"][0] for t in answer["outputs"] if t["name"] == "label")


def send_traffic(srv):
    """Each digit on REST and OIP JSON, a 7 as OIP binary tensors, a 3 on gRPC and one bad
    REST body. Returns [(protocol, body, labels the client got or None, answer)]."""
    sent = []
    for png in DIGITS:
        r = rest(srv, png.read_bytes(), "image/png", f"rest-{png.stem}")
        assert r.status_code == 200, r.text
        sent.append(("rest", png.read_bytes(), r.json()["label"], r.json()))
    for png in DIGITS:
        body = oip_json_body(png)
        r = requests.post(f"{srv.url('oip')}/v2/models/{MODEL}/infer", data=body, timeout=30,
                          headers={**auth(srv), "Content-Type": "application/json",
                                   "X-Request-ID": f"oip-{png.stem}"})
        assert r.status_code == 200, r.text
        sent.append(("oip", body, oip_label(r.json()), r.json()))
    body, head = oip_binary_body(DIGITS[7])
    r = requests.post(f"{srv.url('oip')}/v2/models/{MODEL}/infer", data=body, timeout=30,
                      headers={**auth(srv), "Inference-Header-Content-Length": str(head),
                               "X-Request-ID": "oip-binary"})
    assert r.status_code == 200, r.text
    sent.append(("oip-binary", body, oip_label(r.json()), r.json()))
    with GrpcClient(f"127.0.0.1:{srv.ports.grpc_inference}", srv.keys()["inference"]) as g:
        answer = g.predict(MODEL, DIGITS[3].read_bytes(), "image/png")
    assert answer.status == 200, answer
    sent.append(("grpc", DIGITS[3].read_bytes(), answer.body["label"], answer.body))
    r = rest(srv, b"garbage", "application/json", "bad-1")
    assert r.status_code == 400, r.text
    sent.append(("rest", b"garbage", None, r.json()))
    return sent


@pytest.fixture(scope="module")
def two_versions(archives, tmp_path_factory):
    """lenet 1.0 and its swapped 2.0 side by side, every request logged; the traffic sent,
    the log as it was after it (a copy: replaying adds records), the counters then."""
    store = tmp_path_factory.mktemp("payload-store")
    shutil.copy(archives[MODEL], store / f"{MODEL}.mar")
    second = swapped_archive(archives[MODEL], store)
    srv = logged_server(tmp_path_factory, store, enable_model_api=True, cores=2,
                        payload_log=1.0)
    with srv.running(timeout=240):
        target = lifecycle.Target.of(srv.run_dir, store)
        target.management.register(second.name, target.management.describe(MODEL, "1.0"))
        sent = send_traffic(srv)
        copy = tmp_path_factory.mktemp("payload-copy") / "log.jsonl"
        records = log_lines(srv.settings.payload_dir())
        copy.write_text("".join(json.dumps(r) + "\n" for r in records))
        yield srv, sent, copy, payload_counts(srv)


def test_every_request_is_logged_once_with_its_body_and_answer(two_versions):
    srv, sent, copy, counts = two_versions
    records = [json.loads(line) for line in copy.read_text().splitlines()]
    assert len(records) == len(sent) == 23
    assert counts == {"records": 23, "errors": 0, "dropped": 0}
    for r in records:
        assert r.pop("time").endswith("Z")
        assert r.pop("latency_ms") > 0
        assert (r.pop("model"), r.pop("version")) == (MODEL, "1.0")
    by_id = {r["request_id"]: r for r in records if r["protocol"] == "rest"}
    assert sorted(by_id) == sorted([f"rest-{p.stem}" for p in DIGITS] + ["bad-1"])
    seven = sent[7]
    assert by_id["rest-7"] == {"request_id": "rest-7", "protocol": "rest", "status": 200,
                               "content_type": "image/png",
                               "body_b64": base64.b64encode(seven[1]).decode(),
                               "answer": seven[3]}
    assert by_id["bad-1"] == {"request_id": "bad-1", "protocol": "rest", "status": 400,
                              "content_type": "application/json", "body": "garbage",
                              "answer": sent[-1][3]}
    oip_records = [r for r in records if r["protocol"] == "oip"]
    # The OIP plugin passes the front proxy's X-Request-ID (here the client's) to the worker.
    assert [r.pop("request_id") for r in oip_records] == [
        *(f"oip-{p.stem}" for p in DIGITS), "oip-binary"]
    assert oip_records == [
        *({"protocol": "oip", "status": 200, "body": body.decode(), "answer": answer}
          for protocol, body, _, answer in sent if protocol == "oip"),
        {"protocol": "oip", "status": 200, "binary_header_length": oip_binary_body(DIGITS[7])[1],
         "body_b64": base64.b64encode(sent[20][1]).decode(), "answer": sent[20][3]}]
    (grpc,) = [r for r in records if r["protocol"] == "grpc"]
    assert (grpc["status"], grpc["body_b64"], grpc["answer"]) == (
        200, base64.b64encode(DIGITS[3].read_bytes()).decode(), sent[21][3])


def test_the_log_holds_no_key_or_token_and_only_its_owner_reads_it(two_versions):
    srv, _, _, _ = two_versions
    folder = srv.settings.payload_dir()
    text = "".join(p.read_text() for p in folder.glob("*.jsonl"))
    tokens = json.loads(srv.key_file.read_text())  # TorchServe's own, which nginx sends on
    secrets = [srv.keys()["inference"], *(t["key"] for t in tokens.values())]
    assert [s for s in secrets if s in text] == []
    assert ("Bearer" in text, "uthorization" in text) == (False, False)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {
        payload_log.LOG_NAME: 0o600, payload_log.LOCK_NAME: 0o600}


def replay(srv, log, model, code=0):
    done = subprocess.run([sys.executable, "-m", "kiln.cli", "replay", str(log), model,
                           "--run-dir", str(srv.run_dir), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == code, done.stderr
    assert "replayed 23 of 23" in done.stderr
    return json.loads(done.stdout)


def test_replay_against_the_logged_version_agrees_on_every_row(two_versions):
    srv, _, copy, _ = two_versions
    figures = replay(srv, copy, f"{MODEL}:1.0")
    assert (figures["outcomes"], figures["rows"], figures["agreed"], figures["values"]) == (
        {"scored": 22, "same_error": 1}, 22, 22, 0)
    assert figures["replay_ms_mean"] > 0 and figures["logged_ms_mean"] > 0


def test_replay_against_another_version_reports_where_it_disagrees(two_versions):
    srv, sent, copy, _ = two_versions
    labels = [label for _, _, label, _ in sent if label is not None]
    expected = sum(label not in SWAPPED for label in labels)
    assert (len(labels), expected) == (22, 18)  # 0 and 1, on REST and OIP
    figures = replay(srv, copy, f"{MODEL}:2.0")
    assert (figures["outcomes"], figures["rows"], figures["agreed"]) == (
        {"scored": 22, "same_error": 1}, 22, expected)


def shadow_scored(srv):
    page = requests.get(f"{srv.url('metrics')}/metrics", timeout=10).text
    return sum(s.value for family in text_string_to_metric_families(page)
               for s in family.samples if s.name == "kiln_shadow_requests_total"
               and s.labels.get("version") == "2.0" and s.labels.get("outcome") == "scored")


def test_a_shadow_s_copies_of_a_request_are_not_logged(two_versions):
    """What nginx mirrors for a shadow of a REST prediction: the plugin scores the default
    version again and the candidate on it, both copies of a request logged once already."""
    srv, _, _, _ = two_versions
    token = json.loads(srv.key_file.read_text())["inference"]["key"]  # nginx's, to the plugin
    before, scored = log_lines(srv.settings.payload_dir()), shadow_scored(srv)
    r = requests.post(f"http://127.0.0.1:{srv.settings.internal_ports.oip}/kiln-shadow/"
                      f"{MODEL}/2.0", data=DIGITS[7].read_bytes(), timeout=30,
                      headers={"Authorization": f"Bearer {token}", "Content-Type": "image/png"})
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 60
    while shadow_scored(srv) == scored:  # both copies answered and compared
        assert time.monotonic() < deadline, "the shadow's copies were never scored"
        time.sleep(0.1)
    assert log_lines(srv.settings.payload_dir()) == before


def test_replay_against_a_version_not_served_fails(two_versions):
    srv, _, copy, _ = two_versions
    figures = replay(srv, copy, f"{MODEL}:9.9", code=1)
    assert figures["outcomes"] == {"replay_error": 22, "error_changed": 1}


# -- bounds, a full disk, off ------------------------------------------------------------------
MAX_BYTES, FILES = 4096, 3


@pytest.fixture(scope="module")
def small_log(archives, tmp_path_factory):
    srv = logged_server(tmp_path_factory, Workspace.current().model_store, cores=1,
                        payload_log=1.0, payload_log_max_bytes=MAX_BYTES,
                        payload_log_files=FILES)
    with srv.running(timeout=240):
        yield srv


def test_the_log_rotates_within_its_size_and_file_count(small_log):
    ids = [f"r-{i}" for i in range(30)]
    for request_id in ids:
        assert rest(small_log, DIGITS[7].read_bytes(), "image/png", request_id).status_code == 200
    folder = small_log.settings.payload_dir()
    names = sorted(p.name for p in folder.glob("*.jsonl"))
    assert names == ["payloads.1.jsonl", "payloads.2.jsonl", "payloads.jsonl"]
    records = log_lines(folder)
    longest = max(len(json.dumps(r, separators=(",", ":"))) + 1 for r in records)
    for name in names:
        size = (folder / name).stat().st_size
        assert size <= MAX_BYTES
        if name != payload_log.LOG_NAME:  # rotated when the next record would not fit
            assert size + longest > MAX_BYTES
    kept = [r["request_id"] for r in records]  # the newest, in order: the oldest dropped
    assert kept == ids[len(ids) - len(kept):]
    assert payload_counts(small_log)["records"] == 30


@pytest.fixture(scope="module")
def full_disk_log(archives, tmp_path_factory):
    srv = logged_server(tmp_path_factory, Workspace.current().model_store, cores=1,
                        payload_log=1.0)
    with srv.running(timeout=240):
        yield srv


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_a_full_disk_stops_the_log_counts_it_and_every_request_is_answered(full_disk_log):
    srv = full_disk_log
    assert rest(srv, DIGITS[7].read_bytes(), "image/png", "before").status_code == 200
    current = srv.settings.payload_dir() / payload_log.LOG_NAME
    current.unlink()
    current.symlink_to("/dev/full")  # each write: ENOSPC
    labels = []
    for i, png in enumerate(DIGITS[:5]):
        r = rest(srv, png.read_bytes(), "image/png", f"full-{i}")
        assert r.status_code == 200, r.text
        labels.append(r.json()["label"])
    assert labels == ["0", "1", "2", "3", "4"]
    assert payload_counts(srv) == {"records": 1, "errors": 1, "dropped": 5}


def test_fraction_zero_logs_nothing(archives, tmp_path_factory):
    srv = logged_server(tmp_path_factory, Workspace.current().model_store, cores=1,
                        payload_log=0.0)
    with srv.running(timeout=240):
        for png in DIGITS[:5]:
            assert rest(srv, png.read_bytes(), "image/png", png.stem).status_code == 200
        assert not srv.settings.payload_dir().exists()
        assert payload_counts(srv) == {}
