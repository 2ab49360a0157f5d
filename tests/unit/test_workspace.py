"""What a user's commands write goes under their workspace: the current folder, --workspace DIR
or KILN_WORKSPACE; never into Kiln's own folders. Run as a user runs it: the `kiln` command,
an own model declared with `kiln init`, exported and archived."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kiln import workspace
from kiln.workspace import Workspace

REPO = Path(__file__).resolve().parents[2]
KILN = Path(sys.executable).parent / "kiln"
EXPORTS = ["model.onnx", "model.ts", "signature.json"]
INIT = ["--name", "iris", "--input",
        "features names=sepal_length,sepal_width,petal_length,petal_width",
        "--output", "multiclass labels=setosa,versicolor,virginica"]


def kiln(*args: str, cwd: Path, env: dict | None = None) -> None:
    environ = {k: v for k, v in os.environ.items() if k != workspace.ENV}
    done = subprocess.run([str(KILN), *args], cwd=cwd, env={**environ, **(env or {})},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"kiln {' '.join(args)}\n{done.stdout}\n{done.stderr}"


def written(folder: Path) -> dict[str, int]:
    """{relative path: mtime in ns} of every file under `folder`."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns
            for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """The README's iris example, its weights saved and declared by `kiln init`, run from an
    empty folder that thereby is the workspace; the folder of model.py and iris.toml."""
    folder = tmp_path_factory.mktemp("own") / "model"
    shutil.copytree(REPO / "examples" / "iris", folder)
    spec = importlib.util.spec_from_file_location("iris_model", folder / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    torch.save(module.IrisNet().state_dict(), folder / "iris.pt")
    kiln("init", str(folder / "model.py"), str(folder / "iris.pt"), *INIT, cwd=folder)
    return folder


@pytest.fixture(scope="module")
def repo_outputs():
    """The repo's own exports and archives, as they are before these tests and after."""
    def now():
        return {name: written(REPO / name) for name in ("artifacts", "model_store")}

    before = now()
    yield
    assert now() == before


@pytest.mark.parametrize("how", ["cwd", "flag", "env"])
def test_exports_and_archives_go_under_the_workspace(how, model, repo_outputs, tmp_path):
    ws, elsewhere = tmp_path / "ws", tmp_path / "elsewhere"
    ws.mkdir()
    elsewhere.mkdir()
    export = ["export", "iris", "--models-dir", str(model)]
    archive = ["archive", "iris", "--models-dir", str(model)]
    cwd, env = elsewhere, None
    if how == "cwd":
        cwd = ws
    elif how == "flag":  # before the subcommand, and after it
        export, archive = ["--workspace", str(ws), *export], [*archive, f"--workspace={ws}"]
    else:
        env = {workspace.ENV: str(ws)}
    kiln(*export, cwd=cwd, env=env)
    kiln(*archive, cwd=cwd, env=env)
    assert sorted(written(ws)) == [*(f"artifacts/iris/{f}" for f in EXPORTS),
                                   "model_store/iris.mar"]
    assert written(elsewhere) == {}


def test_the_workspace_is_the_current_folder_unless_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(workspace.ENV, raising=False)
    here = Workspace.current()
    assert (here.artifacts, here.model_store, here.run, here.tune) == (
        tmp_path / "artifacts", tmp_path / "model_store", tmp_path / "run", tmp_path / "tune")
    monkeypatch.setenv(workspace.ENV, str(tmp_path / "ws"))
    assert Workspace.current().exports("iris") == tmp_path / "ws" / "artifacts" / "iris"


def test_a_workspace_that_is_no_folder_is_refused(tmp_path):
    done = subprocess.run([str(KILN), "--workspace", str(tmp_path / "none"), "keys"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"--workspace {tmp_path / 'none'}: no such folder" in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("before", [None, "elsewhere"])
def test_workspace_flag_holds_for_its_command_only(before, tmp_path, monkeypatch, caplog):
    """main() run in a caller's own process (a test, a script) uses --workspace for that
    command and leaves the caller's KILN_WORKSPACE as it was: a leaked one moved every later
    test's workspace."""
    from kiln.cli.main import main

    if before is None:
        monkeypatch.delenv(workspace.ENV, raising=False)
    else:
        monkeypatch.setenv(workspace.ENV, str(tmp_path / before))
    assert main(["--workspace", str(tmp_path), "keys"]) == 1  # no key yet: named, with its path
    assert str(tmp_path / "run" / "keys") in caplog.text
    assert os.environ.get(workspace.ENV) == (before and str(tmp_path / before))
