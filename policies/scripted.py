"""Small policies for the ROS graph, tests and benchmarks (registered in policies.base.POLICIES).

- 'hold': zero motion, gripper open (a safe placeholder).
- 'random_walk': bounded random deltas (exercises the graph without a model).
- 'tiny_mlp': a small torch MLP on a 16x16 thumbnail + state, whose weights the learner node
  updates (so a new weight version reaching the actor is observable). Not a capable policy:
  it stands in for the diffusion/autoregressive/VLA policies until those issues land.

All return float32 (num_samples, H, 7) chunks in environment units (Bridge action bounds).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import cv2
import numpy as np
import torch
from torch import nn

from policies.base import register_policy
from robot_rl.types import ActionSpace, ACTION_DIM, IMAGE_KEY, Observation, STATE_DIM, STATE_KEY

THUMBNAIL = 16


@register_policy('hold')
class HoldPolicy:
    """Zero deltas, gripper open."""

    action_horizon = 1

    def __init__(self, **_: Any):
        self.action_space = ActionSpace.bridge()

    def reset(self, seed: Optional[int] = None) -> None:
        pass

    def sample_actions(self, obs: Observation, instruction: str, num_samples: int) -> np.ndarray:
        actions = np.zeros((num_samples, 1, ACTION_DIM), np.float32)
        actions[..., 6] = 1.0
        return actions


@register_policy('random_walk')
class RandomWalkPolicy:
    """Uniform deltas at `scale` of the bounds; the gripper flips with probability 0.1."""

    action_horizon = 1

    def __init__(self, scale: float = 0.3, seed: int = 0, **_: Any):
        self.action_space = ActionSpace.bridge()
        self.scale = float(scale)
        self._rng = np.random.default_rng(seed)
        self._gripper = 1.0

    def reset(self, seed: Optional[int] = None) -> None:
        self._gripper = 1.0
        if seed is not None:
            self._rng = np.random.default_rng(seed)

    def sample_actions(self, obs: Observation, instruction: str, num_samples: int) -> np.ndarray:
        if self._rng.random() < 0.1:
            self._gripper = 1.0 - self._gripper
        half = 0.5 * (self.action_space.high - self.action_space.low) * self.scale
        actions = self._rng.uniform(-half, half, (num_samples, 1, ACTION_DIM)).astype(np.float32)
        actions[..., 6] = self._gripper
        return self.action_space.clip(actions)


class TinyMLP(nn.Module):
    """(B, 3*16*16 + 7) -> (B, 7) pre-tanh action mean in normalised units."""

    def __init__(self, hidden: int = 64, layers: int = 2):
        super().__init__()
        dims = [3 * THUMBNAIL * THUMBNAIL + STATE_DIM] + [hidden] * layers
        blocks = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            blocks += [nn.Linear(d_in, d_out), nn.SiLU()]
        self.trunk = nn.Sequential(*blocks)
        self.head = nn.Linear(dims[-1], ACTION_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def thumbnails(images: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, 3) -> float32 (B, 3*16*16) in [0, 1]."""
    small = [cv2.resize(im, (THUMBNAIL, THUMBNAIL), interpolation=cv2.INTER_AREA)
             for im in np.asarray(images)]
    return (np.stack(small).reshape(len(small), -1) / 255.0).astype(np.float32)


@register_policy('tiny_mlp')
class TinyMLPPolicy:
    """Gaussian around tanh(MLP(thumbnail, state)) in normalised action space.

    module: the TinyMLP whose state dict the learner trains and publishes.
    noise: std of the exploration noise in normalised units (0 = deterministic).
    """

    action_horizon = 1

    def __init__(self, hidden: int = 64, layers: int = 2, noise: float = 0.1, seed: int = 0,
                 device: str = 'cpu', **_: Any):
        torch.manual_seed(seed)
        self.kwargs: Dict[str, Any] = {'hidden': int(hidden), 'layers': int(layers)}
        self.action_space = ActionSpace.bridge()
        self.device = torch.device(device)
        self.module = TinyMLP(hidden, layers).to(self.device)
        self.noise = float(noise)
        self._gen = torch.Generator().manual_seed(seed)

    def reset(self, seed: Optional[int] = None) -> None:
        if seed is not None:
            self._gen.manual_seed(int(seed))

    def _inputs(self, images: np.ndarray, states: np.ndarray) -> torch.Tensor:
        x = np.concatenate([thumbnails(images), np.asarray(states, np.float32)], axis=1)
        return torch.from_numpy(x).to(self.device)

    @torch.no_grad()
    def sample_actions(self, obs: Observation, instruction: str, num_samples: int) -> np.ndarray:
        mean = torch.tanh(self.module(self._inputs(obs[IMAGE_KEY][None], obs[STATE_KEY][None])))
        noise = torch.randn((num_samples, ACTION_DIM), generator=self._gen) * self.noise
        norm = (mean.cpu() + noise).clamp(-1.0, 1.0).numpy()
        return self.action_space.unnormalise(norm)[:, None, :]

    def supervised_loss(self, batch: Any) -> torch.Tensor:
        """MSE in normalised units on a TransitionBatch-like batch (images, states, actions)."""
        pred = torch.tanh(self.module(self._inputs(batch.images, batch.states)))
        target = torch.from_numpy(self.action_space.normalise(batch.actions)).to(self.device)
        return torch.mean((pred - target.clamp(-1.0, 1.0)) ** 2)

    def load_weights(self, tensors: Mapping[str, np.ndarray], source: str) -> None:
        """Copy numpy tensors into the module (ValueError names a mismatch)."""
        from robot_rl.models.checkpoint import load_tensors_into
        load_tensors_into(self.module, {k: torch.from_numpy(np.array(v))
                                        for k, v in tensors.items()}, source)


def make_policy(name: str, kwargs: Optional[Mapping[str, Any]] = None):
    """An instance of the registered policy `name` (ValueError lists the known names)."""
    from policies.base import POLICIES
    if name not in POLICIES:
        raise ValueError(f'unknown policy {name!r}; registered: {sorted(POLICIES)}')
    return POLICIES[name](**dict(kwargs or {}))
