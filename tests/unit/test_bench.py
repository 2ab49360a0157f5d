"""The pure parts of `kiln bench`: wrk's report, the ratio table."""

from pathlib import Path

from kiln.loadtests import wrk
from kiln.loadtests.bench import Row, add_ratios, format_table

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


def rows():
    return [Row("in-process onnxruntime b1", 0, 1000.0, 0.1, 0.2, 10),
            Row("in-process onnxruntime b8", 0, 4000.0, 0.2, 0.4, 10),
            Row("kiln", 1, 100.0, 8.0, 20.0, 10), Row("kiln", 16, 400.0, 30.0, 60.0, 10),
            Row("stock", 1, 200.0, 4.0, 10.0, 10), Row("stock", 16, 200.0, 60.0, 120.0, 10),
            Row("noop", 1, 400.0, 2.0, 5.0, 10), Row("noop", 16, 800.0, 20.0, 40.0, 10)]


def test_ratios_against_ceiling_noop_and_stock_at_the_same_concurrency():
    table = {(r.name, r.clients): r for r in add_ratios(rows())}
    kiln16, kiln1 = table["kiln", 16], table["kiln", 1]
    assert (kiln16.x_ceiling, kiln16.x_noop, kiln16.x_stock, kiln16.p99_x_stock) == (
        0.1, 0.5, 2.0, 0.5)
    assert (kiln1.x_ceiling, kiln1.x_noop, kiln1.x_stock, kiln1.p99_x_stock) == (
        0.025, 0.25, 0.5, 2.0)


def test_in_process_rows_compare_with_the_servers_at_the_highest_concurrency():
    table = {(r.name, r.clients): r for r in add_ratios(rows())}
    b8 = table["in-process onnxruntime b8", 0]
    assert (b8.x_ceiling, b8.x_noop, b8.x_stock) == (1.0, 5.0, 20.0)


def test_missing_base_rows_give_no_ratio():
    only = add_ratios([Row("kiln", 16, 400.0, 30.0, 60.0, 10)])
    assert (only[0].x_ceiling, only[0].x_noop, only[0].x_stock) == (None, None, None)


def test_table_has_one_line_per_row():
    lines = format_table(add_ratios(rows())).splitlines()
    assert len(lines) == 9
    assert lines[3].split()[:5] == ["kiln", "1", "100", "0.025", "0.25"]
