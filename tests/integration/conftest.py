"""A real TorchServe on free loopback ports, serving archives built the way `make serve` does."""

import logging

import pytest

from deploy.server import Ports, Server, ServerSettings
from kiln import client as http
from kiln.pipeline import ensure_built
from model_store.archive import STORE
from training import registry

MODELS = list(registry.REGISTRY)
log = logging.getLogger("kiln.tests")


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def archives():
    """Train, export and archive what is missing (reuses what `make serve` built)."""
    return {name: ensure_built(name) for name in MODELS}


@pytest.fixture(scope="session")
def server(archives, tmp_path_factory):
    srv = Server(ServerSettings(run_dir=tmp_path_factory.mktemp("torchserve"),
                                model_store=STORE, models=MODELS, ports=Ports.free()))
    with srv.running(timeout=240):
        yield srv


@pytest.fixture(scope="session")
def client(server):
    return http.Client(server.url("inference"), server.keys()["inference"])
