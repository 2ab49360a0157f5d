"""Each model file: exactly one class, a no-argument constructor, the documented shapes."""

import pytest
import torch
from ts.utils.util import list_classes_from_module

from kiln.training import registry

NAMES = list(registry.REGISTRY)


def test_registry_names_are_the_model_files():
    files = sorted(p.stem for p in registry.MODELS_DIR.glob("*.py") if p.stem != "__init__")
    assert files == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_model_file_defines_one_class_as_torchserve_sees_it(name):
    import importlib

    module = importlib.import_module(f"kiln.training.models.{name}")
    classes = list_classes_from_module(module)
    assert len(classes) == 1
    assert issubclass(classes[0], torch.nn.Module)
    assert registry.get(name).model_class() is classes[0]


@pytest.mark.parametrize("name", NAMES)
def test_model_builds_without_arguments_and_keeps_the_batch(name):
    spec = registry.get(name)
    model = spec.model_class()().eval()
    out = model(torch.zeros(3, *spec.input_shape))
    expected = (3, 1) if spec.output_kind == "binary" else (3, 10)
    assert tuple(out.shape) == expected


def test_lenet_is_the_tutorial_architecture():
    model = registry.get("lenet").build()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "conv1.weight": (6, 1, 5, 5), "conv1.bias": (6,),
        "conv2.weight": (16, 6, 5, 5), "conv2.bias": (16,),
        "fc1.weight": (120, 400), "fc1.bias": (120,),
        "fc2.weight": (84, 120), "fc2.bias": (84,),
        "fc3.weight": (10, 84), "fc3.bias": (10,),
    }  # fmt: skip


def test_mlp_and_binary_layer_sizes():
    mlp = {k: tuple(v.shape) for k, v in registry.get("mlp").build().state_dict().items()}
    assert mlp["fc1.weight"] == (128, 784) and mlp["fc2.weight"] == (10, 128)
    binary = registry.get("binary").build()
    shapes = [tuple(v.shape) for v in binary.state_dict().values()]
    assert shapes == [(16, 30), (16,), (1, 16), (1,)]
    out = binary(torch.randn(5, 30))
    assert bool(((out > 0) & (out < 1)).all())  # a sigmoid output, not logits


def test_unknown_model_name_says_which_exist():
    with pytest.raises(SystemExit, match="known: lenet, mlp, rnn, binary"):
        registry.get("resnet")
