"""PA-RL online fine-tuning on a Cal-QL critic: the learner, the actor, and their two schedules.

Pre-trained in: a behaviour-cloned policy (robot-rl-train-bc) and a Cal-QL critic
(robot-rl-train-critic). Then, per online episode:

1. the actor collects one episode with the *optimised* policy (PA-RL steps 1-3 at every control
   step: sample N, keep the top m by Q, gradient ascent, argmax), recording RLDS steps;
2. the learner stores it (on disk first) and, per environment step, does `updates_per_step`
   critic updates (Cal-QL whose TD target uses optimised actions at s') and as many policy
   updates (one supervised step on optimised actions);
3. new weights (policy + critic) go back to the actor with a version number.

Batches mix offline data and online data (`offline_ratio`, 0.5 by default); `offline_ratio=0`
with `warmup_episodes` > 0 is WSRL (the warm-up rollouts seed the online buffer, no offline
data is kept). Steps a person teleoperated (interventions, robot_rl.episodes) stay in the online
data and are also kept as their own source, `intervention_ratio` of every batch (HIL-SERL).
Optimiser states are fresh at the offline -> online switch.

Two schedules over the same `Learner` and `Actor`:
- `run_sync`: one process alternates 1 and 2-3 (the published loop; deterministic; the demo);
- `run_learner` / `run_actor`: separate processes over TCP (robot_rl.transport.link): the actor
  steps at the control rate and never waits; the learner trains as fast as the ratio allows,
  checkpoints, and a restarted learner resumes from its last checkpoint and on-disk replay.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
from pathlib import Path
import shutil
import time
from typing import Any, Callable, Dict, List, Optional, Tuple
import uuid

import numpy as np
import torch

from policies.common import ChunkPolicy, concat_batches, load_policy, save_policy
from robot_rl.data.chunks import ChunkBatch, ChunkDataset
from robot_rl.data.replay import MixedSampler, ReplayBuffer
from robot_rl.episodes.interventions import intervention_segments, step_metadata
from robot_rl.models import checkpoint
from robot_rl.models.critic import Critic, load_critic, save_critic
from robot_rl.rl import learner as common
from robot_rl.rl import parl
from robot_rl.rl.calql import CalQL, CalQLConfig, polyak_update
from robot_rl.rl.online_learner import records_to_episode
from robot_rl.rl.train_bc import to_policy_batch
from robot_rl.steering.execution import ChunkExecutor
from robot_rl.steering.vgps import StepInfo
from robot_rl.transport.envelope import EnvelopeError, peek
from robot_rl.transport.steps import (decode_steps, encode_steps, EpisodeAssembler, StepBatch,
                                      StepRecord)
from robot_rl.transport.weights import (decode_weights, encode_weights, state_dict_to_numpy,
                                        WeightUpdate, WIRE_DTYPES)
from robot_rl.types import ActionSpace, Episode, fit_image, IMAGE_KEY, Observation, STATE_KEY

logger = logging.getLogger(__name__)

POLICY_FILE = 'policy.safetensors'
DISTILLED_FILE = 'distilled_policy.safetensors'
"""With policy_tau < 1: the distilled policy, beside the acting one in POLICY_FILE."""
STATE_FORMAT = 'robot_rl.finetune_state/1'
CURVE_FILE = 'curve.jsonl'


@dataclasses.dataclass
class OfflineSource:
    """One Bridge-format dataset directory of offline data (robot-rl-gen-data, OXE)."""

    path: str = ''
    split: str = 'train'
    labelling: str = 'dataset'
    """'dataset' (stored rewards and terminals) or 'vgps' (demos: last 3 transitions succeed)."""
    max_episodes: Optional[int] = None


@dataclasses.dataclass
class LearnerConfig:
    """What the learner needs (the actor reads the checkpoints and `parl` too)."""

    policy_path: str = ''
    """Behaviour-cloned policy checkpoint (.safetensors from robot-rl-train-bc)."""
    critic_path: str = ''
    """Cal-QL checkpoint directory (critic + target_critic) or a critic .safetensors file."""
    offline: List[OfflineSource] = dataclasses.field(default_factory=list)
    offline_ratio: float = 0.5
    """Share of every batch drawn from offline data (0: online only, the WSRL variant)."""
    intervention_ratio: float = 0.0
    """Share of every batch drawn from intervention steps (a person's teleoperated actions,
    rebuilt from the online replay's episodes at start); 0 = they count only as online data.
    Until the first intervention arrives, the other sources share this weight."""
    warmup_episodes: int = 0
    """Episodes collected before the first update (seed the online buffer; WSRL)."""
    updates_per_step: float = 1.0
    """Critic updates, and policy updates, per environment step (the update-to-data ratio)."""
    batch_size: int = 64
    policy_lr: float = 1e-4
    bc_ratio: float = 0.5
    """Share of every distillation batch that clones chunks of successful episodes (offline
    and online) instead of the critic's choices: distilling a policy on its own samples alone
    drifts it away from its data (README), this keeps it there. 0: PA-RL's targets only."""
    policy_tau: float = 1.0
    """Rate at which the acting policy follows the distilled one after every update
    (Polyak). The acting policy samples PA-RL's candidates, acts, is streamed to the actor
    and saved as policy.safetensors. 1: they are one policy (PA-RL as published). Below 1,
    candidates come from a slowly moving copy: a policy distilled on its own samples
    collapses within a few hundred updates, one distilled on a fixed copy's samples loses
    far less (README; at 0.01 the copy only delays the collapse). 0: the pre-trained policy
    always acts."""
    train_critic: bool = True
    """False: the pre-trained Cal-QL critic is kept as loaded and only the policy learns
    (policy improvement against the offline critic). Online TD moves a critic that is still
    far from its returns' scale, and with it the ranking the policy is distilled towards
    (README)."""
    grad_clip: float = 1.0
    publish_every: int = 20
    """Processes: send the actor new weights every this many updates."""
    weights_dtype: str = 'float32'
    """Floating-point type of weight messages: float32, or float16 (half the bytes)."""
    checkpoint_every: int = 200
    """Processes: checkpoint every this many updates (and at the end)."""
    language_model: Optional[str] = None
    algo: CalQLConfig = dataclasses.field(default_factory=CalQLConfig)
    parl: parl.PARLConfig = dataclasses.field(default_factory=parl.PARLConfig)

    def problems(self) -> List[str]:
        return [text for ok, text in (
            (bool(self.policy_path), 'policy_path'),
            (bool(self.critic_path), 'critic_path'),
            (0.0 <= self.offline_ratio <= 1.0, 'offline_ratio in [0, 1]'),
            (self.offline_ratio == 0.0 or bool(self.offline),
             'offline data when offline_ratio > 0'),
            (self.offline_ratio < 1.0, 'offline_ratio < 1 (online data must be used)'),
            (0.0 <= self.intervention_ratio < 1.0
             and self.offline_ratio + self.intervention_ratio < 1.0,
             'intervention_ratio in [0, 1) with offline_ratio + intervention_ratio < 1'),
            (self.warmup_episodes >= 0, 'warmup_episodes >= 0'),
            (self.updates_per_step > 0, 'updates_per_step > 0'),
            (min(self.batch_size, self.publish_every, self.checkpoint_every) >= 1,
             'batch_size, publish_every, checkpoint_every >= 1'),
            (self.policy_lr > 0, 'policy_lr > 0'),
            (0.0 <= self.bc_ratio < 1.0, 'bc_ratio in [0, 1)'),
            (0.0 <= self.policy_tau <= 1.0, 'policy_tau in [0, 1]'),
            (self.weights_dtype in WIRE_DTYPES, f'weights_dtype in {WIRE_DTYPES}')) if not ok]


class SuccessChunks:
    """Behaviour-cloning chunks (policy units) of every successful episode seen so far.

    Episodes added between two samples become one ChunkDataset (the offline successes at the
    start: one, built once; each later online success: a small one of its own), so a new
    success never copies the frames of the others.
    """

    def __init__(self, horizon: int, action_space: ActionSpace):
        self.horizon, self.action_space = horizon, action_space
        self.count = 0
        self._pending: List[Episode] = []
        self._parts: List[ChunkDataset] = []

    def add(self, episode: Episode) -> None:
        """Keep `episode` (environment units) if it succeeded."""
        if episode.success and episode.num_transitions > 0:
            self._pending.append(episode)
            self.count += 1

    def __len__(self) -> int:
        """Successful episodes kept."""
        return self.count

    def sample(self, n: int, rng: np.random.Generator) -> ChunkBatch:
        """n chunks drawn uniformly over every kept transition."""
        if self._pending:
            self._parts.append(ChunkDataset(self._pending, self.horizon, self.action_space))
            self._pending = []
        ends = np.cumsum([len(part) for part in self._parts])
        rows = rng.integers(0, ends[-1], n)
        owner = np.searchsorted(ends, rows, side='right')
        batches = [part.get(rows[owner == i] - (ends[i] - len(part)))
                   for i, part in enumerate(self._parts) if np.any(owner == i)]
        return ChunkBatch(np.concatenate([b.images for b in batches]),
                          [text for b in batches for text in b.instructions],
                          np.concatenate([b.actions for b in batches]),
                          np.concatenate([b.mask for b in batches]))


class LearnerStopped(RuntimeError):
    """The learner cannot go on (e.g. its checkpoint directory is unwritable); message says why."""


# ----------------------------------------------------------------------------- models


class Models:
    """The pre-trained policy and critic (+ target), loaded onto one device, seeded."""

    def __init__(self, cfg: LearnerConfig, device: torch.device, seed: int):
        self.policy: ChunkPolicy = load_policy(cfg.policy_path, device=device, seed=seed)
        path = Path(cfg.critic_path)
        online_path = path / common.CRITIC_FILE if path.is_dir() else path
        loaded = load_critic(online_path, device)
        if loaded.action_space is None:
            raise ValueError(f'{online_path}: the critic carries no action space')
        self.critic: Critic = loaded.critic
        self.target: Optional[Critic] = (load_critic(path / common.TARGET_FILE, device).critic
                                         if path.is_dir() else None)
        self.critic_space: ActionSpace = loaded.action_space
        self.units = parl.UnitMap(self.policy.action_space, self.critic_space, device)
        if self.critic.config.lang_dim != self.policy.encoder_config.lang_dim:
            raise ValueError(f'the critic embeds instructions in {self.critic.config.lang_dim} '
                             f'dimensions, the policy in {self.policy.encoder_config.lang_dim}')

    @property
    def image_size(self) -> int:
        return self.policy.encoder_config.image_size


def weights_message(policy: ChunkPolicy, critic: Critic, version: int,
                    meta: Optional[Dict[str, Any]] = None, dtype: str = 'float32') -> bytes:
    """Policy and critic tensors ('policy.*', 'critic.*') as one versioned weights envelope."""
    tensors = {f'policy.{k}': v
               for k, v in state_dict_to_numpy(policy.state_dict(), dtype).items()}
    tensors.update({f'critic.{k}': v
                    for k, v in state_dict_to_numpy(critic.state_dict(), dtype).items()})
    return encode_weights(tensors, version, {'policy': policy.name,
                                             'kwargs': policy.config_dict(), **(meta or {})})


# ----------------------------------------------------------------------------- the learner


class Learner:
    """Step batches in; Cal-QL + PA-RL updates; checkpoints and versioned weights out.

    run_dir holds replay/ (one file per closed episode, written before it counts),
    checkpoints/last (policy, critics, optimiser state, counters; atomic) and curve.jsonl (one
    line per stored episode). An existing run_dir is resumed: weights, optimisers, counters.
    """

    def __init__(self, cfg: LearnerConfig, run_dir: Path, device: torch.device, seed: int = 0):
        problems = cfg.problems()
        if problems:
            raise ValueError('invalid learner config: need ' + '; '.join(problems))
        self.cfg, self.run_dir, self.device = cfg, Path(run_dir), device
        torch.manual_seed(seed)
        self.models = Models(cfg, device, seed)
        self.policy, self.space = self.models.policy, self.models.critic_space
        # The policy that samples candidates and acts; the distilled one itself at tau 1.
        self.acting = self.policy if cfg.policy_tau == 1.0 else copy.deepcopy(self.policy)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        sampler = parl.parl_sampler(self.acting, self.models.critic, self.models.units, cfg.parl)
        self.calql = CalQL(self.models.critic, cfg.algo, sampler=sampler, generator=self.generator)
        if self.models.target is not None:
            self.calql.target_critic.load_state_dict(self.models.target.state_dict())
        self.embed = common.make_embed(self.models.critic.config.lang_dim, cfg.language_model,
                                       device)
        self.rng = np.random.default_rng(seed)
        self.online = ReplayBuffer(self.run_dir / 'replay', gamma=cfg.algo.gamma)
        # In memory, derived from the online episodes (their metadata lists the steps).
        self.interventions = ReplayBuffer(gamma=cfg.algo.gamma)
        for episode in self.online.episodes():
            self._add_interventions(episode)
        self._warmup_transitions: Optional[int] = None
        self.successes = SuccessChunks(self.policy.action_horizon, self.policy.action_space)
        for episode in self.online.episodes():
            self.successes.add(dataclasses.replace(
                episode, actions=self.space.unnormalise(episode.actions)))
        self.offline = self._read_offline()
        sources = [(self.online, 1.0 - cfg.offline_ratio - cfg.intervention_ratio)]
        if self.offline is not None:
            sources.append((self.offline, cfg.offline_ratio))
        if cfg.intervention_ratio > 0:
            sources.append((self.interventions, cfg.intervention_ratio))
        self.sampler = MixedSampler(sources)
        self.assembler = EpisodeAssembler({(e.metadata.get('actor'), e.metadata.get('episode'))
                                           for e in self.online.episodes()})
        # The offline -> online switch: fresh optimiser states for the critic and the policy.
        self.calql.reset_optimizers()
        self.policy_opt = torch.optim.Adam(self.policy.parameters(), lr=cfg.policy_lr)
        self.updates = self.version = 0
        self.steps_received = 0
        self.elapsed_s = 0.0
        self._started = time.monotonic()
        self.last_stats: Dict[str, float] = {}
        self._resume()

    # -- data ------------------------------------------------------------------------------

    def _read_offline(self) -> Optional[ReplayBuffer]:
        if self.cfg.offline_ratio == 0.0 or not self.cfg.offline:
            return None
        episodes = []
        for source in self.cfg.offline:
            episodes += common.read_source(source.path, source.split, source.labelling,
                                           self.models.image_size, source.max_episodes)
        for episode in episodes:
            self.successes.add(episode)
        return common.make_replay((common.normalise_actions(e, self.space) for e in episodes),
                                  self.cfg.algo.gamma)

    @property
    def episodes(self) -> int:
        """Online episodes stored (warm-up included)."""
        return len(self.online)

    def warmup_transitions(self) -> Optional[int]:
        """Transitions in the warm-up episodes; None while the warm-up is still running."""
        if self._warmup_transitions is None and self.episodes >= self.cfg.warmup_episodes:
            lengths = [e.num_transitions for _, e in zip(range(self.cfg.warmup_episodes),
                                                         self.online.episodes())]
            self._warmup_transitions = int(sum(lengths))
        return self._warmup_transitions

    def updates_due(self) -> int:
        """Updates the ratio allows now: updates_per_step x post-warm-up transitions - done."""
        warmup = self.warmup_transitions()
        if warmup is None or self.online.num_transitions == 0:
            return 0
        allowed = math.floor(self.cfg.updates_per_step * (self.online.num_transitions - warmup))
        return max(allowed - self.updates, 0)

    def ingest(self, batch: StepBatch) -> List[Episode]:
        """Add a step batch; return the episodes it closed, each stored on disk first.

        Actions arrive in environment units and are stored in the critic's normalised units.
        """
        stored = []
        self.steps_received += len(batch.steps)
        for (actor, episode), instruction, steps in self.assembler.add(batch):
            meta = {'actor': actor, 'episode': episode, 'units': 'critic-normalised',
                    'policy_versions': sorted({s.policy_version for s in steps}),
                    **step_metadata(steps)}
            episode = records_to_episode(instruction, steps, meta)
            raw = common.normalise_actions(episode, self.space)
            try:
                stored.append(self.online.add_episode(raw))
            except OSError as err:
                raise LearnerStopped(f'cannot write episode to {self.online.directory}: {err}; '
                                     'the actor keeps it until this is fixed') from err
            self._add_interventions(stored[-1])
            self.successes.add(episode)
            self._log_episode(stored[-1])
        return stored

    def _add_interventions(self, episode: Episode) -> None:
        for segment in intervention_segments(episode):
            self.interventions.add_episode(segment)

    @property
    def replay(self) -> ReplayBuffer:
        """The online replay (on disk)."""
        return self.online

    def ready(self) -> bool:
        """Whether an update is due (the ratio allows one now)."""
        return self.updates_due() > 0

    def durable(self, batch: StepBatch) -> bool:
        """Whether `batch`'s episode is stored on disk (its steps can be acknowledged)."""
        return batch.key in self.assembler.completed

    def _log_episode(self, episode: Episode) -> None:
        warmup = self.episodes <= self.cfg.warmup_episodes
        line = {'episode': self.episodes, 'instruction': episode.language_instruction,
                'success': bool(episode.is_terminal[-1]), 'length': episode.num_transitions,
                'return': float(episode.rewards[:-1].sum()), 'warmup': warmup,
                'updates': self.updates, 'version': self.version,
                'wall_s': round(self.wall_s, 2), **episode.metadata,
                **{k: round(v, 4) for k, v in self.last_stats.items() if math.isfinite(v)}}
        with open(self.run_dir / CURVE_FILE, 'a') as f:
            f.write(json.dumps(line) + '\n')

    @property
    def wall_s(self) -> float:
        """Learner seconds over every (re)start of this run."""
        return self.elapsed_s + time.monotonic() - self._started

    # -- one update ------------------------------------------------------------------------

    def update(self) -> Dict[str, float]:
        """One Cal-QL critic step (PA-RL TD target; unless the critic is kept fixed), then one
        PA-RL policy step."""
        batch = self.sampler.sample(self.cfg.batch_size, self.rng)
        cbatch = common.to_calql_batch(batch, self.embed, self.device)
        critic_stats = (dataclasses.asdict(self.calql.update(cbatch)) if self.cfg.train_critic
                        else {})
        cloned = round(self.cfg.bc_ratio * len(cbatch.images)) if len(self.successes) else 0
        rl = len(cbatch.images) - cloned
        targets = parl.distillation_batch(self.acting, self.calql.critic, cbatch.images[:rl],
                                          cbatch.lang_emb[:rl], cbatch.actions[:rl],
                                          self.models.units, self.cfg.parl, self.generator,
                                          states=cbatch.states[:rl])
        if cloned:
            targets = concat_batches(targets, to_policy_batch(
                self.successes.sample(cloned, self.rng), self.policy))
        policy_loss = parl.distil(self.policy, self.policy_opt, targets, self.cfg.grad_clip)
        if self.acting is not self.policy:
            polyak_update(self.acting, self.policy, self.cfg.policy_tau)
        critic_loss = critic_stats.get('loss', 0.0)
        if not (math.isfinite(critic_loss) and math.isfinite(policy_loss)):
            raise LearnerStopped(f'non-finite loss at update {self.updates + 1} (critic '
                                 f'{critic_loss}, policy {policy_loss}); the last checkpoint '
                                 'is intact')
        self.updates += 1
        self.last_stats = {**critic_stats, 'loss_policy': policy_loss}
        return self.last_stats

    def weights_message(self) -> bytes:
        """Envelope bytes of the acting policy and the critic at the current version."""
        return weights_message(self.acting, self.calql.critic, self.version,
                               {'updates': self.updates}, self.cfg.weights_dtype)

    def publish(self) -> bytes:
        """A new weight version: bump the version and return its message."""
        self.version += 1
        return self.weights_message()

    def maybe_publish(self) -> Optional[bytes]:
        """After an update: checkpoint every `checkpoint_every` updates; every `publish_every`
        return a new weights message (else None)."""
        if self.updates % self.cfg.checkpoint_every == 0:
            self.save()
        return self.publish() if self.updates % self.cfg.publish_every == 0 else None

    # -- checkpoints -----------------------------------------------------------------------

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / 'checkpoints'

    def save(self) -> Path:
        """Write checkpoints/step_<updates> atomically and point `last` at it.

        An unwritable directory or a full disk raises LearnerStopped; the previous checkpoint
        stays intact (everything is written into a temporary directory renamed last).
        """
        root = self.checkpoints
        directory = root / f'step_{self.updates:09d}'
        tmp = root / f'.{directory.name}.tmp-{uuid.uuid4().hex}'
        extra = {'updates': self.updates, 'version': self.version, 'episodes': self.episodes,
                 'wall_s': self.wall_s}
        try:
            root.mkdir(parents=True, exist_ok=True)
            if directory.exists():
                return directory
            save_policy(tmp / POLICY_FILE, self.acting, extra)
            if self.acting is not self.policy:
                save_policy(tmp / DISTILLED_FILE, self.policy, extra)
            save_critic(tmp / common.CRITIC_FILE, self.calql.critic, self.space, extra)
            save_critic(tmp / common.TARGET_FILE, self.calql.target_critic, self.space, extra)
            tensors: Dict[str, torch.Tensor] = {'log_alpha': self.calql.log_alpha.detach()[None]}
            groups = {name: common.flatten_optimizer(name, opt, tensors)
                      for name, opt in (('policy_opt', self.policy_opt),
                                        ('critic_opt', self.calql.critic_opt),
                                        ('alpha_opt', self.calql.alpha_opt)) if opt is not None}
            checkpoint.save_tensors(tmp / common.STATE_FILE, tensors, {
                'format': STATE_FORMAT, 'optimizers': groups, 'extra': extra})
            os.rename(tmp, directory)
            common.publish_alias(root, directory, 'last')
            common.prune_checkpoints(root, ['last'])
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise LearnerStopped(f'cannot write a checkpoint in {root}: {err}; stopping the '
                                 'learner (the previous checkpoint is intact)') from err
        return directory

    def _resume(self) -> None:
        last = self.checkpoints / 'last'
        if not last.exists():
            logger.info('fresh run in %s (optimiser states reset for the online phase)',
                        self.run_dir)
            return
        modules = [(POLICY_FILE, self.acting), (common.CRITIC_FILE, self.calql.critic),
                   (common.TARGET_FILE, self.calql.target_critic)]
        if self.acting is not self.policy:
            if not (last / DISTILLED_FILE).exists():
                raise ValueError(f'{last}: no {DISTILLED_FILE} to resume policy_tau '
                                 f'{self.cfg.policy_tau} from (the run used policy_tau 1)')
            modules.append((DISTILLED_FILE, self.policy))
        for name, module in modules:
            tensors, _ = checkpoint.read_checkpoint(last / name)
            checkpoint.load_tensors_into(module, tensors, str(last / name))
        tensors, meta = checkpoint.read_checkpoint(last / common.STATE_FILE)
        if meta.get('format') != STATE_FORMAT:
            raise ValueError(f'{last / common.STATE_FILE}: not a fine-tuning state file')
        with torch.no_grad():
            self.calql.log_alpha.copy_(tensors['log_alpha'].reshape(()))
        optimizers = {'policy_opt': self.policy_opt, 'critic_opt': self.calql.critic_opt,
                      'alpha_opt': self.calql.alpha_opt}
        for name, groups in meta['optimizers'].items():
            common.load_optimizer(optimizers[name], name, groups, tensors)
        extra = meta['extra']
        self.updates, self.version = int(extra['updates']), int(extra['version'])
        self.elapsed_s = float(extra['wall_s'])
        logger.info('resumed %s at update %d, weight version %d (%d episodes in replay)',
                    self.run_dir, self.updates, self.version, self.episodes)


# ----------------------------------------------------------------------------- the actor


class Actor:
    """Acts with the optimised policy and records RLDS step records; takes new weights.

    Every control step: one policy encoding and N sampled chunks, one critic encoding, PA-RL's
    optimisation of their first actions (or of whole chunks: `parl.scoring`), then the chosen
    chunk through the same execution as V-GPS: temporal ensembling, sticky gripper, the
    robot's limits. The executed action is what is recorded. `load` verifies a weights update
    against both networks before copying.
    """

    def __init__(self, models: Models, cfg: parl.PARLConfig, name: str = 'actor',
                 bounds: Optional[ActionSpace] = None, seed: int = 0):
        self.models, self.cfg, self.name = models, cfg, name
        self.policy, self.critic = models.policy.eval(), models.critic.eval()
        self.device = self.policy.device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.executor = ChunkExecutor(self.policy.action_horizon, bounds or ActionSpace.bridge())
        self.version = 0
        self.last = StepInfo()
        self._embeddings: Dict[str, torch.Tensor] = {}

    def load(self, update: WeightUpdate) -> bool:
        """Copy a weights update in (True), or log why not and keep the current weights."""
        try:  # verify both before copying either
            parts = split_weights(update)
            for prefix, module in (('policy', self.policy), ('critic', self.critic)):
                check_fits(module, parts[prefix], f'weights v{update.version}')
        except ValueError as err:
            logger.error('%s; keeping version %d', err, self.version)
            return False
        self.policy.load_state_dict(parts['policy'])
        self.critic.load_state_dict(parts['critic'])
        self.version = update.version
        return True

    def reset(self, seed: Optional[int] = None) -> None:
        """A new episode (`seed` restarts the policy's sampling and the softmax selection)."""
        self.policy.reset(seed)
        self.executor.reset()
        if seed is not None:
            self.generator.manual_seed(seed)

    def act(self, obs: Observation, instruction: str) -> np.ndarray:
        """The action (7,) to execute, environment units."""
        size = self.models.image_size
        image = fit_image(obs[IMAGE_KEY], (size, size), what='the fine-tuned policy')
        images = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)[None]
        if instruction not in self._embeddings:
            self._embeddings[instruction] = self.policy.embed([instruction])
        state = None  # only a critic that reads the robot state needs it
        if self.critic.config.state_dim:
            state = torch.as_tensor(np.asarray(obs[STATE_KEY], np.float32),
                                    device=self.device).reshape(1, -1)
        choice = parl.optimised_actions(self.policy, self.critic, images,
                                        self._embeddings[instruction], self.models.units,
                                        self.cfg, generator=self.generator, states=state)
        self.last = StepInfo(self.cfg.num_samples, 0, choice.value.float().cpu().numpy())
        chunk = self.policy.action_space.unnormalise(choice.chunk[0].float().cpu().numpy())
        return self.executor(chunk.astype(np.float32))

    def run_episode(self, env, instruction: str, seed: int,
                    on_step: Optional[Callable[[StepRecord], None]] = None,
                    before_step: Optional[Callable[[], None]] = None
                    ) -> Tuple[List[StepRecord], Dict[str, Any]]:
        """One episode: (step records, the last step's info; info['success'] is the outcome).
        `on_step` sees each record as it is made; `before_step` runs before each action
        (pacing, taking new weights)."""
        obs, _ = env.reset(seed=seed)
        self.reset()
        records: List[StepRecord] = []
        done, info = False, {'success': False}
        while not done:
            if before_step is not None:
                before_step()
            action = self.act(obs, instruction)
            next_obs, reward, terminated, truncated, info = env.step(action)
            records.append(StepRecord(len(records), obs[IMAGE_KEY], obs[STATE_KEY], action,
                                      float(reward), len(records) == 0, False, False,
                                      self.version))
            if on_step is not None:
                on_step(records[-1])
            obs, done = next_obs, terminated or truncated
        records.append(StepRecord(len(records), obs[IMAGE_KEY], obs[STATE_KEY],
                                  np.zeros(7, np.float32), 0.0, False, True,
                                  bool(info['success']), self.version))
        if on_step is not None:
            on_step(records[-1])
        return records, info


