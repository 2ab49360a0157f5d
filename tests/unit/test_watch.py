"""What the model answers and how its inputs drift, recorded by the handler (handlers/watch.py,
handlers/drift.py and each input kind's statistics)."""

import io
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry
from ts.context import Context, RequestProcessor

from kiln.handlers import drift, kinds, rest, watch
from kiln.handlers import handler as kiln_handler

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TINY = {"model_name": "tiny", "version": "1.0"}


def samples(registry, name):
    """{labels other than model and version: value} of one sample name."""
    return {tuple(v for k, v in sorted(s.labels.items()) if k not in TINY): s.value
            for family in registry.collect() for s in family.samples if s.name == name}


def serving(model_dir, tmp_path, reference, environ=None):
    """A handler initialised from a copy of `model_dir` whose signature holds `reference`
    (none: an older export), recording into a registry of its own: each batch as it is
    answered, with every row's drift (the drift study's settings), or as `environ` says."""
    folder = shutil.copytree(model_dir, tmp_path / "tiny")
    signature = json.loads((folder / "signature.json").read_text())
    if reference is not None:
        signature["reference"] = reference
    (folder / "signature.json").write_text(json.dumps(signature))
    manifest = {"model": {"modelName": "tiny", "serializedFile": "model.onnx",
                          "handler": "handler.py", "modelVersion": "1.0"}}
    context = Context("tiny", str(folder), manifest, 8, None, "0.12.0",
                      limit_max_image_pixels=True, metrics=None, model_yaml_config={})
    handler = kiln_handler.KilnHandler()
    handler.initialize(context)
    registry = CollectorRegistry()
    handler.watch = watch.watch_for(handler.signature, "tiny", "1.0",
                                    environ or {watch.DELAY_ENV: "0",
                                                watch.DRIFT_RATE_ENV: "0"}, registry)
    return handler, context, registry


def send(handler, context, bodies):
    context.request_processor = [RequestProcessor({}) for _ in bodies]
    return [json.loads(answer) for answer in handler.handle([{"body": b} for b in bodies],
                                                            context)]


def features_reference(spec, rng):
    """Every feature standard normal once standardised; 40% malignant."""
    z = rng.normal(size=(2000, len(spec["names"])))
    return {"inputs": {spec["name"]: {name: drift.reference_of(z[:, i])
                                      for i, name in enumerate(spec["names"])}},
            "labels": {"malignant": 0.4, "benign": 0.6}}


def raw_rows(spec, z):
    return np.asarray(spec["mean"]) + np.asarray(spec["std"]) * z


def test_answers_are_counted_by_label_with_their_probability(features_model_dir, tmp_path):
    rng = np.random.default_rng(1)
    spec = json.loads((features_model_dir / "signature.json").read_text())["inputs"][0]
    handler, context, registry = serving(features_model_dir, tmp_path,
                                         features_reference(spec, rng))
    rows = raw_rows(spec, rng.normal(size=(40, 30)))
    answers = []
    for start in range(0, 40, 8):  # batches of 8 requests, one bad one among the last
        bodies = [json.dumps(r.tolist()) for r in rows[start:start + 8]]
        answers += send(handler, context, bodies + ["[1, 2]"] * (start == 32))
    good = [a for a in answers if "label" in a]

    labels = [a["label"] for a in good]
    assert samples(registry, "kiln_answers_total") == {
        (label,): float(labels.count(label)) for label in set(labels)}
    assert samples(registry, "kiln_answer_top_probability_count") == {(): 40.0}
    assert math.isclose(samples(registry, "kiln_answer_top_probability_sum")[()],
                        sum(a["probability"] for a in good), rel_tol=1e-6)
    assert samples(registry, "kiln_answer_reference_ratio") == {("malignant",): 0.4,
                                                                ("benign",): 0.6}


def test_drift_is_scored_per_feature_once_enough_rows_came(features_model_dir, tmp_path):
    rng = np.random.default_rng(2)
    spec = json.loads((features_model_dir / "signature.json").read_text())["inputs"][0]
    handler, context, registry = serving(features_model_dir, tmp_path,
                                         features_reference(spec, rng))
    z = rng.normal(size=(drift.MIN_ROWS + 200, 30))
    send(handler, context, [json.dumps(r.tolist()) for r in raw_rows(spec, z[:drift.MIN_ROWS - 1])])
    assert samples(registry, "kiln_input_drift_score") == {}  # too few rows to say

    send(handler, context, [json.dumps(r.tolist()) for r in raw_rows(spec, z[drift.MIN_ROWS - 1:])])
    scores = samples(registry, "kiln_input_drift_score")
    assert sorted(scores) == sorted((name, "input") for name in spec["names"])
    assert {f for (f, _), s in scores.items() if s > drift.THRESHOLD} == set()

    shifted = rng.normal(size=(300, 30))
    shifted[:, 0] += 3.0  # the first feature moves three training spreads
    send(handler, context, [json.dumps(r.tolist()) for r in raw_rows(spec, shifted)])
    scores = samples(registry, "kiln_input_drift_score")
    assert {f for (f, _), s in scores.items() if s > drift.THRESHOLD} == {spec["names"][0]}


