"""What the trainable policy classes share: observation encoder, batches, sampling, checkpoints.

A `ChunkPolicy` is image + language conditioned and predicts chunks of H actions in normalised
units ([-1, 1] through the ActionSpace it carries). Subclasses supply only the head:

    head_loss(z, actions, mask) -> scalar      supervised loss of normalised chunks given z
    head_sample(z, n) -> (B, n, H, 7)          n normalised chunks per encoded observation

Everything else (encoding the observation once per call, language embedding with its cache,
image size checks, units, checkpoints) lives here so the classes differ only in what differs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, Dict, Mapping, NamedTuple, Optional, Union

import numpy as np
import torch
from torch import nn

from policies.base import POLICIES
from robot_rl.models import checkpoint
from robot_rl.models.language import shared_encoder
from robot_rl.models.resnet import ResNetEncoder
from robot_rl.types import ACTION_DIM, ActionSpace, fit_image, IMAGE_KEY, Observation

CHECKPOINT_FORMAT = 'robot_rl.policy/1'


@dataclasses.dataclass
class EncoderConfig:
    """The ResNet + FiLM observation encoder (same family as the critic's)."""
    depth: int = 10
    width: int = 16
    coord_channels: bool = True
    lang_dim: int = 384
    image_size: int = 64
    """Model input (square, pixels); observations of the same aspect ratio are resized to it."""


class PolicyBatch(NamedTuple):
    """Behaviour-cloning (or PA-RL distillation) examples, on the policy's device."""
    images: torch.Tensor    # uint8 (B, h, w, 3)
    lang_emb: torch.Tensor  # float32 (B, lang_dim)
    actions: torch.Tensor   # float32 (B, H, 7), normalised to [-1, 1]
    mask: torch.Tensor      # float32 (B, H): 1 where the chunk step exists, 0 past the episode end


def concat_batches(*batches: PolicyBatch) -> PolicyBatch:
    """One batch of the rows of several (same image size and horizon)."""
    return PolicyBatch(*(torch.cat(parts) for parts in zip(*batches)))


class ChunkPolicy(nn.Module):
    """Base class of the trainable policies (see module docstring)."""

    name: ClassVar[str] = ''

    def __init__(self, action_space: Optional[ActionSpace] = None, horizon: int = 4,
                 encoder: Optional[Mapping[str, Any]] = None, language_model: Optional[str] = None,
                 device: Union[str, torch.device] = 'cpu', seed: int = 0):
        super().__init__()
        if horizon < 1:
            raise ValueError(f'horizon must be >= 1, got {horizon}')
        self.action_space = action_space or ActionSpace.bridge()
        self.action_horizon = int(horizon)
        self.encoder_config = EncoderConfig(**dict(encoder or {}))
        self.language_model = language_model
        e = self.encoder_config
        torch.manual_seed(seed)  # subclasses build their heads next, from the same seed
        self.encoder = ResNetEncoder(e.depth, e.width, e.coord_channels, e.lang_dim)
        self.feature_dim = self.encoder.feature_dim
        self.generator = torch.Generator(device=torch.device(device)).manual_seed(seed)
        self._device = torch.device(device)

    # -- what subclasses provide ---------------------------------------------------------------

    def head_config(self) -> Dict[str, Any]:
        """Constructor keyword arguments of the head (saved in checkpoints)."""
        return {}

    def head_loss(self, z: torch.Tensor, actions: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head_sample(self, z: torch.Tensor, num_samples: int) -> torch.Tensor:
        raise NotImplementedError

    # -- the Policy protocol ---------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device, *args, **kwargs):  # keep the sampling generator on the module's device
        module = super().to(device, *args, **kwargs)
        if isinstance(device, (str, torch.device)) and torch.device(device) != self._device:
            self._device = torch.device(device)
            self.generator = torch.Generator(device=self._device).manual_seed(
                int(self.generator.initial_seed()))
        return module

    def reset(self, seed: Optional[int] = None) -> None:
        if seed is not None:
            self.generator.manual_seed(int(seed))

    def embed(self, instructions) -> torch.Tensor:
        """Instructions (list of str) -> (B, lang_dim) embeddings on the policy's device."""
        for text in instructions:
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f'instruction must be a non-empty string, got {text!r}')
        encoder = shared_encoder(self.language_model, self.device)
        if encoder.dim != self.encoder_config.lang_dim:
            raise ValueError(f'language model gives {encoder.dim}-d embeddings, the policy '
                             f'expects {self.encoder_config.lang_dim}')
        return encoder.embed(list(instructions))

    def encode(self, images: torch.Tensor, lang_emb: torch.Tensor) -> torch.Tensor:
        return self.encoder(images, lang_emb)

    def supervised_loss(self, batch: PolicyBatch) -> torch.Tensor:
        return self.head_loss(self.encode(batch.images, batch.lang_emb),
                              batch.actions.float(), batch.mask.float())

    def model_image(self, image: np.ndarray) -> np.ndarray:
        """The observation image at the model's input size (see robot_rl.types.fit_image)."""
        size = self.encoder_config.image_size
        return fit_image(image, (size, size), what=f'{self.name} policy')

    @torch.no_grad()
    def sample_normalised(self, obs: Observation, instruction: str,
                          num_samples: int) -> torch.Tensor:
        """(num_samples, H, 7) normalised chunks from ONE encoding of the observation."""
        if num_samples < 1:
            raise ValueError(f'num_samples must be >= 1, got {num_samples}')
        image = torch.from_numpy(self.model_image(obs[IMAGE_KEY])).to(self.device)[None]
        z = self.encode(image, self.embed([instruction]))
        return self.head_sample(z, num_samples)[0].clamp(-1.0, 1.0)

    def sample_actions(self, obs: Observation, instruction: str, num_samples: int) -> np.ndarray:
        """float32 (num_samples, H, 7) chunks in environment units."""
        was_training = self.training
        self.eval()
        try:
            norm = self.sample_normalised(obs, instruction, num_samples)
        finally:
            self.train(was_training)
        return self.action_space.unnormalise(norm.float().cpu().numpy()).astype(np.float32)

    # -- checkpoints ---------------------------------------------------------------------------

    def load_weights(self, tensors: Mapping[str, np.ndarray], source: str) -> None:
        """Copy streamed numpy tensors in (a learner's update); ValueError names a mismatch."""
        checkpoint.load_tensors_into(self, {k: torch.from_numpy(np.array(v))
                                            for k, v in tensors.items()}, source)

    def config_dict(self) -> Dict[str, Any]:
        return {'horizon': self.action_horizon, 'encoder': dataclasses.asdict(self.encoder_config),
                'language_model': self.language_model, **self.head_config()}


def save_policy(path: Union[str, Path], policy: ChunkPolicy,
                extra: Optional[Dict[str, Any]] = None) -> None:
    """Write `path` (.safetensors) and its JSON sidecar (class, config, action space, extra)."""
    meta = {'format': CHECKPOINT_FORMAT, 'policy': policy.name, 'config': policy.config_dict(),
            'action_space': policy.action_space.to_dict(), 'extra': extra or {}}
    checkpoint.save_checkpoint(path, policy, meta)


def load_policy(path: Union[str, Path], device: Union[str, torch.device] = 'cpu',
                seed: int = 0) -> ChunkPolicy:
    """Rebuild a policy from its sidecar and load its tensors (ValueError names a mismatch)."""
    import policies  # noqa: F401  (registers every policy class)
    tensors, meta = checkpoint.read_checkpoint(path)
    if meta.get('format') != CHECKPOINT_FORMAT:
        raise ValueError(f'{path}: not a policy checkpoint (format {meta.get("format")!r}, '
                         f'expected {CHECKPOINT_FORMAT!r})')
    name = meta['policy']
    if name not in POLICIES:
        raise ValueError(f'{path}: unknown policy class {name!r}; registered: {sorted(POLICIES)}')
    policy = POLICIES[name](action_space=ActionSpace.from_dict(meta['action_space']),
                            device=device, seed=seed, **meta['config'])
    checkpoint.load_tensors_into(policy, tensors, source=str(path))
    return policy.to(device)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values (B, H, ...) over the steps where mask (B, H) is 1."""
    while mask.dim() < values.dim():
        mask = mask.unsqueeze(-1)
    weights = mask.expand_as(values)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


__all__ = ['ACTION_DIM', 'ChunkPolicy', 'concat_batches', 'EncoderConfig', 'PolicyBatch',
           'load_policy', 'masked_mean', 'save_policy']
