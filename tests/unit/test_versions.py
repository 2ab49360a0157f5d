"""deploy/versions.py: the run folder's versions.json, its lock, its atomic writes and the
checks that refuse a bad admin action without changing anything."""

import json
import stat
import subprocess
import sys
import textwrap
import zipfile

import pytest

from kiln.cli.main import main
from kiln.deploy import lifecycle, versions
from kiln.deploy.versions import Route, VersionsError

D1, D2 = "a" * 64, "b" * 64


def deployed(run, *ready):
    """lenet 1.0 (default) and 2.0, both ready unless `ready` names the ready ones."""
    with versions.transaction(run) as state:
        versions.add(state, "lenet", "1.0", "lenet.mar", D1)
        versions.add(state, "lenet", "2.0", "lenet-2.0.mar", D2)
        for v in ready or ("1.0", "2.0"):
            versions.mark_ready(state, "lenet", v)
    return versions.load(run)


def refused(run, change, message):
    """`change` inside a transaction is refused with `message` and leaves the file as it was."""
    before = versions.state_file(run).read_bytes()
    with pytest.raises(VersionsError, match=message), versions.transaction(run) as state:
        change(state)
    assert versions.state_file(run).read_bytes() == before


def test_nothing_deployed_is_an_empty_state(tmp_path):
    assert versions.load(tmp_path) == {}


def test_first_version_is_the_default_and_the_file_is_owner_only(tmp_path):
    state = deployed(tmp_path)
    assert state == {"lenet": {
        "versions": {"1.0": {"archive": "lenet.mar", "digest": D1, "state": "ready"},
                     "2.0": {"archive": "lenet-2.0.mar", "digest": D2, "state": "ready"}},
        "default": "1.0", "previous": None, "route": None, "shadows": {}}}
    assert versions.route(state, "lenet") == Route("1.0", None, {})
    for name in (versions.STATE_FILE, versions.LOCK_FILE):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600


def test_promote_remembers_the_previous_default_and_rollback_returns_to_it(tmp_path):
    deployed(tmp_path)
    with versions.transaction(tmp_path) as state:
        versions.promote(state, "lenet", "2.0")
    state = versions.load(tmp_path)
    assert (state["lenet"]["default"], state["lenet"]["previous"]) == ("2.0", "1.0")
    with versions.transaction(tmp_path) as state:
        versions.rollback(state, "lenet")
    state = versions.load(tmp_path)
    assert (state["lenet"]["default"], state["lenet"]["previous"]) == ("1.0", "2.0")


def test_retire_forgets_the_version_and_the_previous_default(tmp_path):
    deployed(tmp_path)
    with versions.transaction(tmp_path) as state:
        versions.promote(state, "lenet", "2.0")
        versions.retire(state, "lenet", "1.0")
    entry = versions.load(tmp_path)["lenet"]
    assert (sorted(entry["versions"]), entry["default"], entry["previous"]) == (["2.0"], "2.0",
                                                                                 None)


@pytest.mark.parametrize("change, message", [
    (lambda s: versions.promote(s, "mnist", "2.0"), "no versions of mnist are recorded"),
    (lambda s: versions.promote(s, "lenet", "3.0"), r"lenet has no version 3.0 \(versions: "
                                                    r"1.0, 2.0\)"),
    (lambda s: versions.retire(s, "lenet", "1.0"), "lenet 1.0 is the default"),
    (lambda s: versions.rollback(s, "lenet"), "lenet has no previous default"),
    (lambda s: versions.add(s, "lenet", "2.0", "lenet-2.0.mar", "c" * 64),
     "lenet 2.0 is already served with other weights"),
    (lambda s: versions.add(s, "lenet", "2/0", "x.mar", D2), "version '2/0'"),
    (lambda s: versions.set_route(s, "lenet", {"1.0": 90, "2.0": 20}),
     "lenet's weights add up to 110, not 100"),
    (lambda s: versions.set_route(s, "lenet", {"1.0": 110, "2.0": -10}), "weight -10"),
    (lambda s: versions.set_route(s, "lenet", {"1.0": 50, "3.0": 50}), "no version 3.0"),
    (lambda s: versions.set_shadow(s, "lenet", "2.0", 1.5), "shadow fraction 1.5"),
])
def test_a_bad_action_changes_nothing(tmp_path, change, message):
    deployed(tmp_path)
    refused(tmp_path, change, message)


def test_the_last_version_cannot_be_retired(tmp_path):
    with versions.transaction(tmp_path) as state:
        versions.add(state, "lenet", "1.0", "lenet.mar", D1)
    refused(tmp_path, lambda s: versions.retire(s, "lenet", "1.0"), "its last version")


