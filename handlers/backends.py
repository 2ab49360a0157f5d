"""Run an exported Kiln model: ONNX Runtime (the default export) or TorchScript.

A backend takes the model inputs (one array per signature input, in forward() order, batch
first) and returns the float32 output shaped like output.shape. onnxruntime and torch are
imported by the backend that needs them, when it is built, never at module import.
"""

import logging
import os
from abc import ABC, abstractmethod

import numpy as np

logger = logging.getLogger(__name__)

ONNX_SUFFIXES = (".onnx",)
TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".torchscript")
# The file each export form is written to in a model's artifacts folder: export writes them,
# archives and batch jobs pick one by the form's name (torch-free, so a batch job needs none).
EXPORT_FILES = {"onnx": "model.onnx", "torchscript": "model.ts"}


class Backend(ABC):
    """A loaded model. `description` says what it really runs on, for the logs."""

    description = ""

    @abstractmethod
    def run(self, model_inputs) -> np.ndarray:
        """One array per input (or one bare array) in, float32 output rows out, one per
        input row."""


class OnnxRuntimeBackend(Backend):
    """An InferenceSession built once; CUDA when a GPU is assigned and the build has it."""

    def __init__(self, path, gpu_id=None, intra_op_threads=1, require_gpu=False,
                 input_names=None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        # TorchServe scales with workers, one process each: a worker that also spreads one
        # small request over every core only fights its siblings for them.
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning intra-op threads burn a core each while the worker waits for requests.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")

        want_cuda = gpu_id is not None
        providers = ["CPUExecutionProvider"]
        if want_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(gpu_id)}))
        self.session = ort.InferenceSession(path, sess_options=options, providers=providers)

        # onnxruntime-gpu falls back to CPU with only a warning (missing CUDA or cuDNN
        # libraries): believe the session, not the request.
        self.providers = self.session.get_providers()
        on_gpu = "CUDAExecutionProvider" in self.providers
        _check_gpu(want_cuda, on_gpu, gpu_id, require_gpu, f"onnxruntime has {self.providers}")

        self.input_names = [i.name for i in self.session.get_inputs()]
        _check_input_names(self.input_names, input_names, path)
        self.output_name = self.session.get_outputs()[0].name
        device = f"CUDA device {gpu_id}" if on_gpu else "CPU"
        self.description = (
            f"onnxruntime {ort.__version__} on {device}, providers {self.providers}, "
            f"{intra_op_threads} intra-op thread(s)"
        )

    def run(self, model_inputs):
        arrays = _as_list(model_inputs, len(self.input_names))
        feed = {name: np.ascontiguousarray(x)
                for name, x in zip(self.input_names, arrays, strict=True)}
        (output,) = self.session.run([self.output_name], feed)
        return np.asarray(output, dtype=np.float32)


class TorchScriptBackend(Backend):
    """A TorchScript module on cuda:gpu_id when torch sees CUDA, else on the CPU."""

    def __init__(self, path, gpu_id=None, intra_op_threads=1, require_gpu=False,
                 input_names=None):
        import torch

        want_cuda = gpu_id is not None
        on_gpu = want_cuda and torch.cuda.is_available()
        _check_gpu(want_cuda, on_gpu, gpu_id, require_gpu, "torch.cuda.is_available() is False")
        # Process-wide, which is acceptable only because a TorchServe worker serves one
        # model; it is called from the handler's initialize(), never at import.
        torch.set_num_threads(intra_op_threads)
        self._torch = torch
        self.device = torch.device(f"cuda:{gpu_id}" if on_gpu else "cpu")
        self.module = torch.jit.load(path, map_location=self.device).eval()
        self.description = (
            f"torch {torch.__version__} TorchScript on {self.device}, "
            f"{intra_op_threads} intra-op thread(s)"
        )

    def run(self, model_inputs):
        torch = self._torch
        arrays = model_inputs if isinstance(model_inputs, (list, tuple)) else [model_inputs]
        xs = [torch.from_numpy(np.ascontiguousarray(x)).to(self.device) for x in arrays]
        with torch.inference_mode():
            output = self.module(*xs)  # positional, in the signature's order
        return output.cpu().numpy().astype(np.float32, copy=False)


def _as_list(model_inputs, expected):
    arrays = model_inputs if isinstance(model_inputs, (list, tuple)) else [model_inputs]
    if len(arrays) != expected:
        raise ValueError(f"the model takes {expected} inputs, got {len(arrays)}")
    return arrays


def _check_input_names(actual, expected, path):
    """The graph's inputs must be the signature's, in order: that is how they are fed."""
    if expected is not None and list(expected) != list(actual):
        raise ValueError(f"{os.path.basename(path)} takes inputs {actual}, its signature "
                         f"declares {list(expected)}: export the model again")


def _check_gpu(want_cuda, on_gpu, gpu_id, require_gpu, why_not):
    if require_gpu and not want_cuda:
        raise RuntimeError(
            "handler.require_gpu is true but TorchServe assigned no GPU to this worker "
            "(gpu_id is None): give the model GPUs or set require_gpu to false"
        )
    if want_cuda and not on_gpu:
        if require_gpu:
            raise RuntimeError(
                f"CUDA device {gpu_id} was requested but {why_not}, "
                "and handler.require_gpu is true"
            )
        logger.warning("CUDA device %s was requested but %s: running on CPU", gpu_id, why_not)


def load_backend(path, gpu_id=None, intra_op_threads=1, require_gpu=False, input_names=None):
    """Builds the backend that the serialized file's extension calls for. input_names (the
    signature's, in order) are checked against an ONNX graph's; TorchScript takes them by
    position."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in ONNX_SUFFIXES:
        backend_class = OnnxRuntimeBackend
    elif suffix in TORCHSCRIPT_SUFFIXES:
        backend_class = TorchScriptBackend
    else:
        raise ValueError(
            f"cannot serve {os.path.basename(path)!r}: expected a file ending in one of "
            f"{ONNX_SUFFIXES + TORCHSCRIPT_SUFFIXES}"
        )
    return backend_class(
        path, gpu_id=gpu_id, intra_op_threads=intra_op_threads, require_gpu=require_gpu,
        input_names=input_names,
    )