def test_drift_takes_at_most_its_rate_of_rows_and_the_answers_every_row(features_model_dir,
                                                                        tmp_path):
    rng = np.random.default_rng(5)
    spec = json.loads((features_model_dir / "signature.json").read_text())["inputs"][0]
    # An hour's delay: the queue is recorded when a test says so.
    handler, context, registry = serving(features_model_dir, tmp_path,
                                         features_reference(spec, rng),
                                         {watch.DELAY_ENV: "3600000",
                                          watch.DRIFT_RATE_ENV: "100"})
    rows = raw_rows(spec, rng.normal(size=(2 * drift.MIN_ROWS, 30)))  # under FLUSH_ROWS
    send(handler, context, [json.dumps(r.tolist()) for r in rows[:100]])  # the bucket's all
    # The next 100 find the bucket refilled by 100 rows a second for as long as the first
    # batch took to answer (milliseconds): too few. Counted, but not kept for the sketches.
    send(handler, context, [json.dumps(r.tolist()) for r in rows[100:]])
    assert [inputs is not None for inputs, _ in handler.watch._queued] == [True, False]
    handler.watch.record()
    assert handler.watch._inputs[0][3].rows == 100
    assert samples(registry, "kiln_answer_top_probability_count") == {(): 200.0}


def test_the_drift_bucket_refills_at_its_rate_up_to_a_second_s_worth(features_model_dir,
                                                                      tmp_path):
    spec = json.loads((features_model_dir / "signature.json").read_text())["inputs"][0]
    handler, _, _ = serving(features_model_dir, tmp_path,
                            features_reference(spec, np.random.default_rng(6)),
                            {watch.DELAY_ENV: "0", watch.DRIFT_RATE_ENV: "100"})
    watched = handler.watch
    start = watched._filled
    assert watched._sampled(60, start)  # 100 tokens at the start: 40 left
    assert not watched._sampled(50, start)  # a batch is taken whole or not at all
    assert watched._sampled(40, start)
    assert not watched._sampled(30, start + 0.25)  # 25 tokens a quarter second later
    assert watched._sampled(30, start + 0.31)  # 31 at 0.31 s
    # Never more than a second's worth: a batch over it waits for a full bucket, then owes.
    assert watched._sampled(250, start + 100.0)
    assert not watched._sampled(1, start + 101.0)  # 100 in, 150 owed
    assert watched._sampled(1, start + 101.6)


def test_a_model_without_reference_statistics_holds_no_inputs(features_model_dir, tmp_path):
    handler, context, _ = serving(features_model_dir, tmp_path, None,
                                  {watch.DELAY_ENV: "3600000"})
    spec = handler.signature["inputs"][0]
    rows = raw_rows(spec, np.random.default_rng(7).normal(size=(4, 30)))
    send(handler, context, [json.dumps(r.tolist()) for r in rows])
    assert [inputs for inputs, _ in handler.watch._queued] == [None]


def wait_for(condition, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.01)


