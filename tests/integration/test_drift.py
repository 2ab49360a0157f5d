"""Drift, live and small (loadtests/studies/drift.py with fewer requests): lenet and binary,
one worker each, on a real TorchServe; then the dashboard's drift and regression panels read
from a real Prometheus that scrapes it (tests/integration/test_dashboard.py leaves them here:
they need a worker's first drift.MIN_ROWS rows, and a regression model)."""

import json
import math
import time
from pathlib import Path

import pytest
from conftest import Prometheus, install_prometheus

from kiln.client import Client
from kiln.handlers import drift
from kiln.loadtests.studies import drift as study

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "kiln.json"
COUNT = 150  # requests per set: MIN_ROWS and then some
PANELS = {"Drift: ": ("lenet", "binary"), "Regression: ": ("diabetes",)}
WINDOW = "15s"  # as test_dashboard.py fills in $__rate_interval
DIABETES_ROW = [59.0, 2.0, 32.1, 101.0, 157.0, 93.2, 38.0, 4.0, 4.8598, 87.0]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    server = study.serve(tmp_path_factory.mktemp("drift"), models=(*study.MODELS, "diabetes"))
    with server.running(timeout=240):
        yield server


@pytest.fixture(scope="module")
def results(served):
    return {(r.model, r.name): r for r in study.study(served, COUNT)}


@pytest.fixture(scope="module")
def prometheus(served, tmp_path_factory):
    install_prometheus()
    prom = Prometheus(tmp_path_factory.mktemp("prometheus"), served.url("metrics"))
    try:
        prom.wait_ready()
        yield prom
    finally:
        prom.stop()


def test_training_like_sets_stay_under_and_shifted_ones_go_over(results):
    assert list(results) == [("lenet", "test split"), ("lenet", "inverted"),
                             ("lenet", "noisy grey background"),
                             ("binary", "test split"), ("binary", "features x2")]
    assert all(math.isfinite(r.final) for r in results.values())  # scored: MIN_ROWS came
    over = {key for key, r in results.items() if r.over_at is not None}
    assert over == {("lenet", "noisy grey background"), ("binary", "features x2")}
    # Those went over and stayed over; the others never went over at all.
    assert {key for key, r in results.items() if r.final > drift.THRESHOLD} == over
    assert {key for key, r in results.items() if r.highest > drift.THRESHOLD} == over


def panel_exprs(prefix):
    document = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [(p["title"], t["expr"]) for p in document["panels"] if p["title"].startswith(prefix)
            for t in p["targets"]]


def test_the_dashboard_s_drift_and_regression_panels_read_real_series(served, results,
                                                                      prometheus):
    client = Client(served.url("inference"), served.keys()["inference"])
    for _ in range(2):  # two scrapes with regression answers between them, inside WINDOW
        for _ in range(5):
            assert client.predict_json("diabetes", DIABETES_ROW).ok
        end = prometheus.scrape_after(time.time() + 0.5)
    empty_or_not_finite = {}
    for prefix, models in PANELS.items():
        for title, expr in panel_exprs(prefix):
            for model in models:
                filled = expr.replace("$model", model).replace("$__rate_interval", WINDOW)
                values = [float(s["value"][1]) for s in prometheus.query(filled, end)]
                if not values or not all(math.isfinite(v) for v in values):
                    empty_or_not_finite[f"{title} {model}: {filled}"] = values
    assert empty_or_not_finite == {}
