"""Versions of a model in a running TorchServe: deploy (register and warm), promote, roll
back, retire, and what a restart brings back.

TorchServe's management API does the registering, on loopback with its management token;
versions.json (deploy/versions.py) records what is served, and every action here changes it
in one transaction, so a second admin action meanwhile is told and changes nothing.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests

from kiln import client as http
from kiln import declaration
from kiln.deploy import routing, versions
from kiln.deploy.ports import HOST, INTERNAL_PORTS_FILE, Ports
from kiln.handlers import kinds
from kiln.handlers.handler import WORKER_HEADER
from kiln.model_store import archived_digest, read_archive

log = logging.getLogger("kiln.versions")

# What a management call may take: registering waits for the version's workers to load.
REGISTER_TIMEOUT_S = 180
CALL_TIMEOUT_S = 10
# Warm-up rounds before a worker that served nothing fails the deploy: a round sends every
# warm-up input batch-size times at once, which TorchServe spreads over idle workers.
WARM_ROUNDS = 20
RANDOM_INPUTS = 4


class LifecycleError(RuntimeError):
    """An admin action that could not be done; what it says is for the user."""


@dataclass(frozen=True)
class Management:
    """TorchServe's management API of one run folder."""

    url: str
    token: str

    def call(self, method: str, path: str, timeout: float = CALL_TIMEOUT_S,
             **params) -> list | dict:
        r = requests.request(method, f"{self.url}{path}", params=params or None,
                             timeout=timeout, headers={"Authorization": f"Bearer {self.token}"})
        if r.status_code >= 300:
            try:
                message = r.json().get("message", r.text)
            except ValueError:
                message = r.text
            raise LifecycleError(f"TorchServe refused {method} {path}: {r.status_code} "
                                 f"{message.strip()}")
        return r.json()

    def served(self, name: str) -> dict[str, dict]:
        """{version: description} of every version of `name` TorchServe serves."""
        return {str(d["modelVersion"]): d for d in self.call("GET", f"/models/{name}/all")}

    def describe(self, name: str, v: str) -> dict:
        return self.call("GET", f"/models/{name}/{v}")[0]

    def register(self, archive: str, like: dict) -> None:
        """The archive, with the workers and batching of `like` (the served default)."""
        self.call("POST", "/models", timeout=REGISTER_TIMEOUT_S, url=archive,
                  initial_workers=like["minWorkers"], batch_size=like["batchSize"],
                  max_batch_delay=like["maxBatchDelay"], synchronous="true")

    def set_default(self, name: str, v: str) -> None:
        self.call("PUT", f"/models/{name}/{v}/set-default")

    def unregister(self, name: str, v: str) -> None:
        self.call("DELETE", f"/models/{name}/{v}", timeout=REGISTER_TIMEOUT_S)


@dataclass(frozen=True)
class Target:
    """A running server, as its run folder records it."""

    run_dir: Path
    store: Path
    management: Management
    # TorchServe's own inference port and token (behind the front proxy): warm-up requests
    # go there, pinned to the version, so no client key is spent and no route is involved.
    inference_url: str
    inference_token: str
    # Kiln's OIP plugin on TorchServe's own OIP port: it routes by versions.json.
    oip_url: str

    @classmethod
    def of(cls, run_dir: Path, store: Path) -> Target:
        keys_file, config = run_dir / "key_file.json", run_dir / "config.properties"
        ports = Ports.saved(run_dir)
        if ports is None or not keys_file.exists():
            raise LifecycleError(f"no TorchServe running from {run_dir}: kiln serve first")
        if "enable_model_api=true" not in config.read_text().splitlines():
            raise LifecycleError("versions are registered through TorchServe's model API: "
                                 "restart with kiln serve --enable-model-api (on by itself "
                                 "once run/versions.json exists)")
        keys = json.loads(keys_file.read_text())
        internal = Ports.saved(run_dir, INTERNAL_PORTS_FILE) or ports
        return cls(run_dir, store, Management(f"http://{HOST}:{ports.management}",
                                              keys["management"]["key"]),
                   f"http://{HOST}:{internal.inference}", keys["inference"]["key"],
                   f"http://{HOST}:{internal.oip}")

    def sync_routes(self) -> None:
        """Return once the plugin routes by versions.json as it is now. It rereads the file
        at most every 100 ms (Router.java), so without this a request could still be routed
        by the state before."""
        path = routing.state_file(self.run_dir)
        wrote = hashlib.sha256(path.read_bytes()).hexdigest()
        r = requests.get(f"{self.oip_url}{routing.SYNC_PATH}", timeout=CALL_TIMEOUT_S,
                         headers={"Authorization": f"Bearer {self.inference_token}"})
        seen = r.json().get("sha256") if r.status_code == 200 else r.text[:200]
        if seen != wrote:
            raise LifecycleError(f"the OIP plugin did not read {path} as written ({seen}): "
                                 f"nothing was unregistered")


