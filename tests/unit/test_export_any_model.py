"""Export of a user's model that ONNX cannot take: the operator is named, TorchScript serves."""

import json
import logging
import zipfile

import torch

from kiln import workspace
from kiln.model_store import build
from kiln.training import export

MODEL = """
import torch
from torch import nn


class RunningMax(nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.fc = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cummax(self.fc(x), dim=1).values
"""
DECLARATION = """
[model]
file = "running_max.py"
[weights]
state_dict = "running_max.pt"
[[inputs]]
name = "input"
kind = "features"
names = ["a", "b", "c", "d"]
min = [0, 0, 0, 0]
max = [1, 1, 1, 1]
[output]
kind = "multiclass"
labels = ["x", "y", "z"]
[[examples]]
value = {a = 0.1, b = 0.2, c = 0.3, d = 0.4}
"""


def test_onnx_failure_names_the_operator_and_torchscript_serves(tmp_path, caplog):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "running_max.py").write_text(MODEL)
    (folder / "running_max.toml").write_text(DECLARATION)
    namespace = {}
    exec(MODEL, namespace)
    torch.manual_seed(0)
    torch.save(namespace["RunningMax"]().state_dict(), folder / "running_max.pt")

    artifacts = tmp_path / "artifacts"
    with caplog.at_level(logging.WARNING, logger="kiln.export"):
        sig = export.export("running_max", artifacts, [folder])
    assert list(sig["parity"]) == ["torchscript"]
    assert sig["parity"]["torchscript"]["samples"] == export.RANDOM_ROWS + 1  # and the example
    assert "ONNX has no export for operator aten.cummax" in caplog.text
    assert sorted(p.name for p in artifacts.iterdir()) == ["model.ts", "signature.json"]
    assert json.loads((artifacts / "signature.json").read_text())["inputs"][0]["min"] == [0] * 4


def test_the_build_archives_torchscript_when_onnx_is_missing(tmp_path, monkeypatch):
    """...and ships the model's extra source files and its requirements."""
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "running_max.py").write_text(MODEL.replace(
        "import torch\n", "import torch\nfrom running_max_width import WIDTH\n", 1).replace(
        "width: int = 4", "width: int = WIDTH"))
    (folder / "running_max_width.py").write_text("WIDTH = 4\n")
    (folder / "running_max.toml").write_text(DECLARATION.replace(
        'file = "running_max.py"', 'file = "running_max.py"\n'
        'extra_files = ["running_max_width.py"]\nrequirements = ["numpy>=1.26"]'))
    namespace = {}
    exec(MODEL, namespace)
    torch.save(namespace["RunningMax"]().state_dict(), folder / "running_max.pt")
    monkeypatch.setenv(workspace.ENV, str(tmp_path))
    mar = build.ensure_built("running_max", "onnx", tmp_path / "store", [folder])
    with zipfile.ZipFile(mar) as z:
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        names = set(z.namelist())
        requirements = z.read("requirements.txt").decode()
    assert manifest["model"]["serializedFile"] == "model.ts"
    assert {"running_max.py", "running_max_width.py", "model.ts"} <= names
    assert requirements == "numpy>=1.26\n"
