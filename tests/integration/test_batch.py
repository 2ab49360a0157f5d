"""kiln batch on the real exports: --via server answers exactly as --via local (bad rows
included), a job killed with SIGKILL resumes without losing or repeating a row, and Ray
agrees with local."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kiln.batch import job
from kiln.batch.store import parts_dir
from kiln.batch.writers import read_output

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
CORRUPT = "PNG image could not be decoded (truncated or corrupt)"


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    (folder / "more").mkdir()
    for png in sorted((FIXTURES / "digits").glob("*.png")):
        shutil.copy(png, folder / png.name)
        shutil.copy(png, folder / "more" / png.name)
    (folder / "more" / "corrupt.png").write_bytes((FIXTURES / "digits" / "3.png").read_bytes()[:90])
    return folder


def _cancer_csv(path: Path, copies: int = 1, bad: bool = True) -> Path:
    rows = json.loads((FIXTURES / "breast_cancer" / "rows.json").read_text())
    lines = [[str(v) for v in r["features"]] for r in rows] * copies
    if bad:
        lines.insert(3, ["abc"] + lines[0][1:])  # unreadable: the reader's error
        lines.insert(6, ["nan"] + lines[0][1:])  # readable, rejected by the codec
    signature = json.loads((REPO / "artifacts" / "binary" / "signature.json").read_text())
    header = signature["inputs"][0]["names"]
    path.write_text("\n".join(",".join(x) for x in [header, *lines]) + "\n")
    return path


def _run(name, inp, out, **kw):
    settings = job.JobSettings(name=name, input=inp, output=out, progress=False,
                               artifacts=REPO / "artifacts" / name, **kw)
    return job.run(settings), read_output(out)


def test_server_answers_exactly_as_local(archives, server, image_dir, tmp_path):
    via_server = dict(via="server", url=server.url("inference"),
                      token=server.keys()["inference"], batch_size=8, concurrency=3)
    cases = [("lenet", image_dir, "images"), ("binary", _cancer_csv(tmp_path / "rows.csv"),
                                               "rows")]
    for name, inp, stem in cases:
        _, local = _run(name, inp, tmp_path / f"{stem}-local.csv", chunk_size=7)
        summary, remote = _run(name, inp, tmp_path / f"{stem}-server.jsonl", chunk_size=7,
                               **via_server)
        assert remote == local
        assert summary.failed == sum(r["error"] is not None for r in local)
    _, images = _run("lenet", image_dir, tmp_path / "check.csv")
    by_id = {r["id"]: r for r in images}
    assert by_id["more/corrupt.png"]["error"] == CORRUPT
    assert {i: r["label"] for i, r in by_id.items() if r["error"] is None} == {
        i: Path(i).stem for i in by_id if i != "more/corrupt.png"}
    _, rows = _run("binary", tmp_path / "rows.csv", tmp_path / "rows.csv.out.csv")
    assert [r["error"] for r in rows if r["error"]] == [
        "column 'mean radius' is not a number: 'abc'",
        "feature at [0, 0] is not a finite number: nan"]
    assert [r["id"] for r in rows] == [str(i) for i in range(10)]


def _manifest_chunks(output: Path) -> int:
    try:
        return len(( parts_dir(output) / "manifest.jsonl").read_text().splitlines()) - 1
    except OSError:
        return 0


def _kiln_batch(*args):
    cmd = [sys.executable, "-m", "kiln.cli", "batch", *map(str, args), "--no-progress"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def test_sigkill_then_resume_loses_and_repeats_nothing(archives, tmp_path):
    inp = _cancer_csv(tmp_path / "rows.csv", copies=125, bad=False)  # 1,000 rows
    out = tmp_path / "out.jsonl"
    proc = _kiln_batch("binary", inp, out, "--chunk-size", 100, "--chunk-delay", 0.3)
    deadline = time.monotonic() + 30
    while _manifest_chunks(out) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _manifest_chunks(out)
    assert 2 <= killed_at < 10 and not out.exists()
    resumed = _kiln_batch("binary", inp, out, "--chunk-size", 100, "--resume")
    stdout, stderr = resumed.communicate(timeout=60)
    assert resumed.returncode == 0, stderr.decode()
    assert stdout.decode().startswith("1000 rows scored, 0 failed, "
                                      f"{1000 - 100 * killed_at} this run")
    _, whole = _run("binary", inp, tmp_path / "whole.jsonl", chunk_size=100)
    after = read_output(out)
    assert len(after) == 1000 and len({r["id"] for r in after}) == 1000
    assert after == whole


def test_ray_answers_exactly_as_local(archives, image_dir, tmp_path):
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'kiln[ray]'")
    inp = _cancer_csv(tmp_path / "rows.csv")
    _, local = _run("binary", inp, tmp_path / "local.csv", chunk_size=4)
    _, on_ray = _run("binary", inp, tmp_path / "ray.csv", chunk_size=4, via="ray",
                     batch_size=3, concurrency=2)
    assert on_ray == local


def _ready_worker_pid(server, model: str, not_one_of=(), timeout: float = 60) -> int:
    """The pid of the model's worker once it is READY and none of `not_one_of`."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = requests.get(f"{server.url('management')}/models/{model}", timeout=10,
                         headers={"Authorization": f"Bearer {server.keys()['management']}"})
        r.raise_for_status()
        for worker in r.json()[0]["workers"]:
            if worker.get("status") == "READY" and int(worker["pid"]) not in not_one_of:
                return int(worker["pid"])
        time.sleep(0.05)
    raise AssertionError(f"no new READY worker of {model} within {timeout:g} s")


def _worker_pid(server, model: str) -> int:
    import requests

    r = requests.get(f"{server.url('management')}/models/{model}", timeout=10,
                     headers={"Authorization": f"Bearer {server.keys()['management']}"})
    r.raise_for_status()
    (worker,) = r.json()[0]["workers"]
    return int(worker["pid"])


def test_server_job_across_a_worker_sigkill_loses_and_repeats_nothing(server, tmp_path):
    """TorchServe answers what its dead worker held with 500 "Worker died." and restarts the
    worker: the job retries those requests, and every row comes out once, answered right."""
    inp = _cancer_csv(tmp_path / "rows.csv", copies=1000, bad=False)  # 8,000 rows
    out = tmp_path / "out.csv"
    # One row per request and eight in flight. A worker is idle between batches for part of
    # the time (more so since metrics cost it no log line), so it is killed three times over
    # the job: at least one kill lands on requests it holds.
    proc = _kiln_batch("binary", inp, out, "--via", "server", "--url", server.url("inference"),
                       "--token=" + server.keys()["inference"], "--chunk-size", 500,
                       "--batch-size", 1, "--concurrency", 8)
    killed = []
    for chunks in (2, 5, 8):
        deadline = time.monotonic() + 60
        while (_manifest_chunks(out) < chunks and proc.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.02)
        if proc.poll() is not None:
            break
        pid = _ready_worker_pid(server, "binary", not_one_of=killed)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr.decode()
    assert killed and _worker_pid(server, "binary") not in killed  # new workers answered
    assert stdout.decode().startswith("8000 rows scored, 0 failed")
    assert "Worker died." in stderr.decode()  # the kill did land on requests in flight
    _, whole = _run("binary", inp, tmp_path / "local.csv", chunk_size=500)
    after = read_output(out)
    assert len({r["id"] for r in after}) == 8000
    assert after == whole
