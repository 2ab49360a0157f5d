"""Workers and batching reach a real TorchServe through config.properties' `models`: from a
declaration's [serving], and from an explicit flag over the declaration."""

import pytest
import requests

from kiln import declaration
from kiln.deploy.server import ModelServing, Ports, Server, ServerSettings, declared_serving
from kiln.model_store.build import ensure_built

DECLARED = "binary_declared"  # Kiln's binary model under another name, with a [serving] table
SERVING = "[serving]\nworkers = 2\nbatch_size = 4\nmax_batch_delay_ms = 7\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    builtin = declaration.get("binary")
    text = builtin.path.read_text().split("[[examples]]")[0]
    text = text.replace('file = "binary.py"', f'file = "{builtin.model_file}"')
    (models / f"{DECLARED}.toml").write_text(f"{text}\n{SERVING}")
    store = tmp_path_factory.mktemp("store")
    for name in ("binary", DECLARED):
        ensure_built(name, store=store, models_dirs=[models])
    # DECLARED is not listed in `serving`: the server takes its declaration's, as `kiln serve
    # NAME` with no flags does; binary gets what `kiln serve --batch-size 3` would give it on
    # 2 cores: the defaults derived for 2 models there (one worker each), its batch size 3.
    derived = ModelServing.derived(cores=2, models=2)
    settings = ServerSettings(tmp_path_factory.mktemp("run"), store, ["binary", DECLARED],
                              Ports.free(), models_dirs=[models], cores=2,
                              serving={"binary": declared_serving("binary", defaults=derived,
                                                                  batch_size=3)})
    srv = Server(settings)
    with srv.running(timeout=180):
        yield srv


def describe(server, name):
    r = requests.get(f"{server.url('management')}/models/{name}", timeout=10,
                     headers={"Authorization": f"Bearer {server.keys()['management']}"})
    r.raise_for_status()
    return r.json()[0]


@pytest.mark.parametrize("name,expected", [
    (DECLARED, dict(minWorkers=2, maxWorkers=2, batchSize=4, maxBatchDelay=7)),
    ("binary", dict(minWorkers=1, maxWorkers=1, batchSize=3, maxBatchDelay=1)),
])
def test_describe_model_shows_the_serving_settings(server, name, expected):
    described = describe(server, name)
    assert {k: described[k] for k in expected} == expected
    assert len(described["workers"]) == expected["minWorkers"]
    # The timeout stays the archive's: TorchServe reads it from no other place.
    assert described["responseTimeout"] == 30
