"""The front proxy's spans, from its access log, to an OTLP endpoint.

    python -m kiln.deploy.proxy_spans --log PATH --endpoint URL

nginx cannot export OTLP itself (Debian's nginx 1.22 has no OpenTelemetry module), but it writes
the access log's line of each request whose trace is sampled to a spans log of its own
(deploy/front.py's spans_log_path: at a 1% sample, a hundredth of the lines: following the
whole access log cost this process 1.1 us a request of lenet at 5,000 a second). Each line
(deploy/nginx/nginx.conf, log format kiln_json) names the request's
trace, the proxy's span id (the parent it sent upstream in traceparent, which the worker's
spans hang from, kiln.handlers.tracing) and the caller's span: this process follows the log
and makes one `proxy` span of each line, from nginx's receipt to its last byte sent. It starts
at the log's end, follows its rotation (deploy/access_log.py) and skips lines it cannot read.
`ProxySpans` starts it detached beside TorchServe (deploy/detached.py), as Server does the
metrics exporter.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path

from kiln.deploy.detached import Detached
from kiln.handlers import tracing

log = logging.getLogger("kiln.proxy_spans")
POLL_S = 0.1
# A sampled line's flags as nginx writes them (log format kiln_json: lowercase hex, the sampled
# bit the last digit's lowest). Every line of the spans log has them; the whole access log,
# which this process can follow too, has them on few: each read is searched for them as a
# whole, and only the lines found are split out and parsed (a loop over every line of the
# access log cost this process 0.9 us a request of lenet at 4,500 a second, py-spy).
SAMPLED = re.compile(rb'"trace_flags":"[0-9a-f][13579bdf]"')


class ProxySpansError(RuntimeError):
    pass


def span_of(line: dict) -> dict | None:
    """The proxy span's fields of one access log line; None for a line without a sampled
    trace."""
    try:
        if not int(line["trace_flags"], 16) & 1:  # not sampled
            return None
        trace_id, span_id = int(line["trace_id"], 16), int(line["span_id"], 16)
        parent = int(line["parent_span_id"], 16) if line.get("parent_span_id") else None
        end_ns = int(float(line["end"]) * 1e9)
        start_ns = end_ns - int(float(line["latency_s"]) * 1e9)
    except (KeyError, TypeError, ValueError):
        return None
    attributes = {"http.request.method": line.get("method", ""),
                  "url.path": line.get("route", ""),
                  "http.response.status_code": line.get("status", 0),
                  "kiln.request_id": line.get("request_id", ""),
                  "kiln.model": line.get("model", ""), "kiln.version": line.get("version", "")}
    return dict(name="proxy", trace_id=trace_id, span_id=span_id, parent_id=parent,
                start_ns=start_ns, end_ns=end_ns, attributes=attributes)


class Follower:
    """New complete lines of a log that nginx appends to and that gets rotated."""

    def __init__(self, path: Path):
        self.path = path
        self.file = None
        self.inode = None
        self.partial = b""

    def _open(self, at_end: bool) -> None:
        try:
            self.file = open(self.path, "rb")  # noqa: SIM115 (kept open while following)
        except FileNotFoundError:
            return
        self.inode = os.fstat(self.file.fileno()).st_ino
        if at_end:
            self.file.seek(0, os.SEEK_END)

    def read(self) -> bytes:
        """The complete lines written since the last read, each with its newline."""
        if self.file is None:
            self._open(at_end=self.inode is None)
            if self.file is None:
                return b""
        chunk = self.file.read()
        text = self.partial + chunk
        end = text.rfind(b"\n") + 1
        text, self.partial = text[:end], text[end:]
        try:
            rotated = os.stat(self.path).st_ino != self.inode
        except FileNotFoundError:
            rotated = True
        if rotated and not chunk:  # the old file is read to its end: on to the new one
            self.file.close()
            self.file = None
        return text


def sampled_lines(text: bytes) -> list[bytes]:
    """The lines of `text` whose flags say sampled (SAMPLED), without splitting the rest."""
    found, after = [], 0
    for match in SAMPLED.finditer(text):
        if match.start() < after:  # a second match in a line already taken
            continue
        start = text.rfind(b"\n", 0, match.start()) + 1
        after = text.find(b"\n", match.end())
        after = len(text) if after < 0 else after
        found.append(text[start:after])
    return found


def run(path: Path, endpoint: str) -> int:
    exporter = tracing.Exporter(endpoint)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    follower = Follower(path)
    while not stopping:
        for raw in sampled_lines(follower.read()):
            try:
                span = span_of(json.loads(raw))
            except ValueError:
                span = None
            if span is not None:
                exporter.span(**span)
        # Also after a busy pass: under load the next read then takes POLL_S of lines at once
        # rather than the few written since (a read, a stat and a split each time).
        time.sleep(POLL_S)
    exporter.shutdown()  # what is queued goes out
    return 0


class ProxySpans:
    """The proxy-span process of one run folder."""

    def __init__(self, run_dir: Path, log_path: Path, endpoint: str):
        self.log_path, self.endpoint = log_path, endpoint
        self.process = Detached("Kiln's proxy spans", run_dir / "kiln-proxy-spans.pid",
                                run_dir / "kiln-proxy-spans.log", str(log_path),
                                ProxySpansError)

    def start(self, timeout: float = 10, console: bool = False) -> None:
        self.process.stop()
        command = [sys.executable, "-m", "kiln.deploy.proxy_spans", "--log", str(self.log_path),
                   "--endpoint", self.endpoint]
        self.process.start(command, lambda: True, timeout, console)

    def stop(self, timeout: float = 5) -> bool:
        return self.process.stop(timeout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--log", type=Path, required=True,
                   help="Kiln's spans log (the JSON access log's lines of sampled traces)")
    p.add_argument("--endpoint", required=True, help="the OTLP/HTTP endpoint (its base URL)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s kiln-proxy-spans %(levelname)s %(message)s")
    return run(args.log, args.endpoint)


if __name__ == "__main__":
    sys.exit(main())