def test_answers_wait_in_the_queue_until_it_fills_or_the_delay_passes(features_model_dir,
                                                                      tmp_path):
    spec = json.loads((features_model_dir / "signature.json").read_text())["inputs"][0]
    rows = raw_rows(spec, np.random.default_rng(4).normal(size=(watch.FLUSH_ROWS, 30)))
    bodies = [json.dumps(r.tolist()) for r in rows]
    count = "kiln_answer_top_probability_count"
    # An hour's delay: only a full queue is recorded, by the batch that fills it.
    handler, context, registry = serving(features_model_dir, tmp_path / "full", None,
                                         {watch.DELAY_ENV: "3600000"})
    send(handler, context, bodies[:8])
    assert samples(registry, count) == {(): 0.0}  # queued on the answer path, not recorded
    for start in range(8, len(bodies) - 8, 8):
        send(handler, context, bodies[start:start + 8])
    assert samples(registry, count) == {(): 0.0}  # 8 rows short of FLUSH_ROWS
    send(handler, context, bodies[-8:])
    assert samples(registry, count) == {(): float(len(bodies))}
    send(handler, context, bodies[:3])
    handler.watch.record()  # what the thread would do an hour later
    assert samples(registry, count) == {(): len(bodies) + 3.0}

    # The default delay: a lone request is recorded by the thread soon after its answer.
    handler, context, registry = serving(features_model_dir, tmp_path / "lone", None,
                                         {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    assert handler.watch.delay == watch.DEFAULT_DELAY_MS / 1000
    send(handler, context, bodies[:1])
    wait_for(lambda: samples(registry, count) == {(): 1.0}, "record after the delay")


def test_an_archive_without_reference_statistics_is_served_without_drift_scores(
        features_model_dir, tmp_path):
    handler, context, registry = serving(features_model_dir, tmp_path, None)
    spec = handler.signature["inputs"][0]
    rows = raw_rows(spec, np.random.default_rng(3).normal(size=(drift.MIN_ROWS + 10, 30)))
    answers = send(handler, context, [json.dumps(r.tolist()) for r in rows])
    assert all("label" in a for a in answers)
    assert samples(registry, "kiln_answer_top_probability_count") == {(): len(rows) * 1.0}
    assert samples(registry, "kiln_input_drift_score") == {}
    assert samples(registry, "kiln_answer_reference_ratio") == {}


def test_outside_kiln_s_server_nothing_is_recorded(features_model_dir, tmp_path):
    handler, context, _ = serving(features_model_dir, tmp_path, None)
    assert not watch.watch_for(handler.signature, "tiny", "1.0", {})._on


def test_a_server_with_watching_off_records_nothing(features_model_dir, tmp_path):
    handler, context, _ = serving(features_model_dir, tmp_path, None)
    registry = CollectorRegistry()
    handler.watch = watch.watch_for(handler.signature, "tiny", "1.0",
                                    {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
                                     watch.OFF_ENV: "off"}, registry)
    spec = handler.signature["inputs"][0]
    rows = raw_rows(spec, np.random.default_rng(3).normal(size=(4, 30)))
    answers = send(handler, context, [json.dumps(r.tolist()) for r in rows])
    assert all("label" in a for a in answers)
    assert list(registry.collect()) == []


# --- the statistics and the score ------------------------------------------------------------


def test_psi_of_two_bins_is_the_textbook_sum():
    got = drift.psi(np.asarray([[0.5, 0.5]]), np.asarray([[0.25, 0.75]]))
    assert got.tolist() == pytest.approx([0.25 * math.log(2) + 0.25 * math.log(1.5)], rel=1e-12)


def test_reference_bins_training_values_at_their_quintiles():
    ref = drift.reference_of(np.arange(100.0))
    assert ref["edges"] == [19.8, 39.6, 59.4, 79.2]
    assert ref["ratios"] == [0.2] * 5
    assert ref["mean"] == 49.5


def test_a_sketch_forgets_and_scores_only_after_min_rows():
    sketch = drift.Sketch({"x": drift.reference_of(np.arange(100.0))})
    sketch.add(np.full((drift.MIN_ROWS - 1, 1), 10.0))
    assert sketch.scores() is None
    sketch.add(np.full((1, 1), 10.0))
    # Everything in the first of five equal bins: shares (1, 0, 0, 0, 0) against 0.2 each.
    expected = 0.8 * math.log(5) + 4 * (drift.FLOOR - 0.2) * math.log(drift.FLOOR / 0.2)
    assert sketch.scores().tolist() == pytest.approx([expected], rel=1e-12)
    weight = sketch.weight
    sketch.add(np.full((drift.WINDOW_ROWS, 1), 90.0))
    kept = (1 - 1 / drift.WINDOW_ROWS) ** drift.WINDOW_ROWS
    assert sketch.weight == pytest.approx(weight * kept + drift.WINDOW_ROWS, rel=1e-12)


def test_a_tensor_s_length_ends_at_its_last_value_other_than_padding():
    spec = {"name": "ids", "kind": "tensor", "dtype": "int64", "shape": [-1, -1],
            "pad_value": 0}
    names, values = kinds.of(spec).statistics(spec, np.asarray([[1, 2, 0, 3, 0, 0],
                                                                [4, 0, 0, 0, 0, 0],
                                                                [0, 0, 0, 0, 0, 0]]))
    assert names == ("length",) and values.tolist() == [[4.0], [1.0], [0.0]]


def test_an_image_s_intensity_and_ink_are_read_after_framing(image_signature):
    signature = image_signature
    spec = signature["inputs"][0]
    unit = np.zeros((1, 1, 32, 32))
    unit[0, 0, 10:20, 10:15] = 1.0  # 50 of 1024 pixels inked
    unit[0, 0, 0, 0] = 0.05  # faint, under the ink threshold
    rows = (unit - spec["mean"][0]) / spec["std"][0]
    names, values = kinds.of(spec).statistics(spec, rows)
    assert names == ("intensity", "ink")
    assert np.allclose(values, [[50.05 / 1024, 50 / 1024]], rtol=0, atol=1e-12)


def test_an_inverted_digit_has_the_statistics_of_the_digit(image_signature):
    signature = image_signature
    spec = signature["inputs"][0]
    digit = np.asarray(Image.open(FIXTURES / "digits" / "7.png").convert("L"))
    buffer = io.BytesIO()
    Image.fromarray(255 - digit).save(buffer, "PNG")
    stats = [kinds.of(spec).statistics(spec, rest.decode_body(body, signature)[0][0])[1]
             for body in ((FIXTURES / "digits" / "7.png").read_bytes(), buffer.getvalue())]
    assert stats[0].tolist() == stats[1].tolist()


def test_a_variable_length_tensor_is_watched_by_its_length():
    spec = {"name": "ids", "kind": "tensor", "dtype": "int64", "shape": [-1, -1],
            "max_length": 8, "pad_value": 0}
    signature = {"inputs": [spec],
                 "output": {"kind": "multiclass", "labels": ["a", "b"], "shape": [-1, 2]},
                 "reference": {"inputs": {"ids": {"length": drift.reference_of(
                     np.arange(100.0) % 8 + 1)}}}}
    registry = CollectorRegistry()
    watched = watch.watch_for(signature, "tiny", "1.0", {watch.DELAY_ENV: "0"},
                              registry)
    rows = np.zeros((drift.MIN_ROWS, 8), dtype=np.int64)
    rows[:, :2] = 5  # every request two tokens long, padded to the batch's longest
    watched.observe([rows], np.tile(np.float32([[0.9, 0.1]]), (drift.MIN_ROWS, 1)))
    (score,) = samples(registry, "kiln_input_drift_score").items()
    assert score[0] == ("length", "ids") and score[1] > drift.THRESHOLD
    assert samples(registry, "kiln_answers_total") == {("a",): 100.0, ("b",): 0.0}


@pytest.mark.parametrize(("setting", "variable"), [(True, "on"), (False, "off")])
def test_the_server_s_watch_setting_reaches_the_workers(tmp_path, setting, variable):
    from kiln.deploy.server import Ports, Server, ServerSettings

    settings = ServerSettings(tmp_path, tmp_path, ["lenet"], Ports.free(), watch=setting)
    assert Server(settings)._env()[watch.OFF_ENV] == variable


@pytest.mark.parametrize(("extra", "rate"), [({}, str(watch.DEFAULT_DRIFT_ROWS_PER_S)),
                                             ({"drift_rows_per_s": 0}, "0")])
def test_the_server_s_drift_rate_reaches_the_workers(tmp_path, extra, rate):
    from kiln.deploy.server import Ports, Server, ServerSettings

    settings = ServerSettings(tmp_path, tmp_path, ["lenet"], Ports.free(), **extra)
    assert Server(settings)._env()[watch.DRIFT_RATE_ENV] == rate


def test_observe_all_records_what_one_observe_per_value_records():
    values = [0.05, 0.2, 0.2, 0.25, 0.97, 0.995, 1.0, 0.999, 0.5]
    recorded = []
    for record in (lambda h: [h.observe(v) for v in values],
                   lambda h: watch.observe_all(h, values)):
        registry = CollectorRegistry()
        histogram = watch.declare(registry)[watch.TOP_PROBABILITY_METRIC].labels("m", "1")
        record(histogram)
        recorded.append({(s.name, s.labels.get("le")): s.value for family in registry.collect()
                         for s in family.samples if not s.name.endswith("_created")})
    assert recorded[0] == recorded[1]
    bucket = watch.TOP_PROBABILITY_METRIC + "_bucket"
    # A value on a bound is in that bucket, as observe() has it.
    assert (recorded[1][(bucket, "0.2")], recorded[1][(bucket, "0.3")]) == (3, 4)
    assert recorded[1][(watch.TOP_PROBABILITY_METRIC + "_sum", None)] == pytest.approx(
        sum(values), abs=1e-12)