def split_weights(update: WeightUpdate) -> Dict[str, Dict[str, torch.Tensor]]:
    """{'policy': tensors, 'critic': tensors} of a `weights_message`; ValueError otherwise."""
    parts: Dict[str, Dict[str, torch.Tensor]] = {'policy': {}, 'critic': {}}
    for key, value in update.tensors.items():
        prefix, _, name = key.partition('.')
        if prefix not in parts:
            raise ValueError(f'weights v{update.version}: unexpected tensor {key!r}')
        parts[prefix][name] = torch.from_numpy(np.array(value))
    return parts


def check_fits(module: torch.nn.Module, tensors: Dict[str, torch.Tensor], source: str) -> None:
    """ValueError naming the first tensor that does not fit `module` (nothing is copied)."""
    expected = module.state_dict()
    for name, value in expected.items():
        if name not in tensors or tensors[name].shape != value.shape:
            raise ValueError(f'{source}: tensor {name!r} missing or of another shape')
    extra = sorted(tensors.keys() - expected.keys())
    if extra:
        raise ValueError(f'{source}: unexpected tensor {extra[0]!r}')


# ----------------------------------------------------------------------------- schedules


def episode_plan(tasks: List[str], total: int, seed: int) -> List[Tuple[str, int]]:
    """(task, environment seed) of episode i: tasks round-robin, seeds distinct per run seed."""
    return [(tasks[i % len(tasks)], 1_000_000 * (seed + 1) + i) for i in range(total)]


