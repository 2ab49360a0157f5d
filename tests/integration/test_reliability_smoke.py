"""The reliability benchmark (loadtests/studies/reliability/), every part in its shortest run
against the session's server: the table has every row, each a number, and the requests at the
bounds got the answers the bounds promise."""

import json
import math

import pytest

from kiln.loadtests import wrk
from kiln.loadtests.studies.reliability.cli import measure, parse_args
from kiln.loadtests.studies.reliability.report import write
from kiln.loadtests.studies.reliability.table import format_table

pytestmark = pytest.mark.skipif(not wrk.available(), reason="wrk is not installed (apt-get)")

FLAGS = ["--load-seconds", "3", "--clients", "2", "--slow", "8", "--cell-seconds", "1",
         "--repeat", "1", "--soak-seconds", "2", "--sample-seconds", "0.5"]
KILL = ["kill: lenet requests", "kill: lenet failed", "kill: until 200 again",
        "kill: until replacement READY", "kill: mlp requests", "kill: mlp failed",
        "kill: mlp max latency", "kill: wrk CPU"]
SLOW = [f"slow {proto}: {figure}, {held}" for proto in ("rest", "oip")
        for held in ("none held", "8 held")
        for figure in ("p50", "p99", "req/s", "good failed")]
AMPLIFICATION = {
    "amp lenet: minimal": 200,
    "amp lenet: most PNGs at pixel bound": 200,
    "amp lenet: one PNG at pixel bound": 200,
    "amp lenet: most JSON pixel arrays": 200,
    "amp lenet: pixels over bound, refused": 413,
    "amp lenet: body over size bound, refused": 413,
    "amp binary: minimal": 200,
    "amp binary: most rows": 200,
    "amp binary: rows over bound, refused": 413,
}
SOAK = ["soak: requests", "soak: failed", "soak: wrk CPU"] + [
    f"soak {process}: {figure}"
    for process in ("frontend", "lenet workers", "mlp workers", "rnn workers", "binary workers")
    for figure in ("RSS", "RSS max", "RSS slope", "PSS")]
OIP_FLOOD = [f"binary OIP flood (2 clients x 3 s): {figure}" for figure in (
    "requests", "5xx or none", "JVM RSS peak", "JVM RSS after", "workers replaced")]
FRONT_KILL = ["front kill: lenet requests", "front kill: lenet failed",
              "front kill: until orphaned workers gone", "front kill: until a new master",
              "front kill: until 200 again", "front kill: wrk CPU"]

THIN = [f"thin lenet: {case}" for case in ("square at pixel bound", "thinnest admitted",
                                           "widest admitted", "1 x 16,777,216")] + [
    "thin flood: good lenet p50, no flood"] + [
    f"thin flood {image}: {figure}"
    for image in ("square at pixel bound", "thinnest admitted", "1 x 16,777,216")
    for figure in ("good p50", "good p99", "good max", "good failed", "503 share")]


@pytest.fixture(scope="module")
def report(server):
    return measure(server, parse_args(FLAGS))


def test_the_table_has_every_row_and_each_is_a_number(report):
    names = [r.name for r in report.rows]
    assert names == KILL + SLOW + list(AMPLIFICATION) + SOAK + THIN + OIP_FLOOD + FRONT_KILL
    table = format_table(report.rows).splitlines()
    assert [line[:len(name)] for line, name in zip(table[1:], names, strict=True)] == names
    for row in report.rows:
        if row.value is None and none_answered(report, row):
            continue  # "-": no good request of its cell was answered, and "failed" says so
        assert isinstance(row.value, int | float) and math.isfinite(row.value), row


def none_answered(report, row):
    """Whether `row` is a good-request latency of a thin flood cell in which every good
    request failed, or the 503 share of a flood none of whose requests was answered within
    its cell (the smoke's 1 s cells, on busy cores: wrk counts only what is answered)."""
    if row.name.startswith("thin flood ") and row.name.endswith(": 503 share"):
        return row.detail == "of 0 sent"
    prefix, _, figure = row.name.rpartition(": good ")
    if not prefix.startswith("thin flood ") or figure not in ("p50", "p99", "max"):
        return False
    failed = next(r for r in report.rows if r.name == f"{prefix}: good failed")
    return failed.detail.startswith(f"of {failed.value};")


def test_requests_at_the_bounds_are_answered_and_those_over_refused(report):
    amp = {r.name: r.detail for r in report.rows if r.name in AMPLIFICATION}
    assert {name: detail.rsplit(", ", 1)[1] for name, detail in amp.items()} == {
        name: f"{status} x1" for name, status in AMPLIFICATION.items()}


def test_the_json_holds_the_table(report, tmp_path):
    opts = parse_args(FLAGS)
    write(report, opts, tmp_path)
    saved = json.loads((tmp_path / "reliability.json").read_text())
    assert [r["name"] for r in saved["rows"]] == [r.name for r in report.rows]
    assert (tmp_path / "reliability.html").read_text().count("<svg") == 3


def test_thin_images_are_answered_up_to_the_squares_cost_and_refused_past_it(report):
    thin = {r.name: r.detail.rsplit(", ", 1)[1] for r in report.rows if r.name in THIN[:4]}
    assert thin == {THIN[0]: "200 x1", THIN[1]: "200 x1", THIN[2]: "200 x1",
                    THIN[3]: "413 x1"}
