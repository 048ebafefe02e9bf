"""Behaviour cloning of any trainable policy class on Bridge-format data.

    robot-rl-train-bc policy=diffusion data=sim steps=20000
    robot-rl-train-bc policy=autoregressive resume=true

1. Config: dataclasses (the hydra schema lives in robot_rl.cli.train_bc), `validate()`.
2. Run directory `<output_dir>/<data>__<exp>__<policy>__<seed>__<unix time>` (or resumed).
3. Data: Bridge-format directories -> episodes -> ONE ActionSpace (saved with every
   checkpoint) -> a ChunkDataset per source (frame, instruction, next H actions), mixed by
   weight; held-out episodes from the eval split.
4. The policy (policies/: diffusion, autoregressive, gaussian) and AdamW.
5. Loop: sample, augment, `policy.supervised_loss` (the same loss PA-RL distils with), clip
   gradients, step; log train/ and time/, evaluate held-out loss and sampled-action error
   (eval/), keep checkpoints `last` and `best`.

The critic trainer (robot_rl.rl.train_critic) shares the data config, the normaliser, the
augmentation, the logger and the checkpoint aliases.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
import shutil
import time
from typing import Any, Dict, List, NamedTuple, Optional
import uuid

import numpy as np
import torch
from tqdm import tqdm

from policies.base import POLICIES
from policies.common import ChunkPolicy, EncoderConfig, load_policy, PolicyBatch, save_policy
from robot_rl.data.chunks import ChunkBatch, ChunkDataset
from robot_rl.models import checkpoint
from robot_rl.rl import learner
from robot_rl.rl.train_critic import DataConfig
from robot_rl.types import ActionSpace

POLICY_FILE, STATE_FILE = 'policy.safetensors', 'state.safetensors'
STATE_FORMAT = 'robot_rl.bc_state/1'

# ----------------------------------------------------------------------------- 1. config


@dataclasses.dataclass
class PolicyConfig:
    """Which policy class and its shape (head options are class-specific)."""

    name: str = 'diffusion'
    """A registered trainable policy: diffusion, autoregressive or gaussian."""
    horizon: int = 4
    """H: actions per predicted chunk."""
    encoder: EncoderConfig = dataclasses.field(default_factory=EncoderConfig)
    head: Dict[str, Any] = dataclasses.field(default_factory=dict)
    """Keyword arguments of the class's head (see its constructor)."""


LR_SCHEDULES = ('constant', 'cosine')


def learning_rate(cfg: 'TrainBCConfig', step: int) -> float:
    """The rate of (0-based) `step` under cfg.lr_schedule."""
    if cfg.lr_schedule == 'constant':
        return cfg.lr
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * step / cfg.steps))


