"""The load-test report's data preparation and charts, from a committed locust CSV sample,
synthetic scrapes and the scrapes of what the handler's own recorder wrote."""

import html
import math
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from kiln.handlers import metrics
from kiln.loadtests import monitor, report, report_data, report_text, svg
from kiln.loadtests.thresholds import Check

SAMPLE = Path(__file__).resolve().parent.parent / "fixtures" / "loadtest" / "stats_history.csv"
T0 = 1795331535.0
METRICS = """# TYPE ts_queue_latency_microseconds counter
ts_queue_latency_microseconds{model_name="lenet",model_version="default",hostname="vm",} 3000.0
ts_inference_requests_total{model_name="lenet",model_version="default",hostname="vm",} 4.0
kiln_inference_seconds_sum{model_name="lenet",Hostname="vm",} 0.25
kiln_inference_seconds_count{model_name="lenet",Hostname="vm",} 5.0
jvm_threads 12
"""


def test_history_keeps_the_aggregated_rows_only():
    h = report_data.read_history(SAMPLE, T0)
    assert h["users"] == [(0.0, 0.0), (1.0, 1.0), (2.0, 1.0), (3.0, 1.0), (4.0, 2.0)]
    assert h["rps"] == [(0.0, 0.0), (1.0, 0.0), (2.0, 0.0), (3.0, 2.0), (4.0, 5.5)]
    assert h["p95"] == [(1.0, 0.0), (2.0, 67.0), (3.0, 21.0), (4.0, 21.0)]  # N/A left out
    assert h["requests"][-1] == (4.0, 46.0)


def test_parse_metrics_keeps_kiln_and_torchserve_series():
    samples = monitor.parse_metrics(METRICS)
    assert samples == {
        ("ts_queue_latency_microseconds", (("model_name", "lenet"), ("model_version", "default"))):
            3000.0,
        ("ts_inference_requests_total", (("model_name", "lenet"), ("model_version", "default"))):
            4.0,
        ("kiln_inference_seconds_sum", (("model_name", "lenet"),)): 0.25,
        ("kiln_inference_seconds_count", (("model_name", "lenet"),)): 5.0,
    }  # fmt: skip


def scaled(factor):
    return {key: value * factor for key, value in monitor.parse_metrics(METRICS).items()}


def test_server_split_is_per_interval_means_from_deltas():
    scrapes = [(T0, scaled(1)), (T0 + 2, scaled(1)), (T0 + 4, scaled(3))]
    split = report_data.server_split(scrapes, T0, "lenet")
    # 6000 us over 8 requests; 0.5 s over 10 requests. The idle interval has no point.
    assert split == {"queue": [(4.0, 0.75)], "preprocess": [], "inference": [(4.0, 50.0)],
                     "postprocess": []}
    assert report_data.server_split(scrapes, T0, "mlp")["queue"] == []


def test_server_split_reads_the_series_the_handler_records():
    registry = CollectorRegistry()
    ticks = iter([0.0, 0.125, 1.0, 1.0625, 2.0, 2.0])  # (start, end) of each stage, in seconds
    recorder = metrics.Recorder(metrics.declare(registry), "lenet", clock=lambda: next(ticks))

    def scrape():
        return monitor.parse_metrics(generate_latest(registry).decode())

    before = scrape()
    for stage, requests in (("preprocess", 4), ("inference", 4), ("postprocess", 4)):
        recorder.record_stage(stage, recorder.now(), requests)
    recorder.record_batch(4)
    scrapes = [(T0, before), (T0 + 2, scrape())]
    split = report_data.server_split(scrapes, T0, "lenet")
    assert split == {"queue": [], "preprocess": [(2.0, 125.0)], "inference": [(2.0, 62.5)],
                     "postprocess": [(2.0, 0.0)]}
    assert report_data.batch_sizes(scrapes, T0, "lenet") == [(2.0, 4.0)]


def test_cpu_series_drops_psutil_s_first_baseline():
    samples = [(T0, {"server": 0.0, "client": 0.0}), (T0 + 1, {"server": 150.0, "client": 40.0}),
               (T0 + 2, {"server": 50.0, "client": 20.0})]
    cpu = report_data.cpu_series(samples, T0)
    assert cpu == {"server": [(1.0, 150.0), (2.0, 50.0)], "client": [(1.0, 40.0), (2.0, 20.0)]}
    assert report_data.summary(cpu["server"]) == (100.0, 150.0)
    assert all(math.isnan(v) for v in report_data.summary([]))


def test_chart_draws_one_path_per_series_with_data():
    chart = svg.line_chart("t", {"a": [(0, 1), (1, 3)], "b": []}, "ms")
    assert chart.count('<path class="series"') == 1
    assert 'data-points="2"' in chart and "b (no data)" in chart
    assert svg.nice_max(3.2) == 5 and svg.nice_max(12) == 20 and svg.nice_max(0) == 1.0


def test_report_has_six_charts_and_the_verdict():
    run = report.Run("lenet", "step", 4, 4.0, 12, "http://x", T0,
                     [Check("p95 ms", "<= 0.001", 18, False)],
                     report_data.read_history(SAMPLE, T0),
                     [(T0, scaled(1)), (T0 + 2, scaled(3))],
                     [(T0, {"server": 0.0}), (T0 + 1, {"server": 90.0})], cores=2)
    page = report.render(run)
    assert page.count('<svg class="chart"') == 6
    assert "<script" not in page and "http://x" in page and "FAILED" in page
    assert "<td>server</td><td>90 %</td><td>90 %</td>" in page


STATS = SAMPLE.parent / "stats.csv"
CHECKS = [Check("requests", "> 0", 412, True), Check("p95 ms", "<= 20", 21, False)]


def test_endpoint_rows_are_locust_s_totals_as_printed():
    assert report_data.read_endpoints(STATS) == [
        ("POST /predictions/lenet", "412", "0", "41.19", "11", "21", "67"),
        ("POST /v2/models/lenet/infer", "0", "0", "0.00", "N/A", "N/A", "N/A"),
        ("Aggregated", "412", "3", "41.19", "11", "21", "67"),
    ]


def test_terminal_summary_prints_the_endpoints_and_each_threshold():
    assert report_text.render(report_data.read_endpoints(STATS), CHECKS) == """\
endpoint                     requests  failures  req/s  p50 ms  p95 ms  p99 ms
POST /predictions/lenet           412         0  41.19      11      21      67
POST /v2/models/lenet/infer         0         0   0.00     N/A     N/A     N/A
Aggregated                        412         3  41.19      11      21      67

thresholds: FAILED
threshold  limit  actual  result
requests     > 0     412    held
p95 ms     <= 20      21  FAILED"""
    assert report_text.render([], []).endswith("thresholds: not evaluated\n"
                                               "threshold  limit  actual  result")


def test_report_holds_the_same_endpoint_and_verdict_cells():
    endpoints = report_data.read_endpoints(STATS)
    page = report.render(report.Run("lenet", "step", 4, 4.0, 12, "http://x", T0, CHECKS,
                                    endpoints=endpoints))
    assert html_rows(page) == [list(report_data.VERDICT_HEADER),
                               *map(list, report_data.verdict_rows(CHECKS)),
                               list(report_data.ENDPOINT_HEADER), *map(list, endpoints),
                               ["processes", "mean", "peak"]]


def html_rows(page):
    """Every table row of a page as its cells' text."""
    return [[html.unescape(c) for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", page)]
