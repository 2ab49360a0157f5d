"""TorchServe entry point for every Kiln model.

The batch contract: handle() gets one entry per request in TorchServe's batch and returns
exactly one JSON answer per request, in the same order. A bad request gets its own 400 and
never spoils its neighbours; a model failure answers 500 and the worker lives on.

TorchServe does not load this file itself: the archive's entry module (model_store/archive.py,
ENTRY_SOURCE) subclasses KilnHandler as the one class TorchServe looks for. The archive ships
the `kiln` package beside it, so this module and its helpers are imported as `kiln.handlers.X`
(the import root is `kiln`; `kiln.X` lives in the top-level folder X/, pyproject's mapping).
"""

import json
import logging
import os
import sys

from kiln.handlers import (
    answers,
    backends,
    cores,
    forms,
    inputs,
    limits,
    metrics,
    oip,
    payload_log,
    rest,
    timing,
    tracing,
    watch,
)
from kiln.handlers.errors import RETRY_AFTER_S, BadInput, error_body
from kiln.handlers.signature import load_signature

logger = logging.getLogger(__name__)

# The `handler:` section of the archive's model-config.yaml, with its defaults (top_k None:
# the signature's output.top_k).
HANDLER_OPTIONS = {"top_k": None, "intra_op_threads": "auto", "require_gpu": False}
# Set by Kiln's server start-up: how many workers all served models have together.
SERVED_WORKERS_ENV = "KILN_SERVED_WORKERS"
SIGNATURE_FILE = "signature.json"
JSON_CONTENT_TYPE = "application/json"
BATCH_SIZE_HEADER = "Kiln-Batch-Size"
# Which version gave an answer (the archive's manifest's modelVersion): with versions served
# side by side, a client and a test can see where the route sent it. The OIP plugin passes it
# on; TorchServe's gRPC API drops handler headers, so gRPC answers do not carry it.
VERSION_HEADER = "X-Kiln-Model-Version"
# The worker's pid: `kiln deploy` warms a version until each of its workers has answered.
WORKER_HEADER = "Kiln-Worker"
# Reason phrases stay fixed: they go into the HTTP status line, where text taken from a
# request (a feature name, say) does not belong. The details are in the JSON body.
PHRASES = {400: "Bad Request", 413: "Payload Too Large", 500: "Internal Server Error",
           503: "Service Unavailable"}
# TorchServe's worker json.loads an application/json body before handle() unless this is
# "false", with no bound on depth or size; Kiln's handler parses every body itself, after
# limits.py's checks on the text (and so once, not twice for a body TorchServe cannot parse).
DECODE_INPUT_ENV = "TS_DECODE_INPUT_REQUEST"
# The per-batch gauge TorchServe's worker emits itself (ts/service.py), which Kiln's does not.
PREDICTION_TIME = "PredictionTime"


