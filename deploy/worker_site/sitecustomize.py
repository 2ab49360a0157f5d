"""Put on PYTHONPATH of TorchServe's processes by kiln serve (deploy/server.py): in a model
worker, `torch` is imported on first use rather than at start.

TorchServe's worker imports torch in its protocol module only to ask whether an answer is a
tensor, which a Kiln answer (JSON text) never is; an ONNX Runtime worker has no other use
for it. Importing it cost each worker about 1 s of CPU at start and 180 MiB of RSS (140 MiB
of PSS: loadtests/studies/memory.py --eager-torch). The stand-in below imports the real torch the
first time anything reads an attribute of it (a TorchScript model, a handler of someone
else's), so nothing that uses torch sees a difference.

The worker also reads the frontend's frames through a buffer (BufferedFrames): TorchServe's
protocol module calls recv() once per field, four times for each header of each request of a
batch, and logs a line per batch that nobody reads (Kiln's log4j2.xml drops it).
"""

import importlib
import importlib.util
import logging
import struct
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


class BufferedFrames:
    """What TorchServe 0.12's worker reads of its one socket to the frontend, recv()'d as far
    as the socket has bytes and handed out field by field from memory.

    Stock `_retrieve_buffer` asks recv() for exactly the next field, so a batch of 8 requests
    with 8 headers each costs about 300 system calls; here it costs one or two. Fields keep
    their stock types (bytearray), and every parser of the stock module stays as it is: only
    its two readers of the socket and `retrieve_msg` are replaced (install). The socket has
    no other reader (the worker's loop, or AsyncService's one thread), so bytes read ahead
    belong to the next frame and wait here for it.
    """

    CHUNK = 1 << 16
    INT = struct.Struct("!i")

    def __init__(self, protocol):
        self.protocol = protocol
        self.conn = None
        self.data = bytearray()
        self.pos = 0

    def _fill(self, conn, length: int) -> None:
        """Until `length` bytes past `pos` are held; exits as stock does when the frontend
        has closed the socket."""
        if conn is not self.conn:  # a new connection: nothing read ahead belongs to it
            self.conn, self.data, self.pos = conn, bytearray(), 0
        while len(self.data) - self.pos < length:
            if self.pos:
                del self.data[:self.pos]
                self.pos = 0
            chunk = conn.recv(max(self.CHUNK, length - len(self.data)))
            if not chunk:
                logging.info("Frontend disconnected.")
                sys.exit(0)
            self.data += chunk

    def buffer(self, conn, length: int) -> bytearray:
        self._fill(conn, length)
        start, self.pos = self.pos, self.pos + length
        return self.data[start:self.pos]

    def int(self, conn) -> int:
        self._fill(conn, 4)
        (value,) = self.INT.unpack_from(self.data, self.pos)
        self.pos += 4
        return value

    def message(self, conn):
        """Stock retrieve_msg, without its per-batch "Backend received inference" line."""
        p = self.protocol
        cmd = self.buffer(conn, 1)
        if cmd == p.LOAD_MSG:
            return cmd, p._retrieve_load_msg(conn)
        if cmd == p.PREDICT_MSG:
            return cmd, p._retrieve_inference_msg(conn)
        raise ValueError(f"Invalid command: {cmd}")

    def install(self) -> None:
        """Before the worker script imports `retrieve_msg` from the module by name."""
        self.protocol._retrieve_buffer = self.buffer
        self.protocol._retrieve_int = self.int
        self.protocol.retrieve_msg = self.message


if sys.argv and sys.argv[0].endswith(WORKER_SCRIPT):
    defer("torch")
    try:
        import ts.protocol.otf_message_handler as _protocol
    except ImportError:  # not TorchServe's worker after all: nothing to speed up
        pass
    else:
        BufferedFrames(_protocol).install()
