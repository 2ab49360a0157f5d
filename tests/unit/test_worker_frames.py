"""deploy/worker_site's BufferedFrames reads TorchServe's frontend-to-worker frames as the stock
protocol module does, field for field, however the bytes arrive; and a worker started with
the site hook uses it, while TorchServe's own PredictionTime line is left out for Kiln's
handler only."""

import importlib.util
import logging
import os
import random
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import ts.protocol.otf_message_handler as stock
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from kiln.deploy.server import WORKER_SITE
from kiln.handlers import handler as kiln_handler


def fresh_protocol():
    """A private copy of TorchServe's protocol module, for BufferedFrames to patch."""
    spec = importlib.util.spec_from_file_location("otf_copy", stock.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def site_module():
    path = WORKER_SITE / "sitecustomize.py"
    spec = importlib.util.spec_from_file_location("kiln_site_copy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not a worker script: it installs nothing here
    return module


def field(data: bytes) -> bytes:
    return struct.pack("!i", len(data)) + data


def load_frame() -> bytes:
    return (b"L" + field(b"lenet") + field(b"/models/lenet") + struct.pack("!i", 8)
            + field(b"kiln_handler.py") + struct.pack("!i", -1) + field(b"") + b"\x01")


def inference_frame(requests: list[tuple[bytes, dict, list]]) -> bytes:
    """requests: (request id, headers, [(name, content type, value)])."""
    out = b"I"
    for request_id, headers, inputs in requests:
        out += field(request_id)
        for name, value in headers.items():
            out += field(name) + field(value)
        out += struct.pack("!i", -1)
        for name, content_type, value in inputs:
            out += field(name) + field(content_type) + field(value)
        out += struct.pack("!i", -1)
    return out + struct.pack("!i", -1)


BODY_SIZES = (0, 1, 300, 70_000, 200_000)


def random_frames(rng: random.Random, count: int, sizes=BODY_SIZES) -> list[bytes]:
    frames = [load_frame()]
    for _ in range(count):
        batch = []
        for i in range(rng.randint(1, 8)):
            headers = {f"x-h{j}".encode(): rng.randbytes(rng.randint(0, 40)).hex().encode()
                       for j in range(rng.randint(0, 9))}
            body = rng.randbytes(rng.choice(sizes))
            inputs = [(b"body", b"image/png", body)]
            if rng.random() < 0.3:
                inputs.append((b"data", b"application/json", b'{"a": [1, 2]}'))
            if rng.random() < 0.3:
                inputs.append((b"text", b"text/plain", "caf\u00e9".encode()))
            batch.append((f"req-{i}".encode(), headers, inputs))
        frames.append(inference_frame(batch))
    return frames


def read_all(protocol, data: bytes, chunks, messages: int):
    """Writes `data` in pieces of the sizes `chunks` yields from another thread, and reads
    `messages` messages with `protocol.retrieve_msg`; then the writer closes its end."""
    ours, theirs = socket.socketpair()

    def write():
        view, pos = memoryview(data), 0
        with theirs:
            while pos < len(data):
                n = next(chunks)
                theirs.sendall(view[pos:pos + n])
                pos += n

    writer = threading.Thread(target=write)
    writer.start()
    try:
        return [protocol.retrieve_msg(ours) for _ in range(messages)], ours
    finally:
        writer.join(timeout=30)


@pytest.mark.parametrize("piece", ["byte", "random", "whole"])
def test_buffered_frames_read_what_stock_reads(piece, monkeypatch):
    monkeypatch.delenv("TS_DECODE_INPUT_REQUEST", raising=False)
    rng = random.Random(7)
    # A write a byte costs a system call a byte: smaller bodies there.
    frames = random_frames(rng, 12, (0, 1, 300, 5_000) if piece == "byte" else BODY_SIZES)
    data = b"".join(frames)
    sizes = {"byte": lambda: 1, "random": lambda: rng.randint(1, 5000),
             "whole": lambda: len(data)}[piece]

    def chunks():
        while True:
            yield sizes()

    expected, stock_end = read_all(stock, data, chunks(), len(frames))
    patched = fresh_protocol()
    site_module().BufferedFrames(patched).install()
    got, our_end = read_all(patched, data, chunks(), len(frames))
    try:
        assert got == expected
        assert [cmd for cmd, _ in got] == [b"L"] + [b"I"] * 12
        # Fields keep the stock types: a body is a bytearray, a JSON input is parsed.
        (_, first_batch) = got[1]
        assert all(isinstance(r["parameters"][0]["value"], bytearray) for r in first_batch)
        # The frontend gone: the worker exits as stock does.
        with pytest.raises(SystemExit):
            patched.retrieve_msg(our_end)
    finally:
        stock_end.close()
        our_end.close()


def test_bytes_read_ahead_wait_for_the_next_message_and_a_new_socket_starts_empty():
    patched = fresh_protocol()
    site_module().BufferedFrames(patched).install()
    small = [inference_frame([(b"r", {b"h": b"v"}, [(b"body", b"image/png", body)])])
             for body in (b"one", b"two")]  # small: all sent before any read
    frames = [load_frame(), *small]
    first, second = socket.socketpair(), socket.socketpair()
    try:
        first[1].sendall(b"".join(frames[:2]))  # the load frame and one batch, in one write
        second[1].sendall(frames[2])
        assert patched.retrieve_msg(first[0])[0] == b"L"
        assert patched.retrieve_msg(second[0])[1] == stock_parse(frames[2])
        first[1].sendall(frames[1])
        assert patched.retrieve_msg(first[0])[1] == stock_parse(frames[1])
    finally:
        for a, b in (first, second):
            a.close()
            b.close()


def stock_parse(frame: bytes):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(frame)
        return stock.retrieve_msg(ours)[1]


def test_a_worker_started_with_the_site_hook_reads_through_buffered_frames(tmp_path):
    script = tmp_path / "model_service_worker.py"
    script.write_text("import ts.protocol.otf_message_handler as p\n"
                      "from ts.protocol.otf_message_handler import retrieve_msg\n"
                      "print(retrieve_msg.__qualname__, p._retrieve_int.__qualname__)\n")
    env = {**os.environ, "PYTHONPATH": str(WORKER_SITE)}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["BufferedFrames.message", "BufferedFrames.int"]
    other = script.with_name("other.py")
    other.write_text(script.read_text())
    done = subprocess.run([sys.executable, str(other)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.split() == ["retrieve_msg", "_retrieve_int"]


def metrics_lines(caplog, cache, name):
    caplog.clear()
    cache.add_time(name, 1.5, None)
    return [r.getMessage() for r in caplog.records if "[METRICS]" in r.getMessage()]


def test_kiln_handler_leaves_out_prediction_time_and_nothing_else(caplog):
    config = Path(stock.__file__).parents[1] / "configs" / "metrics.yaml"
    cache = MetricsCacheYamlImpl(config_file_path=str(config))
    cache.initialize_cache()
    cache.set_request_ids({0: "req-0"})
    caplog.set_level(logging.INFO)
    assert metrics_lines(caplog, cache, "PredictionTime")  # stock: one line a batch
    context = type("Context", (), {"metrics": cache})()
    kiln_handler.skip_prediction_time(context)
    kiln_handler.skip_prediction_time(context)  # a second load wraps nothing twice
    assert metrics_lines(caplog, cache, "PredictionTime") == []
    assert metrics_lines(caplog, cache, "MyHandlerTime") != []
