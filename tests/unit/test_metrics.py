"""Kiln's metrics, recorded with prometheus-client as a worker records them: in a registry
of the test's own, and in multiprocess mode in a process of its own."""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from ts.context import Context, RequestProcessor

from kiln.deploy.metrics_exporter import Collector
from kiln.handlers import arrays, errors, features, images, inputs, metrics, oip, rest, tensors
from kiln.handlers import handler as kiln_handler
from kiln.handlers.errors import BadInput


def worker_context(model_dir):
    manifest = {"model": {"modelName": "tiny", "serializedFile": "model.onnx",
                          "handler": "handler.py", "modelVersion": "1.0"}}
    return Context("tiny", str(model_dir), manifest, 8, None, "0.12.0",
                   limit_max_image_pixels=True, metrics=None, model_yaml_config={})


class Clock:
    def __init__(self, *readings):
        self.readings = list(readings)

    def __call__(self):
        return self.readings.pop(0)


def samples(registry):
    """{(sample name, labels as a sorted tuple): value} of every sample with a value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect() for s in family.samples
            if not s.name.endswith("_created")}


TINY = (("model_name", "tiny"), ("version", "1.0"))


def bucket(name, le):
    return (f"{name}_bucket", (("le", le), *TINY))


# --- recording -------------------------------------------------------------------------


def test_recorder_observes_seconds_once_per_request_in_kiln_s_buckets():
    registry = CollectorRegistry()
    recorder = metrics.recorder_for("tiny", {}, registry, version="1.0")
    # Binary fractions: the sums are exact.
    recorder._clock = Clock(0.5 + 1 / 1024, 2.0 + 1 / 64)

    recorder.record_batch(3)
    recorder.record_stage("preprocess", 0.5)
    recorder.record_stage("inference", 2.0, requests=2)
    recorder.record_rejection(BadInput("expected 30 features", reason="bad_shape"))
    recorder.record_rejection(BadInput("some message"))

    got = samples(registry)
    pre, inf = "kiln_preprocess_seconds", "kiln_inference_seconds"
    assert got[(f"{pre}_count", TINY)] == 1.0
    assert got[(f"{pre}_sum", TINY)] == 1 / 1024
    assert got[bucket(pre, "0.001")] == 1.0 and got[bucket(pre, "0.0005")] == 0.0
    assert got[(f"{inf}_count", TINY)] == 2.0
    assert got[(f"{inf}_sum", TINY)] == 2 / 64
    assert got[bucket(inf, "0.025")] == 2.0 and got[bucket(inf, "0.01")] == 0.0
    assert got[("kiln_postprocess_seconds_count", TINY)] == 0.0
    assert got[("kiln_batch_size_requests_sum", TINY)] == 3.0
    assert got[bucket("kiln_batch_size_requests", "4.0")] == 1.0
    assert got[bucket("kiln_batch_size_requests", "2.0")] == 0.0
    rejected = {k[1]: v for k, v in got.items() if k[0] == "kiln_requests_rejected_total"}
    assert rejected == {(("model_name", "tiny"), ("reason", "bad_shape"), ("version", "1.0")): 1.0,
                        (("model_name", "tiny"), ("reason", "other"), ("version", "1.0")): 1.0}


def test_recorded_families_are_the_declared_ones_in_base_units():
    registry = CollectorRegistry()
    metrics.recorder_for("tiny", {}, registry, version="1.0")
    found = {f.name: (f.type, f.unit) for f in registry.collect()}
    assert found == {
        "kiln_preprocess_seconds": ("histogram", ""),
        "kiln_inference_seconds": ("histogram", ""),
        "kiln_postprocess_seconds": ("histogram", ""),
        "kiln_batch_size_requests": ("histogram", ""),
        "kiln_requests_rejected": ("counter", ""),
    }
    assert set(metrics.RECORDED) == {*list(found)[:4], "kiln_requests_rejected_total"}
    assert metrics.STAGE_BUCKETS_S == tuple(sorted(metrics.STAGE_BUCKETS_S))


def test_without_a_multiprocess_folder_nothing_is_recorded():
    recorder = metrics.recorder_for("tiny", {})
    recorder.record_batch(2)
    recorder.record_stage("inference", recorder.now())
    recorder.record_rejection(BadInput("empty body", reason="empty_body"))
    assert REGISTRY.get_sample_value("kiln_batch_size_requests_count",
                                     {"model_name": "tiny"}) is None


# A worker as TorchServe starts it: PROMETHEUS_MULTIPROC_DIR in its environment from the start.
WORKER = """
import os
from kiln.handlers import metrics
from kiln.handlers.errors import BadInput

