"""The payload log's store and records (handlers/payload_log.py), without a server: several
real processes writing one store, TorchServe's own Context for the records."""

import base64
import json
import multiprocessing
import os
import re
import stat

import pytest
from prometheus_client import CollectorRegistry
from ts.context import Context, RequestProcessor

from kiln.handlers import payload_log

LINE_BYTES = 100
CAP = 20 * LINE_BYTES
FILES = 4
WRITERS, LINES_EACH = 4, 300


def fixed_line(writer, n):
    text = json.dumps({"writer": writer, "n": n})
    return (text + " " * (LINE_BYTES - 1 - len(text)) + "\n").encode()


def write_lines(folder, writer):
    store = payload_log.Store(str(folder), CAP, FILES)
    for n in range(LINES_EACH):
        store.append(fixed_line(writer, n))


def test_writers_in_several_processes_rotate_one_bounded_store(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=write_lines, args=(tmp_path, w)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * WRITERS
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [payload_log.LOCK_NAME, "payloads.1.jsonl", "payloads.2.jsonl",
                     "payloads.3.jsonl", "payloads.jsonl"]
    kept = {}
    for i in range(FILES - 1, -1, -1):
        data = (tmp_path / payload_log.rotated_name(i)).read_bytes()
        # Every file full to its cap and no further: 1200 lines of 100 bytes fill 60 files.
        assert len(data) == CAP
        for line in data.splitlines():
            record = json.loads(line)  # whole lines: no write interleaved with another
            kept.setdefault(record["writer"], []).append(record["n"])
    assert sum(map(len, kept.values())) == FILES * CAP // LINE_BYTES
    for numbers in kept.values():  # each writer's newest lines, in its order: oldest dropped
        assert numbers == list(range(LINES_EACH - len(numbers), LINES_EACH))
    for path in tmp_path.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


class Batch:
    """A TorchServe batch as the worker hands it over: TorchServe's Context, one request
    processor per request holding its headers."""

    def __init__(self, headers, statuses=None):
        self.context = Context("lenet", "/nowhere", {"model": {"modelVersion": "1.0"}}, 1,
                               None, "0.12.0")
        self.context.request_processor = [RequestProcessor(dict(h)) for h in headers]
        self.context.request_ids = {i: f"ts-{i}" for i in range(len(headers))}
        for idx, code in enumerate(statuses or []):
            self.context.set_response_status(code, "", idx)


def counter(registry, name):
    value = registry.get_sample_value(f"kiln_payload_log_{name}_total",
                                      {"model_name": "lenet", "version": "1.0"})
    return value


def logged(tmp_path, fraction=1.0, draw=None):
    registry = CollectorRegistry()
    log = payload_log.PayloadLog(payload_log.Store(str(tmp_path / "payloads")), fraction,
                                 "lenet", "1.0", registry,
                                 **({"draw": draw} if draw else {}))
    return log, registry


def read(tmp_path):
    path = tmp_path / "payloads" / payload_log.LOG_NAME
    return [json.loads(line) for line in path.read_text().splitlines()]


PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"


def test_a_record_holds_the_named_fields_the_body_exactly_and_no_header(tmp_path):
    log, registry = logged(tmp_path)
    batch = Batch([{"X-Request-ID": "client-7", "Authorization": "Bearer sekret-key",
                    "Content-Type": "image/png", "Host": "localhost"},
                   {"x-request-id": "bad id with spaces", "authorization": "Bearer sekret-key",
                    "Content-Type": "application/json", "Host": "localhost"},
                   {payload_log.oip.PROTOCOL_HEADER: payload_log.oip.PROTOCOL,
                    payload_log.oip.BINARY_HEADER: "12"},
                   {}], statuses=[200, 400, 200, 200])
    data = [{"body": bytearray(PNG)}, {"body": bytearray(b'{"x": 1}')},
            {"body": bytearray(b'{"inputs": []}\x00\x00\x80?')}, {"data": b"[1, 2]"}]
    answers = ['{"label": "7"}', '{"error": "bad", "code": 400}', '{"outputs": []}',
               '{"label": "1"}']
    log.record(data, answers, batch.context, started=0)
    records = read(tmp_path)
    for r in records:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r.pop("time"))
        assert r.pop("latency_ms") > 0
    assert records == [
        {"request_id": "client-7", "model": "lenet", "version": "1.0", "protocol": "rest",
         "status": 200, "content_type": "image/png",
         "body_b64": base64.b64encode(PNG).decode(), "answer": {"label": "7"}},
        {"request_id": "ts-1", "model": "lenet", "version": "1.0", "protocol": "rest",
         "status": 400, "content_type": "application/json", "body": '{"x": 1}',
         "answer": {"error": "bad", "code": 400}},
        {"request_id": "ts-2", "model": "lenet", "version": "1.0", "protocol": "oip",
         "status": 200, "binary_header_length": 12,
         "body_b64": base64.b64encode(b'{"inputs": []}\x00\x00\x80?').decode(),
         "answer": {"outputs": []}},
        {"request_id": "ts-3", "model": "lenet", "version": "1.0", "protocol": "grpc",
         "status": 200, "body": "[1, 2]", "answer": {"label": "1"}},
    ]
    text = (tmp_path / "payloads" / payload_log.LOG_NAME).read_text()
    assert "sekret" not in text and "uthorization" not in text
    assert counter(registry, "records") == 4


