"""A real Prometheus scrapes the test TorchServe, and what it reads back through its HTTP API
matches the traffic the test sent: counts exactly, the rate and the p95 consistently."""

import logging
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from kiln.handlers import metrics

log = logging.getLogger("kiln.tests")

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MODEL = "binary"
GOOD_BODY = (FIXTURES / "breast_cancer" / "benign.json").read_bytes()
BAD_BODY = b"[1, 2]"  # two features where the model takes 30
BAD_REASON = "bad_shape"
GOOD, BAD = 24, 8
# TorchServe counts a request a moment after its answer reaches the client.
SETTLE_S = 0.5
# The largest finite bucket bound of Kiln's stage histograms, in seconds.
TOP_BUCKET = metrics.STAGE_BUCKETS_S[-1]
SELECT = f'{{model_name="{MODEL}"}}'

# What promtool's lint says about series TorchServe itself exports, which Kiln cannot rename:
# its CamelCase system and worker metrics, counters without _total, microsecond units.
TORCHSERVE_PROBLEMS = {
    (name, "metric names should be written in 'snake_case' not 'camelCase'")
    for name in ("QueueTime", "WorkerThreadTime", "WorkerLoadTime", "CPUUtilization",
                 "MemoryUsed", "MemoryAvailable", "MemoryUtilization", "DiskUsage",
                 "DiskUtilization", "DiskAvailable", "GPUMemoryUtilization", "GPUMemoryUsed",
                 "GPUUtilization", "PredictionTime", "HandlerTime")
} | {
    (name, "label names should be written in 'snake_case' not 'camelCase'")
    for name in ("WorkerLoadTime", "PredictionTime", "HandlerTime", "GPUMemoryUtilization",
                 "GPUMemoryUsed", "GPUUtilization")
} | {
    (name, 'counter metrics should have "_total" suffix')
    for name in ("Requests2XX", "Requests4XX", "Requests5XX",
                 "ts_inference_latency_microseconds", "ts_queue_latency_microseconds")
} | {
    (name, 'use base unit "seconds" instead of "microseconds"')
    for name in ("ts_inference_latency_microseconds", "ts_queue_latency_microseconds")
}  # fmt: skip
# Kiln's own series, in base units with Kiln's buckets (handlers/metrics.py), pass as they are.
KILN_PROBLEMS = set()


# --- traffic ----------------------------------------------------------------------------


def send(server, client, bodies, threads=4):
    """Posts each body to MODEL from a few threads (so that some share a batch); statuses."""
    url = f"{server.url('inference')}/predictions/{MODEL}"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {client.token}"}

    def one(body):
        return requests.post(url, data=body, headers=headers, timeout=30).status_code

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, bodies))


# Counters whose increase over the test's traffic is known exactly.
COUNTS = {
    "requests": f"ts_inference_requests_total{SELECT}",
    "batched": f"kiln_batch_size_requests_sum{SELECT}",
    "preprocessed": f"kiln_preprocess_seconds_count{SELECT}",
    "inferred": f"kiln_inference_seconds_count{SELECT}",
    "postprocessed": f"kiln_postprocess_seconds_count{SELECT}",
    "rejected": f'kiln_requests_rejected_total{{model_name="{MODEL}",reason="{BAD_REASON}"}}',
}


def counts(prom, at):
    return {name: prom.value(f"sum({expr})", at) for name, expr in COUNTS.items()}


def bucket_counts(prom, at):
    """{upper bound: cumulative count} of the inference-time histogram at `at`."""
    result = prom.query(f"sum by (le) (kiln_inference_seconds_bucket{SELECT})", at)
    return {float(r["metric"]["le"]): float(r["value"][1]) for r in result}


def quantile_bucket(before, after, q):
    """(lower, upper) bounds of the bucket holding the q-quantile of what came in between."""
    bounds = sorted(after)
    total = after[float("inf")] - before.get(float("inf"), 0.0)
    lower = 0.0
    for upper in bounds:
        if after[upper] - before.get(upper, 0.0) >= q * total:
            return lower, upper
        lower = upper
    raise AssertionError(f"no bucket reaches {q} of {total}")


def test_prometheus_reads_back_what_was_sent(server, client, prometheus):
    # One request of each kind first, so that every series exists before the baseline.
    assert send(server, client, [GOOD_BODY, BAD_BODY]) == [200, 400]
    start = prometheus.scrape_after(time.time() + SETTLE_S)
    before, buckets_before = counts(prometheus, start), bucket_counts(prometheus, start)

    statuses = send(server, client, [GOOD_BODY] * GOOD + [BAD_BODY] * BAD)
    assert statuses == [200] * GOOD + [400] * BAD
    end = prometheus.scrape_after(time.time() + SETTLE_S)
    after = counts(prometheus, end)

    assert {name: after[name] - before[name] for name in COUNTS} == {
        "requests": GOOD + BAD, "batched": GOOD + BAD, "preprocessed": GOOD + BAD,
        "inferred": GOOD, "postprocessed": GOOD, "rejected": BAD,
    }  # fmt: skip
    # A window from one scrape to another holds both samples: Prometheus then has nothing to
    # extrapolate, and the rate is exactly the requests sent over the window.
    window = f"{round((end - start) * 1000)}ms"
    rate = prometheus.value(f"sum(rate(ts_inference_requests_total{SELECT}[{window}]))", end)
    # Exact up to the sample timestamps, which Prometheus keeps in whole milliseconds.
    assert rate == pytest.approx((GOOD + BAD) / (end - start), rel=1e-6)

    p95 = prometheus.value(
        f"histogram_quantile(0.95, sum by (le) "
        f"(increase(kiln_inference_seconds_bucket{SELECT}[{window}])))", end)
    lower, upper = quantile_bucket(buckets_before, bucket_counts(prometheus, end), 0.95)
    assert 0.0 < p95 <= TOP_BUCKET
    assert lower < p95 <= upper


def test_metrics_endpoint_passes_promtool_but_for_torchserve_s_own_series(
        server, client, prometheus, promtool):
    assert send(server, client, [GOOD_BODY, BAD_BODY]) == [200, 400]
    time.sleep(SETTLE_S)
    text = requests.get(f"{server.url('metrics')}/metrics", timeout=10).text
    for name in metrics.RECORDED:
        assert f"# TYPE {name} " in text  # promtool sees Kiln's series, not an empty page

    done = subprocess.run([str(promtool), "check", "metrics"], input=text,
                          capture_output=True, text=True, timeout=30)

    flagged = {tuple(line.split(" ", 1)) for line in
               (done.stdout + done.stderr).splitlines() if line.strip()}
    assert flagged - TORCHSERVE_PROBLEMS == KILN_PROBLEMS
