"""The one list of Kiln's models: a name here names its model file, archive and endpoint."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MODELS_DIR = Path(__file__).resolve().parent / "models"


@dataclass(frozen=True)
class TrainDefaults:
    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    augment: bool = False


@dataclass(frozen=True)
class ModelSpec:
    name: str
    dataset: str  # "mnist" or "breast_cancer"
    input_shape: tuple[int, ...]  # without the batch dimension
    output_kind: str  # "multiclass" or "binary"
    defaults: TrainDefaults
    pad: int = 0  # zero pixels added on each side of a 28x28 digit
    extra: dict = field(default_factory=dict)

    @property
    def model_file(self) -> Path:
        return MODELS_DIR / f"{self.name}.py"

    def model_class(self) -> type[torch.nn.Module]:
        return model_class_of(f"kiln.training.models.{self.name}")

    def build(self) -> torch.nn.Module:
        return self.model_class()()


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "lenet", "mnist", (1, 32, 32), "multiclass", pad=2,
            defaults=TrainDefaults(epochs=30, batch_size=64, lr=2e-3, augment=True),
        ),
        ModelSpec(
            "mlp", "mnist", (1, 28, 28), "multiclass",
            defaults=TrainDefaults(epochs=30, batch_size=64, lr=1e-3, augment=True),
        ),
        ModelSpec(
            "rnn", "mnist", (1, 28, 28), "multiclass",
            defaults=TrainDefaults(epochs=30, batch_size=64, lr=2e-3, augment=True),
        ),
        ModelSpec(
            "binary", "breast_cancer", (30,), "binary",
            defaults=TrainDefaults(epochs=60, batch_size=32, lr=1e-3),
        ),
    )
}


def get(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise SystemExit(f"unknown model {name!r}; known: {', '.join(REGISTRY)}") from None


def model_class_of(module_name: str) -> type[torch.nn.Module]:
    """The single class a model file defines (TorchServe's --model-file rule, enforced here too)."""
    from torch import nn  # here, not at the top: `kiln predict` should not pay for torch

    module = importlib.import_module(module_name)
    classes = [
        obj for _, obj in inspect.getmembers(module, inspect.isclass)
        if obj.__module__ == module.__name__
    ]
    if len(classes) != 1 or not issubclass(classes[0], nn.Module):
        found = [c.__name__ for c in classes]
        raise TypeError(f"{module_name} must define exactly one nn.Module class, found {found}")
    return classes[0]