def outcome(info: Dict[str, Any]) -> Dict[str, Any]:
    """An episode's outcome from its last info: 'success' (what the learner was told) and, when
    a classifier gave the reward (robot_rl.rewards.hidden), how it labelled the episode and the
    simulator's verdict."""
    keys = ('true_success', 'label_source', 'p_success')
    return {'success': bool(info['success']), **{k: info[k] for k in keys if k in info}}


def run_sync(learner: Learner, actor: Actor, envs: Dict[str, Any], instructions: Dict[str, str],
             plan: List[Tuple[str, int]], progress=None) -> List[Dict[str, Any]]:
    """The published loop in one process: per episode, collect, store, update, reload weights,
    checkpoint. Resumes at episode `learner.episodes`; returns one summary per episode run here.
    """
    summaries = []
    for index in range(learner.episodes, len(plan)):
        task, env_seed = plan[index]
        records, info = actor.run_episode(envs[task], instructions[task], env_seed)
        learner.ingest(StepBatch(actor.name, index, instructions[task], index, records))
        due = learner.updates_due()
        for _ in range(due):
            learner.update()
        if due:
            actor.load(decode_weights(learner.publish()))
            learner.save()  # every episode: an interrupted run resumes where it stopped
        summaries.append({'episode': index, 'task': task, **outcome(info),
                          'updates': learner.updates, 'wall_s': learner.wall_s})
        if progress is not None:
            recent = [s['success'] for s in summaries[-20:]]
            progress.set_postfix(task=task, success20=f'{np.mean(recent):.2f}',
                                 updates=learner.updates, refresh=False)
            progress.update(1)
    learner.save()
    return summaries


