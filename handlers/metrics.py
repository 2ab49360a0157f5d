"""Kiln's Prometheus metrics: stage times per request, batch sizes, rejections by reason.

Recorded in the worker's own process with prometheus-client in multiprocess mode: each
observation is a few writes to a memory-mapped file in PROMETHEUS_MULTIPROC_DIR (set by
Kiln's server for its workers), which Kiln's metrics exporter (deploy/metrics_exporter.py)
sums over every worker when Prometheus scrapes it. TorchServe's own metrics API would print
a log line per observation for its frontend to parse: that cost more CPU per request than
decoding the request did (docs/deploy.md has the figures). Times are in seconds, in buckets
Kiln chooses.
"""

import logging
import time

from prometheus_client import Counter, Histogram

from kiln.handlers.errors import REJECT_REASONS

logger = logging.getLogger(__name__)

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
MODEL_LABEL = "model_name"
# The archive's version (its manifest's modelVersion): versions served side by side are told
# apart, as TorchServe's own series tell them apart by model_version.
VERSION_LABEL = "version"
REASON_LABEL = "reason"
STAGES = ("preprocess", "inference", "postprocess")
BATCH_SIZE_METRIC = "kiln_batch_size_requests"
REJECTED_METRIC = "kiln_requests_rejected_total"
# From a feature row (tens of microseconds) through a PNG (about 0.5 ms) and a batch of them
# (a few ms) to the largest legal image (about 0.5 s, handlers/limits.py).
STAGE_BUCKETS_S = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3,
                   50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5)
# Requests in one TorchServe batch: at most the model's batch_size.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def stage_metric(stage):
    return f"kiln_{stage}_seconds"


# What the handler records: name -> (type, label names).
RECORDED = {
    **{stage_metric(stage): ("histogram", [MODEL_LABEL, VERSION_LABEL]) for stage in STAGES},
    BATCH_SIZE_METRIC: ("histogram", [MODEL_LABEL, VERSION_LABEL]),
    REJECTED_METRIC: ("counter", [MODEL_LABEL, VERSION_LABEL, REASON_LABEL]),
}


def declare(registry=None):
    """Kiln's metric families, {name: metric}; `registry` None registers them nowhere (in
    multiprocess mode the exporter reads the files, not a registry)."""
    stages = {
        stage_metric(stage): Histogram(stage_metric(stage), f"Time of the handler's {stage} "
                                       "stage, once per request it served",
                                       [MODEL_LABEL, VERSION_LABEL],
                                       buckets=STAGE_BUCKETS_S, registry=registry)
        for stage in STAGES
    }
    batch = Histogram(BATCH_SIZE_METRIC, "Requests in one batch the handler received",
                      [MODEL_LABEL, VERSION_LABEL], buckets=BATCH_SIZE_BUCKETS, registry=registry)
    # prometheus-client adds the _total itself.
    rejected = Counter(REJECTED_METRIC.removesuffix("_total"),
                       "Requests answered 4xx by the handler, by reason",
                       [MODEL_LABEL, VERSION_LABEL, REASON_LABEL], registry=registry)
    return {**stages, BATCH_SIZE_METRIC: batch, REJECTED_METRIC: rejected}


def recorder_for(model_name, environ, registry=None, version=""):
    """A Recorder for `model_name` at `version`; one that records nothing where the process has no
    multiprocess folder (a handler outside Kiln's server: batch jobs, benchmarks, tests).
    `registry`: where the metrics are registered (tests read them back from it)."""
    if registry is None and not environ.get(MULTIPROC_DIR_ENV):
        logger.info("no %s: Kiln's metrics are not recorded", MULTIPROC_DIR_ENV)
        return Recorder()
    return Recorder(declare(registry), model_name, version=version)


def rejection_reason(err):
    """The reason label of a BadInput: one of REJECT_REASONS, never free text."""
    reason = getattr(err, "reason", "other")
    if reason not in REJECT_REASONS:
        logger.warning("rejection reason %r is not in REJECT_REASONS; counted as other", reason)
        return "other"
    return reason


class Recorder:
    """Records one model's observations; `metrics` is declare()'s mapping. Without it (the
    default) every call is a no-op."""

    def __init__(self, metrics=None, model_name="", clock=time.perf_counter, version=""):
        self._clock = clock
        metrics = metrics or {}
        # Children bound once: a labels() lookup per observation costs as much as the write.
        self._stages = {stage: metrics[stage_metric(stage)].labels(model_name, version)
                        for stage in STAGES if stage_metric(stage) in metrics}
        batch = metrics.get(BATCH_SIZE_METRIC)
        self._batch = batch.labels(model_name, version) if batch is not None else None
        self._rejected = metrics.get(REJECTED_METRIC)
        self._model, self._version = model_name, version
        self._reasons = {}

    def now(self):
        """A start time for record_stage()."""
        return self._clock()

    def record_stage(self, stage, started, requests=1):
        """How long `stage` took since `started`, once per request it served: a model call
        scores a whole batch, and each of its requests waited that long for it."""
        metric = self._stages.get(stage)
        if metric is None:
            return
        seconds = self._clock() - started
        for _ in range(requests):
            metric.observe(seconds)

    def record_batch(self, size):
        if self._batch is not None:
            self._batch.observe(size)

    def record_rejection(self, err):
        if self._rejected is None:
            return
        reason = rejection_reason(err)
        child = self._reasons.get(reason)
        if child is None:
            child = self._rejected.labels(self._model, self._version, reason)
            self._reasons[reason] = child
        child.inc()
