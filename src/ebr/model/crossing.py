"""Feature-crossing blocks of the towers. Pluggable by name: `make_crossing("mlp", ...)`.
(MaskNet and DHEN join here; each takes (B, in_dim) and returns (B, out_dim).)"""

from __future__ import annotations

import torch
from torch import nn


class MLPCrossing(nn.Module):
    """Plain MLP over the concatenated fields: Linear-ReLU stacks, then Linear to out_dim."""

    def __init__(self, in_dim: int, out_dim: int, hidden: list[int], dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.LayerNorm(in_dim)]
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            d = h
        layers.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in_dim) -> (B, out_dim)
        return self.net(x)


def make_crossing(kind: str, in_dim: int, out_dim: int, hidden: list[int], dropout: float = 0.0) -> nn.Module:
    if kind == "mlp":
        return MLPCrossing(in_dim, out_dim, hidden, dropout)
    raise ValueError(f"unknown crossing {kind!r}; available: mlp")