def test_a_warming_version_takes_no_traffic(tmp_path):
    deployed(tmp_path, "1.0")
    refused(tmp_path, lambda s: versions.set_route(s, "lenet", {"1.0": 50, "2.0": 50}),
            "lenet 2.0 is not ready yet")
    refused(tmp_path, lambda s: versions.promote(s, "lenet", "2.0"), "not ready yet")


def test_route_and_shadows_are_read_back(tmp_path):
    deployed(tmp_path)
    with versions.transaction(tmp_path) as state:
        versions.set_route(state, "lenet", {"1.0": 90, "2.0": 10})
        versions.set_shadow(state, "lenet", "2.0", 0.2)
    assert versions.route(versions.load(tmp_path), "lenet") == Route(
        "1.0", {"1.0": 90, "2.0": 10}, {"2.0": 0.2})
    # Traffic cannot be routed to a version that is about to be gone.
    refused(tmp_path, lambda s: versions.retire(s, "lenet", "2.0"), "route sends traffic")


CHILD = textwrap.dedent("""
    import sys
    from kiln.deploy import versions
    try:
        with versions.transaction(sys.argv[1]) as state:
            versions.promote(state, "lenet", "2.0")
    except versions.VersionsError as err:
        print(err)
""")


def test_a_second_admin_action_at_once_is_told_and_changes_nothing(tmp_path):
    deployed(tmp_path)
    with versions.transaction(tmp_path) as state:
        versions.retire(state, "lenet", "2.0")
        # Another process's action while this one holds the lock.
        told = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)],
                              capture_output=True, text=True, check=True).stdout
    assert told.startswith("another admin action is in progress")
    assert sorted(versions.load(tmp_path)["lenet"]["versions"]) == ["1.0"]


CRASH = textwrap.dedent("""
    import os, signal, sys
    from kiln.deploy import versions
    # Dies the hard way with the new state written to the temporary file, before the rename.
    os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
    with versions.transaction(sys.argv[1]) as state:
        versions.promote(state, "lenet", "2.0")
""")


def test_a_crash_mid_write_leaves_the_old_state_whole(tmp_path):
    before = deployed(tmp_path)
    done = subprocess.run([sys.executable, "-c", CRASH, str(tmp_path)])
    assert done.returncode == -9
    assert json.loads(versions.state_file(tmp_path).read_text()) == before
    # The lock died with the process: the next action goes through.
    with versions.transaction(tmp_path) as state:
        versions.promote(state, "lenet", "2.0")
    assert versions.load(tmp_path)["lenet"]["default"] == "2.0"


def test_an_unreadable_state_file_is_named(tmp_path):
    versions.state_file(tmp_path).write_text("{half")
    with pytest.raises(VersionsError, match="versions.json is not valid JSON"):
        versions.load(tmp_path)


def archive_with(path, signature):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("signature.json", json.dumps(signature))
    return path


def test_a_version_with_other_inputs_or_outputs_needs_the_flag(tmp_path):
    served = {"inputs": [{"name": "input", "shape": [-1, 30]}], "output": {"labels": ["a", "b"]},
              "parity": {"onnx": {}}}
    other = {**served, "output": {"labels": ["a", "b", "c"]}, "parity": {}}
    old = archive_with(tmp_path / "m.mar", served)
    new = archive_with(tmp_path / "m-2.0.mar", other)
    # Parity figures and provenance may differ: clients see inputs and outputs only.
    lifecycle.check_signature(old, archive_with(tmp_path / "m-1.1.mar", {**served,
                                                                          "parity": {}}), False)
    with pytest.raises(VersionsError, match=r"m-2.0.mar's output differ from the served "
                                            r"default's \(m.mar\)"):
        lifecycle.check_signature(old, new, False)
    lifecycle.check_signature(old, new, True)


def test_route_and_shadow_commands_write_the_state(tmp_path, capsys):
    deployed(tmp_path)
    run = ["--run-dir", str(tmp_path)]
    assert main(["route", "lenet", "1.0=90", "2.0=10", *run]) == 0
    assert main(["shadow", "lenet", "2.0", "--fraction", "0.2", *run]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "lenet: unpinned requests follow 1.0=90, 2.0=10",
        "lenet 2.0 shadows 0.2 of the routed requests"]
    assert versions.route(versions.load(tmp_path), "lenet") == Route(
        "1.0", {"1.0": 90, "2.0": 10}, {"2.0": 0.2})
    before = versions.state_file(tmp_path).read_bytes()
    for argv in (["route", "lenet", "1.0=90", "2.0=20"], ["route", "lenet", "1.0=x"],
                 ["route", "lenet", "1.0=50", "1.0=50"],
                 ["shadow", "lenet", "3.0", "--fraction", "0.1"]):
        assert main([*argv, *run]) == 1
    assert versions.state_file(tmp_path).read_bytes() == before
    assert main(["route", "lenet", *run]) == 0
    assert versions.load(tmp_path)["lenet"]["route"] is None
