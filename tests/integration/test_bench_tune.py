"""`kiln bench` and `kiln tune` end to end, in their shortest modes, as subprocesses."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import yaml

from kiln.loadtests import bench_gpu, declared, observability, wrk
from kiln.loadtests.bench import COMPARISON, PLAIN_BEST_CONFIG, kiln_serve_config
from kiln.loadtests.bench_table import config_name

REPO = Path(__file__).resolve().parent.parent.parent
MODEL = declared.default_name("features")  # a features model: the quickest to serve
pytestmark = pytest.mark.skipif(not wrk.available(), reason="wrk is not installed (apt-get)")


def kiln(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], cwd=REPO, timeout=timeout,
                          capture_output=True, text=True)


def test_bench_has_every_row_with_positive_figures(archives, tmp_path):
    out = tmp_path / "bench.json"
    done = kiln("bench", MODEL, "--seconds", "1", "--clients", "4,2", "--out", str(out),
                timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    cmp, serve = result["comparison"], result["kiln_serve"]
    assert serve == config_name(kiln_serve_config(MODEL, []))
    batches = sorted({1, kiln_serve_config(MODEL, []).batch_size, COMPARISON.batch_size})
    served = [("kiln", "nginx -> TorchServe", cmp), ("kiln direct", "TorchServe", cmp)]
    served += [("plain", "TorchServe", cmp), ("noop", "TorchServe", cmp)]
    served += [("noop", "TorchServe", serve)] if serve != cmp else []
    served += [("stock", "TorchServe", "TorchServe defaults"),
               ("kiln as served", "nginx -> TorchServe", serve),
               ("plain best", "TorchServe", config_name(PLAIN_BEST_CONFIG)),
               ("plain best, bare proxy", "bare nginx -> TorchServe",
                config_name(PLAIN_BEST_CONFIG))]
    rows = result["rows"]
    assert [(r["name"], r["via"], r["config"], r["clients"]) for r in rows] == [
        *((f"in-process {b} b{n}", "in-process", "", 0) for b in ("onnxruntime", "torchscript")
          for n in batches),
        *((*row, n) for row in served for n in (1, 2, 4)),
        *((f"kiln observability {s}", "nginx -> TorchServe", cmp, 4)
          for s in ("off", "on", "on 0.1%")),
        *((f"kiln oip {p}", "nginx -> TorchServe", cmp, n) for p in ("http", "grpc")
          for n in (1, 2, 4))]
    for r in rows:
        assert r["throughput"] > 0 and r["p50_ms"] > 0 and r["p99_ms"] > 0, r
        assert r["errors"] == 0, r
        assert r["x_ceiling"] > 0, r
        if r["config"] == cmp:
            assert r["x_noop"] > 0 and r["x_plain"] > 0, r
        if r["via"] != "in-process":
            assert r["server_cpu_us"] > 0 and r["x_best"] > 0, r
        wrk_row = not r["name"].startswith("kiln oip")  # h2load's rows count no nginx share
        # A figure, not more: CPU time moves in 10 ms ticks, and a 1 s cell on busy cores can
        # hold a few dozen requests, whose 50 us each of nginx read as no tick at all.
        assert (r["proxy_cpu_us"] is not None and r["proxy_cpu_us"] >= 0) if (
            r["via"] in ("nginx -> TorchServe", "bare nginx -> TorchServe") and wrk_row
        ) else r["proxy_cpu_us"] is None, r
    assert done.stdout.count("Kiln as served (") == 3
    assert done.stdout.count("plain best itself behind a bare nginx (the floor of any proxy)") == 3
    for sample in ("1.0%", "0.1%"):
        assert done.stdout.count(f"Observability all on (traces and payloads sampled at "
                                 f"{sample}) against all off at ") == 1
    pairs = result["observability_pair_ratios"]
    assert list(pairs) == [observability.ON, observability.SPARSE], pairs
    assert all(len(r) == observability.PAIRS and all(x > 0 for x in r)
               for r in pairs.values()), pairs
    if not torch.cuda.is_available():
        assert result["gpu"] == {"notes": [bench_gpu.SKIPPED], "rows": []}
        assert bench_gpu.SKIPPED in done.stdout.splitlines()


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
