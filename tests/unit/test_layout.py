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

import numpy as np
import pytest

from kiln import layout
from kiln.loadtests import run
from kiln.model_store import archive
from kiln.training import reference

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
# kiln.declaration reads a model's declaration with no training: it knows the input kinds
# (handlers) and, when a declaration names one, Kiln's recipe names (RECIPE_NAMES).
LAYERS = {
    "leaf": set(),
    "handlers": set(),
    "declaration": {"handlers", "leaf"},
    "training": {"declaration", "handlers", "leaf"},
    "model_store": {"declaration", "training", "handlers", "leaf"},
    "deploy": {"declaration", "model_store", "training", "handlers", "leaf"},
    "batch": {"handlers", "leaf"},
    "loadtests": {"declaration", "deploy", "model_store", "training", "batch", "handlers",
                  "leaf"},
    "cli": {"declaration", "loadtests", "deploy", "model_store", "training", "batch", "handlers",
            "leaf"},
}


# The one module of a higher layer that kiln.declaration imports: a tuple of names, with
# nothing imported beside it.
RECIPE_NAMES = ("kiln.training", "kiln.training.recipes")


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
                if layer == "declaration" and name in RECIPE_NAMES:
                    continue
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
# finding binary's archive (in the workspace argv[1]) up to date.
BUILD_PROBE = """
import os, sys
from kiln import workspace
from kiln.model_store import build
os.environ[workspace.ENV] = sys.argv[1]
rc = build.ensure_built("binary").stat().st_mtime_ns
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
    # Today's export also stores reference statistics (without them ensure_built exports again).
    rows = np.random.default_rng(0).normal(size=(40, 30)).astype(np.float32)
    signature["reference"] = reference.reference(signature["inputs"], signature["output"],
                                                 [rows], np.arange(40) % 2)
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
    mar = archive.build("binary", "onnx", artifacts=folder, store=tmp_path / "model_store")
    built_at = mar.stat().st_mtime_ns
    loaded = _kiln_loads([tmp_path], tmp_path, BUILD_PROBE)
    assert loaded == {"rc": built_at, "heavy": []}


# Module-level names that hold a path derived from the module's own __file__, each with why
# it is only ever read: what commands write goes under the workspace (kiln/workspace.py), never
# beside Kiln's code, which an installed Kiln keeps in site-packages.
READ_ONLY_NEAR_CODE = {
    "kiln/training/train.py:CODE": "the checkout whose git commit a run records",
    "kiln/deploy/front.py:TEMPLATE": "nginx.conf template",
    "kiln/deploy/front.py:KEYS_LUA": "the key check's Lua, which nginx loads",
    "kiln/deploy/torchserve_config.py:LOG_CONFIG": "log4j2 configuration",
    "kiln/deploy/torchserve_config.py:CONSOLE_LOG_CONFIG": "log4j2 configuration",
    "kiln/deploy/plugins.py:OIP_PLUGIN_SOURCE": "the OIP plugin's Java sources",
    "kiln/loadtests/locustfile_path.py:LOCUSTFILE": "the locustfile locust is given",
    "kiln/loadtests/wrk.py:SCRIPT": "the Lua script wrk is given",
    "kiln/loadtests/studies/reliability/load.py:MIX_LUA": "the Lua script of the mixed load",
    "kiln/loadtests/stock.py:HERE": "the folder of the two handlers below",
    "kiln/loadtests/stock.py:NOOP_HANDLER": "a handler the bench archives",
    "kiln/loadtests/stock.py:PLAIN_HANDLER": "a handler the bench archives",
    "kiln/loadtests/studies/handler_cost.py:BODY": "a committed test image the study sends",
    "kiln/loadtests/studies/payload_log_cost.py:SEVEN": "a committed test image the study logs",
    "kiln/batch/ray_job.py:REPO": "the code Ray ships to its workers",
}


def paths_from_own_file(tree: ast.Module, where: str) -> tuple[set[str], list[str]]:
    """(module-level names whose value derives from __file__, directly or through another
    such name; the uses of __file__ that no module-level assignment names)."""
    uses = {id(n) for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == "__file__"}
    derived: set[str] = set()
    named: set[int] = set()
    changed = True
    while changed:  # a fixed point: B = A / "x" after A = Path(__file__)...
        changed = False
        for node in tree.body:
            if not isinstance(node, ast.Assign | ast.AnnAssign) or node.value is None:
                continue
            inside = list(ast.walk(node.value))
            if not any(id(n) in uses or isinstance(n, ast.Name) and n.id in derived
                       for n in inside):
                continue
            named |= {id(n) for n in inside}
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name) and t.id not in derived:
                    derived.add(t.id)
                    changed = True
    bare = [f"{where}:{n.lineno}" for n in ast.walk(tree)
            if id(n) in uses and id(n) not in named]
    return {f"{where}:{name}" for name in derived}, bare


def test_no_module_derives_a_writable_path_from_its_own_file():
    derived, bare = set(), []
    for where, path in layout.package_files().items():
        if path.suffix == ".py":
            names, uses = paths_from_own_file(ast.parse(path.read_text()), where)
            derived |= names
            bare += uses
    assert bare == []  # a __file__ path used in place, with no name saying what it is
    assert derived - set(READ_ONLY_NEAR_CODE) == set()
    assert set(READ_ONLY_NEAR_CODE) <= derived  # no stale entry
