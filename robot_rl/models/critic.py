"""Language-conditioned ensemble critic: `encode` once per observation, `q` for K candidates.

    z = critic.encode(images, lang_emb)          # (B, F): ResNet + FiLM, run once
    q = critic.q(z, actions)                     # actions (B, K, A) -> (E, B, K)

The E heads are MLPs over [feature, action] whose weights are stacked, so all heads and all K
candidates go through one batched matmul per layer. The first layer is split into a feature part
(computed once per observation) and an action part (per candidate), which is exactly the
concatenated linear layer but makes scoring K candidates cost almost nothing beyond one
encoding. Optionally the action enters every hidden layer (PA-RL), and optionally the heads are
categorical: HL-Gauss ("Stop Regressing", Farebrother et al. 2024) over a fixed value range.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from robot_rl.models import checkpoint
from robot_rl.models.resnet import ResNetEncoder, STAGE_BLOCKS
from robot_rl.types import ACTION_DIM, ActionSpace

CHECKPOINT_FORMAT = 'robot_rl.critic/1'
STATE_BOX_LOW = (0.12, -0.25, 0.015, -0.8, -0.8, -2.0, 0.0)
STATE_BOX_HIGH = (0.45, 0.25, 0.25, 0.8, 0.8, 2.0, 1.0)
"""The WidowX's end-effector workspace (m, rad; as the simulator's) and gripper range."""


@dataclasses.dataclass
class CriticConfig:
    """Critic architecture. Defaults are the V-GPS critic with a 384-d MiniLM embedding."""

    encoder_depth: int = 34
    """ResNet depth: 18 or 34 (10 = one block per stage, for tests)."""
    encoder_width: int = 64
    """Stem channels; the feature is 8 * width (512 at 64)."""
    coord_channels: bool = True
    """Append two coordinate planes to the image."""
    lang_dim: int = 384
    """Language embedding size for FiLM (384 MiniLM, 512 MUSE); 0 = no language."""
    action_dim: int = ACTION_DIM
    """Action size (normalised to [-1, 1])."""
    state_dim: int = 0
    """Proprioceptive state fed beside the image feature (7 on the WidowX: end-effector xyz,
    roll-pitch-yaw, gripper); 0 = the image alone, as V-GPS. A grasp that closes 2 cm too high
    is plain in the state and a few pixels in a 64 px frame. States are in the robot's own
    frame, so train a state critic on one robot's data, not a cross-embodiment mix."""
    state_low: Tuple[float, ...] = STATE_BOX_LOW
    """State values mapped to -1 (the WidowX workspace box and gripper closed by default)."""
    state_high: Tuple[float, ...] = STATE_BOX_HIGH
    """State values mapped to +1."""
    ensemble_size: int = 2
    """Number of Q heads E, 2..10."""
    hidden_dims: Tuple[int, ...] = (256, 256)
    """Hidden widths of each head's MLP."""
    layer_norm: bool = False
    """LayerNorm after every hidden linear layer."""
    action_every_layer: bool = False
    """Feed the action into every hidden layer (PA-RL), not only the first."""
    num_bins: int = 0
    """0 = scalar heads; > 1 = categorical HL-Gauss heads with this many bins (128 typical)."""
    value_min: float = -100.0
    """Lower end of the categorical support (-1 / (1 - gamma) for the -1/0 sparse reward)."""
    value_max: float = 0.0
    """Upper end of the categorical support."""
    hl_gauss_sigma: float = 0.75
    """HL-Gauss smoothing sigma in units of the bin width ('Stop Regressing' uses 0.75)."""

    def __post_init__(self):
        self.hidden_dims = tuple(int(h) for h in self.hidden_dims)
        self.state_low = tuple(float(x) for x in self.state_low)
        self.state_high = tuple(float(x) for x in self.state_high)
        checks = [
            (self.encoder_depth in STAGE_BLOCKS, f'encoder_depth in {sorted(STAGE_BLOCKS)}'),
            (self.encoder_width >= 1, 'encoder_width >= 1'),
            (self.lang_dim >= 0, 'lang_dim >= 0'),
            (self.action_dim >= 1, 'action_dim >= 1'),
            (self.state_dim >= 0, 'state_dim >= 0'),
            (self.state_dim == 0 or len(self.state_low) == len(self.state_high) == self.state_dim,
             'state_low and state_high of state_dim values each'),
            (all(h > lo for lo, h in zip(self.state_low, self.state_high)),
             'state_high > state_low in every dimension'),
            (2 <= self.ensemble_size <= 10, 'ensemble_size in 2..10'),
            (len(self.hidden_dims) >= 1 and min(self.hidden_dims) >= 1,
             'hidden_dims: one or more positive widths'),
            (self.num_bins == 0 or self.num_bins >= 2, 'num_bins 0 (scalar) or >= 2'),
            (self.value_max > self.value_min, 'value_max > value_min'),
            (self.hl_gauss_sigma > 0, 'hl_gauss_sigma > 0'),
        ]
        failed = [rule for ok, rule in checks if not ok]
        if failed:
            raise ValueError(f'CriticConfig: need {"; ".join(failed)} (got {self})')

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> 'CriticConfig':
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f'CriticConfig: unknown fields {sorted(unknown)}')
        return cls(**d)


