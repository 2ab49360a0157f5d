"""The pure parts of `kiln bench`: wrk's report, the rows, their ratios and labels, the GPU
section's skip, and the plain handler on a tiny ONNX model."""

import io
import json
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from kiln.cli import serve
from kiln.cli.main import build_parser
from kiln.deploy.server import ModelServing
from kiln.loadtests import bench, bench_gpu, observability, stock, wrk
from kiln.loadtests.bench_arguments import client_counts
from kiln.loadtests.bench_table import (
    AS_SERVED,
    BARE,
    DIRECT,
    FRONT,
    PLAIN_BEST,
    PLAIN_BEST_PROXIED,
    Row,
    add_ratios,
    as_served_summary,
    format_table,
    observability_summary,
    summary,
)
from kiln.loadtests.plain_handler import PlainHandler

SAMPLE = Path(__file__).resolve().parent.parent / "fixtures" / "wrk" / "latency.txt"


def test_wrk_report_is_parsed():
    run = wrk.parse(SAMPLE.read_text())
    assert run == wrk.WrkRun(requests=746, seconds=2.0, throughput_rps=372.81, p50_ms=35.46,
                             p99_ms=140.48, errors=6)


def test_wrk_units_convert_to_ms():
    text = SAMPLE.read_text().replace("35.46ms", "812.00us").replace("140.48ms", "1.50s")
    run = wrk.parse(text)
    assert (run.p50_ms, run.p99_ms) == (0.812, 1500.0)


def test_wrk_report_without_latency_is_refused():
    text = "\n".join(line for line in SAMPLE.read_text().splitlines() if "%  " not in line)
    try:
        wrk.parse(text)
    except wrk.WrkError as err:
        assert "--latency" in str(err)
    else:
        raise AssertionError("parsed a report without percentiles")


CMP = "w2 b16 d5"


def rows():
    def served(name, via, config, clients, rps, p99, wrk_cpu=None):
        return Row(name, clients, rps, p99 / 2, p99, 10, client_cpu_pct=wrk_cpu,
                   server_cpu_pct=150.0 if wrk_cpu else None, via=via, config=config)

    return [Row("in-process onnxruntime b1", 0, 1000.0, 0.1, 0.2, 10),
            Row("in-process onnxruntime b16", 0, 4000.0, 0.2, 0.4, 10),
            served("kiln", FRONT, CMP, 1, 100.0, 20.0), served("kiln", FRONT, CMP, 16, 400.0, 60.0),
            served("kiln direct", DIRECT, CMP, 16, 500.0, 50.0, 12.0),
            served(AS_SERVED, FRONT, "w1 b8 d2", 16, 300.0, 80.0),
            served(PLAIN_BEST, DIRECT, "w2 b8 d1", 16, 375.0, 90.0),
            served("plain", DIRECT, CMP, 1, 200.0, 10.0),
            served("plain", DIRECT, CMP, 16, 250.0, 100.0),
            served("noop", DIRECT, CMP, 1, 400.0, 5.0),
            served("noop", DIRECT, CMP, 16, 800.0, 40.0),
            served("noop", DIRECT, "w1 b8 d2", 16, 600.0, 30.0),
            served("stock", DIRECT, "TorchServe defaults", 16, 200.0, 120.0)]


def test_ratios_against_the_plain_and_noop_rows_of_the_same_configuration():
    table = {(r.name, r.config, r.clients): r for r in add_ratios(rows())}
    kiln16, kiln1 = table["kiln", CMP, 16], table["kiln", CMP, 1]
    assert (kiln16.x_ceiling, kiln16.x_noop, kiln16.x_plain, kiln16.p99_x_plain) == (
        0.1, 0.5, 1.6, 0.6)
    assert (kiln1.x_ceiling, kiln1.x_noop, kiln1.x_plain, kiln1.p99_x_plain) == (
        0.025, 0.25, 0.5, 2.0)
    assert (table["kiln direct", CMP, 16].x_plain, table["kiln direct", CMP, 16].x_noop) == (
        2.0, 0.625)


