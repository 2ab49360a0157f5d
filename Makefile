# The usual verbs. Each one installs what is missing first (scripts/bootstrap.sh): serving
# verbs what serving needs, test verbs the test bench too.
VENV ?= .venv
BIN := $(VENV)/bin
export VENV

.PHONY: install install-test serve stop test test-unit test-integration test-installed image-check \
	lint clean

## What serving needs: a JDK, nginx, the venv with kiln and its runtime extra.
install:
	@scripts/bootstrap.sh serve

## That and the test bench: Prometheus, wrk, h2load, Chromium, HAProxy, the test/parquet/ray extras.
install-test:
	@scripts/bootstrap.sh test

## Train, export and archive what is missing, start TorchServe on 127.0.0.1, print how to call it.
serve: install
	$(BIN)/kiln serve

## Stop the TorchServe that `make serve` started.
stop:
	@if [ -x $(BIN)/kiln ]; then $(BIN)/kiln stop; else echo "nothing to stop"; fi

## The whole suite: lint, unit tests, then integration tests against a real TorchServe
## (but the installed wheel's test, which takes minutes on its own: make test-installed).
test: install-test
	$(BIN)/ruff check .
	$(BIN)/pytest -ra --durations=30 -m "not installed and not image"

test-unit: install-test
	$(BIN)/pytest -ra tests/unit

test-integration: install-test
	$(BIN)/pytest -ra -m "not installed and not image" tests/integration

## The wheel, installed into a fresh venv outside the repository, serving a model of a user's.
test-installed: install-test
	$(BIN)/pytest -ra -m installed tests/integration/test_installed_wheel.py

## Kiln's CPU image built here with buildah (no registry, no container runtime) and run from its
## own root filesystem: keys, probes, REST, OIP, gRPC, the drain (docs/deploy.md; as root).
image-check:
	@scripts/bootstrap.sh image
	$(BIN)/pytest -ra -m image tests/integration/test_image.py

lint: install-test
	$(BIN)/ruff check .

## Remove what the build made (weights, exports, archives, run folder); keeps the venv.
clean:
	rm -rf artifacts runs run model_store/*.mar
