"""Signatures and tiny fixed-weight models, exported the way `kiln export` exports."""

import io
import json
import warnings

import numpy as np
import pytest
from PIL import Image

MEASURES = [
    "radius", "texture", "perimeter", "area", "smoothness",
    "compactness", "concavity", "concave points", "symmetry", "fractal dimension",
]  # fmt: skip
# The 30 breast-cancer feature names, in scikit-learn's order.
FEATURE_NAMES = (
    [f"mean {m}" for m in MEASURES] + [f"{m} error" for m in MEASURES]
    + [f"worst {m}" for m in MEASURES]
)  # fmt: skip


def image_signature_dict(pad=2):
    side = 28 + 2 * pad
    return {
        "signature_version": 2,
        "name": "tinydigits",
        "inputs": [{"name": "input", "kind": "image", "dtype": "float32",
                    "shape": [-1, 1, side, side], "channels": 1, "size": [28, 28],
                    "resize": "mnist", "pad": pad, "pixel_max": 255,
                    "mean": [0.1307], "std": [0.3081]}],
        "output": {"name": "probabilities", "dtype": "float32", "shape": [-1, 10],
                   "kind": "multiclass", "labels": [str(d) for d in range(10)], "top_k": 3},
    }  # fmt: skip


def features_signature_dict():
    return {
        "signature_version": 2,
        "name": "tinycancer",
        "inputs": [{"name": "input", "kind": "features", "dtype": "float32", "shape": [-1, 30],
                    "names": list(FEATURE_NAMES),
                    "mean": [float(i) for i in range(30)],
                    "std": [1.0 + 0.5 * i for i in range(30)]}],
        "output": {"name": "probabilities", "dtype": "float32", "shape": [-1, 1],
                   "kind": "binary", "labels": ["malignant", "benign"], "threshold": 0.5},
    }  # fmt: skip


@pytest.fixture
def image_signature():
    return image_signature_dict()


@pytest.fixture
def features_signature():
    return features_signature_dict()


@pytest.fixture
def feature_row(features_signature):
    """Feature i is 2i + 1; with mean i and std 1 + 0.5i it standardises to (i + 1)/(1 + 0.5i)."""
    names = features_signature["inputs"][0]["names"]
    return {name: 2.0 * i + 1.0 for i, name in enumerate(names)}


@pytest.fixture
def light_square_png():
    """A 28x28 light-on-dark 20x20 blob, off centre: framing must move it to rows/cols 4..23."""
    pixels = np.zeros((28, 28), dtype=np.uint8)
    pixels[1:21, 6:26] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _tiny_image_model(torch):
    linear = torch.nn.Linear(32 * 32, 10)
    with torch.no_grad():
        linear.weight.copy_(torch.sin(torch.arange(10 * 1024, dtype=torch.float32) * 0.37)
                            .reshape(10, 1024) * 0.05)
        linear.bias.copy_(torch.linspace(-0.5, 0.5, 10))
    return torch.nn.Sequential(torch.nn.Flatten(), linear, torch.nn.Softmax(dim=1)).eval()


def _tiny_features_model(torch):
    linear = torch.nn.Linear(30, 1)
    with torch.no_grad():
        linear.weight.copy_(torch.linspace(-1.0, 1.0, 30).reshape(1, 30) * 0.5)
        linear.bias.fill_(0.1)
    return torch.nn.Sequential(linear, torch.nn.Sigmoid()).eval()


def _export_model_dir(directory, model, example, signature):
    """Writes model.onnx, model.pt and signature.json, as an archive's model folder holds."""
    import torch

    directory.mkdir()
    with warnings.catch_warnings():
        # torch.export's own deprecation noise (LeafSpec), not something these tests can fix.
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            model,
            (example,),
            str(directory / "model.onnx"),
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            input_names=["input"],
            output_names=["probabilities"],
            external_data=False,
            verbose=False,
        )
    torch.jit.script(model).save(str(directory / "model.pt"))
    (directory / "signature.json").write_text(json.dumps(signature))
    return directory


@pytest.fixture(scope="session")
def image_model_dir(tmp_path_factory):
    import torch

    model = _tiny_image_model(torch)
    return _export_model_dir(
        tmp_path_factory.mktemp("models") / "tinydigits",
        model,
        torch.zeros(2, 1, 32, 32),
        image_signature_dict(),
    )


@pytest.fixture(scope="session")
def features_model_dir(tmp_path_factory):
    import torch

    model = _tiny_features_model(torch)
    return _export_model_dir(
        tmp_path_factory.mktemp("models") / "tinycancer",
        model,
        torch.zeros(2, 30),
        features_signature_dict(),
    )
