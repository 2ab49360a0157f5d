import torch
from torch import nn


class RNNClassifier(nn.Module):
    """An LSTM that reads the 28 rows of a 1x28x28 digit as a sequence; 10 class logits out."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = 28
        self.lstm = nn.LSTM(input_size=28, hidden_size=128, batch_first=True)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.reshape(x.shape[0], self.rows, -1)
        out, _ = self.lstm(seq)
        return self.head(out[:, -1])