def test_kiln_serves_own_configuration_has_its_noop_and_no_plain():
    kiln = {(r.name, r.config): r for r in add_ratios(rows()) if r.clients == 16}[
        AS_SERVED, "w1 b8 d2"]
    assert (kiln.x_noop, kiln.x_plain, kiln.p99_x_plain) == (0.5, None, None)


def test_served_rows_are_compared_with_the_plain_handler_at_its_best_at_their_concurrency():
    table = {(r.name, r.clients): r for r in add_ratios(rows())}
    assert [table[k].x_best for k in ((AS_SERVED, 16), ("kiln", 16), ("kiln", 1),
                                      (PLAIN_BEST, 16))] == [0.8, 1.07, None, 1.0]
    assert table["in-process onnxruntime b16", 0].x_best is None


def test_as_served_summary_gives_the_ratio_the_p50_and_nginx_share_of_the_cpu():
    kiln = Row(AS_SERVED, 32, 3000.0, 9.0, 20.0, 1, server_cpu_us=700.0, proxy_cpu_us=55.0,
               via=FRONT, config="w2 b8 d1")
    plain = Row(PLAIN_BEST, 32, 2500.0, 11.0, 25.0, 1, server_cpu_us=650.0, via=DIRECT,
                config="w2 b8 d1")
    lonely = Row(AS_SERVED, 16, 2000.0, 7.0, 15.0, 1, via=FRONT, config="w2 b8 d1")
    assert as_served_summary(add_ratios([lonely, plain, kiln]), 3) == [
        "Kiln as served (w2 b8 d1, through nginx) against the plain handler at its best "
        "(w2 b8 d1, straight to TorchServe), 32 client(s), medians of 3 rounds taking turns: "
        "1.2x (3000 vs 2500 inputs/s), p50 9.00 vs 11.00 ms, server CPU 700 vs 650 us a "
        "request, nginx's 55 of it"]


def test_as_served_summary_adds_the_floor_of_a_bare_proxy_in_front_of_plain_best():
    kiln = Row(AS_SERVED, 16, 1800.0, 9.0, 20.0, 1, server_cpu_us=400.0, proxy_cpu_us=50.0,
               via=FRONT, config="w2 b8 d1")
    plain = Row(PLAIN_BEST, 16, 2000.0, 8.0, 25.0, 1, server_cpu_us=300.0, via=DIRECT,
                config="w2 b8 d5")
    floor = Row(PLAIN_BEST_PROXIED, 16, 1600.0, 9.5, 25.0, 1, server_cpu_us=340.0,
                proxy_cpu_us=28.0, via=BARE, config="w2 b8 d5")
    (line,) = as_served_summary(add_ratios([floor, kiln, plain]), 3)
    assert line.startswith("Kiln as served (w2 b8 d1, through nginx) against the plain "
                           "handler at its best (w2 b8 d5, straight to TorchServe), 16 "
                           "client(s), medians of 3 rounds taking turns: 0.9x ")
    assert line.endswith("nginx's 50 of it; plain best itself behind a bare nginx (the floor "
                         "of any proxy): 0.8x, that nginx's 28 us a request")


def test_kiln_as_served_is_what_kiln_serve_gives_the_model_alone_on_these_cores(monkeypatch):
    monkeypatch.setattr(bench, "usable_cores", lambda: 2)
    args = build_parser().parse_args(["serve", "lenet"])
    assert bench.kiln_serve_config("lenet", []) == serve._serving(args, ["lenet"], 2)[
        "lenet"] == ModelServing(workers=2, batch_size=8, max_batch_delay_ms=1)


def test_bench_clients_are_a_list_measured_at_16_and_32_by_default():
    assert build_parser().parse_args(["bench", "lenet"]).clients == [16, 32]
    assert client_counts("32,4,32") == [4, 32]
    for bad in ("", "0,16", "sixteen"):
        with pytest.raises(Exception, match="whole numbers >= 1"):
            client_counts(bad)


