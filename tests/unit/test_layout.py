"""One import root: `kiln`, mapped over the top-level folders, and nothing else installed."""

import ast
import json
import os
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kiln import layout
from kiln.loadtests import run
from kiln.model_store import archive

REPO = Path(__file__).resolve().parents[2]


def test_pyproject_maps_exactly_the_subpackages_the_archive_ships():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["packages"] == ["kiln", *(f"kiln.{sub}" for sub in layout.SUBPACKAGES)]
    for name, folder in config["package-dir"].items():
        assert layout.package_folder(name) == REPO / folder


def test_package_files_cover_every_module_once():
    files = layout.package_files()
    assert files["kiln/handlers/rest.py"] == REPO / "handlers" / "rest.py"
    assert files["kiln/loadtests/wrk_post.lua"] == REPO / "loadtests" / "wrk_post.lua"
    assert files["kiln/training/models/lenet.py"] == REPO / "training" / "models" / "lenet.py"
    assert len(set(files.values())) == len(files)
    # deploy/worker_site is no module of Kiln's: a folder for TorchServe's workers' PYTHONPATH.
    python = {p for p in REPO.glob("*/**/*.py")
              if p.parts[len(REPO.parts)] in {"kiln", "training", "handlers", "model_store",
                                               "deploy", "loadtests", "batch"}
              and p.parent.name != "worker_site"}
    assert python == {p for p in files.values() if p.suffix == ".py"}


PROBE = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
files = {}
for name, module in list(sys.modules.items()):
    path = getattr(module, "__file__", None)
    if path and "kiln" in name:
        files.setdefault(path, []).append(name)
twice = {path: names for path, names in files.items() if len(names) > 1}
assert not twice, twice
for generic in ("training", "handlers", "batch", "deploy", "loadtests", "model_store"):
    try:
        importlib.import_module(generic)
    except ModuleNotFoundError:
        continue
    raise AssertionError(f"{generic} is importable as a top-level name")
print("ok")
"""


def test_no_generic_top_level_names_and_no_module_under_two_names(tmp_path):
    modules = ["kiln.cli.main", "kiln.handlers.handler", "kiln.batch.job", "kiln.batch.local",
               "kiln.loadtests.bench", "kiln.training.export", "kiln.model_store.archive"]
    done = subprocess.run([sys.executable, "-c", PROBE, *modules], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr


def test_locust_imports_kiln_only_through_the_installed_package(tmp_path):
    """What `kiln loadtest` hands locust: the locustfile's own imports, and no folder of Kiln's
    importable under a generic name."""
    env = run.locust_env("steady", "a-token")
    done = subprocess.run([sys.executable, "-c", PROBE, "kiln.loadtests.locustfile"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr


# Who may import whom: each layer only what is below it. The leaves are the modules at the
# root (logging set-up, the HTTP and gRPC clients, this layout): they import no layer.
LAYERS = {
    "leaf": set(),
    "handlers": set(),
    "training": {"handlers", "leaf"},
    "model_store": {"training", "handlers", "leaf"},
    "deploy": {"model_store", "training", "handlers", "leaf"},
    "batch": {"handlers", "leaf"},
    "loadtests": {"deploy", "model_store", "training", "batch", "handlers", "leaf"},
    "cli": {"loadtests", "deploy", "model_store", "training", "batch", "handlers", "leaf"},
}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "kiln" or len(parts) == 1:
        return None
    return parts[1] if parts[1] in LAYERS else "leaf"


def test_layers_import_downward_only():
    wrong = []
    for relative, path in layout.package_files().items():
        if path.suffix != ".py":
            continue
        module = relative[:-3].replace("/", ".")
        layer = _layer(module)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                target = _layer(name)
                if target and target != layer and target not in LAYERS[layer or "leaf"]:
                    wrong.append(f"{module} ({layer}) imports {name} ({target})")
    assert wrong == []


# Runs one `kiln` command in a fresh interpreter, then names the heavy modules it loaded: torch
# and the training code that imports it (data.py brings scikit-learn too).
COMMAND_PROBE = """
import json, sys
from kiln.cli.main import main
try:
    rc = main(sys.argv[1:])
