"""Kiln's metrics, recorded through TorchServe's own metrics cache as a worker records them."""

import ast
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import ts
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from kiln.handlers import arrays, errors, features, images, inputs, metrics, oip, rest, tensors
from kiln.handlers import handler as kiln_handler
from kiln.handlers.errors import BadInput

HANDLERS = Path(metrics.__file__).parent
METRICS_YAML = HANDLERS / "metrics.yaml"
# TorchServe's default metrics configuration: what a worker's cache starts from.
TS_METRICS_YAML = Path(ts.__file__).parent / "configs" / "metrics.yaml"
# [METRICS]name.unit:value|#dimensions|#type:TYPE|#hostname:host,timestamp
METRIC_LINE = re.compile(r"\[METRICS\](\w+)\.(\w+):([^|]+)\|#([^|]*)\|#type:(\w+)\|#hostname:")


class Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def emitted():
    """The [METRICS] lines a worker would print to its stdout, for the frontend to read."""
    log = logging.getLogger("ts.metrics.caching_metric")
    capture, level = Capture(), log.level
    log.addHandler(capture)
    log.setLevel(logging.INFO)
    yield capture.lines
    log.removeHandler(capture)
    log.setLevel(level)


def parse(lines):
    out = []
    for line in lines:
        match = METRIC_LINE.match(line)
        assert match, f"not a metric line: {line}"
        name, unit, value, dims, kind = match.groups()
        out.append((name, unit, float(value), dims, kind))
    return out


def worker_context(model_dir, metrics):
    manifest = {"model": {"modelName": "tiny", "serializedFile": "model.onnx",
                          "handler": "handler.py", "modelVersion": "1.0"}}
    return Context("tiny", str(model_dir), manifest, 8, None, "0.12.0",
                   limit_max_image_pixels=True, metrics=metrics, model_yaml_config={})


def worker_cache():
    cache = MetricsCacheYamlImpl(config_file_path=str(TS_METRICS_YAML))
    cache.initialize_cache()
    return cache


class Clock:
    def __init__(self, *readings):
        self.readings = list(readings)

    def __call__(self):
        return self.readings.pop(0)


# --- declarations ----------------------------------------------------------------------


def test_metrics_yaml_declares_exactly_what_the_handler_records():
    declared = metrics.read_declarations(METRICS_YAML)
    metrics.check_declarations(declared)
    assert declared == {
        "kiln_preprocess_centiseconds": ("histogram", "centiseconds", ["model_name"]),
        "kiln_inference_centiseconds": ("histogram", "centiseconds", ["model_name"]),
        "kiln_postprocess_centiseconds": ("histogram", "centiseconds", ["model_name"]),
        "kiln_batch_size_requests": ("histogram", "requests", ["model_name"]),
        "kiln_requests_rejected_total": ("counter", "count", ["model_name", "reason"]),
    }


def test_a_declaration_with_other_labels_fails_the_check():
    declared = metrics.read_declarations(METRICS_YAML)
    declared["kiln_requests_rejected_total"] = ("counter", "count", ["model_name"])
    with pytest.raises(ValueError, match="^metrics.yaml declares "):
        metrics.check_declarations(declared)


@pytest.mark.parametrize("text, message", [
    ("histogram: []\n", "expected a model_metrics mapping"),
    ("model_metrics:\n  summary: []\n", "unknown metric type 'summary'"),
    ("model_metrics:\n  counter:\n    - {name: x, unit: count}\n",
     "each metric needs a name, a unit and dimensions, got {'name': 'x', 'unit': 'count'}"),
])  # fmt: skip
def test_a_malformed_metrics_yaml_is_refused(tmp_path, text, message):
    path = tmp_path / "metrics.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        metrics.read_declarations(path)
    assert str(err.value) == f"{path}: {message}"


# --- recording -------------------------------------------------------------------------


