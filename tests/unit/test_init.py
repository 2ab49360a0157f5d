"""kiln init: a declaration from a model file, its weights and a few flags, checked by a dry
forward pass before it is written."""

import argparse
import tomllib

import pytest
import torch

from kiln import declaration
from kiln.training import init

MODEL = """
import torch
from torch import nn


class Pair(nn.Module):
    def __init__(self, hidden: int = 8):
        super().__init__()
        self.fc = nn.Linear(4, hidden)
        self.out = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(x)))
"""


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "pair.py").write_text(MODEL)
    namespace = {}
    exec(MODEL, namespace)
    model = namespace["Pair"](hidden=8)
    with torch.no_grad():  # every input answers y (the second label), whatever the seed
        model.out.weight.zero_()
        model.out.bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
    torch.save(model.state_dict(), tmp_path / "pair.pt")
    (tmp_path / "example.json").write_text('{"a": 1, "b": 2, "c": 3, "d": 4}')
    return tmp_path


def args_for(folder, *extra):
    parser = argparse.ArgumentParser()
    init.add_arguments(parser)
    return parser.parse_args([str(folder / "pair.py"), str(folder / "pair.pt"), "--name",
                              "pair", *extra])


GOOD = ["--input", "features names=a,b,c,d", "--output", "multiclass labels=x,y,z",
        "--args", '{"hidden": 8}', "--example", "example.json", "--expect", "y"]


def test_init_writes_a_declaration_that_reads_back(folder, monkeypatch):
    monkeypatch.chdir(folder)
    target = init.init(args_for(folder, *GOOD))
    assert target == folder / "pair.toml"
    assert tomllib.loads(target.read_text()) == {
        "version": "1.0", "description": "",
        "model": {"file": "pair.py", "args": {"hidden": 8}},
        "weights": {"state_dict": "pair.pt"},
        "inputs": [{"name": "input", "kind": "features", "names": ["a", "b", "c", "d"]}],
        "output": {"kind": "multiclass", "labels": ["x", "y", "z"]},
        "examples": [{"file": "example.json", "expect": "y"}],
    }
    decl = declaration.get("pair", [folder])
    assert (decl.model_class().__name__, decl.activation) == ("Pair", "softmax")


@pytest.mark.parametrize("change, message", [
    (("features names=a,b,c,d", "features names=a,b,c"),
     "the declared input does not fit the model: given input [2, 3]; the model says: "
     "mat1 and mat2 shapes cannot be multiplied (2x3 and 4x8)"),
    (("multiclass labels=x,y,z", "multiclass labels=x,y"),
     "the model returns shape [-1, 3], but a multiclass output with 2 labels needs [-1, 2]"),
    (('{"hidden": 8}', '{"hidden": 5}'), "do not load into Pair: Error(s) in loading"),
    (("features names=a,b,c,d", "picture size=2x2"), "kind 'picture' is not one of"),
])
def test_a_declaration_that_does_not_fit_is_refused_and_not_written(folder, monkeypatch,
                                                                     change, message):
    monkeypatch.chdir(folder)
    argv = [a.replace(*change) for a in GOOD]
    with pytest.raises((init.InitError, declaration.DeclarationError)) as err:
        init.init(args_for(folder, *argv))
    assert message in str(err.value)
    assert sorted(p.name for p in folder.iterdir()) == ["example.json", "pair.pt", "pair.py"]


@pytest.mark.parametrize("expect", ["x", "z"])
def test_an_example_that_does_not_get_its_expected_label_is_refused(folder, monkeypatch,
                                                                    expect):
    monkeypatch.chdir(folder)
    argv = [*GOOD[:-1], expect]
    with pytest.raises(init.InitError) as err:
        init.init(args_for(folder, *argv))
    assert str(err.value) == (f"the example example.json gets 'y' from the model, but --expect "
                              f"says {expect!r}")
    assert init.run(args_for(folder, *argv)) == 1  # kiln init exits non-zero
    assert sorted(p.name for p in folder.iterdir()) == ["example.json", "pair.pt", "pair.py"]


def test_an_existing_declaration_is_kept_unless_forced(folder, monkeypatch):
    monkeypatch.chdir(folder)
    init.init(args_for(folder, *GOOD))
    with pytest.raises(init.InitError, match="exists; --force replaces it"):
        init.init(args_for(folder, *GOOD))
    init.init(args_for(folder, *GOOD, "--force", "--version", "2.0"))
    assert declaration.get("pair", [folder]).version == "2.0"
