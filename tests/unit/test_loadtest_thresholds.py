"""Load-test thresholds and shapes: the pure parts of `kiln loadtest`."""

import math

import pytest

from kiln.loadtests import shapes
from kiln.loadtests.thresholds import Check, Thresholds, evaluate, load, passed


def test_evaluate_checks_every_given_limit():
    t = Thresholds(max_fail_ratio=0.01, max_p95_ms=50, max_p99_ms=None)
    assert evaluate(t, requests=200, fail_ratio=0.02, p95_ms=40, p99_ms=900) == [
        Check("requests", "> 0", 200, True),
        Check("failure ratio", "<= 0.01", 0.02, False),
        Check("p95 ms", "<= 50", 40, True),
    ]


def test_no_requests_and_nan_percentiles_fail():
    checks = evaluate(Thresholds(0.0, 1.0, 1.0), 0, 0.0, math.nan, math.nan)
    assert [c.held for c in checks] == [False, True, False, False]
    assert passed(checks) is False


def test_impossible_p95_fails():
    checks = evaluate(Thresholds(max_p95_ms=0.001), 10, 0.0, 1.0, 2.0)
    assert passed(checks) is False


@pytest.mark.parametrize(("name", "text"), [
    ("t.yaml", "thresholds:\n  max_fail_ratio: 0.05\n  max_p99_ms: 250\n"),
    ("t.toml", "[thresholds]\nmax_fail_ratio = 0.05\nmax_p99_ms = 250\n"),
    ("t.yml", "max_fail_ratio: 0.05\nmax_p99_ms: 250\n"),
])  # fmt: skip
def test_load_yaml_and_toml(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    assert load(tmp_path / name) == Thresholds(0.05, None, 250)


def test_flags_override_the_file():
    assert Thresholds(0.05, 100, 250).merged(max_p95_ms=20, max_p99_ms=None) == Thresholds(
        0.05, 20, 250)


@pytest.mark.parametrize(("text", "message"), [
    ("max_p95: 3\n", "unknown thresholds ['max_p95']"),
    ("max_p95_ms: -1\n", "threshold max_p95_ms must be a number >= 0, got -1"),
    ("max_p95_ms: fast\n", "threshold max_p95_ms must be a number >= 0, got 'fast'"),
])  # fmt: skip
def test_bad_files_say_what_is_wrong(tmp_path, text, message):
    (tmp_path / "t.yaml").write_text(text)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load(tmp_path / "t.yaml")


PROFILE = shapes.Profile(users=8, spawn_rate=2.0, duration=40.0)


def test_step_climbs_in_four_steps_then_ends():
    at = [shapes.users_at("step", PROFILE, t) for t in (0, 9.9, 10, 25, 39.9, 40)]
    assert at == [(2, 2.0), (2, 2.0), (4, 2.0), (6, 2.0), (8, 2.0), None]


def test_spike_jumps_at_once_in_the_middle_fifth():
    at = [shapes.users_at("spike", PROFILE, t) for t in (0, 15.9, 16, 23.9, 24, 40)]
    assert at == [(2, 8.0), (2, 8.0), (8, 8.0), (8, 8.0), (2, 8.0), None]


def test_constant_and_unknown_shapes():
    assert shapes.users_at("constant", PROFILE, 39) == (8, 2.0)
    with pytest.raises(ValueError, match="unknown shape 'ramp'"):
        shapes.users_at("ramp", PROFILE, 1)
