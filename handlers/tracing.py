"""OTLP spans of one request, through the OpenTelemetry SDK (Kiln's `tracing` extra), when an
OTLP endpoint is configured (kiln serve --otlp-endpoint; workers get ENDPOINT_ENV).

A trace of one request: the caller's span -> `proxy` (nginx's span, made from its access log
line by deploy/proxy_spans.py) -> `queue`, `preprocess`, `inference`, `postprocess` (made here,
by the worker, with the times Server-Timing reports, kiln.handlers.timing). Both sides know
the proxy's span id: nginx sends it to the worker as the traceparent's parent id and writes it
in its access log line. The spans are built with their known ids and times as the SDK's
ReadableSpan and handed to its BatchSpanProcessor, which exports them in the background.
"""

import logging
import re

logger = logging.getLogger(__name__)

ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
SERVICE_NAME = "kiln"
# How long a span may wait in the SDK's queue before it is sent: the SDK's own default, 5 s,
# or OTEL_BSP_SCHEDULE_DELAY (ms), which the SDK reads. Each export is an HTTP request from
# every worker: at 0.5 s, 1% of lenet's traces cost its workers about 6 us a request under
# load (py-spy, kiln bench's observability pair), mostly the exports' HTTP.
SCHEDULE_DELAY_ENV = "OTEL_BSP_SCHEDULE_DELAY"
SAMPLED_LAST_DIGITS = frozenset("13579bdf")  # the flags are lowercase hex (TRACEPARENT)
TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
MISSING_EXTRA = ("an OTLP endpoint needs the OpenTelemetry SDK: install Kiln's tracing extra "
                 "(pip install 'kiln[tracing]')")


def traces_url(endpoint):
    """OTLP/HTTP's traces path under an endpoint, as OTEL_EXPORTER_OTLP_ENDPOINT means it."""
    return endpoint.rstrip("/") + "/v1/traces"


def sdk_present():
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        return False
    return True


class Exporter:
    """Spans of known ids and times to an OTLP/HTTP endpoint, in the background."""

    def __init__(self, endpoint, attributes=None):
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
        except ImportError:
            raise RuntimeError(MISSING_EXTRA) from None
        self.resource = Resource.create({"service.name": SERVICE_NAME, **(attributes or {})})
        self.processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(endpoint)))
        self.ids = RandomIdGenerator()

    def new_span_id(self):
        return self.ids.generate_span_id()

    def span(self, name, trace_id, span_id, parent_id, start_ns, end_ns, attributes=None,
             sampled=True):
        """Queues one finished span (ids as ints; parent_id None: a root span)."""
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.trace import SpanContext, TraceFlags

        flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
        parent = (SpanContext(trace_id, parent_id, is_remote=True, trace_flags=flags)
                  if parent_id else None)
        self.processor.on_end(ReadableSpan(
            name, context=SpanContext(trace_id, span_id, is_remote=False, trace_flags=flags),
            parent=parent, resource=self.resource, attributes=attributes or {},
            start_time=start_ns, end_time=max(start_ns, end_ns)))

    def shutdown(self):
        self.processor.shutdown()


class Off:
    def record(self, clock, idx, traceparent, received):
        pass


class StageSpans:
    """The worker's spans of each request of a batch, children of the proxy's span."""

    def __init__(self, exporter, model, version):
        self.exporter = exporter
        self.attributes = {"kiln.model": model, "kiln.version": version}

    def record(self, clock, idx, traceparent, received):
        """`clock`: the batch's timing.BatchClock; `received`: nginx's receipt ($msec)."""
        # The flags' sampled bit is the last hex digit's lowest: at a production sample rate
        # nearly every request stops here, before the regular expression (about 1 us).
        if not traceparent or traceparent[-1] not in SAMPLED_LAST_DIGITS:
            return
        match = TRACEPARENT.fullmatch(traceparent)
        if match is None or not int(match[3], 16) & 1:  # none, or not sampled
            return
        trace_id, parent_id = int(match[1], 16), int(match[2], 16)
        attributes = {**self.attributes, "kiln.batch_size": clock.batch_size}
        for name, start_ns, end_ns in clock.stages(idx, received):
            self.exporter.span(name, trace_id, self.exporter.new_span_id(), parent_id,
                               start_ns, end_ns, attributes)


def for_worker(environ, model, version):
    """The stage spans of a worker when environ names an endpoint, else Off."""
    endpoint = environ.get(ENDPOINT_ENV)
    if not endpoint:
        return Off()
    logger.info("OTLP spans of %s to %s", model, traces_url(endpoint))
    return StageSpans(Exporter(endpoint), model, version)
