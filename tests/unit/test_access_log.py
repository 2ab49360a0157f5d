"""Kiln's access log stays bounded: rotated past its size, nginx told to reopen it."""

import json
import signal
import subprocess

import pytest

from kiln.deploy import access_log


def test_rotation_shifts_the_files_and_drops_the_oldest(tmp_path):
    log = tmp_path / "kiln_access.jsonl"
    for text in ("oldest", "older", "old"):
        log.write_text(text)
        access_log.rotate(log, files=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "kiln_access.jsonl", "kiln_access.jsonl.1", "kiln_access.jsonl.2"]
    assert (log.read_text(), access_log.rotated(log, 1).read_text(),
            access_log.rotated(log, 2).read_text()) == ("", "old", "older")
    assert log.stat().st_mode & 0o777 == 0o600


def test_a_log_over_its_size_is_rotated_and_nginx_told(tmp_path):
    log = tmp_path / "kiln_access.jsonl"
    log.write_text("x" * 11)
    stand_in = subprocess.Popen(["sleep", "60"])  # SIGUSR1 ends it, as it tells nginx to reopen
    try:
        rotation = access_log.Rotation(log, max_bytes=10)
        assert rotation.check(stand_in.pid)
        assert stand_in.wait(timeout=10) == -signal.SIGUSR1
        assert (log.read_text(), access_log.rotated(log, 1).read_text()) == ("", "x" * 11)
    finally:
        stand_in.kill()
        stand_in.wait()


def test_a_log_within_its_size_or_absent_is_left_alone(tmp_path):
    log = tmp_path / "kiln_access.jsonl"
    assert not access_log.Rotation(log, max_bytes=10).check(0)  # pid 0: never signalled
    log.write_text("x" * 10)
    assert not access_log.Rotation(log, max_bytes=10).check(0)
    assert [p.name for p in tmp_path.iterdir()] == ["kiln_access.jsonl"]


def test_bad_bounds_are_refused(tmp_path):
    with pytest.raises(ValueError, match="max_bytes >= 1 and files >= 1, got 0 and 3"):
        access_log.Rotation(tmp_path / "log", max_bytes=0)


@pytest.mark.parametrize("environ, access_log, otlp", [
    ({}, False, None),
    ({"KILN_ACCESS_LOG": "1"}, True, None),
    ({"KILN_ACCESS_LOG": "no"}, False, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False, "http://collector:4318"),
])
def test_a_container_takes_them_from_its_environment(environ, access_log, otlp):
    from kiln.deploy import container

    settings = container.parse_args([], environ)
    assert (settings.access_log, settings.otlp_endpoint) == (access_log, otlp)
    server = container.server_settings(settings)
    written = container.front_settings(settings, server, settings.run_dir)
    logs = settings.run_dir.resolve() / "torchserve" / "logs"
    assert written.access_log == (logs / "kiln_access.jsonl" if access_log else None)
    assert written.spans_log == (logs / "kiln_spans.jsonl" if otlp else None)


@pytest.mark.parametrize("fraction, lines", [
    (1.0, "* 01;"),
    (0.0, "* 00;"),
    (0.015, "1.5% 01;\n        * 00;"),
])
def test_fresh_traces_are_sampled_for_a_share_of_requests(fraction, lines):
    from kiln.deploy import front

    assert front.trace_sample(fraction) == lines


def test_a_sample_share_outside_0_to_1_is_refused():
    from kiln.deploy import front

    with pytest.raises(ValueError, match="the trace sample must be from 0 to 1, got 1.5"):
        front.trace_sample(1.5)


LINE = {"trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "span_id": "00f067aa0ba902b7",
        "parent_span_id": "", "trace_flags": "01", "end": 1700000000.5, "latency_s": 0.25,
        "method": "POST", "route": "/predictions/lenet", "status": 200, "request_id": "r1",
        "model": "lenet", "version": "1.0"}


def test_an_access_log_line_is_the_proxys_span():
    from kiln.deploy import proxy_spans

    span = proxy_spans.span_of(LINE)
    assert {k: span[k] for k in ("name", "trace_id", "span_id", "parent_id", "start_ns",
                                 "end_ns")} == {
        "name": "proxy", "trace_id": 0x4bf92f3577b34da6a3ce929d0e0e4736,
        "span_id": 0x00f067aa0ba902b7, "parent_id": None,
        "start_ns": 1700000000250000000, "end_ns": 1700000000500000000}


