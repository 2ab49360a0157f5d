"""`kiln keys`: list, show, rotate or revoke the keys clients send, or (--admin) the admin keys."""

from __future__ import annotations

import logging
from pathlib import Path

from kiln.deploy import front
from kiln.deploy.server import Server, ServerSettings
from kiln.keys import ADMIN_KEYS_FILE, KEYS_FILE, SHOWN_CHARS, private_dir

log = logging.getLogger("kiln")


def cmd_keys(args) -> int:
    """List, show, rotate or revoke the front proxy's keys, whose running front takes a change
    at once; or (--admin) the admin keys, which the admin service reads at each change. A key
    is printed whole only by `show`."""
    import time

    path = args.run_dir / (ADMIN_KEYS_FILE if args.admin else KEYS_FILE)
    run = front.Front(args.run_dir.resolve() / "nginx", path)
    now = time.time()
    try:
        keys = front.read_keys(path) if path.exists() else []
        if args.action in ("rotate", "revoke"):
            keys = (front.rotate(keys, now, args.overlap, args.lifetime)
                    if args.action == "rotate" else revoke(keys, args.key, now))
            taken = _write_admin(args.run_dir, path, keys) if args.admin \
                else _rotate(args.run_dir, run, keys)
    except (OSError, ValueError, front.FrontError) as err:
        log.error("%s", err)
        return 1
    newest = front.current(keys, now)
    if newest is None:
        log.error("no valid key in %s: kiln serve makes the first one", path)
        return 1
    if args.action == "show":
        print(newest.value)
        return 0
    for key in keys:
        state = ("in use" if key is newest else
                 "expired" if not key.valid_at(now) else
                 "ends in %.0f s" % (key.expires - now) if key.expires else "valid")
        if key.expires and key.valid_at(now) and key is newest:
            state += ", ends in %.0f s" % (key.expires - now)
        print(f"{key.value[:SHOWN_CHARS]}...  {state}")
    if args.action == "revoke":
        print(f"revoked: {args.key[:SHOWN_CHARS]}... is refused from now on")
    if args.action == "rotate":
        shows = "kiln keys --admin show" if args.admin else "kiln keys show"
        print(f"rotated: the new key is last ({shows} prints it); the others end in "
              f"{args.overlap:g} s" + ("" if taken else " (no server runs: kiln serve reads it)"))
    return 0


def revoke(keys: list, given: str | None, now: float) -> list:
    """`keys` less the one `given` names (whole, or its start as `list` shows it); raises
    unless exactly one does, or when no valid key would be left."""
    if not given or len(given) < SHOWN_CHARS:
        raise ValueError(f"revoke needs the key, or its first {SHOWN_CHARS} characters or "
                         f"more as kiln keys list shows them")
    named = [k for k in keys if k.value.startswith(given)]
    if len(named) != 1:
        raise ValueError(f"{len(named) or 'no'} keys start with {given[:SHOWN_CHARS]}...: "
                         f"give more of it")
    left = [k for k in keys if k is not named[0]]
    if not any(k.valid_at(now) for k in left):
        raise ValueError("that is the last valid key: rotate first (kiln keys rotate "
                         "--overlap 0 ends every other key now)")
    return left


def _write_admin(run_dir: Path, path: Path, keys: list) -> bool:
    """The admin keys written: a running admin service reads them at its next request."""
    private_dir(run_dir)
    front.write_keys(path, keys)
    return True


def _rotate(run_dir: Path, run: front.Front, keys: list) -> bool:
    """The rotated keys to the front that runs (True), or to the file alone when no server
    runs from `run_dir` (False). Raises, writing nothing, when a server runs but no front
    proxy of it can take them: nginx would go on with the old keys."""
    if run.wait_master(timeout=5) is not None or run.processes():
        run.apply(keys)  # raises when only a master's orphaned workers are left
        return True
    if Server(ServerSettings(run_dir, Path(), [])).pid() is not None:
        raise front.FrontError(f"TorchServe runs from {run_dir} but its front proxy does not: "
                               f"kiln serve starts it, with the keys of {run.keys_file}")
    private_dir(run_dir)  # kiln serve's run folder, made as serve makes it
    front.write_keys(run.keys_file, keys)
    return False