# -- deploy -------------------------------------------------------------------------------------
def deploy(target: Target, decl: declaration.Declaration, v: str,
           build: Callable[[str], Path], allow_signature_change: bool = False) -> str:
    """Build `decl`'s current weights as version `v` (`build` exports with the parity gate
    and archives), register it beside the served versions, warm each of its workers, and
    record it ready. Anything refused or failed leaves the service and versions.json as they
    were. Returns what was done, for the user."""
    name = decl.name
    versions.check_version_name(v)
    with versions.transaction(target.run_dir) as state:
        served = target.management.served(name)
        if name not in state:
            seed(state, name, served, target.store)
        default = state[name]["default"]
        existed = (target.store / f"{name}-{v}.mar").exists()
        mar = build(v)
        try:
            digest = archived_digest(mar)
            known = state[name]["versions"].get(v)
            versions.add(state, name, v, mar.name, digest)  # refuses other weights
            if known is not None:
                state[name]["versions"][v] = known
                return f"{name} {v} is already deployed with these weights: nothing to do"
            check_signature(target.store / state[name]["versions"][default]["archive"], mar,
                            allow_signature_change)
            register(target, state, name, v, mar, served[default])
        except Exception:
            if not existed:
                mar.unlink(missing_ok=True)
            raise
    return f"{name} {v} deployed and warm ({mar.name}); the default is still {default}"


def seed(state: dict, name: str, served: dict[str, dict], store: Path) -> None:
    """The version `kiln serve` started (NAME.mar), recorded as the model's ready default."""
    archive = f"{name}.mar"
    manifest, _ = read_archive(store / archive)
    v = str((manifest or {}).get("model", {}).get("modelVersion"))
    if v not in served:
        raise LifecycleError(f"{archive} in {store} holds version {v}, which TorchServe does "
                             f"not serve (it serves {', '.join(served)}): serve from that store")
    versions.add(state, name, v, archive, archived_digest(store / archive) or "")
    versions.mark_ready(state, name, v)


def check_signature(served: Path, new: Path, allowed: bool) -> None:
    """The new version takes the inputs and gives the outputs the default does: its clients
    are the default's."""
    old_sig, new_sig = _signature(served), _signature(new)
    for part in ("inputs", "output"):
        if old_sig[part] != new_sig[part] and not allowed:
            raise versions.VersionsError(
                f"{new.name}'s {part} differ from the served default's ({served.name}): its "
                f"clients would break; deploy with --allow-signature-change if they will not")


def _signature(mar: Path) -> dict:
    with zipfile.ZipFile(mar) as z:
        return json.loads(z.read("signature.json"))


def register(target: Target, state: dict, name: str, v: str, mar: Path, like: dict) -> None:
    """Registered and warm, recorded as warming meanwhile; unregistered again on failure."""
    before = versions.load(target.run_dir)
    versions.write(target.run_dir, state)  # warming: known, and given no traffic
    try:
        target.management.register(mar.name, like)
        warm(target, name, v, int(like["batchSize"]), archive=mar)
    except Exception:
        try:
            target.management.unregister(name, v)
        except (LifecycleError, OSError) as err:
            log.warning("could not unregister %s %s after a failed deploy: %s", name, v, err)
        versions.write(target.run_dir, before)
        raise
    versions.mark_ready(state, name, v)


# -- warm-up ------------------------------------------------------------------------------------
def warm_bodies(decl: declaration.Declaration, signature: dict | None = None,
                seed_: int = 0) -> list[tuple[bytes, str]]:
    """The declaration's examples, and random inputs in the declared ranges for a model of one
    image input, or of one features input given its archive's `signature` (the declaration
    holds no feature names or ranges: the export's training data does)."""
    bodies = [(e.body(), _content_type(e)) for e in decl.examples]
    if len(decl.inputs) != 1:
        return bodies
    spec, rng = decl.inputs[0], np.random.default_rng(seed_)
    kind = kinds.of(spec)
    if kind.pixels:
        for _ in range(RANDOM_INPUTS):
            pixels = rng.integers(0, 256, kind.raw_shape(spec), dtype=np.uint8)
            bodies.append(http.encode_image(_png(pixels)))
    elif signature is not None and {"names", "mean", "std"} <= set(signature["inputs"][0]):
        named = signature["inputs"][0]
        # random_rows draws standardised rows within the ranges; a request carries raw values.
        rows = kind.random_rows(named, RANDOM_INPUTS, rng) * named["std"] + named["mean"]
        bodies += [http.encode_json(dict(zip(named["names"], map(float, row), strict=True)))
                   for row in rows]
    return bodies


