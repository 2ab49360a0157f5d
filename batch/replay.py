"""`kiln replay LOG NAME[:VERSION]`: the payload log's requests (handlers/payload_log.py) sent
again to a served model, each on the protocol and with the body it was logged with, and the
answers compared with the logged ones: the offline twin of a shadow comparison.

Compared as the OIP plugin's shadow compares (deploy/oip_plugin, Shadow.java): answers whose
rows carry labels (multiclass, binary, multilabel) by top-1 agreement, row by row; the others
(regression, raw) by the absolute difference of each value. A request the log holds an error
for is compared by status only.
"""

from __future__ import annotations

import base64
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

from kiln.handlers import oip, payload_log

# The OIP binary tensor extension's header: the length of the JSON part of the body.
BINARY_HEADER = "Inference-Header-Content-Length"


class ReplayError(ValueError):
    pass


def log_files(path: Path) -> list[Path]:
    """The files of a payload log, oldest first: a folder's rotated files then its current
    one, or the one file named."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ReplayError(f"{path}: no such payload log (a .jsonl file, or kiln serve's "
                          f"run/{payload_log.FOLDER}/)")
    files = [path / payload_log.rotated_name(i) for i in range(1000, -1, -1)]
    return [f for f in files if f.is_file()]


def read_records(path: Path, model: str) -> tuple[list[dict], Counter]:
    """The records of `model` in the log, oldest first, and what was left out (unreadable
    lines, other models)."""
    records, left_out = [], Counter()
    for file in log_files(path):
        with open(file, encoding="utf-8") as lines:
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut by a crash of its worker
                    left_out["unreadable"] += 1
                    continue
                if record.get("model") != model:
                    left_out["other models"] += 1
                    continue
                records.append(record)
    return records, left_out


def body_of(record: dict) -> bytes:
    if "body_b64" in record:
        return base64.b64decode(record["body_b64"])
    return record.get("body", "").encode("utf-8")


def fields_of(record: dict) -> dict[str, bytes]:
    """A gRPC input map, one entry per input, or {"data": body}."""
    if "fields" not in record:
        return {"data": body_of(record)}
    return {name: body_of(value) for name, value in record["fields"].items()}


# -- what an answer says -----------------------------------------------------------------------
@dataclass
class Said:
    labels: list[str] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


def said(answer) -> Said:
    """The labels (one per row) or else the values of a REST or OIP answer."""
    out = Said()
    if isinstance(answer, dict) and "outputs" in answer:
        for tensor in answer["outputs"]:
            if tensor.get("name") == oip.LABEL_OUTPUT:
                out.labels += [str(label) for label in tensor.get("data", [])]
            elif tensor.get("datatype") != "BYTES":
                _numbers(tensor.get("data"), out.values)
        return out
    for row in answer if isinstance(answer, list) else [answer]:
        if not isinstance(row, dict):
            continue
        if "label" in row:
            out.labels.append(str(row["label"]))
        elif "labels" in row:
            out.labels.append(json.dumps(row["labels"]))  # a multilabel row: its label set
        elif "values" in row:
            for value in row["values"].values():
                _numbers(value, out.values)
        elif "output" in row:
            _numbers(row["output"], out.values)
    return out


def _numbers(data, into: list[float]) -> None:
    if isinstance(data, list):
        for item in data:
            _numbers(item, into)
    elif isinstance(data, (int, float)) and not isinstance(data, bool):
        into.append(float(data))


# -- the comparison ----------------------------------------------------------------------------
@dataclass
class Report:
    outcomes: Counter = field(default_factory=Counter)
    rows: int = 0
    agreed: int = 0
    values: int = 0
    diff_sum: float = 0.0
    diff_max: float = 0.0
    logged_ms: list[float] = field(default_factory=list)
    replay_ms: list[float] = field(default_factory=list)
    left_out: Counter = field(default_factory=Counter)
    answered: int = 0  # replayed requests answered 2xx
    # The first answer the replay got where the log has an answer: (status, body).
    first_error: tuple[int, object] | None = None

    def add(self, record: dict, status: int, answer, seconds: float) -> None:
        self.replay_ms.append(1000 * seconds)
        self.answered += 200 <= status < 300
        if "latency_ms" in record:
            self.logged_ms.append(float(record["latency_ms"]))
        logged_ok = 200 <= int(record.get("status", 0)) < 300
        if not logged_ok:
            same = status == record.get("status")
            self.outcomes["same_error" if same else "error_changed"] += 1
            return
        if not 200 <= status < 300:
            self.outcomes["replay_error"] += 1
            self.first_error = self.first_error or (status, answer)
            return
        a, b = said(record.get("answer")), said(answer)
        if a.labels and len(a.labels) == len(b.labels):
            self.rows += len(a.labels)
            self.agreed += sum(x == y for x, y in zip(a.labels, b.labels, strict=True))
        elif not a.labels and a.values and len(a.values) == len(b.values):
            diffs = [abs(x - y) for x, y in zip(a.values, b.values, strict=True)]
            self.values += len(diffs)
            self.diff_sum += sum(diffs)
            self.diff_max = max(self.diff_max, *diffs)
        else:
            self.outcomes["unlike"] += 1
            return
        self.outcomes["scored"] += 1

    def nothing_answered(self) -> bool:
        """No replayed request got an answer, though the log has some: the model or version
        is not served, say, and there is nothing to compare."""
        return self.answered == 0 and self.outcomes["replay_error"] > 0

    def agreement(self) -> float | None:
        return self.agreed / self.rows if self.rows else None

    def lines(self) -> list[str]:
        out = [f"requests: {sum(self.outcomes.values())} replayed ("
               + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())) + ")"]
        if self.left_out:
            out.append("left out: " + ", ".join(f"{k} {v}" for k, v in
                                                sorted(self.left_out.items())))
        if self.first_error:
            out.append(f"first replay error: HTTP {self.first_error[0]} "
                       f"{json.dumps(self.first_error[1])[:300]}")
        if self.rows:
            out.append(f"top-1 agreement: {100 * self.agreement():.2f}% of {self.rows} rows "
                       f"({self.rows - self.agreed} differ)")
        if self.values:
            out.append(f"|diff|: mean {self.diff_sum / self.values:.3g}, max "
                       f"{self.diff_max:.3g} over {self.values} values")
        if self.replay_ms:
            out.append(f"latency ms (mean / p50): replayed, client round trip "
                       f"{_figures(self.replay_ms)}; logged, worker time of its batch "
                       f"{_figures(self.logged_ms)}")
        return out

    def as_json(self) -> dict:
        return {"outcomes": dict(self.outcomes), "left_out": dict(self.left_out),
                "rows": self.rows, "agreed": self.agreed, "agreement": self.agreement(),
                "values": self.values,
                "abs_diff_mean": self.diff_sum / self.values if self.values else None,
                "abs_diff_max": self.diff_max if self.values else None,
                "replay_ms_mean": _mean(self.replay_ms), "logged_ms_mean": _mean(self.logged_ms)}


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _figures(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.2f} / {statistics.median(xs):.2f}" if xs else "-"


# -- sending -----------------------------------------------------------------------------------
@dataclass
class Target:
    """Where a replay sends its requests: the front proxy's REST and OIP URLs, the gRPC
    address, the key."""
    rest_url: str
    oip_url: str
    grpc_target: str
    token: str | None = None
    timeout: float = 30
    session: requests.Session = field(default_factory=requests.Session)
    _grpc: object = None

    def send(self, record: dict, name: str, version: str | None) -> tuple[int, object]:
        """(status, answer) of the record's request sent again to name[:version]."""
        protocol = record.get("protocol")
        if protocol == "grpc":
            return self._send_grpc(record, name, version)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if protocol == "oip":
            path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/infer"
            url = self.oip_url + path
            if "binary_header_length" in record:
                headers[BINARY_HEADER] = str(record["binary_header_length"])
                headers["Content-Type"] = "application/octet-stream"
            else:
                headers["Content-Type"] = "application/json"
        else:
            url = f"{self.rest_url}/predictions/{name}" + (f"/{version}" if version else "")
            if record.get("content_type"):
                headers["Content-Type"] = record["content_type"]
        r = self.session.post(url, data=body_of(record), headers=headers, timeout=self.timeout)
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, r.text

    def _send_grpc(self, record: dict, name: str, version: str | None) -> tuple[int, object]:
        from kiln.grpc_client import GrpcClient

        if self._grpc is None:
            self._grpc = GrpcClient(self.grpc_target, self.token, self.timeout)
        answer = self._grpc.predict_map(name, fields_of(record), version)
        return answer.status, answer.body

    def close(self) -> None:
        if self._grpc is not None:
            self._grpc.close()


def replay(records: list[dict], target: Target, name: str, version: str | None,
           progress: Callable[[int, int], None] = lambda done, total: None) -> Report:
    """Each record sent in order, one at a time (so latencies are not each other's queue)."""
    report = Report()
    for done, record in enumerate(records, 1):
        started = time.perf_counter()
        status, answer = target.send(record, name, version)
        report.add(record, status, answer, time.perf_counter() - started)
        progress(done, len(records))
    return report


def parse_model(text: str) -> tuple[str, str | None]:
    """NAME[:VERSION] as (name, version or None)."""
    name, _, version = text.partition(":")
    if not name or (_ and not version):
        raise ReplayError(f"expected NAME or NAME:VERSION, got {text!r}")
    return name, version or None
