import torch
from torch import nn


class DiabetesRegressor(nn.Module):
    """10 standardised features in, disease progression in original units out, shape [N, 1].

    Training standardises the target; the buffers target_mean/target_std (in the state_dict)
    map the network's output back to original units inside forward, so every exported form
    answers in original units.
    """

    def __init__(
        self,
        features: int = 10,
        hidden: int = 16,
        dropout: float = 0.2,
        target_mean: float = 0.0,
        target_std: float = 1.0,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )
        self.register_buffer("target_mean", torch.tensor([target_mean], dtype=torch.float32))
        self.register_buffer("target_std", torch.tensor([target_std], dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.target_std + self.target_mean
