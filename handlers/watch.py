"""What a model answers and how its inputs compare with its training data, as Prometheus
metrics per model and version (recorded as metrics.py's are: multiprocess files in the worker).

Once per batch the handler gives `Watch.observe` the rows it scored and the model's output.
observe() only queues them (about 1 us); the work is done for many batches at once, when
FLUSH_ROWS rows are queued or the oldest is `delay` seconds old: by the batch that finds it so,
or by the worker's watch thread once no batch comes. Each recording has a fixed cost (numpy
calls, a few writes to the multiprocess files): recorded batch by batch, lenet's workers spent
about 15 us a request under load (py-spy, w2 b16 d5, 32 clients); once for 256 rows, 1.4 us
(py-spy) with the drift rate cap below; in this process, 0.41 us a row for 256 rows and
0.25 for 1,024 (a fifth of the batches sampled for drift; loadtests/studies/watch_cost.py
measures handle() with the watch on and off). At lenet's peak (about 2,600 rows a second a
worker) the queue fills first, every 0.8 s. The metrics are up to DEFAULT_DELAY_MS late, at
most twice that, against Prometheus' scrape interval of 5 s (deploy/prometheus). A worker
that stops loses what it had queued.

- ANSWERS_METRIC counts answers by label (multiclass and binary: the answer's label;
  multilabel: each label at or over its threshold);
- TOP_PROBABILITY_METRIC: the probability of the answer's label (multilabel: the highest);
- VALUE_METRIC: each regression output, in buckets at the training targets' deciles where the
  signature has them;
- REFERENCE_MIX_METRIC: the training label mix, set once, for the alert on the answers' mix;
- DRIFT_METRIC: drift.py's score per input and statistic, once the worker has seen
  drift.MIN_ROWS rows; absent for an archive exported without reference statistics.

Rows whose output is not finite are answered 400 and left out.
"""

import logging
import threading
import time

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from kiln.handlers import answers, drift, kinds
from kiln.handlers.metrics import MODEL_LABEL, MULTIPROC_DIR_ENV, VERSION_LABEL
from kiln.handlers.signature import DEFAULT_THRESHOLD

logger = logging.getLogger(__name__)

ANSWERS_METRIC = "kiln_answers_total"
TOP_PROBABILITY_METRIC = "kiln_answer_top_probability"
VALUE_METRIC = "kiln_answer_value"
REFERENCE_MIX_METRIC = "kiln_answer_reference_ratio"
DRIFT_METRIC = "kiln_input_drift_score"
LABEL, OUTPUT, INPUT, FEATURE = "label", "output", "input", "feature"
METRICS = (ANSWERS_METRIC, TOP_PROBABILITY_METRIC, VALUE_METRIC, REFERENCE_MIX_METRIC,
           DRIFT_METRIC)
# Confidence: ten labels start at 0.1, and most answers of a good model sit over 0.9.
PROBABILITY_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
# The batch that brings the queue to this many rows, or finds its oldest batch `delay` old,
# records it; once traffic stops, the worker's watch thread does.
FLUSH_ROWS = 2048
# The delay, in DELAY_ENV, set by the server (ServerSettings.watch_delay_ms); 0: each batch as
# it is answered, so that metrics read after an answer include it (loadtests/studies/drift.py
# reads a score after every request).
DELAY_ENV = "KILN_WATCH_DELAY_MS"
DEFAULT_DELAY_MS = 1000
# Set to "off" by the server (ServerSettings.watch False): no answer or drift metrics, for
# `kiln bench`'s observability-off row.
OFF_ENV = "KILN_WATCH"
# Drift is a distribution's: a sample of the rows measures it as well as all of them. Each
# worker computes its drift statistics on at most this many rows a second (batches picked by a
# token bucket that holds a second's worth; DRIFT_RATE_ENV, set by the server from
# ServerSettings.drift_rows_per_s; 0: every row). Answers are counted for every row. At
# WINDOW_ROWS rows a second the score covers the last second or more. The batches left out
# are not held until the queue is recorded. A recording of 256 rows of lenet cost 0.93 us a
# row with every row's drift, 0.41 with one batch in five's (in this process; an image's
# statistics are the dearest part).
DRIFT_RATE_ENV = "KILN_DRIFT_ROWS_PER_S"
DEFAULT_DRIFT_ROWS_PER_S = drift.WINDOW_ROWS
# Regression values without training deciles: orders of magnitude either side of 0.
VALUE_BUCKETS = (-1e3, -1e2, -10.0, -1.0, 0.0, 1.0, 10.0, 1e2, 1e3)


