"""Reference statistics of a user's model: the declaration's [weights] reference, the
training inputs as a batch job takes them, made model rows as the server makes them."""

import numpy as np
import pytest
import torch

from kiln import declaration
from kiln.handlers import drift
from kiln.training import export

MODEL = """
import torch
from torch import nn


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc(x), dim=1)
"""
DECLARATION = """
[model]
file = "pair.py"
[weights]
state_dict = "pair.pt"
{reference}
[[inputs]]
name = "input"
kind = "features"
names = ["a", "b"]
mean = [10.0, 0.0]
std = [2.0, 1.0]
[output]
kind = "multiclass"
activation = "none"
labels = ["no", "yes"]
[[examples]]
value = {{a = 10.0, b = 0.5}}
"""


def declared(tmp_path, reference_line):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "pair.py").write_text(MODEL)
    (folder / "pair.toml").write_text(DECLARATION.format(reference=reference_line))
    namespace = {}
    exec(MODEL, namespace)
    torch.manual_seed(0)
    torch.save(namespace["Pair"]().state_dict(), folder / "pair.pt")
    return folder


def test_a_declared_reference_gives_quantiles_of_the_served_rows_and_the_label_mix(tmp_path):
    folder = declared(tmp_path, 'reference = "train.npz"')
    a = np.arange(100.0)  # standardised as the server does: (a - 10) / 2
    np.savez(folder / "train.npz", input=np.column_stack([a, np.ones(100)]),
             target=np.asarray([0] * 30 + [1] * 70))
    sig = export.export("pair", tmp_path / "artifacts", [folder])

    reference = sig["reference"]
    assert reference["rows"] == 100
    assert reference["inputs"]["input"]["a"] == drift.reference_of(
        ((a - 10.0) / 2.0).astype(np.float32))
    assert reference["inputs"]["input"]["b"]["edges"] == [1.0]  # all alike: one edge
    assert reference["labels"] == {"no": 0.3, "yes": 0.7}


def test_without_a_declared_reference_the_signature_has_none(tmp_path):
    folder = declared(tmp_path, "")
    assert "reference" not in export.export("pair", tmp_path / "artifacts", [folder])


def test_a_reference_without_the_model_s_input_fails_the_export_naming_it(tmp_path):
    folder = declared(tmp_path, 'reference = "train.npz"')
    np.savez(folder / "train.npz", features=np.zeros((10, 2)))
    with pytest.raises(export.ExportError, match=r"train.npz has no array for input\(s\) "
                                                 r"\['input'\]"):
        export.export("pair", tmp_path / "artifacts", [folder])


def test_a_recipe_model_cannot_declare_a_reference(tmp_path):
    path = tmp_path / "lenet.toml"
    text = declaration.BUILTIN_DIR.joinpath("lenet.toml").read_text()
    path.write_text(text.replace('recipe = "mnist"', 'recipe = "mnist"\nreference = "x.npy"'))
    (tmp_path / "lenet.py").write_text(declaration.BUILTIN_DIR.joinpath("lenet.py").read_text())
    with pytest.raises(declaration.DeclarationError, match="Kiln knows a recipe's"):
        declaration.load(path)
