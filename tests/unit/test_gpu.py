"""The CUDA path, on a machine that has one; skipped with the reason elsewhere."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from kiln.handlers import backends

HAS_CUDA_ORT = "CUDAExecutionProvider" in ort.get_available_providers()
HAS_CUDA_TORCH = torch.cuda.is_available()


@pytest.mark.skipif(not HAS_CUDA_ORT, reason=(
    f"no CUDA in this onnxruntime (providers {ort.get_available_providers()}): "
    "install .[gpu] on a GPU machine"))
def test_onnx_backend_gets_cuda_on_the_assigned_device(image_model_dir):
    backend = backends.load_backend(str(image_model_dir / "model.onnx"), gpu_id=0,
                                         require_gpu=True)
    assert backend.providers[0] == "CUDAExecutionProvider"
    cpu = backends.load_backend(str(image_model_dir / "model.onnx"))
    x = np.random.default_rng(0).standard_normal((4, 1, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(backend.run(x), cpu.run(x), atol=1e-5)


@pytest.mark.skipif(not HAS_CUDA_TORCH, reason="torch sees no CUDA device on this machine")
def test_torchscript_backend_moves_to_the_assigned_device(features_model_dir):
    backend = backends.load_backend(str(features_model_dir / "model.pt"), gpu_id=0,
                                         require_gpu=True)
    assert "TorchScript on cuda:0" in backend.description
    x = np.zeros((3, 30), dtype=np.float32)
    assert backend.run(x).shape == (3, 1)
