"""The HPA's custom metric, end to end but for the adapter itself: prometheus-adapter's rule
(deploy/k8s/prometheus-adapter/rules.yaml) finds its series and runs its query, filled in as
the adapter fills it for the HPA's pods, against a real Prometheus that scrapes a real
TorchServe labelled the way Kubernetes service discovery labels a pod; the answer agrees with
the traffic the test sent."""

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml
from conftest import Prometheus, install_prometheus

from kiln import declaration

MODELS = declaration.default_set()
ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "k8s" / "prometheus-adapter" / "rules.yaml"
HPA = ROOT / "deploy" / "k8s" / "base" / "hpa.yaml"
FIXTURES = ROOT / "tests" / "fixtures"
SEVEN = (FIXTURES / "digits" / "7.png").read_bytes()
BENIGN = (FIXTURES / "breast_cancer" / "benign.json").read_bytes()
BODIES = {"lenet": ("image/png", SEVEN), "mlp": ("image/png", SEVEN),
          "rnn": ("image/png", SEVEN), "binary": ("application/json", BENIGN)}
# What Kubernetes service discovery would label the scraped pod with; the HPA's target has a
# second pod that has not been scraped yet, and the adapter asks for both.
NAMESPACE, POD, NEW_POD = "kiln-test", "kiln-0", "kiln-1"
CLIENTS, PER_CLIENT = 4, 12
# A worker's metric lines reach the frontend a moment after its answers reach the client.
SETTLE_S = 0.5


def rule() -> dict:
    (only,) = yaml.safe_load(RULES.read_text())["rules"]
    return only


def fill(template: str, series: str, namespace: str, pods: list[str]) -> str:
    """The metricsQuery as prometheus-adapter builds it for pods of one namespace
    (pkg/naming/metrics_query.go: `label="value"` matchers joined by commas, a regex
    alternation for more than one name, grouped by the resource's label)."""
    pod_matcher = f'pod="{pods[0]}"' if len(pods) == 1 else f'pod=~"{"|".join(pods)}"'
    query = (template.replace("<<.Series>>", series)
             .replace("<<.LabelMatchers>>", f'namespace="{namespace}",{pod_matcher}')
             .replace("<<.GroupBy>>", "pod"))
    assert "<<" not in query, query
    return query


