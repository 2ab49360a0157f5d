"""Shadow scoring (issue 18): `kiln shadow lenet 2.0 --fraction F` has 2.0 also score a sample
of the requests routed to 1.0, on a real TorchServe behind Kiln's front proxy. lenet 1.0 is the
workspace's trained weights, 2.0 a one-batch run with another seed: they disagree on some of
the noisy digits sent here, so the agreement measured can be checked against the offline one."""

import io
import json
import math
import os
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from kiln.cli.main import main
from kiln.deploy import lifecycle, versions
from kiln.deploy.ports import INTERNAL_PORTS_FILE, Ports
from kiln.deploy.routing import SHADOWED_HEADER
from kiln.deploy.server import Server, ServerSettings
from kiln.handlers.handler import VERSION_HEADER
from kiln.training import train

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
NAME = "lenet"
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "kiln.json"
DIGITS = [np.asarray(Image.open(FIXTURES / "digits" / f"{d}.png").convert("L"), dtype=np.float64)
          for d in range(10)]


@pytest.fixture(scope="module")
def served(archives, tmp_path_factory):
    """lenet 1.0 (trained) served, 2.0 (a one-batch dry run) deployed beside it."""
    ws = tmp_path_factory.mktemp("workspace")
    (ws / "model_store").mkdir()
    shutil.copy(archives[NAME], ws / "model_store" / f"{NAME}.mar")
    train.train(train.config_for([NAME, "--out", str(ws / "artifacts" / NAME), "--log-dir",
                                  str(ws / "runs"), "--dry-run", "--seed", "1"]))
    flags = server_flags(ws, Ports.free())
    assert kiln(ws, "serve", NAME, "--enable-model-api", "--no-build", *flags) == 0
    try:
        assert kiln(ws, "deploy", NAME, "--version", "2.0", *flags) == 0
        yield ws, Server(ServerSettings(
            ws / "run", ws / "model_store", [NAME], Ports.saved(ws / "run"),
            internal_ports=Ports.saved(ws / "run", INTERNAL_PORTS_FILE)))
    finally:
        kiln(ws, "stop", "--run-dir", str(ws / "run"))


def server_flags(ws, ports: Ports) -> list[str]:
    """kiln serve's (and deploy's) flags for the workspace's server on `ports`."""
    return ["--run-dir", str(ws / "run"), "--store", str(ws / "model_store"),
            *[arg for api, port in vars(ports).items()
              for arg in (f"--{api.replace('_', '-')}-port", str(port))]]


def kiln(ws, *argv) -> int:
    return main(["--workspace", str(ws), *argv])


def shadow(ws, fraction) -> None:
    assert kiln(ws, "shadow", NAME, "2.0", "--fraction", str(fraction),
                "--run-dir", str(ws / "run")) == 0


def noisy_digits(n: int, seed: int) -> list[np.ndarray]:
    """n 28x28 digits with noise: enough of them that the two versions disagree on some."""
    rng = np.random.default_rng(seed)
    return [np.clip(DIGITS[i % 10] + rng.normal(0, 90, (28, 28)), 0, 255).round()
            for i in range(n)]


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def auth(srv: Server) -> dict[str, str]:
    return {"Authorization": f"Bearer {srv.keys()['inference']}"}


def rest(srv: Server, pixels: np.ndarray, version: str | None = None) -> requests.Response:
    path = f"/predictions/{NAME}" + (f"/{version}" if version else "")
    r = requests.post(f"{srv.url('inference')}{path}", data=png(pixels), timeout=30,
                      headers={**auth(srv), "Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    return r


def oip(srv: Server, pixels: np.ndarray, version: str | None = None,
        outputs: list[str] | None = None) -> requests.Response:
    """An OIP infer; `outputs`: the output tensors asked for (all when None)."""
    body = {"inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "FP32",
                        "data": [pixels.tolist()]}]}
    if outputs is not None:
        body["outputs"] = [{"name": name} for name in outputs]
    path = f"/v2/models/{NAME}" + (f"/versions/{version}" if version else "") + "/infer"
    r = requests.post(f"{srv.url('oip')}{path}", json=body, headers=auth(srv), timeout=30)
    assert r.status_code == 200, r.text
    return r