@pytest.mark.parametrize("change", [{"trace_flags": "00"}, {"trace_id": ""}, {"end": "x"}])
def test_an_unsampled_or_unreadable_line_makes_no_span(change):
    from kiln.deploy import proxy_spans

    assert proxy_spans.span_of({**LINE, **change}) is None


def test_the_follower_reads_whole_lines_across_a_rotation(tmp_path):
    from kiln.deploy import proxy_spans

    log = tmp_path / "kiln_access.jsonl"
    log.write_bytes(b"before\n")
    follower = proxy_spans.Follower(log)
    assert follower.read() == b""  # it starts at the end
    with log.open("ab") as f:
        f.write(b"one\ntw")
    assert follower.read() == b"one\n"
    with log.open("ab") as f:
        f.write(b"o\n")
    access_log.rotate(log, files=1)
    log.write_bytes(b"three\n")
    assert follower.read() == b"two\n"
    assert follower.read() == b""  # the old file is done: on to the new one
    assert follower.read() == b"three\n"


def test_only_the_sampled_lines_are_split_out():
    from kiln.deploy import proxy_spans

    def line(flags, request_id="r"):
        return json.dumps({**LINE, "trace_flags": flags, "request_id": request_id},
                          separators=(",", ":")).encode()

    # A client's text holding the flags' form is escaped by nginx (escape=json), so it does
    # not match; a line matched twice is taken once; the last line may lack its newline.
    lines = [line("00"), line("01"), line("00", '"trace_flags":"01"'), line("02"),
             line("03") + b'"trace_flags":"01"', line("ff")]
    assert proxy_spans.sampled_lines(b"\n".join(lines)) == [lines[1], lines[4], lines[5]]
    assert proxy_spans.sampled_lines(b"") == []


def test_nginx_writes_the_log_in_buffers_flushed_every_second(tmp_path):
    assert access_log.nginx_directive(tmp_path / "kiln_access.jsonl") == (
        f"access_log {tmp_path}/kiln_access.jsonl kiln_json buffer=64k flush=1s;")


def front_settings(folder, logs, **extra):
    """A front's settings writing a.jsonl ("access" in logs) and s.jsonl ("spans")."""
    from kiln.deploy import front

    return front.FrontSettings(
        nginx_dir=folder, keys_file=folder / "keys", listen="127.0.0.1", public={},
        upstream={}, max_body=1024, ready_path="/ready", live_path="/live",
        draining_flag=folder / "draining", route_state=folder / "versions.json",
        access_log=folder / "a.jsonl" if "access" in logs else None,
        spans_log=folder / "s.jsonl" if "spans" in logs else None, **extra)


@pytest.mark.parametrize("logs, lines", [
    ((), ["access_log off;"]),
    (("access",), ["access_log {d}/a.jsonl kiln_json buffer=64k flush=1s;"]),
    (("spans",), ["access_log {d}/s.jsonl kiln_json buffer=64k flush=1s if=$kiln_trace_sampled;"]),
    (("access", "spans"), ["access_log {d}/a.jsonl kiln_json buffer=64k flush=1s;",
                           "access_log {d}/s.jsonl kiln_json buffer=64k flush=1s "
                           "if=$kiln_trace_sampled;"]),
])
def test_the_spans_log_holds_the_sampled_traces_lines_only(tmp_path, logs, lines):
    from kiln.deploy import front

    settings = front_settings(tmp_path, logs)
    assert front.access_logs(settings).split("\n    ") == [
        line.format(d=tmp_path) for line in lines]
    assert front.written_logs(settings) == [tmp_path / f"{name[0]}.jsonl" for name in logs]


@pytest.mark.parametrize("logs", [(), ("access",), ("spans",), ("access", "spans")])
def test_the_supervisor_is_told_to_rotate_every_log_nginx_writes(tmp_path, logs):
    from kiln.deploy import front, supervise

    settings = front_settings(tmp_path, logs, access_log_max_bytes=99)
    command = front.supervisor_command(settings)
    assert command[1:3] == ["-m", "kiln.deploy.supervise"]
    rotations = supervise.rotations_of(supervise.parser().parse_args(command[3:]))
    assert [(r.path, r.max_bytes) for r in rotations] == [
        (tmp_path / f"{name[0]}.jsonl", 99) for name in logs]
