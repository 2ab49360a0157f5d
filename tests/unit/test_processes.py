"""A process that has exited counts as exited while it waits to be reaped: Kiln's detached
processes are reaped by init, late or (a container's PID 1 that is no init) never."""

import subprocess
import sys

import psutil

from kiln.deploy import processes

# A parent that starts a child and never reaps it, as a lazy init does.
LAZY_PARENT = ("import subprocess, sys, time\n"
               "child = subprocess.Popen([sys.executable, '-c', 'pass'])\n"
               "print(child.pid, flush=True)\n"
               "time.sleep(600)\n")


def test_an_unreaped_zombie_has_exited_and_a_running_process_has_not():
    parent = subprocess.Popen([sys.executable, "-c", LAZY_PARENT], stdout=subprocess.PIPE,
                              text=True)
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        assert processes.wait_exited([child], timeout=60) == []
        assert child.status() == psutil.STATUS_ZOMBIE  # not ours to reap: still there
        assert processes.exited(child)
        running = psutil.Process(parent.pid)
        assert not processes.exited(running)
        assert processes.wait_exited([running], timeout=0) == [running]
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()


def test_a_child_of_ours_that_exited_is_reaped():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    proc = psutil.Process(child.pid)
    assert processes.wait_exited([proc], timeout=60) == []
    assert not psutil.pid_exists(child.pid)
