"""PyTorch regressors: one row -> a number (MLP) or a lookback window -> a number (GRU, TCN)."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from finpipe.training import SeedAverage, TrainConfig


class MLPRegressor(nn.Module):
    """[B, F] -> [B]: `layers` x (Linear, GELU, Dropout), then a linear head."""

    def __init__(self, n_features: int, hidden: int = 64, layers: int = 2, dropout: float = 0.1):
        super().__init__()
        blocks: list[nn.Module] = []
        width = n_features
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
            width = hidden
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)).squeeze(-1)


class GRURegressor(nn.Module):
    """[B, L, F] -> [B]: a GRU over the window; the last step's hidden state feeds a linear head."""

    def __init__(self, n_features: int, hidden: int = 64, layers: int = 2, dropout: float = 0.1):
        super().__init__()
        self.gru = nn.GRU(
            n_features,
            hidden,
            num_layers=layers,
            batch_first=True,
            dropout=dropout if layers > 1 else 0.0,  # between GRU layers only
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output, _ = self.gru(x)
        return self.head(self.dropout(output[:, -1])).squeeze(-1)


class CausalConvBlock(nn.Module):
    """Dilated 1-D convolution padded on the left only (step t sees steps <= t), with a skip."""

    def __init__(
        self, channels_in: int, channels_out: int, kernel_size: int, dilation: int, dropout: float
    ):
        super().__init__()
        self.left_pad = (kernel_size - 1) * dilation
        self.conv = nn.Conv1d(channels_in, channels_out, kernel_size, dilation=dilation)
        self.dropout = nn.Dropout(dropout)
        self.skip = (
            nn.Identity()
            if channels_in == channels_out
            else nn.Conv1d(channels_in, channels_out, kernel_size=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, L] -> [B, C', L]
        y = self.conv(F.pad(x, (self.left_pad, 0)))
        return self.dropout(F.gelu(y)) + self.skip(x)


class TemporalCNNRegressor(nn.Module):
    """[B, L, F] -> [B]: causal convolutions with dilations 1, 2, 4, ...; last step -> head.

    The last step sees `receptive_field = 1 + (kernel_size - 1) * (2**layers - 1)` steps.
    """

    def __init__(
        self,
        n_features: int,
        hidden: int = 64,
        layers: int = 2,
        dropout: float = 0.1,
        kernel_size: int = 3,
    ):
        super().__init__()
        self.blocks = nn.Sequential(
            *(
                CausalConvBlock(
                    n_features if i == 0 else hidden, hidden, kernel_size, 2**i, dropout
                )
                for i in range(layers)
            )
        )
        self.head = nn.Linear(hidden, 1)
        self.receptive_field = 1 + (kernel_size - 1) * (2**layers - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        encoded = self.blocks(x.transpose(1, 2))  # [B, hidden, L]
        return self.head(encoded[:, :, -1]).squeeze(-1)


def covering_kernel_size(lookback: int, layers: int) -> int:
    """Smallest kernel size (>= 2) whose dilated stack of `layers` sees the whole lookback."""
    return max(2, math.ceil((lookback - 1) / (2**layers - 1)) + 1)


def build_net(config: TrainConfig, n_features: int) -> nn.Module:
    """Return the net `config.model` names, initialised from `config.seed` (global RNG untouched).

    The temporal CNN's kernel size is chosen so its receptive field covers `config.lookback`
    rows. With `config.seeds` > 1 it is a `SeedAverage` of that many such nets, member k
    initialised from `config.seed + k`.
    """
    if config.seeds > 1:
        return SeedAverage(
            [
                build_net(dataclasses.replace(config, seed=config.seed + k, seeds=1), n_features)
                for k in range(config.seeds)
            ]
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if config.model == "mlp":
            return MLPRegressor(n_features, config.hidden, config.layers, config.dropout)
        if config.model == "gru":
            return GRURegressor(n_features, config.hidden, config.layers, config.dropout)
        if config.model == "tcn":
            kernel_size = covering_kernel_size(config.lookback, config.layers)
            return TemporalCNNRegressor(
                n_features, config.hidden, config.layers, config.dropout, kernel_size
            )
    raise ValueError(f"unknown model {config.model!r}; expected one of mlp, gru, tcn")
