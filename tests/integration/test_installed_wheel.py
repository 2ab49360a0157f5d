"""Kiln as a user installs it: the wheel built from this repository, pip-installed (not
editable) with the runtime extras into a fresh venv outside the repository, then, from a
folder holding only the user's own files and with that venv's `kiln`, the README's
own-model steps on free ports, a batch job, a short load test and a key rotation.
Everything the commands write lands in that folder (the workspace); nothing lands next to
the installed code."""

import csv
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import requests

from kiln.deploy.server import Ports
from kiln.keys import KEYS_FILE, read_keys

# Building, installing (torch alone is 700 MB) and serving take 2.5 to 6 minutes on 2 cores:
# a run of its own (make test-installed), not part of make test.
pytestmark = pytest.mark.installed

REPO = Path(__file__).resolve().parents[2]
STEPS = re.compile(r"<!-- own-model-steps[^>]*-->\s*```bash\n(.*?)```", re.S)
SERVE = "kiln serve iris --models-dir . --run-dir run"
# What a user who load-tests installs: the runtime (cpu) and locust (loadtest), not the bench.
EXTRAS = "cpu,loadtest"


def readme_steps() -> list[str]:
    block = STEPS.search((REPO / "README.md").read_text()).group(1)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def check(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, **kwargs)
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv outside the repository with the built wheel installed in it."""
    tmp = tmp_path_factory.mktemp("installed")
    check([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp / "dist"),
           str(REPO)])
    (wheel,) = (tmp / "dist").glob("kiln-*.whl")
    check([sys.executable, "-m", "venv", str(tmp / "venv")])
    # pip's own configuration finds torch's local CPU wheel and the package cache.
    check([str(tmp / "venv" / "bin" / "python"), "-m", "pip", "install", "--quiet",
           f"{wheel}[{EXTRAS}]"])
    return tmp / "venv"


def site_kiln(venv: Path) -> Path:
    purelib = sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)})
    return Path(purelib) / "kiln"


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def user_env(venv: Path, cache: Path) -> dict[str, str]:
    """The user's shell: the venv's bin first, nothing of this repository's environment, and a
    cache of its own (the OIP plugin is built there from the installed sources)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("KILN_") and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}",
            "XDG_CACHE_HOME": str(cache)}


def test_an_installed_kiln_serves_a_users_model_from_its_own_folder(venv, tmp_path):
    site = site_kiln(venv)
    assert (site / "deploy" / "oip_plugin" / "build.sh").is_file()
    installed = listing(site)
    home = tmp_path / "iris"
    home.mkdir()
    for name in ("model.py", "train.py", "example.json"):  # the user's own files
        shutil.copy(REPO / "examples" / "iris" / name, home)
    env = user_env(venv, tmp_path / "cache")

    def kiln(line: str) -> str:
        done = check(["bash", "-c", line], cwd=home, env=env)
        return done.stdout

    assert kiln("command -v kiln").strip() == str(venv / "bin" / "kiln")
    steps = readme_steps()
    assert SERVE in steps and steps[-1] == "kiln stop --run-dir run"
    ports = Ports.free()
    flags = " ".join(f"--{api.replace('_', '-')}-port {port}" for api, port in vars(ports).items())
    try:
        outputs = [kiln(f"{line} {flags}" if line == SERVE else line) for line in steps[:-1]]
        assert outputs[-1].startswith("iris: setosa")
        served(kiln, home, ports)
    finally:
        # Checked after, so that a failure above is the one reported.
        stopped = subprocess.run(["bash", "-c", steps[-1]], cwd=home, env=env,
                                 capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert not (home / "run" / "torchserve.pid").exists()
    assert listing(site) == installed
    written(home)


def served(kiln, home: Path, ports: Ports) -> None:
    """A batch job through the server and locally, a short load test, a key rotation."""
    with (home / "rows.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sepal_length", "sepal_width", "petal_length", "petal_width"])
        writer.writerows([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]])
    expected = {"0": "setosa", "1": "virginica", "2": "versicolor"}
    for via in ("server", "local"):
        kiln(f"kiln batch iris rows.csv {via}.csv --models-dir . --via {via} --run-dir run "
             "--no-progress")
        with (home / f"{via}.csv").open() as f:
            assert {row["id"]: row["label"] for row in csv.DictReader(f)} == expected, via
    kiln("kiln loadtest iris --models-dir . --run-dir run --users 2 --spawn-rate 2 "
         "--duration 4 --no-oip --max-fail-ratio 0")

    url = f"http://127.0.0.1:{ports.inference}/predictions/iris"
    body = (home / "example.json").read_bytes()

    def status(key: str) -> int:
        return requests.post(url, data=body, timeout=30, headers={
            "Authorization": f"Bearer {key}", "Content-Type": "application/json"}).status_code

    old = kiln("kiln keys show --run-dir run").strip()
    assert status(old) == 200
    kiln("kiln keys rotate --run-dir run --overlap 0")
    new = kiln("kiln keys show --run-dir run").strip()
    assert new != old
    # An overlap ends on a whole second (what nginx compares): the old key's end, as written.
    (end,) = [k.expires for k in read_keys(home / "run" / KEYS_FILE) if k.value == old]
    time.sleep(max(0.0, end - time.time()))
    assert (status(old), status(new)) == (401, 200)
    assert kiln("kiln predict iris example.json --expect setosa --run-dir run").startswith(
        "iris: setosa")


def written(home: Path) -> None:
    """The exports, the archive, the run folder and the load-test report, all in the
    workspace the commands ran in."""
    assert {p.name for p in (home / "artifacts" / "iris").iterdir()} >= {
        "model.onnx", "model.ts", "signature.json"}
    assert (home / "model_store" / "iris.mar").is_file()
    assert (home / "run" / "ports.json").is_file()
    assert len(list(home.rglob("report.html"))) == 1