def test_recorder_writes_torchserve_metric_lines(tmp_path, emitted):
    lines = emitted
    shutil.copy(METRICS_YAML, tmp_path)
    recorder = metrics.recorder_for(worker_context(tmp_path, worker_cache()))
    # 1/128 s is exact in binary, so the centiseconds are exact too.
    recorder._clock = Clock(0.5 + 1 / 128, 2.0 + 5 / 128)

    recorder.record_batch(3)
    recorder.record_stage("preprocess", 0.5)
    recorder.record_stage("inference", 2.0, requests=2)
    recorder.record_rejection(BadInput("expected 30 features", reason="bad_shape"))
    recorder.record_rejection(BadInput("some message"))

    assert parse(lines) == [
        ("kiln_batch_size_requests", "requests", 3.0, "model_name:tiny", "HISTOGRAM"),
        ("kiln_preprocess_centiseconds", "centiseconds", 0.78125, "model_name:tiny",
         "HISTOGRAM"),
        ("kiln_inference_centiseconds", "centiseconds", 3.90625, "model_name:tiny",
         "HISTOGRAM"),
        ("kiln_inference_centiseconds", "centiseconds", 3.90625, "model_name:tiny",
         "HISTOGRAM"),
        ("kiln_requests_rejected_total", "Count", 1.0, "model_name:tiny,reason:bad_shape",
         "COUNTER"),
        ("kiln_requests_rejected_total", "Count", 1.0, "model_name:tiny,reason:other",
         "COUNTER"),
    ]  # fmt: skip


def test_without_a_metrics_cache_nothing_is_recorded(tmp_path, emitted):
    lines = emitted
    recorder = metrics.recorder_for(worker_context(tmp_path, None))
    recorder.record_batch(2)
    recorder.record_stage("inference", recorder.now())
    recorder.record_rejection(BadInput("empty body", reason="empty_body"))
    assert lines == []


def test_a_reason_outside_the_fixed_set_is_counted_as_other():
    err = BadInput("x", reason="feature 'mean radius' is a string")
    assert metrics.rejection_reason(err) == "other"
    assert metrics.rejection_reason(ValueError("no reason at all")) == "other"


def test_handler_records_each_stage_per_request(features_model_dir, feature_row, tmp_path,
                                                emitted):
    lines = emitted
    model_dir = shutil.copytree(features_model_dir, tmp_path / "tiny")
    shutil.copy(METRICS_YAML, model_dir)
    context = worker_context(model_dir, worker_cache())
    handler = kiln_handler.KilnHandler()
    handler.initialize(context)
    requests = [{"body": json.dumps(feature_row)}, {"body": "[1, 2]"},
                {"body": json.dumps(feature_row)}]
    context.request_processor = [RequestProcessor({}) for _ in requests]

    handler.handle(requests, context)

    recorded = [(name, dims) for name, _, _, dims, _ in parse(lines)]
    assert sorted(recorded) == sorted(
        [("kiln_batch_size_requests", "model_name:tiny")]
        + [("kiln_preprocess_centiseconds", "model_name:tiny")] * 3
        + [("kiln_requests_rejected_total", "model_name:tiny,reason:bad_shape")]
        + [("kiln_inference_centiseconds", "model_name:tiny")] * 2
        + [("kiln_postprocess_centiseconds", "model_name:tiny")] * 2
    )
    assert all(value >= 0 for _, _, value, _, _ in parse(lines))


# --- rejection reasons -----------------------------------------------------------------


DECODING_MODULES = (arrays, features, images, inputs, oip, rest, tensors)


def test_every_bad_input_in_the_codecs_names_a_fixed_reason():
    named, passed_on = set(), set()
    nodes = [node for module in DECODING_MODULES
             for node in ast.walk(ast.parse(Path(module.__file__).read_text()))]
    for node in nodes:
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "BadInput":
            (keyword,) = node.keywords
            assert keyword.arg == "reason"
            if isinstance(keyword.value, ast.Constant):
                named.add(keyword.value.value)
            else:
                passed_on.add(ast.unparse(keyword.value))
    assert named <= set(errors.REJECT_REASONS) - {"other"}
    # "instance 3: ..." keeps the reason of the instance's own error.
    assert passed_on == {"err.reason"}


@pytest.mark.parametrize("body, reason", [
    (b"", "empty_body"),
    (b"\x00\x01binary", "not_image_or_json"),
    (b"[1, 2", "undecodable"),
    (b"\x89PNG\r\n\x1a\ntruncated", "wrong_type"),
    (b"[1, 2]", "bad_shape"),
    (b'{"instances": [[1, 2]]}', "bad_shape"),
    (b'{"mean radius": 1}', "bad_features"),
    (b'{"instances": [[' + b", ".join([b"1"] * 29) + b', "x"]]}', "bad_value"),
])  # fmt: skip
def test_rejections_carry_their_reason(features_signature, body, reason):
    with pytest.raises(BadInput) as err:
        rest.decode_body(body, features_signature)
    assert err.value.reason == reason
