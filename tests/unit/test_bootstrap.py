"""`make serve` installs what serving needs and `make test` adds the test bench, read from what
make and scripts/bootstrap.sh say they would run (--dry-run, --plan): nothing is installed."""

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BOOTSTRAP = REPO / "scripts" / "bootstrap.sh"


def bootstrap(*args: str, venv: Path | None = None, runtime: str = "cpu") -> list[str]:
    env = {**os.environ, "KILN_RUNTIME": runtime}
    if venv is not None:
        env["VENV"] = str(venv)
    done = subprocess.run([str(BOOTSTRAP), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, check=True)
    return done.stdout.splitlines()


def mode_of(target: str) -> str:
    """The mode `make TARGET` runs bootstrap.sh with."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    lines = subprocess.run(["make", "-n", target], cwd=REPO, env=env, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    calls = [line.split() for line in lines if line.startswith("scripts/bootstrap.sh")]
    assert len(calls) == 1, lines
    return calls[0][1] if len(calls[0]) > 1 else ""


def plan(mode: str, runtime: str = "cpu") -> tuple[list[str], list[str]]:
    apt, extras = bootstrap("--plan", mode, runtime=runtime)
    assert apt.startswith("apt ") and extras.startswith("extras ")
    return apt.split()[1:], extras.split()[1].split(",")


@pytest.mark.parametrize("target", ["serve", "install"])
def test_make_serve_installs_no_test_bench(target):
    apt, extras = plan(mode_of(target))
    assert apt == ["openjdk-17-jdk-headless", "nginx", "libnginx-mod-http-lua"]
    assert extras == ["cpu"]


@pytest.mark.parametrize("target", ["test", "test-unit", "test-integration", "lint"])
def test_make_test_installs_serving_and_the_bench(target):
    apt, extras = plan(mode_of(target))
    assert apt == ["openjdk-17-jdk-headless", "nginx", "libnginx-mod-http-lua", "prometheus", "wrk",
                   "nghttp2-client", "chromium", "haproxy"]
    assert extras == ["cpu", "parquet", "ray", "test"]


def test_make_image_check_adds_buildah_and_debootstrap_to_the_bench():
    apt, extras = plan(mode_of("image-check"))
    assert apt == ["openjdk-17-jdk-headless", "nginx", "libnginx-mod-http-lua", "prometheus", "wrk",
                   "nghttp2-client", "chromium", "haproxy", "buildah", "debootstrap"]
    assert extras == ["cpu", "parquet", "ray", "test"]


def test_gpu_runtime_replaces_onnxruntime_extra():
    assert plan("serve", runtime="gpu")[1] == ["gpu"]
    assert plan("test", runtime="gpu")[1] == ["gpu", "parquet", "ray", "test"]


def pip_step(lines: list[str]) -> tuple[str | None, str | None]:
    """The extras the dry run would pip-install, and the stamp it would then write."""
    installs = [m.group(1) for line in lines if (m := re.search(r" -e \.\[([a-z,]+)\]$", line))]
    stamps = [line.removeprefix("stamp ") for line in lines if line.startswith("stamp ")]
    assert len(installs) == len(stamps) <= 1, lines
    return (installs[0], stamps[0]) if installs else (None, None)


@pytest.fixture
def venv(tmp_path):
    """A venv that exists as far as bootstrap.sh looks (dry runs never start its python)."""
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.write_text("#!/bin/sh\nexit 1\n")
    python.chmod(0o755)
    return tmp_path


def test_second_run_installs_nothing_and_test_adds_only_the_bench(venv):
    stamp = venv / ".kiln-installed"
    extras, written = pip_step(bootstrap("--dry-run", "serve", venv=venv))
    assert extras == "cpu"
    stamp.write_text(written + "\n")
    assert pip_step(bootstrap("--dry-run", "serve", venv=venv)) == (None, None)

    extras, written = pip_step(bootstrap("--dry-run", "test", venv=venv))
    assert extras == "cpu,parquet,ray,test"
    stamp.write_text(written + "\n")
    assert pip_step(bootstrap("--dry-run", "test", venv=venv)) == (None, None)
    # serve after test keeps the bench: no reinstall, no flip-flop between the two verbs.
    assert pip_step(bootstrap("--dry-run", "serve", venv=venv)) == (None, None)


def test_changed_pyproject_reinstalls_what_the_venv_had(venv):
    (venv / ".kiln-installed").write_text("0123456789abcdef cpu,parquet,ray,test\n")
    assert pip_step(bootstrap("--dry-run", "serve", venv=venv))[0] == "cpu,parquet,ray,test"


def test_switching_runtime_drops_the_other_onnxruntime(venv):
    extras, written = pip_step(bootstrap("--dry-run", "test", venv=venv))
    (venv / ".kiln-installed").write_text(written + "\n")
    assert pip_step(bootstrap("--dry-run", "serve", venv=venv, runtime="gpu"))[0] == \
        "gpu,parquet,ray,test"


def test_unknown_mode_is_refused():
    done = subprocess.run([str(BOOTSTRAP), "everything"], cwd=REPO, capture_output=True,
                          text=True)
    assert done.returncode == 2
    assert done.stderr == "usage: scripts/bootstrap.sh [--dry-run | --plan] serve|test|image\n"


def test_only_the_test_bench_adds_kserve_without_its_dependencies(venv):
    # KServe's SDK pins protobuf<7, which grpcio-tools refuses: a resolving install of it fails.
    no_deps = [line for line in bootstrap("--dry-run", "test", venv=venv) if "--no-deps" in line]
    assert [line.split("--no-deps ")[1] for line in no_deps] == ["kserve==0.21.0"]
    assert not [line for line in bootstrap("--dry-run", "serve", venv=venv) if "kserve" in line]