def test_stock_gets_no_ratio_to_plain_or_noop_and_in_process_rows_only_the_ceiling():
    table = {(r.name, r.clients): r for r in add_ratios(rows())}
    stock_row, b16 = table["stock", 16], table["in-process onnxruntime b16", 0]
    assert (stock_row.x_ceiling, stock_row.x_noop, stock_row.x_plain) == (0.05, None, None)
    assert (b16.x_ceiling, b16.x_noop, b16.x_plain) == (1.0, None, None)


def test_missing_base_rows_give_no_ratio():
    only = add_ratios([Row("kiln", 16, 400.0, 30.0, 60.0, 10, via=FRONT, config=CMP)])
    assert (only[0].x_ceiling, only[0].x_noop, only[0].x_plain) == (None, None, None)


def test_table_has_one_line_per_row_and_says_what_each_goes_through():
    lines = format_table(add_ratios(rows())).splitlines()
    assert len(lines) == 14
    assert lines[0].split()[:4] == ["row", "via", "config", "clients"]
    assert lines[0].split()[-4:] == ["srv", "us/rq", "nginx", "us"]
    assert lines[3].split()[:10] == ["kiln", "nginx", "->", "TorchServe", "w2", "b16", "d5",
                                     "1", "100", "0.025"]
    assert lines[5].split()[:8] == ["kiln", "direct", "TorchServe", "w2", "b16", "d5", "16",
                                    "500"]


def test_summary_compares_kiln_with_plain_and_noop_and_gives_wrk_cpu_at_the_peak():
    assert summary(add_ratios(rows()), CMP, 16) == [
        "At w2 b16 d5, 16 clients:",
        "  Kiln through nginx: 400 inputs/s, 1.6x the plain handler's throughput (p99 0.6x), "
        "0.5x the no-op's",
        "  Kiln direct to TorchServe: 500 inputs/s, 2x the plain handler's throughput "
        "(p99 0.5x), 0.625x the no-op's",
        "  plain handler: 250 inputs/s, 0.312x the no-op's",
        "Peak served: kiln direct (TorchServe, w2 b16 d5) at 16 clients, 500 inputs/s, p99 "
        "50.00 ms; wrk used 12% of a core, the server 150%"]


def test_observability_rows_are_medians_of_their_rounds_with_requests_summed():
    runs = [Row(observability.ON, 16, t, p50, p99, 100, e, 10.0, cpu, us, proxy, via=FRONT,
                config=CMP)
            for t, p50, p99, e, cpu, us, proxy in ((900.0, 9.0, 30.0, 0, 150.0, 1700.0, 60.0),
                                                   (1000.0, 8.0, 20.0, 1, 160.0, 1600.0, 40.0),
                                                   (800.0, 10.0, 25.0, 0, 140.0, 1750.0, 50.0))]
    row = observability.median_row(runs)
    assert (row.name, row.throughput, row.p50_ms, row.p99_ms, row.requests, row.errors,
            row.server_cpu_pct, row.server_cpu_us, row.proxy_cpu_us) == (
        observability.ON, 900.0, 9.0, 25.0, 300, 1, 150.0, 1700.0, 50.0)


def test_observability_summary_gives_the_ratio_the_p50_and_the_cpu_per_request():
    off = Row(observability.OFF, 16, 1000.0, 8.0, 20.0, 1, server_cpu_us=1600.0, via=FRONT,
              config=CMP)
    on = Row(observability.ON, 16, 980.0, 8.1, 20.5, 1, server_cpu_us=1650.0, via=FRONT,
             config=CMP)
    assert observability_summary(off, on, 0.001, 3, [0.9712, 0.99]) == [
        "Observability all on (traces and payloads sampled at 0.1%) against all off at w2 b16 "
        "d5, 16 clients (medians of 3 rounds "
        "taking turns, in each of 2 pairs of servers): throughput 0.98x (980 vs 1000 "
        "inputs/s; pair by pair 0.971x, 0.990x), p50 +0.10 ms, p99 +0.50 ms, server CPU 1650 "
        "vs 1600 us a request (1.03x)"]