def declare(registry, value_buckets=VALUE_BUCKETS):
    """The families, {name: metric}; `registry` None registers them nowhere (multiprocess)."""
    labels = [MODEL_LABEL, VERSION_LABEL]
    return {
        # prometheus-client adds the _total itself.
        ANSWERS_METRIC: Counter(ANSWERS_METRIC.removesuffix("_total"), "Answers by label",
                                [*labels, LABEL], registry=registry),
        TOP_PROBABILITY_METRIC: Histogram(
            TOP_PROBABILITY_METRIC, "Probability of the answer's label (multilabel: the "
            "highest)", labels, buckets=PROBABILITY_BUCKETS, registry=registry),
        VALUE_METRIC: Histogram(VALUE_METRIC, "Regression outputs", [*labels, OUTPUT],
                                buckets=value_buckets, registry=registry),
        # A live worker's value; every worker of a version sets the same one.
        REFERENCE_MIX_METRIC: Gauge(REFERENCE_MIX_METRIC, "Share of each label in the "
                                    "training data", [*labels, LABEL], registry=registry,
                                    multiprocess_mode="livemax"),
        # Each worker scores what it was sent; the worst one speaks for the version.
        DRIFT_METRIC: Gauge(DRIFT_METRIC, "Population stability index of the inputs against "
                            "the training data, over about the last "
                            f"{drift.WINDOW_ROWS} rows a worker scored",
                            [*labels, INPUT, FEATURE], registry=registry,
                            multiprocess_mode="livemax"),
    }


def watch_for(signature, model_name, version, environ, registry=None):
    """A Watch of the model; one that records nothing outside Kiln's server (no multiprocess
    folder), as metrics.recorder_for, or where the server turned watching off."""
    if environ.get(OFF_ENV) == "off" or (registry is None and not environ.get(MULTIPROC_DIR_ENV)):
        return Watch()
    reference = signature.get("reference") or {}
    buckets = _value_buckets(reference.get("outputs"))
    delay = _setting(environ, DELAY_ENV, DEFAULT_DELAY_MS) / 1000
    rate = _setting(environ, DRIFT_RATE_ENV, DEFAULT_DRIFT_ROWS_PER_S)
    return Watch(declare(registry, buckets), signature, model_name, version, delay, rate)


def _setting(environ, name, default):
    """A non-negative number from the server's environment, or its default."""
    try:
        return max(0.0, float(environ.get(name, default)))
    except ValueError:
        logger.warning("%s=%r is not a number; %s it is", name, environ.get(name), default)
        return float(default)


def _value_buckets(outputs):
    """Every output's training deciles together, or VALUE_BUCKETS without them."""
    edges = sorted({e for ref in (outputs or {}).values() for e in ref["edges"]})
    return tuple(edges) or VALUE_BUCKETS


