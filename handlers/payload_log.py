"""The sampled payload log (issue 19, `kiln serve --payload-log FRACTION`): the body and the
answer of a sampled fraction of requests, one JSON line each, for `kiln replay`.

Written here, in the worker, because only the worker holds both a request's body and its
answer (the front proxy sees no answer bodies unless it buffers them; the OIP plugin sees
OIP only). A model has several workers, each a process, all writing one store: every write
and every rotation happens under one lock (flock on a file beside the log), so lines never
interleave and a rotation by one worker is seen by the others at their next write (each
checks that its open file is still the log's, by inode). Records of one batch go out in one
write.

Bounded: files of at most `max_bytes` (a file's first record may pass it: a record is never
split), `files` of them, the oldest dropped. Owner-only files. A store that cannot be written
(a full disk, a folder gone read-only) stops this worker's log: the failure is counted in
kiln_payload_log_errors_total, each sampled record not written since in
kiln_payload_log_dropped_total, and every request is answered as before.

A record holds no request header but those it names (content type, the OIP binary header's
length, the client's X-Request-ID): never an Authorization header or a key. A body that is
UTF-8 text is kept as "body"; any other (PNG, .npy, OIP binary tensors) as "body_b64".
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import math
import os
import random
import re
import time

from prometheus_client import Counter

from kiln.handlers import forms, oip

logger = logging.getLogger(__name__)

# Set by Kiln's server for its workers (deploy/server.py); no fraction or 0: no log.
FRACTION_ENV = "KILN_PAYLOAD_SAMPLE"
DIR_ENV = "KILN_PAYLOAD_DIR"
MAX_BYTES_ENV = "KILN_PAYLOAD_MAX_BYTES"
FILES_ENV = "KILN_PAYLOAD_FILES"
# 8 files of 64 MiB: about 12,000 base64 PNG digits a file, 512 MiB at most on disk.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_FILES = 8
# In the server's run folder.
FOLDER = "payloads"
LOG_NAME = "payloads.jsonl"
LOCK_NAME = ".payloads.lock"
# A client's request id is kept when it is this (goal 1's rule for X-Request-ID); any other
# value is the client's to fix and TorchServe's own id is logged instead.
REQUEST_ID_HEADER = "x-request-id"
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=~-]{1,64}")
LABELS = ("model_name", "version")
# Set by the OIP plugin on a shadow's copies of a request (the REST primary it scores again,
# each candidate's): not the client's requests, which their own workers log.
COPY_HEADER = "kiln-shadow-copy"
# A control character that no text body holds (JSON, a form) and binary ones (PNG, .npy,
# OIP tensors) nearly always do: such a body is kept as base64 even where it happens to be
# valid UTF-8, so that a binary body is always "body_b64".
BINARY_BYTE = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def check_fraction(fraction: float) -> None:
    if not 0 <= fraction <= 1:
        raise ValueError(f"the payload log's fraction must be from 0 to 1, got {fraction:g}")


def check_bounds(fraction: float, max_bytes: int, files: int) -> None:
    """ValueError naming a setting out of range."""
    check_fraction(fraction)
    if max_bytes < 1 or files < 1:
        raise ValueError(f"the payload log needs files of at least 1 byte and at least 1 "
                         f"file, got {max_bytes} bytes and {files} files")


def worker_env(fraction: float, folder, max_bytes: int, files: int) -> dict[str, str]:
    """What Kiln's server gives its workers (a fraction set always: an exported variable of
    the caller's never turns a log on)."""
    return {FRACTION_ENV: repr(float(fraction)), DIR_ENV: str(folder),
            MAX_BYTES_ENV: str(max_bytes), FILES_ENV: str(files)}


def rotated_name(index: int) -> str:
    """The log's file name `index` rotations old (0: the one written now)."""
    return LOG_NAME if index == 0 else f"payloads.{index}.jsonl"