# ----------------------------------------------------------------------------- HL-Gauss


def hl_gauss_target(values: torch.Tensor, edges: torch.Tensor, sigma: float) -> torch.Tensor:
    """Histogram of N(value, sigma^2) over bins, truncated to the support and renormalised.

    values (...,), edges (bins + 1,) -> probabilities (..., bins) summing to 1.
    """
    values = torch.clamp(values, edges[0], edges[-1])
    cdf = torch.special.erf((edges - values[..., None]) / (math.sqrt(2.0) * sigma))
    return (cdf[..., 1:] - cdf[..., :-1]) / (cdf[..., -1:] - cdf[..., :1])


# ----------------------------------------------------------------------------- ensemble MLP


class EnsembleLinear(nn.Module):
    """E independent linear maps as one batched matmul; nn.Linear's init per head.

    `fan_in` sets the init bound when this layer is one part of a wider (concatenated) input.
    """

    def __init__(self, ensemble: int, in_features: int, out_features: int, bias: bool = True,
                 fan_in: Optional[int] = None):
        super().__init__()
        bound = 1.0 / math.sqrt(fan_in or in_features)
        self.weight = nn.Parameter(torch.empty(ensemble, in_features, out_features))
        nn.init.uniform_(self.weight, -bound, bound)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(ensemble, 1, 1, out_features))
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply every head: x (B, K, in) shared, or (E, B, K, in) per head -> (E, B, K, out)."""
        spec = 'bki,eio->ebko' if x.dim() == 3 else 'ebki,eio->ebko'
        y = torch.einsum(spec, x, self.weight)
        return y if self.bias is None else y + self.bias


class EnsembleLayerNorm(nn.Module):
    """LayerNorm over the last dim with a separate affine per head."""

    def __init__(self, ensemble: int, features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ensemble, 1, 1, features))
        self.bias = nn.Parameter(torch.zeros(ensemble, 1, 1, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(E, B, K, D) -> (E, B, K, D)."""
        return F.layer_norm(x, x.shape[-1:]) * self.weight + self.bias


