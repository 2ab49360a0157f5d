import torch
from torch import nn


class IrisNet(nn.Module):
    """Four flower measurements in, three species logits out."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(4, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
