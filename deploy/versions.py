"""What the service serves, per model and version: the run folder's versions.json.

It is the one source of truth for the versions deployed, the default, the route and the
shadows: the admin commands (kiln deploy, promote, rollback, retire, route, shadow) change it,
the front proxy and `kiln serve` read it. Shape, per model:

    {"versions": {V: {"archive": "lenet-2.0.mar", "digest": "<sha256>", "state": "warming"}},
     "default": V, "previous": V | null, "route": {V: weight, ...} | null,
     "shadows": {V: fraction}}

Every change is a transaction: under an exclusive flock on versions.lock, the state is read,
changed in a copy, checked, and written to a temporary file that is fsynced and renamed over
versions.json, so a reader (or a crash) sees the old state or the new one, never half of one.
A change that is refused leaves the file as it was. A second admin action while one holds the
lock is refused at once rather than queued: it was decided on a state about to change.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

STATE_FILE = "versions.json"
LOCK_FILE = "versions.lock"
WARMING, READY = "warming", "ready"
# A version lands in archive names (NAME-V.mar) and URL paths (/predictions/NAME/V).
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._]{0,63}")
# Route weights are percentages; their sum may be off by float rounding, no more.
WEIGHTS_TOTAL = 100.0


class VersionsError(ValueError):
    """An admin action refused: nothing was changed."""


class Busy(VersionsError):
    def __init__(self):
        super().__init__("another admin action is in progress: nothing was changed, try again "
                         "when it is done")


@dataclass(frozen=True)
class Route:
    """Where a model's unpinned requests go: `weights` (version: percent) when set, else all
    to `default`; `shadows` (version: fraction) also score a sample of them."""

    default: str
    weights: dict[str, float] | None
    shadows: dict[str, float]


# -- reading ------------------------------------------------------------------------------------
def state_file(run_dir: Path) -> Path:
    return Path(run_dir) / STATE_FILE


def load(run_dir: Path) -> dict:
    """The state in force ({} when nothing was ever deployed)."""
    return read(state_file(run_dir))


def read(path: Path) -> dict:
    """The state `path` holds ({} when there is no such file)."""
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as err:
        raise VersionsError(f"{path} is not valid JSON ({err}): restore it or remove it") \
            from None
    if not isinstance(state, dict):
        raise VersionsError(f"{path} does not hold an object per model")
    return state


def model(state: dict, name: str) -> dict:
    if name not in state:
        known = ", ".join(sorted(state)) or "none"
        raise VersionsError(f"no versions of {name} are recorded (models: {known}); "
                            f"kiln deploy {name} first")
    return state[name]


def version(state: dict, name: str, v: str) -> dict:
    entry = model(state, name)
    if v not in entry["versions"]:
        known = ", ".join(sorted(entry["versions"]))
        raise VersionsError(f"{name} has no version {v} (versions: {known})")
    return entry["versions"][v]


def route(state: dict, name: str) -> Route:
    entry = model(state, name)
    return Route(entry["default"], entry.get("route"), dict(entry.get("shadows", {})))


# -- writing ------------------------------------------------------------------------------------
@contextlib.contextmanager
def transaction(run_dir: Path) -> Iterator[dict]:
    """The state to change in place inside the block; written atomically when the block ends
    without an exception (a VersionsError inside it changes nothing). Raises Busy when
    another admin action holds the lock."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy() from None
        before = load(run_dir)
        state = copy.deepcopy(before)
        yield state
        if state != before:
            write(run_dir, state)
    finally:
        os.close(fd)  # releases the lock


