"""Server-Timing's value, from nginx's receipt time and the handler's stages."""

import sys

import pytest

from kiln.handlers import timing

TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize("received, started, expected", [
    ("1700000000.000", 1700000000.0105, 9.5),  # the receipt's millisecond counts as waited
    ("1700000000.010", 1700000000.0105, 0.0),  # never below 0
    (None, 1700000000.0, None),  # not through the front proxy
    ("soon", 1700000000.0, None),
    ("nan", 1700000000.0, None),
])
def test_queue_is_measured_from_the_end_of_nginxs_millisecond(received, started, expected):
    got = timing.queue_ms(received, started)
    assert got == (None if expected is None else pytest.approx(expected, abs=1e-3))


def test_the_header_names_four_stages_and_the_trace():
    assert timing.server_timing(1.25, 0.5, 2, 0.125, TRACE) == (
        "queue;dur=1.250, preprocess;dur=0.500, inference;dur=2.000, postprocess;dur=0.125, "
        f'traceparent;desc="{TRACE}"')


@pytest.mark.parametrize("traceparent", [None, "", 'x", evil;dur=1', TRACE.upper()])
def test_a_missing_or_odd_traceparent_is_left_out(traceparent):
    assert timing.server_timing(None, 0, 0, 0, traceparent) == (
        "preprocess;dur=0.000, inference;dur=0.000, postprocess;dur=0.000")


def test_spans_without_the_tracing_extra_are_a_clear_error(monkeypatch):
    from kiln.handlers import tracing

    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter",
                        None)  # as when the extra is not installed
    assert not tracing.sdk_present()
    with pytest.raises(RuntimeError, match=r"pip install 'kiln\[tracing\]'"):
        tracing.Exporter("http://127.0.0.1:4318")