recorder = metrics.recorder_for("tiny", os.environ, version="1.0")
recorder.record_batch(2)
recorder.record_stage("preprocess", recorder.now())
recorder.record_stage("preprocess", recorder.now())
recorder.record_stage("inference", recorder.now(), requests=2)
recorder.record_rejection(BadInput("x", reason="bad_shape"))
"""


def run_worker(folder):
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(folder))
    done = subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_workers_record_in_multiprocess_files_that_the_exporter_sums(tmp_path):
    run_worker(tmp_path)
    run_worker(tmp_path)  # a second worker (or the first one restarted)
    page = Collector(tmp_path).page().decode()
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for family in text_string_to_metric_families(page) for s in family.samples}
    assert values[("kiln_batch_size_requests_count", TINY)] == 2.0
    assert values[("kiln_batch_size_requests_sum", TINY)] == 4.0
    assert values[("kiln_preprocess_seconds_count", TINY)] == 4.0
    assert values[("kiln_inference_seconds_count", TINY)] == 4.0
    assert values[("kiln_requests_rejected_total",
                   (("model_name", "tiny"), ("reason", "bad_shape"), ("version", "1.0")))] == 2.0


def test_the_exporter_marks_gone_workers_dead_once_and_keeps_their_counts(tmp_path):
    run_worker(tmp_path)
    collector = Collector(tmp_path)
    (gone,) = collector.dead_pids()
    assert list(tmp_path.glob(f"*_{gone}.db"))
    first = collector.page()
    assert collector.marked == {gone} and collector.dead_pids() == set()
    assert collector.page() == first


def test_handler_records_each_stage_per_request(features_model_dir, feature_row, tmp_path):
    model_dir = shutil.copytree(features_model_dir, tmp_path / "tiny")
    context = worker_context(model_dir)
    handler = kiln_handler.KilnHandler()
    handler.initialize(context)
    registry = CollectorRegistry()
    handler.metrics = metrics.recorder_for("tiny", {}, registry, version="1.0")
    requests = [{"body": json.dumps(feature_row)}, {"body": "[1, 2]"},
                {"body": json.dumps(feature_row)}]
    context.request_processor = [RequestProcessor({}) for _ in requests]

    handler.handle(requests, context)

    got = samples(registry)
    counts = {name: got[(f"{name}_count", TINY)] for name in
              ("kiln_batch_size_requests", *map(metrics.stage_metric, metrics.STAGES))}
    assert counts == {"kiln_batch_size_requests": 1.0, "kiln_preprocess_seconds": 3.0,
                      "kiln_inference_seconds": 2.0, "kiln_postprocess_seconds": 2.0}
    assert got[("kiln_requests_rejected_total",
                (("model_name", "tiny"), ("reason", "bad_shape"), ("version", "1.0")))] == 1.0
    assert all(got[(f"{metrics.stage_metric(s)}_sum", TINY)] >= 0 for s in metrics.STAGES)


def test_a_reason_outside_the_fixed_set_is_counted_as_other():
    err = BadInput("x", reason="feature 'mean radius' is a string")
    assert metrics.rejection_reason(err) == "other"
    assert metrics.rejection_reason(ValueError("no reason at all")) == "other"


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
