"""A real TorchServe worker imports of Kiln exactly what its archive ships (kiln/__init__.py and
the serving core), from the archive's copy, for both backends: nothing of training, batch,
loadtests or deploy, and nothing from the checkout.

Python's verbose mode (PYTHONVERBOSE) writes to stderr a line for each module a process
imports, by whatever means, and the file each one's code came from; TorchServe logs each line
of a worker's stderr in model_log.log. The worker itself is left as it is served.
"""

import re
import time
import zipfile
from pathlib import Path

import pytest
import requests

from kiln import client as http
from kiln import declaration, layout
from kiln.deploy.server import WORKER_SITE, Ports, Server, ServerSettings
from kiln.model_store.build import ensure_built

BACKENDS = {"lenet": "onnx", "binary": "torchscript"}
NOT_SERVING = ("kiln.training", "kiln.batch", "kiln.loadtests", "kiln.deploy", "kiln.cli")
# "... W-9000-lenet_1.0-stderr MODEL_LOG - import 'kiln.handlers.rest' # <...SourceFileLoader...>"
WORKER_LINE = re.compile(r" W-\d+-(?P<model>\S+)_[^\s_]+-stderr MODEL_LOG - (?P<text>.*)$")
IMPORTED = re.compile(r"import '(?P<module>[^']+)' # ")
# From source: "code object from /x/y.py"; from bytecode: "code object from '/x/__pycache__/y...'"
CODE_FROM = re.compile(r"# code object from '?(?P<path>[^']+)'?$")
STDERR_READ = "Stopped Scanner - W-{port}-{model}_"
STOP_WAIT_S = 60
CHECKOUT = [layout.package_folder(name) for name in
            ("kiln", *(f"kiln.{sub}" for sub in layout.SUBPACKAGES))]


@pytest.fixture(scope="module")
def profiled_server(tmp_path_factory):
    store = tmp_path_factory.mktemp("imports-store")
    for name, backend in BACKENDS.items():
        ensure_built(name, backend, store)
    settings = ServerSettings(run_dir=tmp_path_factory.mktemp("imports-run"), model_store=store,
                              models=list(BACKENDS), ports=Ports.free(), cores=len(BACKENDS))
    # TorchServe hands its environment on to the workers it starts.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONVERBOSE", "1")
        srv = Server(settings)
        with srv.running(timeout=180):
            yield srv


def shipped_files(mar: Path) -> list[str]:
    with zipfile.ZipFile(mar) as z:
        return [n for n in z.namelist() if n.startswith("kiln/") and n.endswith(".py")]


def module_name(file: str) -> str:
    return file.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def answer_good_and_bad(server, name):
    """Drives the imports a request can make: an answer, and a refusal."""
    client = http.Client(server.url("inference"), server.keys()["inference"])
    example = declaration.get(name).examples[0]
    good = (client.predict_file(name, example.file) if example.file is not None
            else client.predict_json(name, example.value))
    assert good.status == 200, good.body
    assert client.predict_json(name, "not an input").status == 400


def stop_workers(server, name):
    """Scales the model to no worker; returns once TorchServe has logged all their stderr."""
    headers = {"Authorization": f"Bearer {server.keys()['management']}"}
    r = requests.put(f"{server.url('management')}/models/{name}", headers=headers,
                     params={"min_worker": 0, "max_worker": 0, "synchronous": "true"},
                     timeout=STOP_WAIT_S)
    assert r.status_code == 200, r.text
    done = STDERR_READ.format(port=r"\d+", model=name)
    deadline = time.monotonic() + STOP_WAIT_S
    while not re.search(done, (server.log_dir / "ts_log.log").read_text()):
        assert time.monotonic() < deadline, f"{name}'s worker stderr not read to its end"
        time.sleep(0.2)


def worker_log(server, name) -> list[str]:
    lines = (server.log_dir / "model_log.log").read_text().splitlines()
    found = (WORKER_LINE.search(line) for line in lines)
    return [m["text"] for m in found if m and m["model"] == name]


def source_of(path: str) -> Path:
    """The .py file a code object came from (its own path, or its cached bytecode's)."""
    p = Path(path)
    return p.parent.parent / f"{p.name.split('.')[0]}.py" if p.parent.name == "__pycache__" else p


@pytest.mark.parametrize("name", list(BACKENDS))
def test_worker_imports_what_its_archive_ships_and_no_more(profiled_server, name):
    answer_good_and_bad(profiled_server, name)
    stop_workers(profiled_server, name)
    lines = worker_log(profiled_server, name)
    imported = [m["module"] for m in map(IMPORTED.match, lines) if m]
    sources = [source_of(m["path"]) for m in map(CODE_FROM.match, lines) if m]
    assert "kiln_handler" in imported  # verbose mode's lines did reach the log
    kiln = sorted(m for m in imported if m.split(".")[0] == "kiln")
    assert [m for m in kiln if m.startswith(NOT_SERVING)] == []
    shipped = shipped_files(profiled_server.settings.model_store / f"{name}.mar")
    assert kiln == sorted(module_name(f) for f in shipped)
    # Each from the model folder TorchServe unpacked the archive into, none from the checkout.
    model_dir = next(p.parent for p in sources if p.name == "kiln_handler.py")
    # (kiln serve's site hook is a top-level `sitecustomize` on PYTHONPATH, not of `kiln`.)
    from_checkout = [p for p in sources if any(p.is_relative_to(f) for f in CHECKOUT)]
    assert from_checkout == [WORKER_SITE / "sitecustomize.py"]
    assert sorted(p for p in sources if p.is_relative_to(model_dir / "kiln")) == sorted(
        model_dir / f for f in shipped)
