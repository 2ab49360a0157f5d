"""A shadow's figures read back from a Prometheus page as the OIP plugin writes them."""

from kiln.deploy import shadowing

PAGE = """\
# TYPE kiln_shadow_requests_total counter
kiln_shadow_requests_total{model_name="lenet",version="2.0",outcome="scored",} 40.0
kiln_shadow_requests_total{model_name="lenet",version="2.0",outcome="candidate_error",} 2.0
# TYPE kiln_shadow_rows_total counter
kiln_shadow_rows_total{model_name="lenet",version="2.0",} 40.0
# TYPE kiln_shadow_agreed_rows_total counter
kiln_shadow_agreed_rows_total{model_name="lenet",version="2.0",} 30.0
# TYPE kiln_shadow_latency_seconds histogram
kiln_shadow_latency_seconds_count{model_name="lenet",version="2.0",role="primary",} 42.0
kiln_shadow_latency_seconds_sum{model_name="lenet",version="2.0",role="primary",} 0.42
kiln_shadow_latency_seconds_count{model_name="lenet",version="2.0",role="candidate",} 40.0
kiln_shadow_latency_seconds_sum{model_name="lenet",version="2.0",role="candidate",} 0.8
# TYPE kiln_shadow_values_total counter
kiln_shadow_values_total{model_name="reg",version="3",} 4.0
# TYPE kiln_shadow_abs_diff_sum_total counter
kiln_shadow_abs_diff_sum_total{model_name="reg",version="3",} 0.5
# TYPE kiln_shadow_abs_diff_max gauge
kiln_shadow_abs_diff_max{model_name="reg",version="3",} 0.25
# TYPE ts_inference_requests_total counter
ts_inference_requests_total{model_name="lenet",model_version="2.0",} 9.0
"""


def test_each_shadow_gets_its_line():
    figures = shadowing.parse(PAGE)
    assert sorted(figures) == [("lenet", "2.0"), ("reg", "3")]
    assert figures[("lenet", "2.0")].line() == (
        "candidate_error 2 scored 40; agreement 75.0% of 40 rows; "
        "mean latency primary 10.0 ms, candidate 20.0 ms")
    assert figures[("reg", "3")].line() == "|diff| mean 0.125 max 0.25"


def test_an_unreadable_metrics_port_gives_no_figures():
    assert shadowing.read("http://127.0.0.1:1") == {}
