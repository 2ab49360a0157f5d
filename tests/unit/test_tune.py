"""The pure parts of `kiln tune`: the sweep, the selection rule, the [serving] it writes."""

import argparse
import subprocess
import tomllib
from pathlib import Path

import pytest

from kiln.deploy.server import ModelServing
from kiln.loadtests import serving_table
from kiln.loadtests.bench_arguments import add_tune_arguments
from kiln.loadtests.tune import (
    Trial,
    Variant,
    choose,
    grid_line,
    markdown,
    serve_command,
    serving_values,
    sweep,
)


def trial(backend, bs, delay, workers, rps, p99, one_p50, one_p99=None, errors=0):
    return Trial(Variant(backend, bs, delay, workers), rps, one_p50 * 2, p99, one_p50,
                 one_p99 if one_p99 is not None else one_p50 * 2, errors)


def test_sweep_is_the_full_grid():
    variants = sweep(["onnx", "torchscript"], [(1, 0), (8, 2)], [1, 2])
    assert len(variants) == 8
    assert variants[0] == Variant("onnx", 1, 0, 1)
    assert variants[-1].name == "torchscript_b8_d2_w2"


def test_the_unbatched_variant_is_always_swept_first():
    variants = sweep(["onnx"], [(8, 2), (1, 0)], [2])
    assert [v.name for v in variants] == ["onnx_b1_d0_w2", "onnx_b8_d2_w2"]


def test_the_grid_is_stated_and_says_when_it_is_not_the_fixed_one():
    assert grid_line("1:0,4:1,8:2,16:5", "1,2", "onnx,torchscript", 16) == (
        "Grid: batch:delay 1:0,4:1,8:2,16:5 (1:0 always), workers 1,2, backends "
        "onnx,torchscript; 16 clients at load and 1 client. The fixed grid.")
    assert grid_line("1:0,4:1", "1", "onnx", 4).endswith(
        "Not the fixed grid (flags narrowed it): do not compare with a report of the fixed one "
        "(1:0,4:1,8:2,16:5, workers 1,2, 16 clients).")


def test_one_client_p50_may_be_at_most_half_again_the_unbatched_one():
    base = trial("onnx", 1, 0, 1, 300, 40, 4)
    assert choose([base, trial("onnx", 8, 2, 1, 900, 60, 6)], 100).variant.batch_size == 8
    assert choose([base, trial("onnx", 8, 5, 1, 900, 60, 6.1)], 100) is base


def test_the_unbatched_baseline_is_the_same_backend_and_workers():
    trials = [trial("onnx", 1, 0, 1, 300, 40, 2), trial("onnx", 1, 0, 2, 500, 40, 6),
              trial("onnx", 8, 2, 2, 900, 60, 8)]
    assert choose(trials, 100).variant == Variant("onnx", 8, 2, 2)


def test_a_variant_without_its_unbatched_trial_does_not_qualify():
    assert choose([trial("onnx", 8, 2, 1, 900, 60, 7)], 100) is None


def test_the_fastest_variant_under_the_bound_wins():
    trials = [trial("onnx", 1, 0, 1, 300, 40, 5), trial("onnx", 8, 2, 1, 900, 60, 7),
              trial("onnx", 16, 5, 1, 1200, 120, 9)]
    assert choose(trials, 100).variant == Variant("onnx", 8, 2, 1)


def test_one_client_p99_must_meet_the_bound_too():
    trials = [trial("onnx", 1, 0, 1, 300, 40, 5), trial("onnx", 8, 50, 1, 900, 60, 52, 101)]
    assert choose(trials, 100).variant == Variant("onnx", 1, 0, 1)


def test_errors_disqualify():
    trials = [trial("onnx", 1, 0, 1, 300, 40, 5), trial("onnx", 8, 2, 1, 900, 60, 7, errors=1)]
    assert choose(trials, 100).variant == Variant("onnx", 1, 0, 1)


def test_a_tie_goes_to_the_lower_one_client_p50():
    trials = [trial("onnx", 8, 5, 1, 1000, 60, 9), trial("torchscript", 8, 2, 2, 970, 70, 6),
              trial("onnx", 1, 0, 1, 500, 50, 8), trial("torchscript", 1, 0, 2, 600, 50, 5)]
    assert choose(trials, 100).variant == Variant("torchscript", 8, 2, 2)


def test_none_qualifies():
    assert choose([trial("onnx", 1, 0, 1, 300, 140, 5)], 100) is None


def test_report_marks_the_pick_and_shows_its_one_client_p50():
    trials = [trial("onnx", 1, 0, 1, 300, 40, 5), trial("onnx", 8, 2, 1, 900, 60, 7)]
    pick = choose(trials, 100)
    text = markdown("m", trials, pick, 100, 16, 3, "Grid: stated.")
    assert "| onnx_b8_d2_w1 | onnx | 8 | 2 | 1 | 900 | 14.00 | 60.00 | 7.00 | 1.40 | 14.00 " \
           "| 0 | **pick** |" in text.splitlines()
    assert "Grid: stated." in text.splitlines()
    assert "Pick: **onnx_b8_d2_w1**: 900 req/s at 16 clients (p99 60.00 ms), 7.00 ms p50 " \
           "at 1 client." in text.splitlines()


def test_the_pick_is_what_kiln_serve_and_a_declaration_take():
    variant = Variant("onnx", 8, 2, 2)
    values = serving_values(variant)
    assert values == {"workers": 2, "batch_size": 8, "max_batch_delay_ms": 2}
    assert ModelServing.resolve(values) == variant.serving()
    assert tomllib.loads(serving_table.table(values)) == {"serving": values}
    assert serve_command("m", variant) == ("kiln serve m --workers 2 --batch-size 8 "
                                           "--max-batch-delay 2")
    assert serve_command("m", Variant("torchscript", 1, 0, 1)).startswith(
        "kiln serve m --backend torchscript ")


def test_report_shows_the_serving_table_of_the_pick():
    trials = [trial("torchscript", 1, 0, 2, 400, 40, 6), trial("torchscript", 4, 1, 2, 900, 60, 7)]
    text = markdown("m", trials, choose(trials, 100), 100, 16, 3)
    toml = text.split("```toml\n", 1)[1].split("```", 1)[0]
    assert tomllib.loads(toml) == {"serving": {"workers": 2, "batch_size": 4,
                                               "max_batch_delay_ms": 1}}
    assert "serve with `--backend torchscript`" in text


def test_a_variant_kiln_serve_cannot_reproduce_is_refused():
    with pytest.raises(ValueError, match="100 ms"):
        Variant("onnx", 8, 0, 1).serving()
    Variant("onnx", 1, 0, 1).serving()  # one request per batch: the delay never counts


def test_tune_s_default_output_is_git_ignored():
    parser = argparse.ArgumentParser()
    add_tune_arguments(parser)
    out = parser.parse_args(["lenet", "--p99-ms", "10"]).out
    repo = Path(__file__).resolve().parents[2]
    for written in ("serving.toml", "report.md", "trials.yaml"):
        ignored = subprocess.run(["git", "check-ignore", "-q", str(out / written)], cwd=repo)
        assert ignored.returncode == 0, f"{out / written} is not git-ignored"
