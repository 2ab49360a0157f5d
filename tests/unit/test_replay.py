"""kiln replay's reading and comparison (batch/replay.py), without a server."""

import json

import pytest

from kiln.batch import replay
from kiln.handlers import payload_log


def record(answer, status=200, **more):
    return {"model": "m", "status": status, "latency_ms": 2.0, "answer": answer, **more}


def test_labels_are_compared_row_by_row_on_rest_and_oip_answers():
    report = replay.Report()
    report.add(record([{"label": "1"}, {"label": "2"}]), 200,
               [{"label": "1"}, {"label": "3"}], 0.01)
    oip = {"outputs": [{"name": "probabilities", "datatype": "FP32", "data": [0.1, 0.9]},
                       {"name": "label", "datatype": "BYTES", "data": ["b"]}]}
    report.add(record(oip), 200, oip, 0.03)
    assert (report.outcomes, report.rows, report.agreed, report.values) == (
        {"scored": 2}, 3, 2, 0)
    assert (report.as_json()["replay_ms_mean"], report.as_json()["logged_ms_mean"]) == (20.0, 2.0)


def test_values_are_compared_by_absolute_difference():
    report = replay.Report()
    report.add(record({"values": {"a": 1.0, "b": [2.0, 3.0]}}), 200,
               {"values": {"a": 1.5, "b": [2.0, 1.0]}}, 0.01)
    assert (report.values, report.diff_sum, report.diff_max) == (3, 2.5, 2.0)


def test_errors_are_compared_by_status_and_a_new_one_is_counted():
    report = replay.Report()
    report.add(record({"error": "x"}, status=400), 400, {"error": "x"}, 0.01)
    report.add(record({"error": "x"}, status=400), 200, {"label": "1"}, 0.01)
    report.add(record({"label": "1"}), 503, {"error": "busy"}, 0.01)
    report.add(record({"label": "1"}), 200, "not json", 0.01)
    assert report.outcomes == {"same_error": 1, "error_changed": 1, "replay_error": 1,
                               "unlike": 1}
    assert (report.first_error, report.nothing_answered()) == ((503, {"error": "busy"}), False)


def test_a_version_not_served_answers_nothing():
    report = replay.Report()
    report.add(record({"label": "1"}), 404, {"error": "no model lenet 9.9"}, 0.01)
    assert report.nothing_answered()
    assert 'first replay error: HTTP 404 {"error": "no model lenet 9.9"}' in report.lines()


def test_a_log_folder_is_read_oldest_file_first_and_other_models_left_out(tmp_path):
    for index, n in ((0, 3), (2, 1), (1, 2)):
        lines = [json.dumps({"model": "m", "n": n}), json.dumps({"model": "other"})]
        (tmp_path / payload_log.rotated_name(index)).write_text("\n".join(lines) + "\n")
    with (tmp_path / payload_log.LOG_NAME).open("a") as current:
        current.write('{"model": "m", "n": \n')  # a line cut short
    records, left_out = replay.read_records(tmp_path, "m")
    assert [r["n"] for r in records] == [1, 2, 3]
    assert left_out == {"other models": 3, "unreadable": 1}


@pytest.mark.parametrize(("text", "parsed"), [("lenet", ("lenet", None)),
                                              ("lenet:2.0", ("lenet", "2.0"))])
def test_name_and_version(text, parsed):
    assert replay.parse_model(text) == parsed


def test_a_version_left_empty_is_refused():
    with pytest.raises(replay.ReplayError, match="NAME or NAME:VERSION"):
        replay.parse_model("lenet:")
