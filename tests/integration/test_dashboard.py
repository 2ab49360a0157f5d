"""Every PromQL expression of the Grafana dashboard returns data from a real Prometheus that
scrapes the test TorchServe after good and bad traffic to every model."""

import json
import math
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from kiln import declaration
from kiln.loadtests.monitor import parse_metrics

MODELS = declaration.default_set()
ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "kiln.json"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
FIXTURES = ROOT / "tests" / "fixtures"
SEVEN = (FIXTURES / "digits" / "7.png").read_bytes()
BENIGN = (FIXTURES / "breast_cancer" / "benign.json").read_bytes()
# (content type, good body, bad body): each bad body is a 400 and a rejection.
BODIES = {
    "lenet": ("image/png", SEVEN, b"not an image"),
    "mlp": ("image/png", SEVEN, b"not an image"),
    "rnn": ("image/png", SEVEN, b"not an image"),
    "binary": ("application/json", BENIGN, b"[1, 2]"),
}
GOOD, BAD = 6, 2
# What Grafana would put in for its own variables; four scrapes of the test's Prometheus
# and more, as Grafana's $__rate_interval is.
WINDOW = "15s"
# The dashboard's shadow row.
SHADOW_PANELS = "Shadow: "
# Panels that need more than this module's traffic: a worker's drift score after its first
# drift.MIN_ROWS rows, a regression model (none in the default set); both are read from a real
# Prometheus in tests/integration/test_drift.py.
ELSEWHERE = ("Drift: ", "Regression: ")
# A worker's metric lines reach the frontend a moment after its answers reach the client.
SETTLE_S = 0.5


def exprs(shadow=False):
    """The dashboard's expressions; the shadow row's (which need a shadow version to show
    anything: tests/integration/test_shadow.py) or all the others."""
    document = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [(panel["title"], target["refId"], target["expr"])
            for panel in document["panels"] for target in panel["targets"]
            if panel["title"].startswith(SHADOW_PANELS) == shadow
            and not panel["title"].startswith(ELSEWHERE)]


def for_model(expr, model):
    return (expr.replace("$model", model).replace("$__rate_interval", WINDOW)
            .replace("$__interval", WINDOW))


def send_round(server, client):
    """GOOD good and BAD bad requests to every model, from a few threads; their statuses."""
    jobs = [(model, body) for model, (_, good, bad) in BODIES.items()
            for body in [good] * GOOD + [bad] * BAD]

    def one(job):
        model, body = job
        headers = {"Content-Type": BODIES[model][0], "Authorization": f"Bearer {client.token}"}
        return requests.post(f"{server.url('inference')}/predictions/{model}", data=body,
                             headers=headers, timeout=30).status_code

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, jobs))


@pytest.fixture(scope="module")
def scraped(server, client, prometheus):
    """The time of a scrape that followed two rounds of traffic, each after a scrape of its own,
    so that every counter has grown between two samples inside WINDOW."""
    expected = ([200] * GOOD + [400] * BAD) * len(BODIES)
    for _ in range(2):
        before = answered(server)
        assert send_round(server, client) == expected
        # The workers record answers in batches (handlers/watch.py): up to 0.5 s later.
        deadline = time.monotonic() + 30
        while any(now < before[m] + GOOD for m, now in answered(server).items()):
            assert time.monotonic() < deadline, "the workers never recorded the answers"
            time.sleep(0.05)
        end = prometheus.scrape_after(time.time() + SETTLE_S)
    return end


def answered(server):
    """{model: the answers its workers have recorded}, for each of BODIES' models, from one
    read of Kiln's metrics port."""
    page = parse_metrics(requests.get(f"{server.url('metrics')}/metrics", timeout=10).text)
    return {model: sum(value for (name, labels), value in page.items()
                       if name == "kiln_answer_top_probability_count"
                       and ("model_name", model) in labels)
            for model in BODIES}


def test_shipped_prometheus_config_passes_promtool(promtool):
    done = subprocess.run([str(promtool), "check", "config", str(PROMETHEUS_CONFIG)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


def test_model_variable_lists_every_served_model(prometheus, scraped):
    r = requests.get(f"{prometheus.url}/api/v1/label/model_name/values", timeout=10,
                     params={"match[]": "ts_inference_requests_total"})
    assert r.json() == {"status": "success", "data": sorted(MODELS)}


@pytest.mark.parametrize("model", MODELS)
def test_every_dashboard_expr_returns_finite_data(prometheus, scraped, model):
    empty_or_not_finite = {}
    for title, ref_id, expr in exprs():
        result = prometheus.query(for_model(expr, model), scraped)
        values = [float(series["value"][1]) for series in result]
        if not values or not all(math.isfinite(v) for v in values):
            empty_or_not_finite[f"{title} {ref_id}: {for_model(expr, model)}"] = result
    assert empty_or_not_finite == {}


@pytest.mark.parametrize("model", MODELS)
def test_version_panels_show_the_served_version_apart(prometheus, scraped, model):
    """Each model serves its declaration's version here: every series of a per-version panel
    names it. (TorchServe's own counters would say model_version="default" here: they name
    the version only of a request whose path names it.)"""
    shown = {}
    for title, ref_id, expr in exprs():
        if title.endswith("per version"):
            result = prometheus.query(for_model(expr, model), scraped)
            shown[f"{title} {ref_id}"] = {
                (s["metric"]["model_name"], s["metric"]["version"]) for s in result}
    expected = {(model, declaration.get(model).version)}
    assert shown == {key: expected for key in [
        "Requests per version A", "Inference time p50 / p99 per version A",
        "Inference time p50 / p99 per version B", "Handler error ratio per version A"]}
