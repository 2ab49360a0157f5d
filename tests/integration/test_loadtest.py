"""`kiln loadtest` against the test TorchServe: locust as a subprocess, thresholds that set
the exit code, the CSV and the HTML report, and the report drawn by a headless chromium."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.loadtests import declared, report, report_data, report_text
from kiln.loadtests.thresholds import Check

REPO = Path(__file__).resolve().parent.parent.parent
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
CHARTS = 6


def loadtest(server, out, *flags, duration=10):
    command = [sys.executable, "-m", "kiln.cli", "loadtest", declared.default_name(),
               "--users", "4", "--spawn-rate", "4", "--duration", str(duration), "--out", str(out),
               "--url", server.url("inference"), "--oip-url", server.url("oip"),
               "--metrics-url", server.url("metrics"), "--token=" + server.keys()["inference"],
               "--run-dir", str(server.run_dir), *flags]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def passing(server, tmp_path_factory):
    out = tmp_path_factory.mktemp("loadtest") / "pass"
    done = loadtest(server, out, "--shape", "step", "--max-fail-ratio", "0",
                    "--max-p95-ms", "5000", "--max-p99-ms", "10000")
    return done, out


def aggregated(out):
    with open(out / "locust_stats.csv", newline="") as f:
        return next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")


def test_generous_thresholds_pass_with_no_failures(passing):
    done, out = passing
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    row = aggregated(out)
    assert int(row["Request Count"]) > 0
    assert int(row["Failure Count"]) == 0
    assert (out / "locust_stats_history.csv").stat().st_size > 0
    assert (out / "report.html").exists()


def test_the_terminal_shows_the_report_s_endpoints_and_verdict(passing):
    done, out = passing
    endpoints = report_data.read_endpoints(out / "locust_stats.csv")
    checks = [Check(**c) for c in json.loads((out / "verdict.json").read_text())]
    name = declared.default_name()
    assert [row[0] for row in endpoints] == [f"POST /predictions/{name}",
                                             f"POST /v2/models/{name}/infer", "Aggregated"]
    assert endpoints[-1][1] == aggregated(out)["Request Count"]
    assert [c.name for c in checks] == ["requests", "failure ratio", "p95 ms", "p99 ms"]
    assert done.stdout == (f"{report_text.render(endpoints, checks)}\n"
                           f"report: {out / 'report.html'}\n")
    page = (out / "report.html").read_text()
    assert report.html_table(report_data.ENDPOINT_HEADER, endpoints) in page
    assert report.html_table(report_data.VERDICT_HEADER,
                             report_data.verdict_rows(checks)) in page


def test_an_impossible_p95_fails_the_run(server, tmp_path):
    done = loadtest(server, tmp_path, "--max-p95-ms", "0.001", duration=4)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "FAILED" in (tmp_path / "report.html").read_text()


def chromium():
    """Debian's chromium, installed with apt-get when missing; None when it cannot be."""
    if shutil.which("chromium") is None:
        root = [] if os.geteuid() == 0 else ["sudo", "-n"]
        for command in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
            subprocess.run([*root, "env", "DEBIAN_FRONTEND=noninteractive", *command],
                           capture_output=True, timeout=900)
    return shutil.which("chromium")


def test_the_report_draws_every_chart_in_chromium(passing, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("chromium is not installed and apt-get could not install it")
    _, out = passing
    done = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path}",
                           "--dump-dom", (out / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    charts = re.findall(r'<svg class="chart".*?</svg>', done.stdout, re.S)
    assert len(charts) == CHARTS, done.stderr[-2000:]
    for chart in charts:
        # Every chart has at least one series drawn through three or more points.
        longest = max((d.count(" L") + 1 for d in re.findall(r'class="series"[^>]*d="([^"]*)"',
                                                              chart)), default=0)
        assert longest >= 3, chart[:300]