def read_handler_options(model_yaml_config):
    """The handler options from model-config.yaml; a typo fails the model load, loudly."""
    given = (model_yaml_config or {}).get("handler") or {}
    if not isinstance(given, dict):
        raise ValueError(f"handler in model-config.yaml must be a mapping, got {given!r}")
    unknown = sorted(set(given) - set(HANDLER_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown handler option(s) {unknown} in model-config.yaml; "
            f"known: {sorted(HANDLER_OPTIONS)}"
        )
    options = {**HANDLER_OPTIONS, **given}
    for key in ("top_k", "intra_op_threads"):
        value = options[key]
        auto = key == "intra_op_threads"
        if (auto and value == "auto") or (key == "top_k" and value is None):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            allowed = "a whole number >= 1" + (' or "auto"' if auto else "")
            raise ValueError(f"handler.{key} must be {allowed}, got {value!r}")
    if not isinstance(options["require_gpu"], bool):
        raise ValueError(
            f"handler.require_gpu must be true or false, got {options['require_gpu']!r}"
        )
    return options


def intra_op_threads(option, model_yaml_config, environ, cpu_count):
    """Threads inside one model call. "auto" shares the cores among every worker of every
    served model, so that workers running at once don't oversubscribe the machine."""
    if option != "auto":
        return option
    own = (model_yaml_config or {}).get("minWorkers") or 1
    try:
        workers = max(1, int(environ.get(SERVED_WORKERS_ENV, own)))
    except ValueError:
        workers = own
    return max(1, (cpu_count or 1) // workers)


def route_logs_to_stderr(names=("kiln.handlers",)):
    """Send Kiln's worker logs to stderr, once per process.

    TorchServe's worker logs everything to stdout, which the frontend records at INFO, per
    request; lines on stderr are recorded at WARN. Kiln's log configuration keeps worker
    lines from WARN up, so Kiln's own messages (the backend it loaded, errors) go to stderr
    and survive, while the per-request chatter on stdout does not cost a write.
    """
    for name in names:
        log = logging.getLogger(name)
        if not any(getattr(h, "kiln_stderr", False) for h in log.handlers):
            handler = logging.StreamHandler(sys.stderr)
            handler.kiln_stderr = True
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def skip_prediction_time(context):
    """TorchServe's worker writes a `[METRICS]PredictionTime` line to stdout after each batch
    (ts/service.py), which the frontend parses into a gauge of the last batch's milliseconds.
    Kiln's stage histograms (metrics.py) measure the same, per request; the line cost about 30
    us a request at batch 8 between the worker and the frontend (10% of lenet's throughput
    through the front proxy; loadtests/studies/worker_io.py). Every other metric of
    TorchServe's API still goes out."""
    cache = context.metrics
    if cache is None or getattr(cache.add_time, "kiln_skips", None) == PREDICTION_TIME:
        return
    add_time = cache.add_time

    def add_time_but_prediction(name, *args, **kwargs):
        if name != PREDICTION_TIME:
            return add_time(name, *args, **kwargs)
        return None

    add_time_but_prediction.kiln_skips = PREDICTION_TIME
    cache.add_time = add_time_but_prediction


def non_finite_message(err, rows):
    """What a client is told when the model's output for its input is NaN or infinite."""
    where = f"instance {err.row}: " if rows > 1 else ""
    return where + answers.NON_FINITE_ANSWER


def _error(context, idx, code, message, reason=None):
    context.set_response_status(code, PHRASES[code], idx)
    if reason:
        context.set_response_header(idx, timing.REASON_HEADER, reason)
    if code == 503:
        context.set_response_header(idx, "Retry-After", str(RETRY_AFTER_S))
    return json.dumps(error_body(message, code))


class KilnHandler:
    """Decode each request, score all good ones in one model call, encode each answer."""

    def __init__(self):
        self.signature = None
        self.backend = None
        self.top_k = HANDLER_OPTIONS["top_k"]
        self.version = ""
        self.metrics = metrics.Recorder()  # records nothing before initialize()
        self.watch = watch.Watch()  # what the model answers, drift: nothing before initialize()
        # This worker's share of time for large images, kept across batches (limits.py).
        self.decode_share = limits.DecodeShare()
        self.payload_log = payload_log.Off()
        self.spans = tracing.Off()
        self.initialized = False

    def initialize(self, context):
        route_logs_to_stderr()
        skip_prediction_time(context)
        os.environ[DECODE_INPUT_ENV] = "false"  # read by the worker for each request
        properties = context.system_properties
        model_dir = properties["model_dir"]
        gpu_id = properties.get("gpu_id")
        self.signature = load_signature(os.path.join(model_dir, SIGNATURE_FILE))
        options = read_handler_options(context.model_yaml_config)
        self.top_k = options["top_k"]
        self.version = str(context.manifest["model"]["modelVersion"])
        self.metrics = metrics.recorder_for(context.model_name, os.environ, version=self.version)
        self.watch = watch.watch_for(self.signature, context.model_name, self.version, os.environ)
        self.payload_log = payload_log.for_worker(os.environ, context.model_name, self.version)
        self.spans = tracing.for_worker(os.environ, context.model_name, self.version)
        serialized = os.path.join(model_dir, context.manifest["model"]["serializedFile"])
        self.backend = backends.load_backend(
            serialized,
            gpu_id=gpu_id,
            intra_op_threads=intra_op_threads(options["intra_op_threads"],
                                              context.model_yaml_config, os.environ,
                                              cores.usable_cores()),
            require_gpu=options["require_gpu"],
            input_names=[spec["name"] for spec in self.signature["inputs"]],
        )
        logger.info(
            "model %s (%s -> %s) loaded: %s",
            context.model_name,
            "+".join(spec["kind"] for spec in self.signature["inputs"]),
            self.signature["output"]["kind"],
            self.backend.description,
        )
        self.initialized = True

    def handle(self, data, context):
        clock = timing.BatchClock(len(data))
        self.metrics.record_batch(len(data))
        answers_out = [None] * len(data)
        good, parts = [], []  # good: (request index, rows it holds, how to encode its answer)
        # What this batch may still take, and this worker over time.
        budget = limits.Budget(self.signature["inputs"], self.decode_share)
        for idx, request in enumerate(data):
            context.set_response_content_type(idx, JSON_CONTENT_TYPE)
            # Which server-side batch a request rode in: clients and tests can see batching.
            context.set_response_header(idx, BATCH_SIZE_HEADER, str(len(data)))
            context.set_response_header(idx, VERSION_HEADER, self.version)
            context.set_response_header(idx, WORKER_HEADER, str(os.getpid()))
            started = self.metrics.now()
            admitted = budget.state()
            try:
                model_inputs, encode = self._decode(request, context, idx, budget)
                parts.append(model_inputs)
                good.append((idx, inputs.batch_size(model_inputs), encode))
            except BadInput as err:
                logger.debug("request %d rejected: %s", idx, err)
                budget.restore(admitted)  # a refused request takes none of the batch's bounds
                self.metrics.record_rejection(err)
                answers_out[idx] = _error(context, idx, err.status, str(err), err.reason)
            except Exception:  # a decoding bug must cost one request, not the batch
                logger.exception("request %d: unexpected decoding failure", idx)
                budget.restore(admitted)
                answers_out[idx] = _error(context, idx, 500, "the request could not be decoded")
            self.decode_share.settle()
            self.metrics.record_stage("preprocess", started)
        clock.decoded()
        if good:
            self._score(inputs.join(parts, self.signature), good, answers_out, context, clock)
        self._time(context, clock, len(data))
        self.payload_log.record(data, answers_out, context, clock.started)
        return answers_out

    def _time(self, context, clock, requests):
        """Each answer's Server-Timing, and its spans when they are exported."""
        for idx in range(requests):
            received = context.get_request_header(idx, timing.RECEIVED_HEADER)
            traceparent = context.get_request_header(idx, timing.TRACEPARENT_HEADER)
            context.set_response_header(idx, timing.SERVER_TIMING_HEADER,
                                        clock.header(idx, received, traceparent))
            self.spans.record(clock, idx, traceparent, received)

    def _decode(self, request, context, idx, budget=None):
        """(model inputs, encode): the rows to score and how to answer them. The protocol is
        the route's: the OIP plugin marks what it forwards, everything else is Kiln's own.
        `budget`: what the server-side batch may still take (limits.py)."""
        form_type = context.get_request_header(idx, forms.FORM_TYPE_HEADER)
        if form_type and isinstance(request, dict) and "body" in request:
            request = forms.decode_form(bytes(request["body"]), form_type)
        body = rest.request_body(request, self.signature)
        if context.get_request_header(idx, oip.PROTOCOL_HEADER) == oip.PROTOCOL:
            return oip.decode_infer(body, self.signature, budget,
                                    context.get_request_header(idx, oip.BINARY_HEADER),
                                    self.version, self._reached(context, idx))
        model_inputs, many = rest.decode_body(body, self.signature, budget)
        output, top_k = self.signature["output"], self.top_k

        def encode(model_output):
            encoded = answers.answers(model_output, output, top_k)
            return encoded if many else encoded[0]

        return model_inputs, encode

    def _reached(self, context, idx):
        """The model and version an OIP request reached, which its body may name. A shadow's
        copy is scored by a version the client did not pick: its primary checks the version."""
        copy = context.get_request_header(idx, payload_log.COPY_HEADER)
        return {"model_name": context.model_name, "model_version": None if copy else self.version}

    def _score(self, batch, good, answers_out, context, clock):
        """Runs the model once on every good row of the batch, then answers each request
        with its own rows' answers (a list when it sent several instances)."""
        started, called = self.metrics.now(), timing.now()
        rows = inputs.batch_size(batch)
        try:
            model_output = self.backend.run(batch)
            if len(model_output) != rows:
                raise ValueError(f"model returned {len(model_output)} rows for {rows}")
        except Exception:  # the worker must answer every request and survive
            logger.exception("model call failed on a batch of %d rows", rows)
            for idx, _, _ in good:
                answers_out[idx] = _error(context, idx, 500, "the model failed on this batch")
            return
        self.metrics.record_stage("inference", started, requests=len(good))
        clock.scored(called)
        self.watch.observe(batch, model_output)
        start = 0
        for idx, count, encode in good:
            own = model_output[start:start + count]
            start += count
            encoding, encoding_since = self.metrics.now(), timing.now()
            try:
                answers_out[idx] = json.dumps(encode(own), allow_nan=False)
            except answers.NonFiniteOutput as err:
                # The input was taken, yet the model has no answer for it: the client's to
                # change (a request must never get a 5xx), and its neighbours are answered.
                logger.debug("request %d: %s", idx, err)  # counted by reason, as a 400 is
                refused = BadInput(non_finite_message(err, count), reason="non_finite_output")
                self.metrics.record_rejection(refused)
                answers_out[idx] = _error(context, idx, refused.status, str(refused),
                                          refused.reason)
            except ValueError as err:
                logger.error("request %d: %s", idx, err)
                answers_out[idx] = _error(context, idx, 500, "the model returned an invalid output")
            self.metrics.record_stage("postprocess", encoding)
            clock.encoded(idx, encoding_since)
