"""'diffusion': a DDPM chunk policy with DDIM sampling (the PA-RL diffusion policy class).

A residual MLP predicts the noise added to a flattened chunk, conditioned on the diffusion
timestep and the observation feature z. Training is the standard DDPM noise MSE over a cosine
schedule (Nichol & Dhariwal, 2021); PA-RL distils optimised actions with exactly this loss.
Sampling runs a few deterministic DDIM steps from random noise, so different noise gives
different chunks while each step stays cheap enough for steering's many samples.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import nn

from policies.base import register_policy
from policies.common import ACTION_DIM, ChunkPolicy, masked_mean
from robot_rl.types import ActionSpace

TIME_EMBED_DIM = 32
COSINE_OFFSET = 0.008
"""The schedule's s: keeps beta_1 from being vanishingly small (Nichol & Dhariwal, eq. 17)."""
MAX_BETA = 0.999
"""Clip on beta_t: the cosine schedule's last beta is 1, which would make x_T pure noise with
an undefined x0 estimate."""


def cosine_alpha_bars(steps: int) -> torch.Tensor:
    """alpha_bar_t for t = 1..steps (index 0..steps-1) of the cosine schedule."""
    t = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    f = torch.cos((t + COSINE_OFFSET) / (1.0 + COSINE_OFFSET) * math.pi / 2) ** 2
    betas = (1.0 - f[1:] / f[:-1]).clamp(max=MAX_BETA)
    return torch.cumprod(1.0 - betas, dim=0).float()


def timestep_embedding(t: torch.Tensor, dim: int = TIME_EMBED_DIM) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (B,) -> (B, dim), as in the transformer."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResidualBlock(nn.Module):
    """x + Linear(SiLU(Linear(LayerNorm(x)))): pre-norm, so the stack trains stably."""

    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class NoiseNet(nn.Module):
    """(noisy chunk (B, D), timestep (B,), feature (B, F)) -> predicted noise (B, D)."""

    def __init__(self, chunk_size: int, feature_dim: int, hidden: int, blocks: int):
        super().__init__()
        self.inp = nn.Linear(chunk_size + TIME_EMBED_DIM + feature_dim, hidden)
        self.blocks = nn.Sequential(*[ResidualBlock(hidden) for _ in range(blocks)])
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, chunk_size))

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = self.inp(torch.cat([x, timestep_embedding(t), z], dim=1))
        return self.out(self.blocks(h))


@register_policy('diffusion')
class DiffusionPolicy(ChunkPolicy):
    """DDPM over flattened chunks; DDIM (eta 0) sampling from random noise.

    Args (besides ChunkPolicy's):
        hidden: width of the noise-prediction MLP.
        blocks: residual blocks in it.
        diffusion_steps: T of the training (DDPM) schedule.
        sample_steps: DDIM steps at sampling time, evenly spaced over the T timesteps.
    """

    name = 'diffusion'

    def __init__(self, action_space: Optional[ActionSpace] = None, horizon: int = 4,
                 encoder: Optional[Mapping[str, Any]] = None, language_model: Optional[str] = None,
                 device: Union[str, torch.device] = 'cpu', seed: int = 0, hidden: int = 256,
                 blocks: int = 3, diffusion_steps: int = 20, sample_steps: int = 5):
        super().__init__(action_space, horizon, encoder, language_model, device, seed)
        if not 1 <= sample_steps <= diffusion_steps:
            raise ValueError(f'need 1 <= sample_steps <= diffusion_steps, got {sample_steps} '
                             f'and {diffusion_steps}')
        self.hidden, self.blocks = int(hidden), int(blocks)
        self.diffusion_steps, self.sample_steps = int(diffusion_steps), int(sample_steps)
        self.chunk_size = self.action_horizon * ACTION_DIM
        self.noise_net = NoiseNet(self.chunk_size, self.feature_dim, self.hidden, self.blocks)
        # Derived from the config, not learned: kept out of checkpoints.
        self.register_buffer('alpha_bars', cosine_alpha_bars(self.diffusion_steps), False)
        self.to(device)

    def head_config(self) -> Dict[str, Any]:
        return {'hidden': self.hidden, 'blocks': self.blocks,
                'diffusion_steps': self.diffusion_steps, 'sample_steps': self.sample_steps}

    def head_loss(self, z: torch.Tensor, actions: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
        """DDPM noise MSE of actions (B, H, 7) given z (B, F), averaged over real chunk steps."""
        b = z.shape[0]
        x0 = actions.reshape(b, self.chunk_size)
        # Training noise comes from the global RNG: torch.manual_seed governs training, and
        # self.generator stays the sampling stream.
        t = torch.randint(0, self.diffusion_steps, (b,), device=z.device)
        noise = torch.randn_like(x0)
        alpha_bar = self.alpha_bars[t][:, None]
        x_t = alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise
        error = (self.noise_net(x_t, t, z) - noise) ** 2
        return masked_mean(error.view_as(actions), mask)

    def head_sample(self, z: torch.Tensor, num_samples: int) -> torch.Tensor:
        """DDIM from noise: z (B, F) -> (B, num_samples, H, 7) in [-1, 1]."""
        b = z.shape[0]
        z = z.repeat_interleave(num_samples, dim=0)
        x = torch.randn((b * num_samples, self.chunk_size), generator=self.generator,
                        device=z.device, dtype=z.dtype)
        timesteps = torch.linspace(self.diffusion_steps - 1, 0, self.sample_steps).round().long()
        for i, t in enumerate(timesteps.tolist()):
            alpha_bar = self.alpha_bars[t]
            prev = timesteps[i + 1].item() if i + 1 < len(timesteps) else None
            alpha_bar_prev = self.alpha_bars[prev] if prev is not None else alpha_bar.new_ones(())
            eps = self.noise_net(x, torch.full((x.shape[0],), t, device=z.device), z)
            x0 = ((x - (1.0 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()).clamp(-1.0, 1.0)
            # The noise consistent with the clipped x0, so the next step stays on its path.
            eps = (x - alpha_bar.sqrt() * x0) / (1.0 - alpha_bar).sqrt()
            x = alpha_bar_prev.sqrt() * x0 + (1.0 - alpha_bar_prev).sqrt() * eps
        return x.view(b, num_samples, self.action_horizon, ACTION_DIM)
