"""`kiln bench` and `kiln tune` end to end, in their shortest modes, as subprocesses."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from kiln.loadtests import declared, wrk

REPO = Path(__file__).resolve().parent.parent.parent
MODEL = declared.default_name("features")  # a features model: the quickest to serve
pytestmark = pytest.mark.skipif(not wrk.available(), reason="wrk is not installed (apt-get)")


def kiln(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], cwd=REPO, timeout=timeout,
                          capture_output=True, text=True)


def test_bench_has_every_row_with_positive_figures(archives, tmp_path):
    out = tmp_path / "bench.json"
    done = kiln("bench", MODEL, "--seconds", "1", "--clients", "4", "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["name"], r["clients"]) for r in rows] == [
        ("in-process onnxruntime b1", 0), ("in-process onnxruntime b8", 0),
        ("in-process torchscript b1", 0), ("in-process torchscript b8", 0),
        ("kiln", 1), ("kiln", 4), ("stock", 1), ("stock", 4), ("noop", 1), ("noop", 4)]
    for r in rows:
        assert r["throughput"] > 0 and r["p50_ms"] > 0 and r["p99_ms"] > 0, r
        assert r["errors"] == 0, r
        assert r["x_ceiling"] > 0 and r["x_noop"] > 0 and r["x_stock"] > 0, r


def test_tune_picks_a_member_of_the_sweep_under_the_bound(archives, tmp_path):
    done = kiln("tune", MODEL, "--p99-ms", "5000", "--backends", "onnx", "--configs",
                "1:0,4:1", "--workers", "1", "--clients", "4", "--seconds", "1",
                "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    trials = yaml.safe_load((tmp_path / "trials.yaml").read_text())
    assert [t["variant"]["name"] for t in trials] == ["onnx_b1_d0_w1", "onnx_b4_d1_w1"]
    written = tomllib.loads((tmp_path / "serving.toml").read_text())["serving"]
    chosen = [t for t in trials if {k: t["variant"][k] for k in written} == written]
    assert len(chosen) == 1 and written["workers"] == 1
    assert chosen[0]["p99_ms"] <= 5000 and chosen[0]["one_p99_ms"] <= 5000
    assert "**pick**" in (tmp_path / "report.md").read_text()