class Watch:
    """Records one model version's answers and input drift; without metrics, nothing."""

    def __init__(self, metrics=None, signature=None, model_name="", version="", delay=0.0,
                 drift_rate=0.0):
        self._on = metrics is not None
        if not self._on:
            return
        self.output = signature["output"]
        labels = (model_name, version)
        # Every label's series from the start: a label never answered counts 0, not missing.
        self._answers = [metrics[ANSWERS_METRIC].labels(*labels, label)
                         for label in self.output.get("labels", [])]
        self._labels = labels
        self._top = metrics[TOP_PROBABILITY_METRIC].labels(*labels)
        self._values = [metrics[VALUE_METRIC].labels(*labels, name)
                        for name in self.output.get("names", [])]
        reference = signature.get("reference") or {}
        for label, share in (reference.get("labels") or {}).items():
            metrics[REFERENCE_MIX_METRIC].labels(*labels, label).set(share)
        self._inputs = _sketches(signature["inputs"], reference.get("inputs") or {})
        self._drift = metrics[DRIFT_METRIC]
        self._scores = {}  # (input, feature) -> gauge child, once it has a score
        # Whether any input is scored, and the token bucket of rows that are (drift_rate 0:
        # all of them).
        self._drifting = any(sketch is not None for *_, sketch in self._inputs)
        self.drift_rate = drift_rate
        self._tokens, self._filled = drift_rate, time.monotonic()
        self.delay = delay
        self._queued = []  # (model inputs, output rows) of each batch not yet recorded
        self._queued_rows = 0
        self._first_queued = 0.0  # time.monotonic() of the oldest queued batch
        self._queue_lock = threading.Lock()
        self._record_lock = threading.Lock()  # one record() at a time: the sketches
        self._armed = False  # the thread is watching the queue's age
        self._wake = threading.Event()
        if delay:
            threading.Thread(target=self._run, name="kiln-watch", daemon=True).start()

    def observe(self, model_inputs, model_output):
        """One batch: the model's inputs (one array per signature input) and its output."""
        if not self._on:
            return
        try:
            rows = np.asarray(model_output, dtype=np.float32)
            now = time.monotonic()
            with self._queue_lock:
                if not self._queued:
                    self._first_queued = now
                kept = model_inputs if self._sampled(len(rows), now) else None
                self._queued.append((kept, rows))
                self._queued_rows += len(rows)
                due = (self._queued_rows >= FLUSH_ROWS
                       or now - self._first_queued >= self.delay)
                wake, self._armed = not self._armed, True
            if due:
                self.record()
            elif wake:
                self._wake.set()
        except Exception:  # watching must never cost an answer
            logger.exception("could not queue the answers and drift of a batch")

    def _sampled(self, rows, now):
        """Whether the drift sketches take this batch of `rows` rows (under the queue lock)."""
        if not self._drifting:
            return False
        if not self.drift_rate:
            return True
        self._tokens = min(self.drift_rate,
                           self._tokens + (now - self._filled) * self.drift_rate)
        self._filled = now
        # A batch of more than a second's worth waits for a full bucket and leaves it owing
        # (never sampled at all, a large batch job would have no drift score).
        if self._tokens < min(rows, self.drift_rate):
            return False
        self._tokens -= rows
        return True

    def record(self):
        """Records every queued batch now (the batch that makes the queue due, the thread
        once traffic stops, tests)."""
        if not self._on:
            return
        with self._record_lock:
            with self._queue_lock:
                queued, self._queued, self._queued_rows = self._queued, [], 0
            if not queued:
                return
            try:
                self._record(queued)
            except Exception:
                logger.exception("could not record the answers and drift of %d batches",
                                 len(queued))

    def _run(self):
        """Records a queue that waited `delay`: under load the batches record it themselves
        (no handoff of the GIL to this thread), so this wakes `delay` apart and finds it
        young; it goes back to waiting once the queue is empty."""
        while True:
            self._wake.wait()
            self._wake.clear()
            while True:
                time.sleep(self.delay)
                with self._queue_lock:
                    if not self._queued:
                        self._armed = False
                        break
                    stale = time.monotonic() - self._first_queued >= self.delay
                if stale:
                    self.record()

    def _record(self, queued):
        flat = np.concatenate([rows.reshape(len(rows), -1) for _, rows in queued])
        finite = None
        if not np.isfinite(flat).all():  # rare: only then which rows
            finite = np.isfinite(flat).all(axis=1)
            flat = flat[finite]
        if len(flat):
            self._answered(flat)
        sampled = [(inputs, rows) for inputs, rows in queued if inputs is not None]
        if sampled:
            self._drifted(sampled, every_row_finite=finite is None)

    def _drifted(self, sampled, every_row_finite):
        """Adds the sampled batches' inputs to the sketches and publishes the scores."""
        finite = None if every_row_finite else np.concatenate(
            [np.isfinite(rows.reshape(len(rows), -1)).all(axis=1) for _, rows in sampled])
        for i, (_, spec, statistics, sketch) in enumerate(self._inputs):
            if sketch is not None:
                # join pads variable lengths to the longest, as for one batch.
                rows = kinds.of(spec).join([inputs[i] for inputs, _ in sampled], spec)
                sketch.add(statistics(rows if finite is None else rows[finite]))
        self._publish()

    def _answered(self, rows):
        kind = self.output["kind"]
        if kind in answers.LABELLED_KINDS:
            chosen, probabilities = answers.best_indices(rows, self.output)
            # One increment per label answered, not per row: each is a write to the
            # multiprocess file under a lock.
            self._count(np.bincount(chosen, minlength=len(self._answers)))
            observe_all(self._top, probabilities)
        elif kind == "multilabel":
            threshold = self.output.get("threshold", DEFAULT_THRESHOLD)
            self._count((rows >= np.asarray(threshold)).sum(axis=0))
            observe_all(self._top, rows.max(axis=1))
        elif kind == "regression":
            for column, child in zip(rows.T, self._values, strict=True):
                observe_all(child, column)

    def _count(self, counts):
        """`counts`: answers per label, in the signature's label order."""
        for i in np.flatnonzero(counts).tolist():
            self._answers[i].inc(int(counts[i]))

    def _publish(self):
        for name, _, _, sketch in self._inputs:
            scores = sketch.scores() if sketch is not None else None
            if scores is None:
                continue
            for feature, score in zip(sketch.names, scores.tolist(), strict=True):
                child = self._scores.get((name, feature))
                if child is None:
                    child = self._scores[(name, feature)] = self._drift.labels(
                        *self._labels, name, feature)
                child.set(score)


