"""The Grafana dashboard and its provisioning files are well formed and agree with each other,
with the Prometheus configuration and with the metrics Kiln's handler records."""

import json
import re
from pathlib import Path

import yaml

from kiln.deploy import shadowing
from kiln.handlers import metrics, watch

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
GRAFANA = DEPLOY / "grafana"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "kiln.yaml"
DASHBOARD = GRAFANA / "dashboards" / "kiln.json"
GRID_WIDTH = 24
# What an expression may leave for Grafana to fill in.
VARIABLES = {"$model", "$__rate_interval"}
PANELS = [
    "Request rate per model", "Mean latency (TorchServe)", "Preprocess time p50 / p95 / p99",
    "Inference time p50 / p95 / p99", "Postprocess time p50 / p95 / p99", "Queue time",
    "Batch size", "HTTP 4xx / 5xx", "Rejected requests by reason", "CPU utilization (host)",
    "Memory used (host)", "Requests per version", "Inference time p50 / p99 per version",
    "Handler error ratio per version", "Shadow: top-1 agreement", "Shadow: |difference| mean / max",
    "Shadow: latency p99, candidate vs primary", "Shadow: sampled requests by outcome",
    "Answers by label", "Answer probability p10 / p50", "Label mix vs training",
    "Drift: input PSI", "Regression: output p10 / p50 / p90",
]  # fmt: skip
# Versions side by side: each of these panels keeps the version label of the series it reads.
VERSION_PANELS = {title: label for title, label in [
    ("Requests per version", "version"),
    ("Inference time p50 / p99 per version", "version"),
    ("Handler error ratio per version", "version"),
]}  # fmt: skip


def load_yaml(path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def dashboard():
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def datasource():
    (only,) = load_yaml(DATASOURCES)["datasources"]
    return only


def cells(grid_pos):
    x, y, w, h = (grid_pos[k] for k in ("x", "y", "w", "h"))
    return {(col, row) for col in range(x, x + w) for row in range(y, y + h)}


def test_datasource_is_the_prometheus_of_deploy_prometheus():
    source = datasource()
    scrape_interval = load_yaml(PROMETHEUS_CONFIG)["global"]["scrape_interval"]
    assert load_yaml(DATASOURCES)["apiVersion"] == 1
    assert (source["uid"], source["type"], source["access"], source["url"]) == (
        "kiln-prometheus", "prometheus", "proxy", "http://127.0.0.1:9090")
    # $__rate_interval is computed from it: it must be the real scrape interval.
    assert source["jsonData"]["timeInterval"] == scrape_interval


def test_prometheus_scrapes_torchserve_s_metrics_port_on_loopback():
    config = load_yaml(PROMETHEUS_CONFIG)
    (job,) = config["scrape_configs"]
    (targets,) = job["static_configs"]
    assert (job["job_name"], job["metrics_path"], targets["targets"]) == (
        "torchserve", "/metrics", ["127.0.0.1:8082"])


def test_dashboard_provider_loads_the_dashboards_folder():
    document = load_yaml(PROVIDERS)
    (provider,) = document["providers"]
    assert document["apiVersion"] == 1
    assert provider["type"] == "file"
    root = str(DEPLOY.parent)
    assert Path(provider["options"]["path"].replace("${KILN_ROOT}", root)) == DASHBOARD.parent


def test_panels_are_the_ones_asked_for_with_unique_ids_and_units():
    panels = dashboard()["panels"]
    assert [p["title"] for p in panels] == PANELS
    ids = [p["id"] for p in panels]
    assert len(set(ids)) == len(ids)
    assert {p["title"]: bool(p["fieldConfig"]["defaults"].get("unit")) for p in panels} == {
        title: True for title in PANELS}


def test_every_panel_and_target_uses_the_provisioned_datasource():
    uid = datasource()["uid"]
    for panel in dashboard()["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
            assert target["expr"].strip(), panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]


def test_panels_do_not_overlap_and_fit_the_grid():
    taken = {}
    for panel in dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["y"] >= 0 and pos["x"] + pos["w"] <= GRID_WIDTH, panel["title"]
        for cell in cells(pos):
            assert cell not in taken, f"{panel['title']} overlaps {taken.get(cell)}"
            taken[cell] = panel["title"]


def test_model_variable_lists_model_names_and_exprs_use_only_known_variables():
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    model = variables["model"]
    assert list(variables) == ["model"]
    assert model["datasource"]["uid"] == datasource()["uid"]
    assert model["query"]["query"] == "label_values(ts_inference_requests_total, model_name)"
    assert model["definition"] == model["query"]["query"]
    used = {v for p in dashboard()["panels"] for t in p["targets"]
            for v in re.findall(r"\$\w+", t["expr"])}
    assert used == VARIABLES


def test_dashboard_shows_every_metric_the_handler_records():
    exprs = " ".join(t["expr"] for p in dashboard()["panels"] for t in p["targets"])
    shown = {re.sub(r"_(bucket|sum|count)$", "", name)
             for name in re.findall(r"\bkiln_\w+", exprs)}
    assert shown == set(metrics.RECORDED) | set(shadowing.METRICS) | set(watch.METRICS)


def test_version_panels_keep_each_version_apart():
    panels = {p["title"]: p for p in dashboard()["panels"]}
    for title, label in VERSION_PANELS.items():
        for target in panels[title]["targets"]:
            groupings = re.findall(r"\bby \(([^)]*)\)", target["expr"])
            assert groupings and all(label in g.split(", ") for g in groupings), (title, target)
            assert f"{{{{{label}}}}}" in target["legendFormat"], title
