"""Kiln's Prometheus metrics: stage times per request, batch sizes, rejections by reason.

The metrics are declared in metrics.yaml beside this file (it ships in the archive). In
prometheus mode a TorchServe worker reports each observation as a [METRICS] line on its
stdout, and the frontend adds it to the series it serves on its metrics endpoint; see
metrics.yaml for why times are in centiseconds.
"""

import logging
import os
import time

import yaml
from ts.metrics.metric_type_enum import MetricTypes

from kiln.handlers.errors import REJECT_REASONS

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.yaml"
MODEL_LABEL = "model_name"
REASON_LABEL = "reason"
STAGES = ("preprocess", "inference", "postprocess")
BATCH_SIZE_METRIC = "kiln_batch_size_requests"
REJECTED_METRIC = "kiln_requests_rejected_total"
CENTISECONDS_PER_SECOND = 100


def stage_metric(stage):
    return f"kiln_{stage}_centiseconds"


# What the handler records, as metrics.yaml must declare it: name -> (type, label names).
RECORDED = {
    **{stage_metric(stage): ("histogram", [MODEL_LABEL]) for stage in STAGES},
    BATCH_SIZE_METRIC: ("histogram", [MODEL_LABEL]),
    REJECTED_METRIC: ("counter", [MODEL_LABEL, REASON_LABEL]),
}


def read_declarations(path):
    """metrics.yaml as {name: (type, unit, label names)}; a malformed file raises ValueError."""
    with open(path, encoding="utf-8") as f:
        document = yaml.safe_load(f) or {}
    sections = document.get("model_metrics")
    if not isinstance(sections, dict):
        raise ValueError(f"{path}: expected a model_metrics mapping")
    declared = {}
    for kind, entries in sections.items():
        if kind not in {t.value for t in MetricTypes}:
            raise ValueError(f"{path}: unknown metric type {kind!r}")
        for entry in entries or []:
            try:
                declared[entry["name"]] = (kind, entry["unit"], list(entry["dimensions"]))
            except (KeyError, TypeError):
                raise ValueError(
                    f"{path}: each metric needs a name, a unit and dimensions, got {entry!r}"
                ) from None
    return declared


def check_declarations(declared):
    """Raises ValueError unless the declarations are exactly what the handler records: a
    metric recorded but not declared, or declared with other labels, would be dropped."""
    found = {name: (kind, labels) for name, (kind, _, labels) in declared.items()}
    if found != RECORDED:
        raise ValueError(f"metrics.yaml declares {found}, the handler records {RECORDED}")


def recorder_for(context):
    """A Recorder on the worker's metrics cache, with the archive's declarations registered;
    a Recorder that records nothing where there is no cache (a handler outside TorchServe)."""
    if context.metrics is None:
        logger.info("no TorchServe metrics cache: Kiln's metrics are not recorded")
        return Recorder()
    declared = read_declarations(os.path.join(os.path.dirname(__file__), METRICS_FILE))
    check_declarations(declared)
    metrics = {
        name: context.metrics.add_metric_to_cache(name, unit, labels, MetricTypes(kind))
        for name, (kind, unit, labels) in declared.items()
    }
    return Recorder(metrics, context.model_name)


def rejection_reason(err):
    """The reason label of a BadInput: one of REJECT_REASONS, never free text."""
    reason = getattr(err, "reason", "other")
    if reason not in REJECT_REASONS:
        logger.warning("rejection reason %r is not in REJECT_REASONS; counted as other", reason)
        return "other"
    return reason


class Recorder:
    """Records one model's observations; `metrics` maps a metric name to TorchServe's
    metric object. Without it (the default) every call is a no-op."""

    def __init__(self, metrics=None, model_name="", clock=time.perf_counter):
        self._metrics = metrics or {}
        self._model = model_name
        self._clock = clock

    def now(self):
        """A start time for record_stage()."""
        return self._clock()

    def record_stage(self, stage, started, requests=1):
        """How long `stage` took since `started`, once per request it served: a model call
        scores a whole batch, and each of its requests waited that long for it."""
        centiseconds = (self._clock() - started) * CENTISECONDS_PER_SECOND
        for _ in range(requests):
            self._emit(stage_metric(stage), centiseconds)

    def record_batch(self, size):
        self._emit(BATCH_SIZE_METRIC, size)

    def record_rejection(self, err):
        self._emit(REJECTED_METRIC, 1, rejection_reason(err))

    def _emit(self, name, value, *labels):
        metric = self._metrics.get(name)
        if metric is not None:
            metric.add_or_update(value, [self._model, *labels])
