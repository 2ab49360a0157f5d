"""`kiln keys`: list, show or rotate the keys clients send."""

from __future__ import annotations

import logging
from pathlib import Path

from kiln.deploy import front
from kiln.deploy.server import Server, ServerSettings
from kiln.keys import KEYS_FILE, private_dir

log = logging.getLogger("kiln")


def cmd_keys(args) -> int:
    """List, show or rotate the front proxy's keys; a running front takes a rotation at once.
    A key is printed whole only by `show`."""
    import time

    path = args.run_dir / KEYS_FILE
    run = front.Front(args.run_dir.resolve() / "nginx", path)
    now = time.time()
    try:
        keys = front.read_keys(path) if path.exists() else []
        if args.action == "rotate":
            keys = front.rotate(keys, now, args.overlap, args.lifetime)
            taken = _rotate(args.run_dir, run, keys)
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
        print(f"{key.value[:6]}...  {state}")
    if args.action == "rotate":
        print(f"rotated: the new key is last (kiln keys show prints it); the others end in "
              f"{args.overlap:g} s" + ("" if taken else " (no server runs: kiln serve reads it)"))
    return 0


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