class Store:
    """Appends lines to LOG_NAME in `folder`, rotating it past `max_bytes`, keeping `files`;
    safe for several processes at once. Raises OSError when it cannot."""

    def __init__(self, folder: str, max_bytes: int = DEFAULT_MAX_BYTES,
                 files: int = DEFAULT_FILES):
        self.folder, self.max_bytes, self.files = folder, max_bytes, files
        self._fd = self._lock_fd = None

    def append(self, data: bytes) -> None:
        if self._lock_fd is None:
            os.makedirs(self.folder, mode=0o700, exist_ok=True)
            self._lock_fd = os.open(os.path.join(self.folder, LOCK_NAME),
                                    os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            size = self._current()
            if size and size + len(data) > self.max_bytes:
                self._rotate()
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _path(self, index: int) -> str:
        return os.path.join(self.folder, rotated_name(index))

    def _current(self) -> int:
        """The size of the log, opened afresh if another worker rotated it."""
        path = self._path(0)
        if self._fd is not None:
            try:
                if os.stat(path).st_ino == os.fstat(self._fd).st_ino:
                    return os.fstat(self._fd).st_size
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return os.fstat(self._fd).st_size

    def _rotate(self) -> None:
        for index in range(self.files - 1, -1, -1):
            source = self._path(index)
            if not os.path.exists(source):
                continue
            if index == self.files - 1:
                os.unlink(source)
            else:
                os.rename(source, self._path(index + 1))
        os.close(self._fd)
        self._fd = os.open(self._path(0), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)


class Off:
    """No payload log: one call per batch, nothing else."""

    def record(self, data, answers_out, context, started):
        pass


def for_worker(environ, model: str, version: str, registry=None):
    """This worker's payload log, from what Kiln's server set; Off unless a fraction > 0."""
    try:
        fraction = float(environ.get(FRACTION_ENV) or 0)
    except ValueError:
        logger.error("%s=%r is not a number: no payload log", FRACTION_ENV,
                     environ.get(FRACTION_ENV))
        return Off()
    if not 0 < fraction <= 1 or not environ.get(DIR_ENV):
        return Off()
    store = Store(environ[DIR_ENV], int(environ.get(MAX_BYTES_ENV) or DEFAULT_MAX_BYTES),
                  int(environ.get(FILES_ENV) or DEFAULT_FILES))
    logger.info("payload log: %g of requests to %s", fraction, store.folder)
    return PayloadLog(store, fraction, model, version, registry)


def declare(registry=None):
    """The payload log's counters (in multiprocess mode registered nowhere: the exporter
    reads the workers' files)."""
    return {name: Counter(f"kiln_payload_log_{name}", text, LABELS, registry=registry)
            for name, text in (
                ("records", "Sampled requests written to the payload log"),
                ("errors", "Failures to write the payload log; each stops a worker's log"),
                ("dropped", "Sampled requests not written: the worker's payload log stopped"))}


class PayloadLog:
    def __init__(self, store: Store, fraction: float, model: str, version: str,
                 registry=None, draw=random.random):
        self.store, self.fraction, self.model, self.version = store, fraction, model, version
        self._draw = draw
        # log(1 - fraction), for the gaps between sampled requests (-inf: every one).
        self._log_keep = math.log1p(-fraction) if fraction < 1 else -math.inf
        self._skip = self._gap()  # requests to let pass before the next sampled one
        counters = declare(registry)
        self._records, self._errors, self._dropped = (
            counters[name].labels(model, version) for name in ("records", "errors", "dropped"))
        self.stopped = False

    def _gap(self) -> int:
        """Requests passed over before the next sampled one: geometric, so that each request
        is sampled with probability `fraction`, independently of the others, for one draw
        per sampled request, none per unsampled one."""
        return int(math.log1p(-self._draw()) / self._log_keep)

    def record(self, data, answers_out, context, started):
        """Logs the sampled requests of a handled batch; `started`: time.perf_counter() when
        the worker took the batch."""
        if self._skip >= len(data):  # an unsampled batch: one subtraction, no draw
            self._skip -= len(data)
            return
        picked, idx = [], self._skip
        while idx < len(data):
            picked.append(idx)
            idx += 1 + self._gap()
        self._skip = idx - len(data)
        picked = [idx for idx in picked if not context.get_request_header(idx, COPY_HEADER)]
        if not picked:
            return
        if self.stopped:
            self._dropped.inc(len(picked))
            return
        latency_ms = round(1000 * (time.perf_counter() - started), 3)
        try:
            lines = b"".join(self.line(data[idx], answers_out[idx], context, idx, latency_ms)
                             for idx in picked)
            self.store.append(lines)
        except OSError as err:
            self.stopped = True
            self._errors.inc()
            self._dropped.inc(len(picked))
            logger.error("payload log stopped in this worker: %s (requests are answered; "
                         "restart the server to log again)", err)
            return
        self._records.inc(len(picked))

    def line(self, request, answer, context, idx, latency_ms) -> bytes:
        headers = {k.lower(): v for k, v in (context.get_all_request_header(idx) or {}).items()}
        record = {"time": utc_now(),
                  "request_id": request_id(headers, context.get_request_id(idx)),
                  "model": self.model, "version": self.version,
                  "protocol": protocol(headers),
                  "status": context.get_response_status(idx)[0],
                  "latency_ms": latency_ms}
        content_type = headers.get(forms.FORM_TYPE_HEADER) or headers.get("content-type")
        if content_type:
            record["content_type"] = content_type
        if headers.get(oip.BINARY_HEADER):
            record["binary_header_length"] = int(headers[oip.BINARY_HEADER])
        record.update(payload(request))
        # The answer is the JSON the handler wrote: spliced in as it is, not parsed again.
        text = json.dumps(record, separators=(",", ":"))
        return f'{text[:-1]},"answer":{answer or "null"}}}\n'.encode()


def utc_now() -> str:
    """ISO 8601, UTC, to the millisecond."""
    now = time.time()
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(now))}.{int(now % 1 * 1000):03d}Z"


def request_id(headers: dict, torchserve_id: str | None) -> str | None:
    """The client's X-Request-ID when it is a safe one, else TorchServe's own request id."""
    given = headers.get(REQUEST_ID_HEADER)
    if isinstance(given, str) and SAFE_REQUEST_ID.fullmatch(given):
        return given
    return torchserve_id


def protocol(headers: dict) -> str:
    """oip (the plugin's mark), rest (an HTTP request: it has a Host header), else grpc."""
    if headers.get(oip.PROTOCOL_HEADER) == oip.PROTOCOL:
        return "oip"
    return "rest" if "host" in headers else "grpc"


def payload(request) -> dict:
    """The request's body (or fields, one per input) as JSON-ready values, exactly."""
    if isinstance(request, dict):
        for key in ("body", "data"):
            if key in request and len(request) == 1:
                return encoded(request[key])
        return {"fields": {name: encoded(value) for name, value in request.items()}}
    return encoded(request)


def encoded(value) -> dict:
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
        if not BINARY_BYTE.search(raw):
            try:
                return {"body": raw.decode("utf-8")}
            except UnicodeDecodeError:
                pass
        return {"body_b64": base64.b64encode(raw).decode("ascii")}
    if isinstance(value, str):
        return {"body": value}
    return {"body": json.dumps(value)}  # a body TorchServe parsed already