@dataclasses.dataclass
class TrainBCConfig:
    """robot-rl-train-bc: every field; configs/train_bc.yaml sets the defaults."""

    exp_name: str = 'bc'
    seed: int = 0
    device: str = 'auto'
    """'auto' (CUDA when present, with bf16 autocast), 'cpu' or 'cuda'."""
    steps: int = 50_000
    batch_size: int = 256
    lr: float = 3e-4
    lr_schedule: str = 'constant'
    """'constant', or 'cosine': from `lr` at the first step down to 0 at `steps`. The rate is a
    function of the step and `steps`: a run resumed with a larger `steps` continues on the
    longer curve."""
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    """Max global gradient norm (0 = no clipping)."""
    successes_only: bool = False
    """Clone only episodes whose last reward marks success (the default clones everything,
    like a generalist trained on mixed-quality data)."""
    log_every: int = 100
    eval_every: int = 2_000
    checkpoint_every: int = 2_000
    eval_batches: int = 8
    """Held-out batches (of batch_size) per evaluation."""
    best_metric: str = 'eval/neg_loss'
    """Evaluation metric (higher is better) that picks the `best` checkpoint."""
    output_dir: str = 'runs'
    run_name: Optional[str] = None
    resume: bool = False
    """Continue run_name (null: the newest run of this data/exp/policy/seed) from `last`."""
    language_model: Optional[str] = None
    """Local transformers directory of the sentence encoder; null = bundled all-MiniLM-L6-v2."""
    policy: PolicyConfig = dataclasses.field(default_factory=PolicyConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    augment: learner.AugmentConfig = dataclasses.field(default_factory=learner.AugmentConfig)

    def validate(self) -> 'TrainBCConfig':
        problems = [text for ok, text in (
            (self.steps > 0, 'steps > 0'), (self.batch_size > 0, 'batch_size > 0'),
            (self.lr > 0, 'lr > 0'), (self.grad_clip >= 0, 'grad_clip >= 0'),
            (self.lr_schedule in LR_SCHEDULES, f'lr_schedule one of {LR_SCHEDULES}'),
            (self.policy.horizon >= 1, 'policy.horizon >= 1'),
            (self.policy.name in POLICIES and issubclass(POLICIES[self.policy.name], ChunkPolicy),
             f'policy.name one of {sorted(n for n, c in POLICIES.items() if issubclass(c, ChunkPolicy))}'),  # noqa: E501
            (bool(self.data.sources), 'at least one data source'),
            (min(self.log_every, self.eval_every, self.checkpoint_every) > 0,
             'log/eval/checkpoint intervals > 0')) if not ok]
        if problems:
            raise ValueError('invalid train_bc config: need ' + '; '.join(problems))
        return self


# ----------------------------------------------------------------------------- 2. run


def make_run(cfg: TrainBCConfig) -> learner.Run:
    prefix = f'{cfg.data.name}__{cfg.exp_name}__{cfg.policy.name}__{cfg.seed}__'
    return learner.make_run(cfg.output_dir, prefix, cfg.run_name, cfg.resume, POLICY_FILE)


# ----------------------------------------------------------------------------- 3. data


class TrainData(NamedTuple):
    datasets: List[ChunkDataset]      # one per source
    weights: np.ndarray               # their share of each batch
    eval_set: Optional[ChunkDataset]
    action_space: ActionSpace


def make_data(cfg: TrainBCConfig, action_space: Optional[ActionSpace]) -> TrainData:
    d, horizon = cfg.data, cfg.policy.horizon
    per_source = []
    for s in d.sources:
        episodes = learner.read_source(s.path, s.split, 'dataset', d.image_size, d.max_episodes)
        if cfg.successes_only:
            episodes = [e for e in episodes if e.success]
        if not episodes:
            raise ValueError(f'{s.path} [{s.split}]: no episodes to clone'
                             + (' (successes_only=true)' if cfg.successes_only else ''))
        per_source.append(episodes)
    space = action_space or learner.fit_action_space(
        [e for episodes in per_source for e in episodes], d.action_bounds, d.bounds_margin)
    datasets = [ChunkDataset(episodes, horizon, space) for episodes in per_source]
    held_out = []
    if d.eval_split is not None:
        for s in d.sources:
            held_out += learner.read_source(s.path, d.eval_split, 'dataset', d.image_size,
                                            d.max_episodes)
    weights = np.array([s.weight for s in d.sources], np.float64)
    return TrainData(datasets, weights / weights.sum(),
                     ChunkDataset(held_out, horizon, space) if held_out else None, space)


def sample(data: TrainData, batch_size: int, rng: np.random.Generator) -> ChunkBatch:
    """A batch mixing the sources by weight (largest-remainder split of batch_size)."""
    counts = np.floor(data.weights * batch_size).astype(int)
    counts[np.argsort(data.weights * batch_size - counts)[::-1][:batch_size - counts.sum()]] += 1
    parts = [ds.sample(n, rng) for ds, n in zip(data.datasets, counts) if n]
    return ChunkBatch(np.concatenate([p.images for p in parts]),
                      [t for p in parts for t in p.instructions],
                      np.concatenate([p.actions for p in parts]),
                      np.concatenate([p.mask for p in parts]))


def to_policy_batch(batch: ChunkBatch, policy: ChunkPolicy, augment=None) -> PolicyBatch:
    device = policy.device
    images = torch.from_numpy(batch.images).to(device)
    if augment is not None:
        images = augment([images])[0]
    return PolicyBatch(images, policy.embed(batch.instructions),
                       torch.from_numpy(batch.actions).to(device),
                       torch.from_numpy(batch.mask).to(device))


# ----------------------------------------------------------------------------- 4. model


def make_policy(cfg: TrainBCConfig, action_space: ActionSpace, device: torch.device
                ) -> ChunkPolicy:
    p = cfg.policy
    return POLICIES[p.name](action_space=action_space, horizon=p.horizon,
                            encoder=dataclasses.asdict(p.encoder),
                            language_model=cfg.language_model, device=device, seed=cfg.seed,
                            **dict(p.head))


# ----------------------------------------------------------------------------- 5. loop


class TrainResult(NamedTuple):
    policy: ChunkPolicy
    step: int
    run_dir: Path
    metrics: Dict[str, float]
    action_space: ActionSpace


def main(cfg: TrainBCConfig) -> TrainResult:
    cfg.validate()
    device = learner.resolve_device(cfg.device)
    run = make_run(cfg)
    rng = np.random.default_rng([cfg.seed, run.start_step])
    data = make_data(cfg, run.action_space)
    policy = make_policy(cfg, data.action_space, device)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if run.start_step:
        load_state(run.checkpoints / 'last', policy, optimizer)
    return train(cfg, run, data, policy, optimizer, rng)


def train(cfg: TrainBCConfig, run: learner.Run, data: TrainData, policy: ChunkPolicy,
          optimizer: torch.optim.Optimizer, rng: np.random.Generator) -> TrainResult:
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    world = learner.World(0, 1, policy.device)
    logger = learner.Logger(run.directory, world)
    logger.config(cfg, run.directory, run.start_step)
    augment = None
    if cfg.augment.enabled:
        generator = torch.Generator(policy.device).manual_seed(cfg.seed + run.start_step)
        augment = functools.partial(learner.augment_views, cfg=cfg.augment, generator=generator)
    autocast = policy.device.type == 'cuda'
    best, metrics, window, busy = run.best, {}, [], 0.0
    last_good: Optional[int] = run.start_step or None
    progress = tqdm(range(run.start_step, cfg.steps), initial=run.start_step, total=cfg.steps,
                    unit='step', dynamic_ncols=True)
    try:
        for step in progress:
            tick = time.perf_counter()
            policy.train()
            batch = to_policy_batch(sample(data, cfg.batch_size, rng), policy, augment)
            with torch.autocast(policy.device.type, torch.bfloat16, enabled=autocast):
                loss = policy.supervised_loss(batch)
            if not torch.isfinite(loss):
                where = (f'the last good checkpoint, {run.checkpoints / "last"} (step '
                         f'{last_good}), is untouched' if last_good else 'no checkpoint was '
                         'written')
                raise FloatingPointError(f'non-finite loss at step {step + 1}. Stopped; {where}')
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            lr = learning_rate(cfg, step)
            for group in optimizer.param_groups:
                group['lr'] = lr
            grad_norm = (torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
                         if cfg.grad_clip else torch.tensor(math.nan))
            optimizer.step()
            busy += time.perf_counter() - tick
            window.append((loss.item(), grad_norm.item()))
            done = step + 1
            if learner.due(done, cfg.log_every, cfg.steps):
                losses, norms = np.mean(window, axis=0)
                logger.scalars({'train/loss': losses, 'train/grad_norm': norms, 'train/lr': lr,
                                'time/steps_per_second': len(window) / busy}, done)
                progress.set_postfix(loss=f'{losses:.3g}')
                window, busy = [], 0.0
            if data.eval_set is not None and learner.due(done, cfg.eval_every, cfg.steps):
                metrics = evaluate(policy, data.eval_set, cfg)
                logger.scalars(metrics, done)
                value = metrics.get(cfg.best_metric, math.nan)
                if math.isfinite(value) and value > best:
                    best = value
                    publish(run, policy, optimizer, done, best, metrics, cfg, 'best')
            if learner.due(done, cfg.checkpoint_every, cfg.steps):
                publish(run, policy, optimizer, done, best, metrics, cfg, 'last')
                last_good = done
    finally:
        progress.close()
        logger.close()
    return TrainResult(policy, max(cfg.steps, run.start_step), run.directory, metrics,
                       data.action_space)


@torch.no_grad()
def evaluate(policy: ChunkPolicy, eval_set: ChunkDataset, cfg: TrainBCConfig) -> Dict[str, float]:
    """Held-out loss, and the error of one sampled chunk's first action (normalised units)."""
    policy.eval()
    rng = np.random.default_rng(cfg.seed)  # the same held-out rows at every evaluation
    losses, errors = [], []
    for _ in range(cfg.eval_batches):
        batch = to_policy_batch(eval_set.sample(cfg.batch_size, rng), policy)
        losses.append(float(policy.supervised_loss(batch)))
        z = policy.encode(batch.images, batch.lang_emb)
        first = policy.head_sample(z, 1)[:, 0, 0].clamp(-1, 1)
        errors.append(float((first - batch.actions[:, 0]).abs().mean()))
    return {'eval/loss': float(np.mean(losses)), 'eval/neg_loss': -float(np.mean(losses)),
            'eval/first_action_mae': float(np.mean(errors))}


# ----------------------------------------------------------------------------- checkpoints


def publish(run: learner.Run, policy: ChunkPolicy, optimizer: torch.optim.Optimizer, step: int,
            best: float, metrics: Dict[str, float], cfg: TrainBCConfig, alias: str) -> None:
    """Write checkpoints/step_<n>/ (policy + optimiser state) once, point `alias` at it."""
    directory = run.checkpoints / f'step_{step:09d}'
    if not directory.exists():
        meta = {'step': step, 'best': best, 'best_metric': cfg.best_metric, 'metrics': metrics,
                'config': dataclasses.asdict(cfg), 'versions': {'torch': torch.__version__}}
        tmp = directory.with_name(f'.{directory.name}.tmp-{uuid.uuid4().hex}')
        try:
            save_policy(tmp / POLICY_FILE, policy, extra=meta)
            tensors: Dict[str, torch.Tensor] = {}
            groups = learner.flatten_optimizer('optimizer', optimizer, tensors)
            checkpoint.save_tensors(tmp / STATE_FILE, tensors, {
                'format': STATE_FORMAT, 'optimizer': groups, 'extra': meta})
            os.rename(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    learner.publish_alias(run.checkpoints, directory, alias)
    learner.prune_checkpoints(run.checkpoints, ('last', 'best'))


def load_state(directory: Path, policy: ChunkPolicy, optimizer: torch.optim.Optimizer) -> None:
    """Copy a checkpoint's weights and optimiser state in (ValueError names a mismatch)."""
    saved = load_policy(directory / POLICY_FILE, device='cpu')
    if saved.config_dict() != policy.config_dict() or saved.name != policy.name:
        raise ValueError(f'{directory / POLICY_FILE}: a {saved.name} policy with '
                         f'{saved.config_dict()}, but the config asks for {policy.name} with '
                         f'{policy.config_dict()}')
    policy.load_state_dict(saved.state_dict())
    tensors, meta = checkpoint.read_checkpoint(directory / STATE_FILE)
    if meta.get('format') != STATE_FORMAT:
        raise ValueError(f'{directory / STATE_FILE}: not a behaviour-cloning state file')
    learner.load_optimizer(optimizer, 'optimizer', meta['optimizer'], tensors)
