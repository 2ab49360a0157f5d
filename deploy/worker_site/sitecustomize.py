"""Put on PYTHONPATH of TorchServe's processes by kiln serve (deploy/server.py): in a model
worker, `torch` is imported on first use rather than at start.

TorchServe's worker imports torch in its protocol module only to ask whether an answer is a
tensor, which a Kiln answer (JSON text) never is; an ONNX Runtime worker has no other use
for it. Importing it cost each worker about 1 s of CPU at start and 180 MiB of RSS (140 MiB
of PSS: loadtests/studies/memory.py --eager-torch). The stand-in below imports the real torch the
first time anything reads an attribute of it (a TorchScript model, a handler of someone
else's), so nothing that uses torch sees a difference.
"""

import importlib
import importlib.util
import sys
import types

WORKER_SCRIPT = "model_service_worker.py"


class DeferredModule(types.ModuleType):
    """A module in sys.modules that imports the real one on first attribute read."""

    def __getattr__(self, name):
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), name)


def defer(name):
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None:
        return
    module = DeferredModule(name)
    module.__spec__ = spec  # find_spec(name) keeps working; the real import replaces it
    sys.modules[name] = module


if sys.argv and sys.argv[0].endswith(WORKER_SCRIPT):
    defer("torch")