def shadow_figures(srv: Server, candidate: str = "2.0") -> dict[str, float]:
    """kiln_shadow_* of lenet's `candidate` on the metrics port: {series: value}."""
    page = requests.get(f"{srv.url('metrics')}/metrics", timeout=10).text
    out = {}
    pattern = re.compile(r'^(kiln_shadow_\w+)\{([^}]*)\} (\S+)$')
    for line in page.splitlines():
        match = pattern.match(line)
        if match and f'model_name="{NAME}"' in match[2] and f'version="{candidate}"' in match[2]:
            outcome = re.search(r'(outcome|role)="(\w+)"', match[2])
            key = match[1] + (f":{outcome[2]}" if outcome else "")
            out[key] = float(match[3])
    return out


def sampled(figures: dict[str, float]) -> float:
    return sum(v for k, v in figures.items() if k.startswith("kiln_shadow_requests_total:"))


def settled(srv: Server, candidate: str = "2.0", count: float | None = None,
            timeout: float = 60) -> dict:
    """The figures once `count` requests were sampled in all and two reads agree (a page is
    collected family by family: one read may hold a pair's outcome but not yet its values),
    or, without a count, once two reads a second apart agree (nothing still being scored)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        now = shadow_figures(srv, candidate)
        if now == last and (count is None or sampled(now) == count):
            return now
        last = now
        time.sleep(1 if count is None else 0.1)
    raise AssertionError(f"the shadow figures never settled: {last}")


def in_force(srv: Server, candidate: str = "2.0") -> dict:
    """Sends requests until one is sampled for `candidate` (the plugin reads the state file
    every 100 ms), then the figures once that one is scored."""
    start = sampled(shadow_figures(srv, candidate))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rest(srv, DIGITS[0])
        if sampled(shadow_figures(srv, candidate)) > start:
            return settled(srv, candidate)
    raise AssertionError(f"no request was sampled for {candidate} in 30 s")


def delta(after: dict, before: dict, key: str) -> float:
    return after.get(key, 0) - before.get(key, 0)


def label(r: requests.Response) -> str:
    body = r.json()
    return body["label"] if "label" in body else body["outputs"][1]["data"][0]


def offline_agreement(srv: Server, inputs: list[np.ndarray], send) -> tuple[int, int]:
    """(agreeing, rows) of 1.0 and 2.0 asked one by one, pinned, on the same inputs, through
    the same protocol (a PNG's decoded pixels are not quite the FP32 values OIP is sent)."""
    agreed = sum(label(send(srv, x, "1.0")) == label(send(srv, x, "2.0")) for x in inputs)
    return agreed, len(inputs)


@pytest.mark.parametrize("protocol", ["rest", "oip"])
def test_a_full_shadow_reports_the_agreement_computed_offline(served, protocol):
    ws, srv = served
    shadow(ws, 1)
    inputs = noisy_digits(60, seed=7)
    try:
        before = in_force(srv)
        send = rest if protocol == "rest" else oip
        answered = [send(srv, x).headers[VERSION_HEADER] for x in inputs]
        after = settled(srv, count=sampled(before) + len(inputs))
    finally:
        shadow(ws, 0)
    assert answered == ["1.0"] * len(inputs)  # no shadow answer reached a client
    agreed, rows = offline_agreement(srv, inputs, send)
    assert 0 < agreed < rows  # the versions do disagree on these inputs
    assert delta(after, before, "kiln_shadow_requests_total:scored") == len(inputs)
    assert delta(after, before, "kiln_shadow_rows_total") == rows
    assert delta(after, before, "kiln_shadow_agreed_rows_total") == agreed
    assert delta(after, before, "kiln_shadow_latency_seconds_count:candidate") == len(inputs)
    assert delta(after, before, "kiln_shadow_latency_seconds_count:primary") == len(inputs)


def scores_output(srv: Server) -> str:
    """lenet's probability tensor: asked for alone, answers are compared by value."""
    r = requests.get(f"{srv.url('oip')}/v2/models/{NAME}", headers=auth(srv), timeout=10)
    return r.json()["outputs"][0]["name"]


def test_a_shadow_compared_by_value_reports_the_differences_computed_offline(served):
    ws, srv = served
    wanted = [scores_output(srv)]
    inputs = noisy_digits(20, seed=5)
    shadow(ws, 1)
    try:
        before = in_force(srv)
        answered = [oip(srv, x, outputs=wanted).headers[VERSION_HEADER] for x in inputs]
        after = settled(srv, count=sampled(before) + len(inputs))
    finally:
        shadow(ws, 0)
    assert answered == ["1.0"] * len(inputs)
    primary, candidate = (np.array([oip(srv, x, v, wanted).json()["outputs"][0]["data"]
                                    for x in inputs]) for v in ("1.0", "2.0"))
    diffs = np.abs(primary - candidate)
    assert delta(after, before, "kiln_shadow_requests_total:scored") == len(inputs)
    assert delta(after, before, "kiln_shadow_rows_total") == 0
    assert delta(after, before, "kiln_shadow_values_total") == diffs.size
    assert delta(after, before, "kiln_shadow_abs_diff_sum_total") == pytest.approx(
        diffs.sum(), rel=1e-9)
    assert after["kiln_shadow_abs_diff_max"] == pytest.approx(diffs.max(), rel=1e-9)


@pytest.mark.parametrize("fraction, marked", [(1, "2.0"), (0, None)])
def test_a_sampled_answer_says_so_and_no_other_does(served, fraction, marked):
    """X-Kiln-Shadowed names the versions an answer was sampled for, on REST and OIP alike."""
    ws, srv = served
    shadow(ws, fraction)
    try:
        lifecycle.Target.of(ws / "run", ws / "model_store").sync_routes()
        got = [rest(srv, DIGITS[3]), oip(srv, DIGITS[3])]
    finally:
        shadow(ws, 0)
    assert [(r.headers[VERSION_HEADER], r.headers.get(SHADOWED_HEADER)) for r in got] == [
        ("1.0", marked), ("1.0", marked)]


def test_a_fifth_of_the_requests_are_shadowed(served):
    ws, srv = served
    shadow(ws, 0.2)
    n = 300
    try:
        before = in_force(srv)
        answered = [rest(srv, x).headers[VERSION_HEADER] for x in noisy_digits(n, seed=3)]
        after = settled(srv)
    finally:
        shadow(ws, 0)
    assert answered == ["1.0"] * n
    scored = delta(after, before, "kiln_shadow_requests_total:scored")
    # Binomial(300, 0.2): mean 60, sd 6.9; 5 sd either side fails once in 1.7 million runs.
    assert 25 <= scored <= 95, scored
    assert sampled(after) - sampled(before) == scored  # none failed, none dropped


def test_a_failing_shadow_changes_no_answer(served):
    """A shadow whose every request fails (a version the state file names but TorchServe does
    not serve: 404 for each) is counted as the candidate's errors; clients see nothing of it."""
    ws, srv = served
    inputs = noisy_digits(20, seed=11)
    expected = [rest(srv, x).json() for x in inputs] + [oip(srv, x).json() for x in inputs]
    with versions.transaction(ws / "run") as state:
        state[NAME]["shadows"]["9.9"] = 1.0
    try:
        before = in_force(srv, "9.9")
        got = [rest(srv, x) for x in inputs]
        got += [oip(srv, x) for x in inputs]
        after = settled(srv, "9.9", count=sampled(before) + 40)
    finally:
        with versions.transaction(ws / "run") as state:
            del state[NAME]["shadows"]["9.9"]
    assert [r.json() for r in got] == expected
    assert [r.headers[VERSION_HEADER] for r in got] == ["1.0"] * 40
    assert delta(after, before, "kiln_shadow_requests_total:candidate_error") == 40
    assert sampled(after) - sampled(before) == 40


def test_kiln_models_prints_each_shadows_figures(served, capsys):
    ws, srv = served
    figures = shadow_figures(srv)
    assert figures["kiln_shadow_rows_total"] > 0  # left by the tests above
    assert kiln(ws, "models", "--run-dir", str(ws / "run"), "--store",
                str(ws / "model_store")) == 0
    out = capsys.readouterr().out
    agreement = 100 * figures["kiln_shadow_agreed_rows_total"] / figures["kiln_shadow_rows_total"]
    line = next(line for line in out.splitlines() if line.startswith(f"{NAME} 2.0: "))
    assert f"scored {figures['kiln_shadow_requests_total:scored']:g}" in line
    assert f"agreement {agreement:.1f}% of {figures['kiln_shadow_rows_total']:g} rows" in line
    assert "mean latency primary " in line and " ms, candidate " in line


@pytest.fixture(scope="module")
def server(served):
    """The served workspace's server: what conftest's `prometheus` scrapes."""
    return served[1]


def shadow_row() -> list[str]:
    document = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [target["expr"] for panel in document["panels"]
            if panel["title"].startswith("Shadow: ") for target in panel["targets"]]


def test_the_dashboard_s_shadow_row_shows_every_figure(served, prometheus):
    """Each expression of the row returns finite data from a real Prometheus, after two rounds
    of shadowed traffic (by label and by value, one failing request) a scrape apart."""
    ws, srv = served
    inputs, wanted = noisy_digits(4, seed=13), [scores_output(srv)]
    shadow(ws, 1)
    try:
        in_force(srv)
        for _ in range(2):
            for x in inputs:
                rest(srv, x)
                oip(srv, x, outputs=wanted)
            settled(srv)
            scraped = prometheus.scrape_after(time.time())
    finally:
        shadow(ws, 0)
    for expr in shadow_row():
        result = prometheus.query(expr.replace("$model", NAME)
                                  .replace("$__rate_interval", "15s"), scraped)
        # 2.0's: the failing shadow's series (9.9, above) have stopped moving (NaN rates).
        values = [float(r["value"][1]) for r in result if r["metric"]["version"] == "2.0"]
        assert values and all(math.isfinite(v) for v in values), (expr, result)


@pytest.fixture
def stuck_version(served):
    """lenet 3.0 (2.0's weights again) deployed, then its workers stopped (SIGSTOP): every
    request to 3.0 waits, until they are continued after the test."""
    ws, srv = served
    assert kiln(ws, "deploy", NAME, "--version", "3.0",
                *server_flags(ws, Ports.saved(ws / "run"))) == 0
    target = lifecycle.Target.of(ws / "run", ws / "model_store")
    pids = [int(w["pid"]) for w in target.management.served(NAME)["3.0"]["workers"]]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield "3.0"
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def timed_rest(srv: Server, x: np.ndarray) -> tuple[dict, str, float]:
    start = time.perf_counter()
    r = rest(srv, x)
    return r.json(), r.headers[VERSION_HEADER], time.perf_counter() - start


def test_a_stuck_shadow_holds_a_bounded_few_requests_and_changes_no_answer(served,
                                                                            stuck_version):
    """A shadow whose worker never answers: Shadow.MAX_IN_FLIGHT (8) pairs wait on it, every
    other sampled request is dropped, and each client gets the same answer as without it."""
    ws, srv = served
    inputs = noisy_digits(40, seed=17)
    alone = [timed_rest(srv, x) for x in inputs]
    before = shadow_figures(srv, stuck_version)
    assert kiln(ws, "shadow", NAME, stuck_version, "--fraction", "1",
                "--run-dir", str(ws / "run")) == 0
    try:
        # In force once the first sample is dropped: 8 held, the 9th dropped.
        deadline = time.monotonic() + 30
        while delta(shadow_figures(srv, stuck_version), before,
                    "kiln_shadow_requests_total:dropped") == 0:
            assert time.monotonic() < deadline, "no sample was dropped in 30 s"
            rest(srv, DIGITS[0])
        held = shadow_figures(srv, stuck_version)
        shadowed = [timed_rest(srv, x) for x in inputs]
        after = shadow_figures(srv, stuck_version)
    finally:
        assert kiln(ws, "shadow", NAME, stuck_version, "--fraction", "0",
                    "--run-dir", str(ws / "run")) == 0
    assert [(a, v) for a, v, _ in shadowed] == [(a, v) for a, v, _ in alone]
    assert delta(after, held, "kiln_shadow_requests_total:dropped") == len(inputs)
    assert sampled(after) - sampled(held) == len(inputs)  # none scored, none failed
    ms = sorted(1000 * t for _, _, t in alone), sorted(1000 * t for _, _, t in shadowed)
    print(f"40 sequential REST requests, p50 / max ms: alone {ms[0][20]:.1f} / {ms[0][-1]:.1f}, "
          f"with a stuck shadow {ms[1][20]:.1f} / {ms[1][-1]:.1f}")