def observe_all(histogram, values):
    """`histogram.observe(v)` of each of `values` (floats: an array or a list), with one
    write per bucket reached and one to the sum, instead of two per value: each is a write to
    the worker's multiprocess file under a lock (about 2 us an observe), and answers mostly
    fall into a few buckets. prometheus-client has no batch observe: this adds to the child's
    bucket and sum values as its observe() does (tests/unit/test_watch.py compares the two)."""
    values = np.asarray(values, dtype=np.float64)
    # observe()'s bucket: the first upper bound at or over the value.
    reached = np.bincount(np.searchsorted(histogram._upper_bounds, values, side="left"),
                          minlength=len(histogram._upper_bounds))
    for i in np.flatnonzero(reached).tolist():
        histogram._buckets[i].inc(int(reached[i]))
    histogram._sum.inc(float(values.sum()))


def _sketches(specs, references):
    """(input name, spec, its kind's statistician, Sketch or None) per signature input, in
    the model's order: None where the archive has no reference for it (an older export) or
    its kind none."""
    out = []
    for spec in specs:
        reference = references.get(spec["name"])
        names, _ = kinds.of(spec).statistics(spec, kinds.of(spec).empty(spec))
        usable = bool(reference) and list(reference) == list(names)
        if reference and not usable:
            logger.warning("input %s: reference statistics %s do not match %s; no drift score",
                           spec["name"], list(reference), list(names))
        out.append((spec["name"], spec, kinds.of(spec).statistician(spec),
                    drift.Sketch(reference) if usable else None))
    return out
