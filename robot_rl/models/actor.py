"""Tanh-Gaussian actor over normalised actions, trained alongside Cal-QL (SAC-style)."""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn
from torch.nn import functional as F


class TanhGaussianActor(nn.Module):
    """pi(a | z) = tanh(N(mean(z), std(z)^2)) over [-1, 1]^A, from an observation feature z.

    Conditioned on the critic's image+language feature (passed in detached by the caller), so one
    encoder pass serves both networks and actor gradients never shape the critic's features.
    """

    def __init__(self, feature_dim: int, action_dim: int,
                 hidden_dims: Tuple[int, ...] = (256, 256), log_std_min: float = -5.0,
                 log_std_max: float = 2.0):
        super().__init__()
        layers, d = [], feature_dim
        for h in hidden_dims:
            layers += [nn.Linear(d, h), nn.SiLU()]
            d = h
        self.trunk = nn.Sequential(*layers)
        self.out = nn.Linear(d, 2 * action_dim)
        self.log_std_min, self.log_std_max = log_std_min, log_std_max

    def forward(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Map z (B, F) to the pre-tanh mean (B, A) and log std (B, A), float32."""
        mean, log_std = self.out(self.trunk(z)).float().chunk(2, dim=-1)
        return mean, log_std.clamp(self.log_std_min, self.log_std_max)

    def sample(self, z: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Draw n actions (reparameterised): z (B, F) -> actions (B, n, A), log-probs (B, n)."""
        mean, log_std = self(z)
        eps = torch.randn(mean.shape[0], n, mean.shape[1], device=mean.device)
        u = mean[:, None] + log_std.exp()[:, None] * eps
        gauss = -0.5 * eps.pow(2) - log_std[:, None] - 0.5 * math.log(2 * math.pi)
        # log |d tanh(u) / du| = 2 (log 2 - u - softplus(-2u)), the numerically stable form
        log_det = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))
        return torch.tanh(u), (gauss - log_det).sum(-1)