class EnsembleMLP(nn.Module):
    """E MLP heads over [feature, action]: (B, F), (B, K, A) -> (E, B, K, out_dim)."""

    def __init__(self, ensemble: int, feature_dim: int, action_dim: int,
                 hidden_dims: Tuple[int, ...], out_dim: int, layer_norm: bool,
                 action_every_layer: bool):
        super().__init__()
        dims = (feature_dim,) + tuple(hidden_dims)
        self.layers = nn.ModuleList()
        self.action_layers = nn.ModuleList()
        self.norms = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            with_action = i == 0 or action_every_layer
            fan_in = d_in + action_dim * with_action
            self.layers.append(EnsembleLinear(ensemble, d_in, d_out, fan_in=fan_in))
            if with_action:
                self.action_layers.append(
                    EnsembleLinear(ensemble, action_dim, d_out, bias=False, fan_in=fan_in))
            self.norms.append(EnsembleLayerNorm(ensemble, d_out) if layer_norm else nn.Identity())
        self.out = EnsembleLinear(ensemble, dims[-1], out_dim)

    def forward(self, z: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        h = z[:, None, :]  # (B, 1, F): the feature part is computed once per observation
        for i, (layer, norm) in enumerate(zip(self.layers, self.norms)):
            h = layer(h)
            if i < len(self.action_layers):
                h = h + self.action_layers[i](actions)  # broadcasts (E, B, 1, H) over K
            h = F.silu(norm(h))
        return self.out(h)


# ----------------------------------------------------------------------------- critic


class Critic(nn.Module):
    """Image + language encoder and an ensemble of Q heads."""

    def __init__(self, config: CriticConfig):
        super().__init__()
        self.config = config
        self.encoder = ResNetEncoder(config.encoder_depth, config.encoder_width,
                                     config.coord_channels, config.lang_dim)
        self.head = EnsembleMLP(config.ensemble_size, self.feature_dim, config.action_dim,
                                config.hidden_dims, max(config.num_bins, 1), config.layer_norm,
                                config.action_every_layer)
        if self.categorical:
            edges = torch.linspace(config.value_min, config.value_max, config.num_bins + 1)
            self.register_buffer('bin_edges', edges, persistent=False)
            self.register_buffer('bin_centers', (edges[1:] + edges[:-1]) / 2, persistent=False)
        if config.state_dim:
            low, high = torch.tensor(config.state_low), torch.tensor(config.state_high)
            self.register_buffer('state_mid', (high + low) / 2, persistent=False)
            self.register_buffer('state_half', (high - low) / 2, persistent=False)

    @property
    def categorical(self) -> bool:
        return self.config.num_bins > 0

    @property
    def feature_dim(self) -> int:
        """Size of z: the image feature, then the normalised state when the critic reads it."""
        return self.encoder.feature_dim + self.config.state_dim

    @property
    def bin_width(self) -> float:
        return (self.config.value_max - self.config.value_min) / self.config.num_bins

    def encode(self, images: torch.Tensor, lang_emb: Optional[torch.Tensor],
               states: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Encode images (B, H, W, 3) uint8 (or float in [0, 1]), lang_emb (B, D) and, for a
        critic with state_dim > 0, states (B, S) in the robot's units -> z (B, F)."""
        z = self.encoder(images, lang_emb)
        if not self.config.state_dim:
            return z
        expected = (z.shape[0], self.config.state_dim)
        if states is None or tuple(states.shape) != expected:
            got = None if states is None else tuple(states.shape)
            raise ValueError(f'this critic reads the robot state too: states must be {expected}, '
                             f'got {got}')
        # Clipped so a state outside the box cannot push the heads far off their training range.
        state = ((states.to(z.dtype) - self.state_mid) / self.state_half).clamp(-1.5, 1.5)
        return torch.cat([z, state], dim=-1)

    def q_logits(self, z: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Head outputs: z (B, F), actions (B, K, A) -> (E, B, K, bins) logits or (E, B, K, 1)."""
        if actions.dim() != 3 or actions.shape[0] != z.shape[0]:
            raise ValueError(f'actions must be (B={z.shape[0]}, K, A), got {tuple(actions.shape)}')
        return self.head(z, actions.to(z.dtype))

    def q(self, z: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Score K candidates: z (B, F), actions (B, K, A) in [-1, 1] -> Q (E, B, K), float32."""
        out = self.q_logits(z, actions).float()
        if self.categorical:
            return out.softmax(-1) @ self.bin_centers
        return out.squeeze(-1)

    def forward(self, images: torch.Tensor, lang_emb: Optional[torch.Tensor],
                actions: torch.Tensor, states: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Convenience: encode then q. -> (E, B, K)."""
        return self.q(self.encode(images, lang_emb, states), actions)

    def td_loss(self, z: torch.Tensor, actions: torch.Tensor,
                target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Regression of every head onto `target`.

        z (B, F), actions (B, A), target (B,) -> (loss, Q (E, B)). Scalar heads: mean squared
        error; categorical heads: cross-entropy against the HL-Gauss histogram of the target.
        """
        out = self.q_logits(z, actions[:, None]).float()[:, :, 0]  # (E, B, bins or 1)
        if not self.categorical:
            q = out.squeeze(-1)
            return (q - target).pow(2).mean(), q
        sigma = self.config.hl_gauss_sigma * self.bin_width
        probs = hl_gauss_target(target, self.bin_edges, sigma)
        loss = -(probs * out.log_softmax(-1)).sum(-1).mean()
        return loss, out.softmax(-1) @ self.bin_centers


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- checkpoints


class CriticCheckpoint(NamedTuple):
    critic: Critic
    action_space: Optional[ActionSpace]
    extra: Dict[str, Any]


def save_critic(path: Union[str, Path], critic: Critic,
                action_space: Optional[ActionSpace] = None,
                extra: Optional[Dict[str, Any]] = None) -> None:
    """Write `path` (.safetensors) and its JSON sidecar (config, action space, extra)."""
    meta = {'format': CHECKPOINT_FORMAT, 'config': critic.config.to_dict(),
            'action_space': action_space.to_dict() if action_space is not None else None,
            'extra': extra or {}}
    checkpoint.save_checkpoint(path, critic, meta)


def load_critic(path: Union[str, Path], device: Union[str, torch.device] = 'cpu',
                config: Optional[CriticConfig] = None) -> CriticCheckpoint:
    """Rebuild a critic from its sidecar config (or `config`) and load its tensors.

    Raises ValueError naming the first tensor whose shape does not match the config.
    """
    tensors, meta = checkpoint.read_checkpoint(path)
    if meta.get('format') != CHECKPOINT_FORMAT:
        raise ValueError(f'{path}: not a critic checkpoint (format {meta.get("format")!r}, '
                         f'expected {CHECKPOINT_FORMAT!r})')
    config = config or CriticConfig.from_dict(meta['config'])
    critic = Critic(config)
    checkpoint.load_tensors_into(critic, tensors, source=str(path))
    space = meta.get('action_space')
    return CriticCheckpoint(critic.to(device),
                            ActionSpace.from_dict(space) if space is not None else None,
                            meta.get('extra', {}))