except SystemExit as done:
    rc = done.code
"""
# What a plain `kiln serve` does beyond `--no-build`, in a fresh interpreter: the build step,
# finding binary's archive (in the store argv[2], from the exports under argv[1]) up to date.
BUILD_PROBE = """
import sys
from pathlib import Path
from kiln.model_store import build
build.ARTIFACTS = Path(sys.argv[1])
mar = build.ensure_built("binary", None, Path(sys.argv[2]))
rc = mar.stat().st_mtime_ns
"""
HEAVY_PROBE = """
import json, sys
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "sklearn")
               or m in ("kiln.training.train", "kiln.training.export", "kiln.training.data"))
print(json.dumps({"rc": rc, "heavy": heavy}))
"""


def _kiln_loads(argv: list, cwd: Path, probe: str = COMMAND_PROBE) -> dict:
    done = subprocess.run([sys.executable, "-c", probe + HEAVY_PROBE, *map(str, argv)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture
def exports(tmp_path, features_model_dir):
    """A model folder as `kiln export binary` leaves it: a real graph, a passed gate."""
    folder = tmp_path / "exports"
    folder.mkdir()
    shutil.copy(features_model_dir / "model.onnx", folder / "model.onnx")
    signature = json.loads((features_model_dir / "signature.json").read_text())
    signature["parity"] = {"onnx": {"max_abs_diff": 0.0, "top1_agreement": 1.0, "samples": 2}}
    (folder / "signature.json").write_text(json.dumps(signature))
    return folder


@pytest.fixture
def closed_url():
    """A loopback URL whose port is bound and not listening: connections are refused, and
    nothing else can take the port meanwhile."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{held.getsockname()[1]}"


def test_commands_that_neither_train_nor_export_import_no_torch(tmp_path, exports,
                                                                 closed_url):
    png = REPO / "training" / "models" / "examples" / "lenet_7.png"
    (tmp_path / "images").mkdir()
    shutil.copy(png, tmp_path / "images")
    (tmp_path / "keys").mkdir()
    # (argv, exit status): each runs for real as far as it goes without a server.
    commands = [
        (["--help"], 0),
        (["archive", "--help"], 0),
        (["archive", "binary", "--artifacts", exports, "--store", tmp_path / "store"], 0),
        # No archive in the store: fails in Server.start, after all its imports.
        (["serve", "--no-build", "lenet", "--store", tmp_path / "empty",
          "--run-dir", tmp_path / "serve"], 1),
        (["predict", "lenet", png, "--url", closed_url, "--token", "x"], 1),
        (["keys", "rotate", "--run-dir", tmp_path / "keys"], 0),
        (["batch", "lenet", tmp_path / "images", tmp_path / "out.jsonl", "--via", "server",
          "--url", closed_url, "--token", "x", "--retries", "0", "--no-progress"], 1),
    ]
    loaded = [(argv[:2], _kiln_loads(argv, tmp_path)) for argv, _ in commands]
    assert loaded == [(argv[:2], {"rc": rc, "heavy": []}) for argv, rc in commands]
    assert (tmp_path / "store" / "binary.mar").is_file()


def test_serving_archives_that_are_up_to_date_imports_no_torch(tmp_path, exports):
    folder = tmp_path / "artifacts" / "binary"
    folder.mkdir(parents=True)
    for name in ("model.onnx", "signature.json"):
        shutil.copy(exports / name, folder)
    for name in ("state_dict.pt", "meta.json"):  # the weights, older than their export
        (folder / name).write_bytes(b"")
        os.utime(folder / name, ns=(0, 0))
    mar = archive.build("binary", "onnx", artifacts=folder, store=tmp_path / "store")
    built_at = mar.stat().st_mtime_ns
    loaded = _kiln_loads([tmp_path / "artifacts", tmp_path / "store"], tmp_path, BUILD_PROBE)
    assert loaded == {"rc": built_at, "heavy": []}