def test_requests_between_the_sampled_ones_are_passed_over(tmp_path):
    # At 1/2, a draw of u lets floor(log2(1 / (1 - u))) requests pass: 0.5 one, 0.75 two.
    draws = iter([0.5, 0.75, 0.0, 0.5, 0.75])
    log, registry = logged(tmp_path, fraction=0.5, draw=lambda: next(draws))
    for first in (0, 3, 6):
        batch = Batch([{"X-Request-ID": f"r{i}", "Host": "h"} for i in range(first, first + 3)])
        log.record([{"body": b"[1]"}] * 3, ["{}"] * 3, batch.context, 0)
    assert [r["request_id"] for r in read(tmp_path)] == ["r1", "r4", "r5", "r7"]
    assert counter(registry, "records") == 4


def test_a_shadow_s_copies_are_left_out(tmp_path):
    log, registry = logged(tmp_path)
    batch = Batch([{"X-Request-ID": "client", "Host": "h"},
                   {payload_log.COPY_HEADER: "1"}])
    log.record([{"body": b"[1]"}] * 2, ["{}"] * 2, batch.context, 0)
    assert [r["request_id"] for r in read(tmp_path)] == ["client"]
    assert counter(registry, "records") == 1


def test_off_unless_a_fraction_and_a_folder_are_given(tmp_path):
    env = payload_log.worker_env(0.0, tmp_path, 10, 2)
    assert isinstance(payload_log.for_worker(env, "lenet", "1.0"), payload_log.Off)
    assert isinstance(payload_log.for_worker({}, "lenet", "1.0"), payload_log.Off)
    on = payload_log.for_worker(payload_log.worker_env(0.5, tmp_path, 10, 2), "lenet", "1.0",
                                CollectorRegistry())
    assert (on.fraction, on.store.folder, on.store.max_bytes, on.store.files) == (
        0.5, str(tmp_path), 10, 2)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_full_disk_stops_the_log_and_counts_what_it_dropped(tmp_path):
    log, registry = logged(tmp_path)
    batch = Batch([{"Host": "h"}] * 2)
    log.record([{"body": b"[1]"}] * 2, ["{}"] * 2, batch.context, 0)
    current = tmp_path / "payloads" / payload_log.LOG_NAME
    current.unlink()
    current.symlink_to("/dev/full")  # every write: ENOSPC
    for _ in range(3):
        log.record([{"body": b"[1]"}] * 2, ["{}"] * 2, batch.context, 0)
    assert log.stopped
    assert (counter(registry, "records"), counter(registry, "errors"),
            counter(registry, "dropped")) == (2, 1, 6)


def test_bounds_out_of_range_are_refused():
    with pytest.raises(ValueError, match="from 0 to 1, got 1.5"):
        payload_log.check_bounds(1.5, 10, 2)
    with pytest.raises(ValueError, match="at least 1 file"):
        payload_log.check_bounds(0.5, 10, 0)


def test_serve_s_flags_reach_the_workers_environment(tmp_path):
    from kiln.cli.main import build_parser
    from kiln.cli.serve import _server

    args = build_parser("serve").parse_args(
        ["serve", "--run-dir", str(tmp_path), "--payload-log", "0.25",
         "--payload-log-file-mb", "2", "--payload-log-files", "5"])
    env = _server(args, ["lenet"])._env()
    assert {k: env[k] for k in (payload_log.FRACTION_ENV, payload_log.DIR_ENV,
                                payload_log.MAX_BYTES_ENV, payload_log.FILES_ENV)} == {
        payload_log.FRACTION_ENV: "0.25",
        payload_log.DIR_ENV: str(tmp_path.resolve() / payload_log.FOLDER),
        payload_log.MAX_BYTES_ENV: str(2 * 2**20), payload_log.FILES_ENV: "5"}


def test_off_by_default_even_with_the_variable_exported(tmp_path, monkeypatch):
    from kiln.cli.main import build_parser
    from kiln.cli.serve import _server

    monkeypatch.setenv(payload_log.FRACTION_ENV, "1.0")
    args = build_parser("serve").parse_args(["serve", "--run-dir", str(tmp_path)])
    assert _server(args, ["lenet"])._env()[payload_log.FRACTION_ENV] == "0.0"


def test_serve_refuses_a_fraction_out_of_range(tmp_path, caplog):
    from kiln.cli.main import main

    assert main(["serve", "--run-dir", str(tmp_path), "--no-build", "--payload-log", "1.5",
                 "lenet"]) == 1
    assert "the payload log's fraction must be from 0 to 1, got 1.5" in caplog.text


def test_the_container_takes_it_from_its_environment():
    from kiln.deploy import container, contract

    settings = container.parse_args([], environ={contract.ENV["payload_log"]: "0.1"})
    assert container.server_settings(settings).payload_log == 0.1
    with pytest.raises(SystemExit):
        container.parse_args(["--payload-log", "-1"], environ={})
