"""Kiln's model declarations: each names its class, builds, and has the documented shapes."""

import pytest
import torch

from kiln import declaration
from kiln.training import export

NAMES = declaration.names()


def test_every_builtin_model_file_has_one_declaration():
    files = sorted(p.stem for p in declaration.BUILTIN_DIR.glob("*.py") if p.stem != "__init__")
    declared = sorted(declaration.get(n).model_file.stem for n in NAMES)
    assert files == declared


def test_the_default_set_is_what_make_serve_serves():
    assert declaration.default_set() == ["binary", "lenet", "mlp", "rnn"]


@pytest.mark.parametrize("name", NAMES)
def test_model_builds_from_its_declaration_and_keeps_the_batch(name):
    decl = declaration.get(name)
    model = decl.build().eval()
    # Before training fills them in: standard statistics, and as many features as the
    # recipe's data has.
    widths = {"breast_cancer": 30, "diabetes": 10}
    filled = []
    for spec in decl.inputs:
        if spec["kind"] == "features":
            n = widths[decl.recipe]
            spec = {**spec, "names": [f"f{i}" for i in range(n)], "mean": [0.0] * n,
                    "std": [1.0] * n}
        elif spec["kind"] == "image":
            spec = {**spec, "mean": [0.0], "std": [1.0]}
        filled.append(spec)
    xs = export.random_inputs(filled, 3)
    out = model(*xs)
    assert out.shape[0] == 3


def test_lenet_is_the_tutorial_architecture():
    model = declaration.get("lenet").build()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "conv1.weight": (6, 1, 5, 5), "conv1.bias": (6,),
        "conv2.weight": (16, 6, 5, 5), "conv2.bias": (16,),
        "fc1.weight": (120, 400), "fc1.bias": (120,),
        "fc2.weight": (84, 120), "fc2.bias": (84,),
        "fc3.weight": (10, 84), "fc3.bias": (10,),
    }  # fmt: skip


def test_mlp_and_binary_layer_sizes():
    mlp = {k: tuple(v.shape) for k, v in declaration.get("mlp").build().state_dict().items()}
    assert mlp["fc1.weight"] == (128, 784) and mlp["fc2.weight"] == (10, 128)
    binary = declaration.get("binary").build()
    shapes = [tuple(v.shape) for v in binary.state_dict().values()]
    assert shapes == [(16, 30), (16,), (1, 16), (1,)]
    out = binary(torch.randn(5, 30))
    assert bool(((out > 0) & (out < 1)).all())  # a sigmoid output, not logits


def test_unknown_model_name_says_which_exist():
    with pytest.raises(declaration.DeclarationError,
                       match="unknown model 'resnet'; declared: binary, diabetes, "
                             "digit_tokens, lenet, mlp, rnn, transformer"):
        declaration.get("resnet")


MINIMAL = """
[model]
file = "net.py"
[weights]
state_dict = "net.pt"
[[inputs]]
name = "x"
kind = "features"
names = ["a", "b"]
[output]
kind = "regression"
names = ["y"]
"""
NET = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, width: int = 2):
        super().__init__()
        self.fc = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)
"""


def _folder(tmp_path, toml=MINIMAL, name="mine"):
    (tmp_path / "net.py").write_text(NET)
    (tmp_path / "net.pt").write_bytes(b"")
    (tmp_path / f"{name}.toml").write_text(toml)
    return tmp_path


def test_a_declaration_outside_the_repo_is_found_with_models_dir(tmp_path):
    folder = _folder(tmp_path)
    decl = declaration.get("mine", [folder])
    assert (decl.name, decl.model_class().__name__, decl.output["kind"]) == (
        "mine", "Net", "regression")
    assert declaration.get(str(folder / "mine.toml")).name == "mine"
    assert "mine" not in declaration.default_set()


def test_a_name_declared_twice_is_refused(tmp_path):
    folder = _folder(tmp_path, name="lenet")
    with pytest.raises(declaration.DeclarationError, match="'lenet' is declared twice"):
        declaration.discover([folder])


@pytest.mark.parametrize("change, message", [
    (("kind = \"regression\"", "kind = \"ranking\""), "kind 'ranking' is not one of"),
    (("[weights]\nstate_dict = \"net.pt\"", "[weights]"), "exactly one of recipe or state_dict"),
    (("file = \"net.py\"", "file = \"gone.py\""), "'gone.py': no such file"),
    (("names = [\"y\"]", "names = [\"y\"]\nthreshold = 2\nlabels = 3\nfoo = 1"),
     "unknown key(s) ['foo'] in [output]"),
    (("kind = \"features\"\nnames = [\"a\", \"b\"]", "kind = \"image\"\nsize = [8]"),
     "size must be [height, width]"),
])
def test_a_bad_declaration_names_the_problem_and_the_file(tmp_path, change, message):
    folder = _folder(tmp_path, MINIMAL.replace(*change))
    with pytest.raises(declaration.DeclarationError) as err:
        declaration.get("mine", [folder])
    assert message in str(err.value) and str(folder / "mine.toml") in str(err.value)
