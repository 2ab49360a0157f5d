import torch
from torch import nn


class DigitTokens(nn.Module):
    """Two inputs, as a text classifier takes them: the token ids of an 8x8 digit's pixels
    (row by row, variable length) and their attention mask; 10 class logits out."""

    def __init__(self, vocab: int = 18, dim: int = 16, max_length: int = 64,
                 hidden: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.max_length = max_length
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.position = nn.Parameter(torch.zeros(max_length, dim))
        self.head = nn.Sequential(nn.Linear(max_length * dim, hidden), nn.ReLU(),
                                  nn.Linear(hidden, classes))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        x = self.embed(input_ids) + self.position[:length]
        x = x * attention_mask.unsqueeze(-1).to(x.dtype)
        # Every sequence padded to the longest the model knows: positions keep their weights.
        x = nn.functional.pad(x, (0, 0, 0, self.max_length - length))
        return self.head(x.flatten(1))
