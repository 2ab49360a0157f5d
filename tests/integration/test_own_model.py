"""A user's own model, served by the README's steps exactly as written, from a folder
outside the repo; then the same model through the Open Inference Protocol, a batch job and a
short load test. Nothing of the repo is edited: the model is its module, its weights, its
example and the declaration `kiln init` writes."""

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from kiln.client import read_token
from kiln.deploy.server import Ports

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STEPS = re.compile(r"<!-- own-model-steps[^>]*-->\s*```bash\n(.*?)```", re.S)


def readme_steps() -> list[str]:
    block = STEPS.search((REPO / "README.md").read_text()).group(1)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def run(line: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("KILN_MODELS_DIR", None)
    done = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
    return done


def test_readme_steps_serve_a_users_own_model(tmp_path):
    busy = [p for p in vars(Ports()).values() if port_in_use(p)]
    if busy:
        pytest.skip(f"the README's steps use Kiln's default ports; {busy} in use here")
    folder = tmp_path / "iris"
    shutil.copytree(REPO / "examples" / "iris", folder)
    steps = readme_steps()
    assert steps[-1] == "kiln stop --run-dir run"
    repo_before = git_status()
    try:
        outputs = [run(line, folder) for line in steps[:-1]]
        assert (folder / "iris.toml").exists() and (folder / "iris.pt").exists()
        assert outputs[-1].stdout.startswith("iris: setosa")
        served_elsewhere_too(folder)
    finally:
        run(steps[-1], folder)
    assert not (folder / "run" / "torchserve.pid").exists()
    assert git_status() == repo_before  # only git-ignored build outputs were written


def git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout


def served_elsewhere_too(folder: Path) -> None:
    """The same model through OIP, a batch job through the server, and a load test."""
    ports = json.loads((folder / "run" / "ports.json").read_text())
    token = read_token(folder / "run")  # the front proxy's key, from run/keys
    auth = {"Authorization": f"Bearer {token}"}
    oip = f"http://127.0.0.1:{ports['oip']}/v2/models/iris"
    meta = requests.get(oip, headers=auth, timeout=10).json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    infer = {"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32",
                         "data": [5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3]}]}
    answer = requests.post(f"{oip}/infer", json=infer, headers=auth, timeout=10)
    assert answer.status_code == 200, answer.text
    labels = next(o for o in answer.json()["outputs"] if o["name"] == "label")
    assert labels["data"] == ["setosa", "virginica"]

    rows = folder / "rows.csv"
    with rows.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sepal_length", "sepal_width", "petal_length", "petal_width"])
        writer.writerows([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]])
    run("kiln batch iris rows.csv predictions.csv --models-dir . --via server --run-dir run "
        "--no-progress", folder)
    with (folder / "predictions.csv").open() as f:
        scored = {row["id"]: row["label"] for row in csv.DictReader(f)}
    assert scored == {"0": "setosa", "1": "virginica", "2": "versicolor"}  # ids: row numbers
    # The declared name from this folder, run here by each export form, answers the same.
    for backend in ("onnx", "torchscript"):
        run(f"kiln batch iris rows.csv {backend}.csv --models-dir . --backend {backend} "
            "--no-progress", folder)
        with (folder / f"{backend}.csv").open() as f:
            assert {row["id"]: row["label"] for row in csv.DictReader(f)} == scored, backend

    done = run("kiln loadtest iris --models-dir . --run-dir run --users 2 --spawn-rate 2 "
               "--duration 4 --no-oip --out loadtest --max-fail-ratio 0", folder)
    assert (folder / "loadtest" / "report.html").exists(), done.stdout
