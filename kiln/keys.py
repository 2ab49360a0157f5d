"""Kiln's client keys: the keys file that the front proxy checks and clients read.

One key per line, `KEY [expires=2026-12-02T10:00:00Z]`, blank lines and # comments ignored,
the newest last. A key never ends unless a rotation (or its operator) gives it an end. Pure
Python with no Kiln import: clients (kiln.client) and the deploy layer share it.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

KEYS_FILE = "keys"  # in kiln serve's run folder
# Beside it, the admin keys (deploy/admin_service.py): the same format, never an inference key.
ADMIN_KEYS_FILE = "admin_keys"
# What `kiln keys list` shows of a key, `revoke` takes at the least, and the admin audit log
# records: enough to tell keys apart, far too little to guess one (6 of 43 characters).
SHOWN_CHARS = 6
KEY_BYTES = 32  # a key Kiln makes: 256 random bits, base64url (43 characters)
MIN_KEY_LENGTH = 22  # a key it accepts: 128 bits of base64 randomness or more
# Characters a key may hold: base64, base64url and hex keys all fit, and none needs quoting.
KEY_CHARS = re.compile(r"[A-Za-z0-9._~+/=-]+")
# How long the keys a rotation replaces keep working, unless told otherwise.
DEFAULT_OVERLAP_S = 3600


class KeysError(ValueError):
    pass


@dataclass(frozen=True)
class Key:
    value: str
    expires: float | None = None  # seconds since the epoch; None: until a rotation

    def valid_at(self, now: float) -> bool:
        return self.expires is None or now < self.expires

    def line(self) -> str:
        if self.expires is None:
            return self.value
        end = dt.datetime.fromtimestamp(math.ceil(self.expires), dt.UTC)
        return f"{self.value} expires={end.strftime('%Y-%m-%dT%H:%M:%SZ')}"


def new_key() -> str:
    """KEY_BYTES random bytes, base64url, never starting with "-": a command line takes such a
    word for an option (`kiln keys revoke KEY` refused one key in 64). Drawn again then, which
    leaves 255.98 of the 256 bits."""
    while True:
        key = secrets.token_urlsafe(KEY_BYTES)
        if not key.startswith("-"):
            return key


def parse_keys(text: str, source: str = "the keys file", now: float | None = None) -> list[Key]:
    """The keys of a keys file: `KEY [expires=2026-12-02T10:00:00Z]` per line, blank lines and
    # comments ignored, the first of a repeated key kept. Raises when no key is valid now."""
    now = time.time() if now is None else now
    keys: dict[str, Key] = {}
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        where = f"{source}, line {number}"
        value, rest = words[0], words[1:]
        if not KEY_CHARS.fullmatch(value):
            raise KeysError(f"{where}: a key may hold only letters, digits and ._~+/=- "
                            f"(base64, base64url or hex)")
        if len(value) < MIN_KEY_LENGTH:
            raise KeysError(f"{where}: a key of {len(value)} characters is too short; use "
                            f"{MIN_KEY_LENGTH} or more (e.g. openssl rand -base64 24)")
        expires = None
        if rest:
            if len(rest) > 1 or not rest[0].startswith("expires="):
                raise KeysError(f"{where}: after the key only expires=<UTC time> may follow")
            expires = _parse_time(rest[0].removeprefix("expires="), where)
        keys.setdefault(value, Key(value, expires))
    if not keys:
        raise KeysError(f"{source} holds no key: every request would be refused")
    if not any(k.valid_at(now) for k in keys.values()):
        raise KeysError(f"every key in {source} has expired: every request would be refused")
    return list(keys.values())


def _parse_time(text: str, where: str) -> float:
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise KeysError(f"{where}: expires={text} is not a time such as 2026-12-02T10:00:00Z")\
            from None
    if moment.tzinfo is None:
        raise KeysError(f"{where}: expires={text} has no time zone: end it with Z (UTC)")
    return moment.timestamp()


def format_keys(keys: list[Key]) -> str:
    return ("# Kiln's keys: clients send 'Authorization: Bearer KEY'. The newest is last;\n"
            "# `kiln keys rotate` adds one and ends the others after an overlap.\n"
            + "".join(f"{k.line()}\n" for k in keys))


def rotate(keys: list[Key], now: float, overlap_s: float,
           lifetime_s: float | None = None) -> list[Key]:
    """The keys after a rotation: the valid ones, each ending `overlap_s` from now at the latest,
    and a new one last (ending `lifetime_s` from now, or never)."""
    if overlap_s < 0 or (lifetime_s is not None and lifetime_s <= overlap_s):
        raise ValueError("the overlap must be >= 0 and a key's lifetime longer than it")
    # Whole seconds, rounded up: what the file says and what nginx enforces (it compares the
    # request's time in seconds) is then the same moment, never earlier than asked for.
    ends = math.ceil(now + overlap_s)
    kept = [Key(k.value, ends if k.expires is None else min(k.expires, ends))
            for k in keys if k.valid_at(now)]
    return [*kept, Key(new_key(), None if lifetime_s is None else math.ceil(now + lifetime_s))]


def current(keys: list[Key], now: float | None = None) -> Key | None:
    """The key a client should use: the newest valid one."""
    now = time.time() if now is None else now
    valid = [k for k in keys if k.valid_at(now)]
    return valid[-1] if valid else None


def read_keys(path: Path) -> list[Key]:
    return parse_keys(path.read_text(), str(path))


def write_keys(path: Path, keys: list[Key]) -> None:
    write_private(path, format_keys(keys))


def write_private(path: Path, text: str) -> None:
    """Atomically (a half-written file is never read) and readable by its owner only: for
    anything that holds a key or a token, or is derived from one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # O_CREAT keeps the mode of a file that exists
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    tmp.replace(path)


def private_dir(path: Path) -> Path:
    """`path` as a folder only its owner may enter (made, or its mode narrowed)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


class KeyFile:
    """The newest valid key of a keys file, read again whenever the file changes: a client
    that holds one keeps working across rotations (kiln.client.Client takes it as its token)."""

    def __init__(self, path: Path):
        self.path = path
        self._seen: tuple[int, int] | None = None
        self._keys: list[Key] = []

    def __call__(self) -> str | None:
        try:
            stat = self.path.stat()
            if (stat.st_mtime_ns, stat.st_size) != self._seen:
                self._keys = read_keys(self.path)
                self._seen = (stat.st_mtime_ns, stat.st_size)
        except (OSError, ValueError):
            return None
        key = current(self._keys)
        return key.value if key else None
