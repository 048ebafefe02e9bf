"""The online learner behind the learner node (plain Python; the node only moves bytes).

    learner = OnlineLearner(make_policy('tiny_mlp', kwargs), 'tiny_mlp', OnlineLearnerConfig(...))
    learner.ingest(decode_steps(message_bytes))   # episodes close on is_last -> replay on disk
    if learner.ready():
        stats = learner.update()                  # one gradient step
        blob = learner.maybe_publish()            # bytes of a new weight version, or None

Durability: a closed episode is written to the replay directory (atomic file per episode)
before it counts; `checkpoint_dir/policy.safetensors` (+ JSON sidecar with the weight version
and update count) is written atomically at every published version. A restarted learner reloads
both, ignores re-delivered steps of episodes it already stored, and continues the version count,
so actors (keep-latest) accept its next version.

The update is behaviour cloning on replay (`policy.supervised_loss`): the learner node's quick
smoke mode with a small online policy and no critic. PA-RL on a Cal-QL critic is
`robot_rl.rl.finetune.Learner`, which has the same interface (ingest / ready / update /
maybe_publish).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from robot_rl.data.replay import EpisodeBuilder, ReplayBuffer
from robot_rl.models.checkpoint import load_tensors_into, read_checkpoint, save_checkpoint
from robot_rl.transport.steps import EpisodeAssembler, StepBatch, StepRecord
from robot_rl.transport.weights import encode_weights, state_dict_to_numpy
from robot_rl.types import Episode, IMAGE_KEY, STATE_KEY

logger = logging.getLogger(__name__)
CHECKPOINT_NAME = 'policy.safetensors'


@dataclasses.dataclass
class OnlineLearnerConfig:
    replay_dir: str
    """Directory of the on-disk replay buffer (one file per closed episode)."""
    checkpoint_dir: str
    """Where policy.safetensors + policy.json are written at each published version."""
    batch_size: int = 32
    lr: float = 1e-3
    min_transitions: int = 4
    """Updates start once the replay holds this many transitions."""
    publish_every: int = 10
    """Publish (and checkpoint) a new weight version every this many updates."""
    seed: int = 0

    def __post_init__(self):
        if self.batch_size < 1 or self.publish_every < 1 or self.min_transitions < 1:
            raise ValueError('batch_size, publish_every and min_transitions must be >= 1')
        if not self.lr > 0:
            raise ValueError(f'lr must be positive, got {self.lr}')


@dataclasses.dataclass
class UpdateStats:
    loss: float
    updates: int
    seconds: float


def records_to_episode(instruction: str, steps: List[StepRecord],
                       metadata: Dict[str, Any]) -> Episode:
    """Ordered step records (the last with is_last) -> a validated Episode."""
    builder = EpisodeBuilder(instruction, metadata)
    for s in steps[:-1]:
        builder.add_step({IMAGE_KEY: s.image, STATE_KEY: s.state}, s.action, s.reward)
    last = steps[-1]
    return builder.finish({IMAGE_KEY: last.image, STATE_KEY: last.state},
                          terminal=last.is_terminal)


class OnlineLearner:
    """Transitions in, gradient steps, versioned weights out; see the module docstring."""

    def __init__(self, policy: Any, policy_name: str, config: OnlineLearnerConfig):
        self.policy, self.policy_name, self.config = policy, policy_name, config
        self.replay = ReplayBuffer(config.replay_dir)
        completed = {(e.metadata.get('actor'), e.metadata.get('episode'))
                     for e in self.replay.episodes()}
        self.assembler = EpisodeAssembler(completed)
        self.optimizer = torch.optim.Adam(policy.module.parameters(), lr=config.lr)
        self.rng = np.random.default_rng(config.seed)
        self.version, self.updates = 0, 0
        self.steps_received = 0
        self._resume()

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.config.checkpoint_dir) / CHECKPOINT_NAME

    def _resume(self) -> None:
        if not self.checkpoint_path.is_file():
            return
        tensors, meta = read_checkpoint(self.checkpoint_path)
        load_tensors_into(self.policy.module, tensors, str(self.checkpoint_path))
        self.version, self.updates = int(meta['version']), int(meta['updates'])
        logger.info('resumed from %s at version %d (%d updates, %d episodes in replay)',
                    self.checkpoint_path, self.version, self.updates, len(self.replay))

    def ingest(self, batch: StepBatch) -> int:
        """Add a step batch; return how many episodes it closed (each stored on disk first)."""
        self.steps_received += len(batch.steps)
        closed = self.assembler.add(batch)
        for (actor, episode), instruction, steps in closed:
            meta = {'actor': actor, 'episode': episode,
                    'policy_versions': sorted({s.policy_version for s in steps})}
            self.replay.add_episode(records_to_episode(instruction, steps, meta))
        return len(closed)

    def ready(self) -> bool:
        return self.replay.num_transitions >= self.config.min_transitions

    def update(self) -> UpdateStats:
        """One behaviour-cloning step on a uniform replay batch."""
        start = time.perf_counter()
        batch = self.replay.sample(self.config.batch_size, self.rng)
        loss = self.policy.supervised_loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.updates += 1
        return UpdateStats(float(loss.detach()), self.updates, time.perf_counter() - start)

    def maybe_publish(self) -> Optional[bytes]:
        """A new weight version every `publish_every` updates (checkpointed first), else None."""
        if self.updates == 0 or self.updates % self.config.publish_every:
            return None
        self.version += 1
        self.save_checkpoint()
        return self.weights_message()

    def weights_message(self) -> bytes:
        """Envelope bytes of the current weights and version."""
        return encode_weights(state_dict_to_numpy(self.policy.module.state_dict()), self.version,
                              {'policy': self.policy_name, 'kwargs': dict(self.policy.kwargs),
                               'updates': self.updates})

    def save_checkpoint(self) -> None:
        save_checkpoint(self.checkpoint_path, self.policy.module,
                        {'version': self.version, 'updates': self.updates,
                         'policy': self.policy_name, 'kwargs': dict(self.policy.kwargs)})