def _content_type(example: declaration.Example) -> str:
    if example.file is None:
        return "application/json"
    return http.CONTENT_TYPES.get(example.file.suffix, "application/octet-stream")


def _png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def warm(target: Target, name: str, v: str, batch_size: int,
         bodies: list[tuple[bytes, str]] | None = None, archive: Path | None = None) -> int:
    """Send the warm-up inputs pinned to version `v` (of `archive`, whose signature gives a
    features model's ranges; None: the examples are enough) until each of its workers has
    answered some; returns how many were sent. An answer other than 200 fails the deploy."""
    if bodies is None:
        bodies = warm_bodies(declaration.get(name), archive and _signature(archive))
    if not bodies:
        raise LifecycleError(f"{name} {v}: no warm-up inputs: declare an example "
                             f"(kiln init --example)")
    pids = {str(w["pid"]) for w in target.management.describe(name, v)["workers"]}
    seen: set[str] = set()
    sent = 0
    url = f"{target.inference_url}/predictions/{name}/{v}"
    headers = {"Authorization": f"Bearer {target.inference_token}"}
    with concurrent.futures.ThreadPoolExecutor(max(1, batch_size * len(pids))) as pool:
        for _ in range(WARM_ROUNDS):
            jobs = [pool.submit(_post, url, headers, body, ctype)
                    for body, ctype in bodies for _ in range(batch_size)]
            for job in jobs:
                seen.add(job.result())
            sent += len(jobs)
            if pids <= seen:
                return sent
    raise LifecycleError(f"{name} {v}: worker(s) {', '.join(sorted(pids - seen))} answered "
                         f"none of {sent} warm-up requests")


def _post(url: str, headers: dict, body: bytes, ctype: str) -> str:
    r = requests.post(url, data=body, headers={**headers, "Content-Type": ctype},
                      timeout=CALL_TIMEOUT_S * 3)
    if r.status_code != 200:
        raise LifecycleError(f"warm-up request to {url} got {r.status_code}: {r.text[:200]}")
    return r.headers.get(WORKER_HEADER, "")


# -- promote, rollback, retire ------------------------------------------------------------------
def promote(target: Target, name: str, v: str) -> str:
    with versions.transaction(target.run_dir) as state:
        versions.promote(state, name, v)
        target.management.set_default(name, v)
    return f"{name}: {v} is the default (was {state[name]['previous']})"


def rollback(target: Target, name: str) -> str:
    with versions.transaction(target.run_dir) as state:
        versions.rollback(state, name)
        target.management.set_default(name, state[name]["default"])
    return f"{name}: rolled back to {state[name]['default']}"


def retire(target: Target, name: str, v: str) -> str:
    """Forget `v` (no route sends it traffic from now on), let the requests it holds finish,
    then unregister it and remove its versioned archive."""
    with versions.transaction(target.run_dir) as state:
        archive = versions.version(state, name, v)["archive"]
        versions.retire(state, name, v)
        versions.write(target.run_dir, state)
        target.sync_routes()  # no route sends it requests, pinned ones are refused
        drain(target, name, v)
        target.management.unregister(name, v)
    if archive != f"{name}.mar":
        (target.store / archive).unlink(missing_ok=True)
    return f"{name} {v} retired"


def drain(target: Target, name: str, v: str) -> None:
    """Return once every request `v` held has been answered. TorchServe 0.12 does not wait
    for them: of 24 requests in flight at an unregister, 2 were answered, 8 got 500 and 14
    no answer within 20 s; scaled to 0 workers first, 22 got no answer
    (loadtests/studies/versions.py). Its queue is first in, first out and a worker takes a
    batch only when done with the last: once each worker has answered a request sent now,
    all sent before have been answered."""
    like = target.management.describe(name, v)
    warm(target, name, v, int(like["batchSize"]))


# -- a restart ----------------------------------------------------------------------------------
def restore(target: Target, name: str, state: dict) -> list[str]:
    """What versions.json (`state`) holds of `name`, brought back into a freshly started
    TorchServe (which serves NAME.mar): the other versions registered and warmed, the default
    set, a version no longer recorded unregistered. One line per change."""
    entry = state[name]
    served = target.management.served(name)
    like = next(iter(served.values()))
    done = []
    for v, info in entry["versions"].items():
        if v not in served:
            target.management.register(info["archive"], like)
            warm(target, name, v, int(like["batchSize"]), archive=target.store / info["archive"])
            done.append(f"{name} {v}: registered and warmed ({info['archive']})")
    target.management.set_default(name, entry["default"])
    for v in set(served) - set(entry["versions"]):
        target.management.unregister(name, v)
        done.append(f"{name} {v}: unregistered (retired)")
    return done