def write(run_dir: Path, state: dict) -> None:
    """versions.json replaced whole: temporary file, fsync, rename, fsync of the folder.
    Call it inside a transaction."""
    path = state_file(run_dir)
    tmp = path.with_name(f".{STATE_FILE}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a power cut
    finally:
        os.close(folder)


# -- changes (each on a state inside a transaction; each checks before it changes) ------------
def check_version_name(v: str) -> str:
    if not VERSION_PATTERN.fullmatch(v):
        raise VersionsError(f"version {v!r}: letters, digits, '.' and '_' only (say 2.0)")
    return v


def add(state: dict, name: str, v: str, archive: str, digest: str) -> None:
    """Record version `v` as warming (the model's default if it is its first). The same
    version again is allowed only with the same weights: a version is immutable."""
    check_version_name(v)
    entry = state.get(name)
    if entry is not None and v in entry["versions"]:
        known = entry["versions"][v]["digest"]
        if known != digest:
            raise VersionsError(f"{name} {v} is already served with other weights (digest "
                                f"{known[:12]}, these are {digest[:12]}): deploy them as "
                                f"another version")
    if entry is None:
        entry = state[name] = {"versions": {}, "default": v, "previous": None, "route": None,
                               "shadows": {}}
    entry["versions"][v] = {"archive": archive, "digest": digest, "state": WARMING}


def mark_ready(state: dict, name: str, v: str) -> None:
    version(state, name, v)["state"] = READY


def promote(state: dict, name: str, v: str) -> None:
    """`v` becomes the default; the default it replaces is remembered for a rollback. A route
    is dropped: unpinned requests all go to the new default."""
    _check_ready(state, name, v)
    entry = state[name]
    if entry["default"] == v:
        raise VersionsError(f"{name} {v} is already the default")
    entry["previous"], entry["default"], entry["route"] = entry["default"], v, None
    entry["shadows"].pop(v, None)


def rollback(state: dict, name: str) -> None:
    """Back to the previous default (which becomes the previous one in turn)."""
    previous = model(state, name)["previous"]
    if previous is None:
        raise VersionsError(f"{name} has no previous default to roll back to")
    promote(state, name, previous)


def retire(state: dict, name: str, v: str) -> None:
    """Forget `v`: never the default nor the last version."""
    version(state, name, v)
    entry = state[name]
    if len(entry["versions"]) == 1:
        raise VersionsError(f"{name} {v} is its last version: it cannot be retired")
    if entry["default"] == v:
        raise VersionsError(f"{name} {v} is the default: promote another version first")
    if entry["route"] and entry["route"].get(v):
        raise VersionsError(f"{name}'s route sends traffic to {v}: route it away first")
    del entry["versions"][v]
    if entry["previous"] == v:
        entry["previous"] = None
    if entry["route"]:
        entry["route"].pop(v, None)
    entry["shadows"].pop(v, None)


def set_route(state: dict, name: str, weights: dict[str, float] | None) -> None:
    """Weights in percent over ready versions, adding up to 100; None: all to the default."""
    model(state, name)
    if weights is not None:
        for v, w in weights.items():
            _check_ready(state, name, v)
            if not (math.isfinite(w) and w >= 0):
                raise VersionsError(f"{name} {v}: weight {w} must be a number >= 0")
        total = sum(weights.values())
        if not math.isclose(total, WEIGHTS_TOTAL, abs_tol=1e-6):
            raise VersionsError(f"{name}'s weights add up to {total:g}, not 100")
    state[name]["route"] = dict(weights) if weights is not None else None


def set_shadow(state: dict, name: str, v: str, fraction: float) -> None:
    """`v` also scores this fraction of the unpinned requests routed elsewhere; 0 ends it."""
    _check_ready(state, name, v)
    if not (math.isfinite(fraction) and 0 <= fraction <= 1):
        raise VersionsError(f"{name} {v}: shadow fraction {fraction} must be within 0 and 1")
    if fraction == 0:
        state[name]["shadows"].pop(v, None)
    else:
        state[name]["shadows"][v] = fraction


def _check_ready(state: dict, name: str, v: str) -> None:
    if version(state, name, v)["state"] != READY:
        raise VersionsError(f"{name} {v} is not ready yet (its workers are warming)")