def run_learner(learner: Learner, server, total_episodes: int) -> None:
    """The learner process: ingest and acknowledge batches, train at the ratio, publish, save.

    Never waits for data while an update is due; returns once `total_episodes` are stored and
    no update is due (after a final checkpoint and weights). Batches failing verification are
    rejected with the reason and the actor resends them.
    """
    server.publish(learner.weights_message())
    while learner.episodes < total_episodes or learner.updates_due() > 0:
        idle = learner.updates_due() == 0
        for peer, data in server.receive(timeout=0.1 if idle else 0.0):
            try:
                batch = decode_steps(data)
            except EnvelopeError as err:
                logger.warning('rejected a step batch: %s', err)
                server.ack(peer, peek(data)[1], ok=False, reason=str(err))
                continue
            learner.ingest(batch)
            if learner.durable(batch):
                server.ack(peer, batch.seq)
        if learner.ready():
            learner.update()
            message = learner.maybe_publish()
            if message is not None:
                server.publish(message)
    learner.save()
    server.publish(learner.publish())


class ActorTiming:
    """Start times of the actor's control steps (the jitter benchmark reads them)."""

    def __init__(self):
        self.starts: List[float] = []

    def periods_ms(self) -> np.ndarray:
        return 1e3 * np.diff(np.asarray(self.starts)) if len(self.starts) > 1 else np.zeros(0)

    def summary(self, period_s: float) -> Dict[str, float]:
        periods = self.periods_ms()
        if periods.size == 0:
            return {'steps': len(self.starts)}
        return {'steps': len(self.starts), 'target_ms': 1e3 * period_s,
                'p50_ms': float(np.percentile(periods, 50)),
                'p99_ms': float(np.percentile(periods, 99)),
                'max_ms': float(periods.max())}


