"""A TorchServe worker started with deploy/worker_site on its PYTHONPATH imports torch on
first use only; every other process is left alone."""

import os
import subprocess
import sys

from kiln.deploy.server import WORKER_SITE

PROBE = """
import sys
import ts.protocol.otf_message_handler as protocol
print("torch at start:", "torch._C" in sys.modules)
import torch
import torch.nn
print("version:", torch.__version__.split("+")[0] == torch.version.__version__.split("+")[0])
print("tensor:", isinstance(torch.zeros(1), protocol.torch.Tensor))
print("real module:", type(sys.modules["torch"]).__name__, "torch._C" in sys.modules)
"""


def run_as(tmp_path, script_name):
    script = tmp_path / script_name
    script.write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": str(WORKER_SITE)}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_a_worker_imports_torch_on_first_use(tmp_path):
    assert run_as(tmp_path, "model_service_worker.py") == [
        "torch at start: False", "version: True", "tensor: True", "real module: module True"]


def test_any_other_process_imports_torch_as_usual(tmp_path):
    assert run_as(tmp_path, "something_else.py")[0] == "torch at start: True"
