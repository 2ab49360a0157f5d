import torch
from torch import nn


class TransformerClassifier(nn.Module):
    """A small Transformer encoder that reads the 28 rows of a 1x28x28 digit as 28 tokens.

    Each row (28 standardised pixels) is projected to d_model, a learned positional embedding
    is added, the tokens go through a pre-norm nn.TransformerEncoder, are mean-pooled, and a
    linear head gives 10 class logits.
    """

    def __init__(
        self,
        d_model: int = 64,
        heads: int = 4,
        layers: int = 2,
        ff: int = 128,
        dropout: float = 0.1,
        rows: int = 28,
        cols: int = 28,
        classes: int = 10,
    ) -> None:
        super().__init__()
        self.rows = rows
        self.embed = nn.Linear(cols, d_model)
        self.pos = nn.Parameter(torch.zeros(1, rows, d_model))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=ff, dropout=dropout,
            activation="gelu", batch_first=True, norm_first=True,
        )
        # No nested tensors: the eval-mode fast path must not change what export/script see.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.reshape(x.shape[0], self.rows, -1)
        h = self.encoder(self.embed(seq) + self.pos)
        return self.head(self.norm(h.mean(dim=1)))