def run_actor(actor: Actor, link, envs: Dict[str, Any], instructions: Dict[str, str],
              plan: List[Tuple[str, int]], control_hz: float = 5.0, send_every: int = 5,
              timing: Optional[ActorTiming] = None, progress=None) -> List[Dict[str, Any]]:
    """The actor process: episodes at the control rate, never waiting for the learner.

    Steps leave in batches of `send_every` (and at each episode's end) through `link`
    (an ActorLink); new weights are taken between steps, keep-latest.
    """
    period = 1.0 / control_hz if control_hz > 0 else 0.0
    timing = timing or ActorTiming()
    next_tick = time.monotonic()
    seq = 0
    summaries = []

    def before_step() -> None:
        nonlocal next_tick
        update = link.take_weights()
        if update is not None:
            actor.load(update)
        if period:
            delay = next_tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            next_tick = max(next_tick + period, time.monotonic() - period)
        timing.starts.append(time.monotonic())

    for index, (task, env_seed) in enumerate(plan):
        pending: List[StepRecord] = []

        def on_step(record: StepRecord) -> None:
            nonlocal seq
            pending.append(record)
            if len(pending) >= send_every or record.is_last:
                link.send(seq, encode_steps(pending, actor=actor.name, episode=index,
                                            instruction=instructions[task], seq=seq,
                                            image_format='png'))
                seq += 1
                pending.clear()

        _, info = actor.run_episode(envs[task], instructions[task], env_seed, on_step,
                                    before_step)
        summaries.append({'episode': index, 'task': task, **outcome(info),
                          'version': actor.version, 'unacked': link.unacked})
        if progress is not None:
            recent = [s['success'] for s in summaries[-20:]]
            progress.set_postfix(task=task, success20=f'{np.mean(recent):.2f}',
                                 version=actor.version, unacked=link.unacked, refresh=False)
            progress.update(1)
    return summaries
