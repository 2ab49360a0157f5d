"""`kiln loadtest`, `kiln bench` and `kiln tune`: measure a served model."""

from __future__ import annotations

import importlib.util
import logging
import shutil

log = logging.getLogger("kiln")


def _lacks_test_bench(command: str, *, module: str = "", program: str = "") -> bool:
    """Whether `command` lacks a part of the test bench, which `make serve` does not install:
    said in one line before any server starts, not as whatever the missing part breaks later.
    The module is looked up without importing it (locust brings gevent's monkey-patching)."""
    if module and importlib.util.find_spec(module) is None:
        missing, installed = f"the Python module {module}", "pip install 'kiln[loadtest]'"
    elif program and shutil.which(program) is None:
        missing, installed = f"the program {program}", f"apt-get install {program}"
    else:
        return False
    # In Kiln's repository make brings the whole bench; an installed Kiln has no Makefile.
    log.error("kiln %s needs %s, which is not installed: run make install-test in Kiln's "
              "repository, or %s", command, missing, installed)
    return True


def cmd_loadtest(args) -> int:
    from kiln.loadtests import run

    if _lacks_test_bench("loadtest", module="locust"):
        return run.CANNOT_RUN
    return run.run(args)


def cmd_bench(args) -> int:
    if _lacks_test_bench("bench", program="wrk"):
        return 1
    from kiln.loadtests import bench

    return bench.run(args)


def cmd_tune(args) -> int:
    if _lacks_test_bench("tune", program="wrk"):
        return 1
    from kiln.loadtests import tune

    return tune.run(args)