def test_observability_on_is_everything_a_production_user_turns_on_and_off_is_none_of_it(
        tmp_path):
    settings = {row: observability.server(tmp_path, "lenet", bench.COMPARISON, [], row,
                                          "http://127.0.0.1:4318").settings
                for row in observability.ROWS}
    assert [(s.access_log, s.otlp_endpoint, s.trace_sample, s.watch, s.payload_log,
             s.serving["lenet"]) for s in settings.values()] == [
        (False, None, 1.0, False, 0.0, bench.COMPARISON),
        (True, "http://127.0.0.1:4318", 0.01, True, 0.01, bench.COMPARISON),
        (True, "http://127.0.0.1:4318", 0.001, True, 0.001, bench.COMPARISON)]
    assert len({s.run_dir for s in settings.values()}) == 3  # side by side in one pair


def test_a_server_that_does_not_run_is_counted_no_cpu(tmp_path):
    server = observability.server(tmp_path, "lenet", bench.COMPARISON, [], observability.OFF,
                                  "http://127.0.0.1:4318")
    sum(range(10**6))  # this process has used some CPU, which is not the server's
    assert observability.serving_cpu_seconds(server) == 0.0


def test_stock_is_labelled_for_what_it_is():
    assert bench.descriptions("lenet", bench.COMPARISON)["stock"] == stock.DESCRIPTION
    assert stock.DESCRIPTION.startswith(
        "TorchServe base_handler, TorchScript, TorchServe defaults: not a set-up anyone would "
        "pick")


def test_kiln_and_plain_are_compared_at_two_workers_batch_16_delay_5():
    assert (bench.COMPARISON.workers, bench.COMPARISON.batch_size,
            bench.COMPARISON.max_batch_delay_ms) == (2, 16, 5)


def test_gpu_section_without_cuda_says_it_was_skipped(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_gpu, "cuda_available", lambda: False)
    section = bench_gpu.inprocess_rows(tmp_path, b"", [1, 16], 1)
    assert (section.rows, section.ran) == ([], False)
    assert bench_gpu.lines(section) == [
        "GPU section skipped: no CUDA here (torch.cuda.is_available() is False)"]


# --- the plain handler, on a two-class ONNX model of a padded 2x2 image ---------------------
def tiny_model(folder: Path) -> Path:
    """[N, 1, 4, 4] -> flatten -> x @ W -> softmax, W's second column all ones."""
    weights = np.stack([np.zeros(16), np.ones(16)], axis=1).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]),
         helper.make_node("MatMul", ["flat", "W"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor("W", TensorProto.FLOAT, [16, 2], weights.ravel().tolist())])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]),
              folder / "model.onnx")
    signature = {"inputs": [{"name": "input", "kind": "image", "shape": [-1, 1, 4, 4],
                             "channels": 1, "size": [2, 2], "pad": 1, "mean": [0.0],
                             "std": [0.5]}],
                 "output": {"kind": "multiclass", "labels": ["dark", "bright"]}}
    (folder / "signature.json").write_text(json.dumps(signature))
    return folder


def png(pixels) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_plain_handler_answers_each_request_of_a_batch(tmp_path):
    handler = PlainHandler()
    handler.initialize(types.SimpleNamespace(
        system_properties={"model_dir": str(tiny_model(tmp_path))}))
    answers = handler.handle([{"body": png([[0, 255], [255, 0]])},
                              {"data": bytearray(png([[0, 0], [0, 0]]))}], None)
    # Two white pixels, standardised to 2 each: logits (0, 4); all black: (0, 0).
    assert [(a["label"], round(a["probability"], 6)) for a in answers] == [
        ("bright", 0.982014), ("dark", 0.5)]
