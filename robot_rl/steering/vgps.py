"""V-GPS: value-guided policy steering (Nakamoto et al., 2024), top to bottom.

Every control step:
1. ask the policy once for K action chunks (it encodes the observation once);
2. drop candidates that are malformed or non-finite (warning); none left -> hold, log an error;
3. encode the latest frame with the critic ONCE and score the first action of every chunk
   (V-GPS), or every action of every chunk averaged over the chunk ('chunk': all of a chunk
   reaches the robot through the ensembler), min over the critic's heads; with several
   critics (independently trained seeds), the mean of their scores;
4. select: argmax (temperature 0), a sample of softmax(Q / temperature), or uniformly at
   random (the 'random' re-ranking control, same K and sampling, no critic);
5. execute through the temporal ensembler and the sticky gripper, clipped to the robot's limits.

The policy's weights are never touched; K = 1 is the base policy with the same execution.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from robot_rl.models.critic import Critic, load_critic
from robot_rl.steering.execution import ChunkExecutor
from robot_rl.types import (ACTION_DIM, ActionSpace, fit_image, IMAGE_KEY, Observation,
                            STATE_KEY)

logger = logging.getLogger(__name__)

SELECTIONS = ('value', 'random')
SCORINGS = ('first_action', 'chunk')


@dataclasses.dataclass
class StepInfo:
    """What the last `act` did (for logs, videos and tests)."""
    candidates: int = 0          # usable chunks out of num_samples
    chosen: int = -1             # index among the usable chunks (-1: held)
    q: Optional[np.ndarray] = None  # (candidates,) the critics' score, when they scored them


def load_steering_critics(paths: Sequence[Union[str, Path]], device='cpu'
                          ) -> Tuple[List[Critic], ActionSpace]:
    """Critics for steering and the action space they score in, from robot-rl-train-critic
    checkpoint directories (their target critic, as in V-GPS) or critic .safetensors files.

    Several paths make an ensemble; they must share one action space and language width
    (ValueError naming the first path that does not)."""
    from robot_rl.rl.learner import TARGET_FILE

    critics, space = [], None
    for path in paths:
        path = Path(path)
        if path.is_dir():
            path = path / TARGET_FILE
        loaded = load_critic(path, device)
        if loaded.action_space is None:
            raise ValueError(f'{path}: the critic carries no action space; it cannot score '
                             'actions')
        if critics and (loaded.action_space.to_dict() != space.to_dict()
                        or loaded.critic.config.lang_dim != critics[0].config.lang_dim):
            raise ValueError(f'{path}: its action space or language width differs from '
                             f'{paths[0]}; an ensemble scores in one')
        critics.append(loaded.critic)
        space = loaded.action_space
    if not critics:
        raise ValueError('no critic paths given')
    return critics, space


class ValueGuidedSteering:
    """Wrap any Policy: sample K chunks, score them with a Cal-QL critic, execute the best.

    critic: one Critic, or a list of them (an ensemble: their scores are averaged).
    critic_action_space: the normaliser saved with the critic (candidates are scored in its
    units). bounds: the robot's action limits (default: the WidowX's). image_size: the critic's
    input side; frames of the same aspect ratio are resized to it (None: as they come).
    """

    def __init__(self, policy, critic: Union[None, Critic, Sequence[Critic]],
                 critic_action_space: Optional[ActionSpace], num_samples: int = 10,
                 temperature: float = 0.0, selection: str = 'value', embed=None,
                 image_size: Optional[int] = None, bounds: Optional[ActionSpace] = None,
                 seed: int = 0, device: str = 'cpu', scoring: str = 'first_action'):
        if num_samples < 1:
            raise ValueError(f'num_samples must be >= 1, got {num_samples}')
        if temperature < 0:
            raise ValueError(f'temperature must be >= 0, got {temperature}')
        if selection not in SELECTIONS:
            raise ValueError(f'selection must be one of {SELECTIONS}, got {selection!r}')
        if scoring not in SCORINGS:
            raise ValueError(f'scoring must be one of {SCORINGS}, got {scoring!r}')
        critics = [] if critic is None else list(critic) if isinstance(critic, (list, tuple)) \
            else [critic]
        if selection == 'value' and num_samples > 1 and (not critics or embed is None
                                                         or critic_action_space is None):
            raise ValueError("selection 'value' with num_samples > 1 needs a critic, its "
                             'action space and a language embedding function')
        self.policy = policy
        self.critics = [c.eval() for c in critics]
        self.critic_space = critic_action_space
        self.num_samples = num_samples
        self.temperature = temperature
        self.selection = selection
        self.scoring = scoring
        self.embed = embed
        self.image_size = image_size
        self.device = torch.device(device)
        self.rng = np.random.default_rng(seed)
        self.executor = ChunkExecutor(policy.action_horizon, bounds or ActionSpace.bridge())
        self.last = StepInfo()

    def reset(self, seed: Optional[int] = None) -> None:
        self.policy.reset(seed)
        self.executor.reset()
        if seed is not None:
            self.rng = np.random.default_rng(seed)

    def act(self, obs: Observation, instruction: str) -> np.ndarray:
        """One control step: the action (7,) to execute, in environment units."""
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f'instruction must be a non-empty string, got {instruction!r}')
        chunks = self.usable(self.policy.sample_actions(obs, instruction, self.num_samples))
        if len(chunks) == 0:
            logger.error('no usable action candidates out of %d: holding still', self.num_samples)
            self.last = StepInfo()
            return self.executor.hold()
        q = None
        if self.selection == 'random' or len(chunks) == 1:
            chosen = int(self.rng.integers(len(chunks)))
        else:
            q = self.score(obs, instruction,
                           chunks[:, 0] if self.scoring == 'first_action' else chunks)
            chosen = self.select(q)
        self.last = StepInfo(len(chunks), chosen, q)
        return self.executor(chunks[chosen])

    def usable(self, chunks) -> np.ndarray:
        """The well-formed, finite candidates (n, H, 7); the rest are dropped with a warning."""
        expected = (self.policy.action_horizon, ACTION_DIM)
        try:
            chunks = np.asarray(chunks, np.float32)
        except (TypeError, ValueError):
            logger.warning('policy returned candidates that are not an array: dropped')
            return np.zeros((0, *expected), np.float32)
        if chunks.ndim != 3 or chunks.shape[1:] != expected:
            logger.warning('policy returned candidates of shape %s, expected (K, %d, %d): dropped',
                           chunks.shape, *expected)
            return np.zeros((0, *expected), np.float32)
        finite = np.isfinite(chunks).all(axis=(1, 2))
        if not finite.all():
            logger.warning('dropped %d of %d candidates with non-finite values',
                           int((~finite).sum()), len(chunks))
        return chunks[finite]

    @torch.no_grad()
    def score(self, obs: Observation, instruction: str, actions: np.ndarray) -> np.ndarray:
        """Q (K,) of K actions (K, 7), or of K chunks (K, H, 7) as the mean over each chunk of
        its actions' Q at this frame: one image encoding per critic, min over its heads, mean
        over the critics."""
        k = len(actions)
        actions = np.asarray(actions, np.float32).reshape(-1, ACTION_DIM)
        image = obs[IMAGE_KEY]
        if self.image_size is not None:
            image = fit_image(image, (self.image_size, self.image_size), what='the critic')
        images = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)[None]
        lang = self.embed([instruction])
        normalised = np.clip(self.critic_space.normalise(actions), -1.0, 1.0)
        actions = torch.from_numpy(normalised).to(self.device)[None]
        states = None  # a state critic names a missing or misshapen state in encode
        if obs.get(STATE_KEY) is not None:
            states = torch.as_tensor(np.asarray(obs[STATE_KEY], np.float32).reshape(1, -1),
                                     device=self.device)
        scores = []
        for critic in self.critics:
            with torch.autocast(self.device.type, torch.bfloat16,
                                enabled=self.device.type == 'cuda'):
                z = critic.encode(images, lang, states if critic.config.state_dim else None)
                q = critic.q(z, actions)  # (E, 1, K*H)
            scores.append(q.float().min(dim=0).values[0])
        return torch.stack(scores).mean(0).cpu().numpy().reshape(k, -1).mean(axis=1)

    def select(self, q: np.ndarray) -> int:
        """argmax at temperature 0, else a draw from softmax(Q / temperature)."""
        if self.temperature == 0:
            return int(np.argmax(q))
        logits = (q - q.max()) / self.temperature
        p = np.exp(logits)
        return int(self.rng.choice(len(q), p=p / p.sum()))
