"""'gaussian': a tanh-Gaussian chunk policy, the simplest trainable baseline.

An MLP maps the observation feature z to a mean and log-std for each of the H * 7 chunk
entries; a sample is tanh(mean + std * eps), so chunks always lie in the normalised box. The
loss is the exact negative log-likelihood of the data chunk under that squashed density, which
keeps it a proper maximum-likelihood objective for both behaviour cloning and PA-RL
distillation.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from policies.base import register_policy
from policies.common import ACTION_DIM, ChunkPolicy, masked_mean
from robot_rl.types import ActionSpace

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0
"""Clamp on the pre-tanh log-std: below -5 the likelihood of a memorised chunk grows without
bound, above 2 samples are almost all +-1."""
ATANH_EDGE = 1.0 - 1e-4
"""Targets are clipped to +-ATANH_EDGE before atanh, so data at exactly +-1 (the gripper) has a
finite likelihood."""


@register_policy('gaussian')
class GaussianPolicy(ChunkPolicy):
    """Encoder feature -> MLP -> (mean, log_std) of a tanh-squashed Gaussian over the chunk.

    Args (besides ChunkPolicy's):
        hidden_dims: widths of the MLP's hidden layers.
    """

    name = 'gaussian'

    def __init__(self, action_space: Optional[ActionSpace] = None, horizon: int = 4,
                 encoder: Optional[Mapping[str, Any]] = None, language_model: Optional[str] = None,
                 device: Union[str, torch.device] = 'cpu', seed: int = 0,
                 hidden_dims: Sequence[int] = (256, 256)):
        super().__init__(action_space, horizon, encoder, language_model, device, seed)
        self.hidden_dims = tuple(int(d) for d in hidden_dims)
        layers, width = [], self.feature_dim
        for out in self.hidden_dims:
            layers += [nn.Linear(width, out), nn.SiLU()]
            width = out
        self.trunk = nn.Sequential(*layers)
        self.chunk_size = self.action_horizon * ACTION_DIM
        self.mean = nn.Linear(width, self.chunk_size)
        self.log_std = nn.Linear(width, self.chunk_size)
        self.to(device)

    def head_config(self) -> Dict[str, Any]:
        return {'hidden_dims': list(self.hidden_dims)}

    def distribution(self, z: torch.Tensor):
        """(mean, std) of the pre-tanh Gaussian, each (B, H * 7)."""
        h = self.trunk(z)
        log_std = self.log_std(h).clamp(LOG_STD_MIN, LOG_STD_MAX)
        return self.mean(h), log_std.exp()

    def head_loss(self, z: torch.Tensor, actions: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
        """Masked mean NLL per chunk entry of actions (B, H, 7) in [-1, 1] given z (B, F)."""
        mean, std = self.distribution(z)
        target = actions.clamp(-ATANH_EDGE, ATANH_EDGE)
        pre_tanh = torch.atanh(target).flatten(1)
        gaussian_nll = (0.5 * ((pre_tanh - mean) / std) ** 2 + std.log()
                        + 0.5 * math.log(2.0 * math.pi))
        # Change of variables a = tanh(u): log p(a) = log p(u) - log(1 - a^2).
        log_det = torch.log1p(-target ** 2).flatten(1)
        nll = (gaussian_nll + log_det).view_as(actions)
        return masked_mean(nll, mask)

    def head_sample(self, z: torch.Tensor, num_samples: int) -> torch.Tensor:
        """num_samples chunks per feature: z (B, F) -> (B, num_samples, H, 7) in (-1, 1)."""
        mean, std = self.distribution(z)
        b = z.shape[0]
        eps = torch.randn((b, num_samples, self.chunk_size), generator=self.generator,
                          device=z.device, dtype=mean.dtype)
        pre_tanh = mean[:, None] + std[:, None] * eps
        return torch.tanh(pre_tanh).view(b, num_samples, self.action_horizon, ACTION_DIM)