def send(server, client, model) -> float:
    """One request; the seconds the client waited for it."""
    content_type, body = BODIES[model]
    headers = {"Content-Type": content_type, "Authorization": f"Bearer {client.token}"}
    began = time.perf_counter()
    r = requests.post(f"{server.url('inference')}/predictions/{model}", data=body,
                      headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return time.perf_counter() - began


@pytest.fixture(scope="module")
def warmed(server, client):
    """One request per model, so that every series exists before Prometheus first looks."""
    assert set(BODIES) == set(MODELS)
    for model in MODELS:
        send(server, client, model)


@pytest.fixture(scope="module")
def pod_prometheus(server, warmed, tmp_path_factory):
    """A fresh Prometheus (nothing in its window but what this module sends) that labels the
    test TorchServe's series as the kubernetes-pods job labels a pod's."""
    install_prometheus()
    prom = Prometheus(tmp_path_factory.mktemp("prometheus-pod"), server.url("metrics"),
                      labels={"namespace": NAMESPACE, "pod": POD})
    try:
        prom.wait_ready()
        yield prom
    finally:
        prom.stop()


@pytest.fixture(scope="module")
def traffic(server, client, pod_prometheus):
    """CLIENTS closed-loop clients, PER_CLIENT requests to each model each; the scrape before,
    the scrape after, and the seconds the clients waited in all."""
    start = pod_prometheus.scrape_after(time.time() + SETTLE_S)
    jobs = [model for model in MODELS for _ in range(CLIENTS * PER_CLIENT)]
    with ThreadPoolExecutor(CLIENTS) as pool:
        waited = sum(pool.map(lambda model: send(server, client, model), jobs))
    end = pod_prometheus.scrape_after(time.time() + SETTLE_S)
    return {"start": start, "end": end, "requests": len(jobs), "waited_s": waited}


def pod_total(prom, metric, at) -> float:
    return prom.value(f'sum({metric}{{namespace="{NAMESPACE}",pod="{POD}"}})', at)


def test_series_query_finds_the_series_of_every_model_on_the_pod(pod_prometheus, traffic):
    r = requests.get(f"{pod_prometheus.url}/api/v1/series", timeout=10, params={
        "match[]": rule()["seriesQuery"], "start": traffic["start"], "end": traffic["end"]})
    found = [s for s in r.json()["data"] if s["model_version"] == "default"]
    # One per model asked without a version (as this module asks); a model asked by version
    # (/predictions/NAME/1.0, as other tests of this session ask) has a series of its own too,
    # and the rule's query sums them per pod.
    assert sorted((s["__name__"], s["namespace"], s["pod"], s["model_name"]) for s in found) == \
        sorted(("ts_inference_latency_microseconds", NAMESPACE, POD, m) for m in MODELS)
    # Each series carries the labels the rule's resources name (Kubernetes service discovery
    # adds them in a cluster), TorchServe's own, and the scrape's; the query sums them away.
    assert {tuple(sorted(s)) for s in r.json()["data"]} == {tuple(sorted({
        "__name__", "namespace", "pod", "model_name", "model_version", "hostname", "instance",
        "job"}))}
    assert set(rule()["resources"]["overrides"]) == {"namespace", "pod"}


def test_rule_names_the_metric_the_hpa_scales_on():
    pods_metric = yaml.safe_load(HPA.read_text())["spec"]["metrics"][0]["pods"]["metric"]
    name = rule()["name"]
    renamed = re.sub(name["matches"], name["as"], "ts_inference_latency_microseconds")
    assert renamed == pods_metric["name"] == "kiln_inflight_requests"


def test_traffic_is_counted_exactly_and_took_no_longer_server_side(pod_prometheus, traffic):
    prom, start, end = pod_prometheus, traffic["start"], traffic["end"]
    requests_seen = (pod_total(prom, "ts_inference_requests_total", end)
                     - pod_total(prom, "ts_inference_requests_total", start))
    assert requests_seen == traffic["requests"]
    inside_s = (pod_total(prom, "ts_inference_latency_microseconds", end)
                - pod_total(prom, "ts_inference_latency_microseconds", start)) / 1e6
    assert 0 < inside_s <= traffic["waited_s"]


def test_metrics_query_gives_the_pods_requests_in_flight(pod_prometheus, traffic):
    prom, start, end = pod_prometheus, traffic["start"], traffic["end"]
    query = fill(rule()["metricsQuery"], "ts_inference_latency_microseconds", NAMESPACE,
                 [POD, NEW_POD])
    result = prom.query(query, end)
    assert [series["metric"] for series in result] == [{"pod": POD}]
    in_flight = float(result[0]["value"][1])

    # Everything in the window happened between this Prometheus' first scrape and `end`, so
    # the rate is the seconds spent inside TorchServe over the window, give or take
    # Prometheus' extrapolation: at most half a scrape interval beyond each end of the samples.
    window_s = float(re.search(r"\[(\d+)m\]", query).group(1)) * 60
    times = sorted({float(t) for series in prom.query(
        f'ts_inference_latency_microseconds{{pod="{POD}"}}[{int(window_s)}s]', end)
        for t, _ in series["values"]})
    first, span = times[0], times[-1] - times[0]
    assert first <= start and times[-1] == end and end - first < window_s
    interval = span / (len(times) - 1)
    inside_s = (pod_total(prom, "ts_inference_latency_microseconds", end)
                - pod_total(prom, "ts_inference_latency_microseconds", first)) / 1e6
    assert inside_s / window_s <= in_flight <= inside_s / window_s * (span + interval) / span
