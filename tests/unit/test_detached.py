import os
import sys

import pytest

from kiln.deploy.detached import Detached

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)", "kiln-test-sleeper"]


class Refused(RuntimeError):
    pass


@pytest.fixture
def sleeper(tmp_path):
    process = Detached("the sleeper", tmp_path / "s.pid", tmp_path / "s.log",
                       "kiln-test-sleeper", Refused)
    try:
        yield process
    finally:
        process.stop(1)


def test_started_it_is_found_by_its_pid_file_and_stopped(sleeper):
    sleeper.start(SLEEPER, ready=lambda: True, timeout=10)
    pid = sleeper.pid()
    assert sleeper.pid_file.read_text() == f"{pid}\n"
    assert sleeper.stop(5) is True
    assert sleeper.pid() is None and not sleeper.pid_file.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert sleeper.stop(5) is False


def test_one_never_ready_is_stopped_and_the_error_says_so(sleeper):
    with pytest.raises(Refused, match="^the sleeper did not start within 0.3 s:\n"):
        sleeper.start(SLEEPER, ready=lambda: False, timeout=0.3)
    assert sleeper.pid() is None and not sleeper.pid_file.exists()


def test_one_that_exits_at_once_says_its_status_and_its_log(sleeper):
    command = [sys.executable, "-c", "import sys; sys.exit('port taken')"]
    with pytest.raises(Refused, match="^the sleeper exited with status 1:\n.*port taken"):
        sleeper.start(command, ready=lambda: False, timeout=10)


def test_a_pid_file_naming_another_process_names_none(sleeper):
    sleeper.pid_file.write_text(f"{os.getpid()}\n")
    assert sleeper.pid() is None
