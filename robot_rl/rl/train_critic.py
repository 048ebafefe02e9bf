"""Offline Cal-QL critic pre-training (V-GPS), reading top to bottom like a cleanrl script.

    robot-rl-train-critic data=bridge_debug critic=tiny steps=2000 batch_size=64
    torchrun --standalone --nproc_per_node 2 -m robot_rl.cli.train_critic data=sim

1. Config: dataclasses (the hydra schema lives in robot_rl.cli.train_critic), `validate()`.
2. Ranks, device, seeds, run directory `<output_dir>/<data>__<exp>__<seed>__<unix time>`.
3. Data: Bridge-format directories -> labelled episodes -> ONE ActionSpace (saved with every
   checkpoint) -> an in-memory ReplayBuffer per source, mixed by weight; or, with
   `data.streaming=true`, labelled transitions streamed from RLDS (robot_rl.data.transitions)
   with the ActionSpace taken from the datasets' cached statistics. Held-out episodes.
4. Models: the critic, the tanh-Gaussian actor that supplies Cal-QL's policy samples, and
   CalQL (target critic, temperatures, optimisers). `resume=true` copies a checkpoint in.
5. Loop: sample, augment, `update`; log train/ and time/, evaluate (eval/, charts/), keep
   checkpoints `last` and `best`.

`main(cfg)` runs it all and `update(...)` is one step, so tests import both. Under torchrun
every rank samples its own batches (its own seed; streaming: its own disjoint shard of every
source's episodes) and steps on the mean gradient; rank 0 alone logs, evaluates and writes
checkpoints. Checkpoints hold the global state (step, weights, every
optimiser's state, identical on all ranks), so a run resumes at any world size: batch_size stays
the global batch, and each rank's sampling streams restart from (seed, rank, step).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import math
from pathlib import Path
import platform
import time
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np
from omegaconf import MISSING
import torch
from tqdm import tqdm

from robot_rl.data import oxe, transitions
from robot_rl.data.layouts import LAYOUTS
from robot_rl.data.replay import MixedSampler, TransitionBatch
from robot_rl.models.actor import TanhGaussianActor
from robot_rl.models.critic import Critic, CriticConfig
from robot_rl.rl import evaluate_critic, learner
from robot_rl.rl.calql import CalQL, CalQLBatch, CalQLConfig, CalQLStats
from robot_rl.types import ACTION_DIM, ActionSpace, Episode

# ----------------------------------------------------------------------------- 1. config


@dataclasses.dataclass
class SourceConfig:
    """One RLDS dataset directory in the training mixture."""

    path: str = MISSING
    """TFDS version directory <data_dir>/<name>/<version> (holds dataset_info.json)."""
    split: str = 'train'
    """Split trained on."""
    layout: str = 'bridge'
    """How the dataset stores its steps (robot_rl.data.layouts: 'bridge', 'fractal', ...);
    steps are standardised to the Bridge step format as they are read."""
    weight: float = 1.0
    """Share of every batch (normalised over the sources)."""
    labelling: str = 'dataset'
    """'dataset': stored rewards and is_terminal (our simulated data); 'vgps': every episode
    is a success, its last 3 transitions reward 0 and terminal, all others -1 (Bridge/OXE)."""


@dataclasses.dataclass
class DataConfig:
    """What to train and evaluate on, and how actions are normalised."""

    name: str = 'data'
    """Dataset name: the `env` part of run names."""
    sources: List[SourceConfig] = dataclasses.field(default_factory=list)
    """The training mixture (one or more directories)."""
    eval_split: Optional[str] = 'val'
    """Held-out split read from every source directory for evaluation; null = none."""
    image_size: Optional[int] = None
    """Frames are resized to image_size x image_size (pixels) when read; null keeps them."""
    action_bounds: str = 'data'
    """'data': 1st..99th percentiles of the training actions, widened by bounds_margin;
    'bridge': the fixed WidowX limits (+-5 cm, +-0.25 rad per step, gripper 0..1)."""
    bounds_margin: float = 0.1
    """Widening of the percentile range on each side, as a fraction of that range."""
    max_episodes: Optional[int] = None
    """Read at most this many episodes per source and split (quick runs); null = all."""
    eval_max_episodes: Optional[int] = None
    """Held-out episodes read into memory per source; null = max_episodes."""
    streaming: bool = False
    """Stream labelled transitions from RLDS (robot_rl.data.transitions) instead of holding
    every episode in replay buffers: for mixtures larger than memory. action_bounds 'data' then
    comes from each source's cached statistics (rlds.compute_dataset_stats), and every torchrun
    rank reads its own disjoint shard of each source's episodes."""
    shuffle_buffer: int = 10_000
    """Streaming: transitions per source (and rank) in the shuffle buffer (frames encoded)."""


@dataclasses.dataclass
class ActorConfig:
    """The tanh-Gaussian actor trained alongside the critic (source of policy samples)."""

    hidden_dims: Tuple[int, ...] = (256, 256)
    """Hidden widths of its MLP over the critic's (detached) image+language feature."""


@dataclasses.dataclass
class TrainCriticConfig:
    """robot-rl-train-critic: every field; configs/train_critic.yaml sets the defaults."""

    exp_name: str = 'calql'
    """Experiment name: the `exp` part of run names."""
    seed: int = 0
    """Seeds network init (same on every rank) and sampling (offset per rank)."""
    device: str = 'auto'
    """'auto' (CUDA when present, with bf16 autocast), 'cpu' or 'cuda'."""
    steps: int = 500_000
    """Gradient steps in total (a resumed run continues up to this)."""
    batch_size: int = 256
    """Transitions per step over all ranks (each rank takes batch_size / ranks)."""
    log_every: int = 100
    """Steps between train/ and time/ scalars (means over the interval)."""
    eval_every: int = 5_000
    """Steps between evaluations on the held-out split (also after the last step)."""
    checkpoint_every: int = 5_000
    """Steps between `last` checkpoints (also after the last step)."""
    eval_batch_size: int = 256
    """Transitions per forward pass during evaluation."""
    best_metric: str = 'eval/q_mc_pearson'
    """Evaluation metric (higher is better) that picks the `best` checkpoint."""
    output_dir: str = 'runs'
    """Runs go to <output_dir>/<run name>/ (TensorBoard events, config, checkpoints/)."""
    run_name: Optional[str] = None
    """null: <data.name>__<exp_name>__<seed>__<unix time>; with resume: the run to resume."""
    resume: bool = False
    """Continue the run named run_name (null: the newest run of this data/exp/seed) from its
    `last` checkpoint, with the same step count, normaliser and optimiser states."""
    language_model: Optional[str] = None
    """Local transformers directory of the sentence encoder; null = bundled all-MiniLM-L6-v2."""
    critic: CriticConfig = dataclasses.field(default_factory=CriticConfig)
    actor: ActorConfig = dataclasses.field(default_factory=ActorConfig)
    algo: CalQLConfig = dataclasses.field(default_factory=CalQLConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    augment: learner.AugmentConfig = dataclasses.field(default_factory=learner.AugmentConfig)

    def validate(self) -> 'TrainCriticConfig':
        """Every fail-fast check that needs no data loaded; ValueError lists what is wrong."""
        d = self.data
        checks = [
            (min(self.steps, self.batch_size, self.log_every, self.eval_every,
                 self.checkpoint_every, self.eval_batch_size) >= 1,
             'steps, batch_size, log_every, eval_every, checkpoint_every, eval_batch_size >= 1'),
            (self.device in ('auto', 'cpu', 'cuda'), "device in 'auto', 'cpu', 'cuda'"),
            (self.device != 'cuda' or torch.cuda.is_available(), "a CUDA GPU for device 'cuda'"),
            (bool(d.sources), 'data.sources: at least one source'),
            (d.action_bounds in learner.ACTION_BOUNDS,
             f'data.action_bounds in {learner.ACTION_BOUNDS}'),
            (d.bounds_margin >= 0, 'data.bounds_margin >= 0'),
            (d.image_size is None or 16 <= d.image_size <= 512, 'data.image_size in 16..512'),
            (d.max_episodes is None or d.max_episodes >= 1, 'data.max_episodes >= 1'),
            (d.eval_max_episodes is None or d.eval_max_episodes >= 1,
             'data.eval_max_episodes >= 1'),
            (d.shuffle_buffer >= 0, 'data.shuffle_buffer >= 0'),
            (self.critic.action_dim == ACTION_DIM, f'critic.action_dim == {ACTION_DIM}'),
            (self.best_metric.startswith(('eval/', 'charts/')), 'best_metric: an eval/ metric'),
        ]
        problems = [rule for ok, rule in checks if not ok]
        for i, source in enumerate(d.sources):
            problems += [f'data.sources[{i}]: {p}' for p in _source_problems(source, d)]
        if problems:
            raise ValueError('train_critic config: ' + '; '.join(problems))
        return self


def _source_problems(source: SourceConfig, data: DataConfig) -> List[str]:
    """What is wrong with one source, read from dataset_info.json (no TensorFlow needed)."""
    problems = []
    if source.layout not in LAYOUTS:
        problems.append(f'layout {source.layout!r} not in {sorted(LAYOUTS)}')
    if source.labelling not in learner.LABELLINGS:
        problems.append(f'labelling {source.labelling!r} not in {learner.LABELLINGS}')
    if not source.weight > 0:
        problems.append(f'weight must be > 0, got {source.weight}')
    info = Path(source.path) / 'dataset_info.json'
    if not info.is_file():
        return problems + [f'{source.path} is not a dataset directory (no dataset_info.json)']
    splits = [s['name'] for s in json.loads(info.read_text()).get('splits', [])]
    for split in (source.split, data.eval_split):
        if split is not None and split not in splits:
            problems.append(f'{source.path} has no split {split!r} (it has {splits})')
    return problems


# ----------------------------------------------------------------------------- 2. run


def make_run(cfg: TrainCriticConfig) -> learner.Run:
    """The run directory: a fresh one, or the resumed run's with its step and normaliser."""
    return learner.make_run(cfg.output_dir, f'{cfg.data.name}__{cfg.exp_name}__{cfg.seed}__',
                            cfg.run_name, cfg.resume, learner.CRITIC_FILE)


def seed_everything(cfg: TrainCriticConfig, world: learner.World, start_step: int,
                    ) -> Tuple[np.random.Generator, torch.Generator]:
    """Per-rank generators for batches (numpy) and for uniform actions and augmentation.

    Derived from (seed, rank, start step): ranks draw different batches, the role of
    DistributedSampler, and a resumed run draws afresh rather than replaying old batches.
    """
    key = [cfg.seed, world.rank, start_step]
    torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))  # actor samples
    generator = torch.Generator(world.device)
    generator.manual_seed(int(np.random.SeedSequence(key + [1]).generate_state(1)[0]))
    return np.random.default_rng(key), generator


# ----------------------------------------------------------------------------- 3. data


class TrainData(NamedTuple):
    batches: Iterator[TransitionBatch]  # this rank's (batch_size / ranks rows each), endless
    eval_episodes: List[Episode]      # held-out: actions normalised, mc_returns set
    action_space: ActionSpace


def make_data(cfg: TrainCriticConfig, world: learner.World, rng: np.random.Generator,
              action_space: Optional[ActionSpace]) -> TrainData:
    """This rank's training batches, the normaliser (fitted unless resumed) and, on the rank
    that evaluates, the held-out episodes.

    In memory (default): read every source, fit the normaliser, fill one buffer per source,
    mix by weight. Streaming: transitions.transition_dataset over this rank's shard, its
    shuffle seeded from `rng` (so from seed, rank and start step).
    Non-finite rewards, returns or actions raise ValueError naming the source (and episode).
    """
    d = cfg.data
    per_rank = cfg.batch_size // world.size
    if d.streaming:
        space, batches = _stream(cfg, world, rng, action_space, per_rank)
    else:
        per_source = [learner.read_source(s.path, s.split, s.labelling, d.image_size,
                                          d.max_episodes, s.layout) for s in d.sources]
        space = action_space or learner.fit_action_space(
            [e for episodes in per_source for e in episodes], d.action_bounds, d.bounds_margin)
        buffers = [learner.make_replay((learner.normalise_actions(e, space) for e in episodes),
                                       cfg.algo.gamma) for episodes in per_source]
        sampler = MixedSampler([(b, s.weight) for b, s in zip(buffers, d.sources)])
        batches = _replay_batches(sampler, per_rank, rng)
    evaluation = []
    if world.is_main and d.eval_split is not None:
        limit = d.max_episodes if d.eval_max_episodes is None else d.eval_max_episodes
        for s in d.sources:
            evaluation += learner.read_source(s.path, d.eval_split, s.labelling, d.image_size,
                                              limit, s.layout)
    return TrainData(batches, evaluate_critic.prepare_episodes(evaluation, space,
                                                               cfg.algo.gamma), space)


def _replay_batches(sampler: MixedSampler, batch_size: int,
                    rng: np.random.Generator) -> Iterator[TransitionBatch]:
    while True:
        yield sampler.sample(batch_size, rng)


def _shared_space(cfg: TrainCriticConfig, world: learner.World,
                  sources: List[transitions.TransitionSource]) -> ActionSpace:
    """Rank 0's normaliser from the sources' statistics (computed once, cached beside the
    data where it is writable), broadcast so every rank normalises identically."""
    d = cfg.data
    bounds = torch.zeros(2, ACTION_DIM, dtype=torch.float64, device=world.device)
    if world.is_main:
        stats = oxe.load_stats(sources).values() if d.action_bounds == 'data' else ()
        space = learner.action_space_from_stats([s.action for s in stats], d.action_bounds,
                                                d.bounds_margin)
        bounds.copy_(torch.from_numpy(np.stack([space.low, space.high])))
    learner.broadcast_from_main([bounds], world)
    low, high = bounds.cpu().numpy()
    return ActionSpace(low=low, high=high)


def _stream(cfg: TrainCriticConfig, world: learner.World, rng: np.random.Generator,
            action_space: Optional[ActionSpace], batch_size: int
            ) -> Tuple[ActionSpace, Iterator[TransitionBatch]]:
    """The streaming data path: the normaliser from cached statistics, and the batches."""
    d = cfg.data
    sources = [transitions.TransitionSource(f'{i}:{s.path}', s.path, s.split, s.layout,
                                            s.weight, s.labelling)
               for i, s in enumerate(d.sources)]
    space = action_space or _shared_space(cfg, world, sources)
    size = None if d.image_size is None else (d.image_size, d.image_size)
    ds = transitions.transition_dataset(
        sources, batch_size=batch_size, gamma=cfg.algo.gamma, action_space=space,
        image_size=size, shuffle_buffer=d.shuffle_buffer, seed=int(rng.integers(2 ** 31)),
        shard=(world.rank, world.size), max_episodes=d.max_episodes)
    return space, transitions.transition_batches(ds, f'{d.name} (rank {world.rank})')


# ----------------------------------------------------------------------------- 4. models


def make_algo(cfg: TrainCriticConfig, world: learner.World,
              generator: torch.Generator) -> CalQL:
    """Critic, actor and Cal-QL on the device (same init on every rank: seeded, broadcast)."""
    with torch.random.fork_rng(devices=[]):  # leave the per-rank sampling seed alone
        torch.manual_seed(cfg.seed)
        critic = Critic(cfg.critic)
        actor = TanhGaussianActor(critic.feature_dim, cfg.critic.action_dim,
                                  tuple(cfg.actor.hidden_dims))
    return CalQL(critic.to(world.device), cfg.algo, actor=actor.to(world.device),
                 generator=generator)


def actor_layout(cfg: TrainCriticConfig, algo: CalQL) -> Dict[str, Any]:
    return {'feature_dim': algo.critic.feature_dim, 'action_dim': cfg.critic.action_dim,
            'hidden_dims': list(cfg.actor.hidden_dims)}


def share_across_ranks(algo: CalQL, world: learner.World) -> None:
    """Rank 0's weights everywhere, and every optimiser stepping on the mean gradient."""
    tensors = [*algo.critic.state_dict().values(), *algo.target_critic.state_dict().values(),
               *algo.actor.state_dict().values(), algo.log_alpha, algo.log_entropy_alpha]
    learner.broadcast_from_main(tensors, world)
    learner.average_gradients([algo.critic_opt, algo.actor_opt, algo.entropy_opt,
                               algo.alpha_opt], world)


# ----------------------------------------------------------------------------- 5. loop


def update(algo: CalQL, batch: CalQLBatch, world: learner.World, step: int) -> CalQLStats:
    """One Cal-QL update (critic, Lagrange alpha, actor, entropy, Polyak); stats are means over
    ranks. FloatingPointError when a loss is not finite, raised on every rank at once before
    anything is saved, so the last checkpoint on disk stays the last good one."""
    stats = algo.update(batch)
    stats = CalQLStats(*learner.mean_across_ranks(dataclasses.astuple(stats), world))
    bad = {k: getattr(stats, k) for k in ('loss', 'loss_td', 'loss_cql', 'loss_actor')
           if not math.isfinite(getattr(stats, k))}
    if bad:
        raise FloatingPointError(f'non-finite loss at step {step + 1}: {bad} (q_data '
                                 f'{stats.q_data:.3g}, alpha {stats.alpha:.3g})')
    return stats


def evaluate(algo: CalQL, episodes: List[Episode], embed: learner.Embed,
             cfg: TrainCriticConfig, device: torch.device
             ) -> Tuple[Dict[str, float], evaluate_critic.Scores]:
    """Held-out metrics (see evaluate_critic) as eval/ scalars, and the per-transition scores."""
    scores = evaluate_critic.score_episodes(algo.critic, algo.actor, episodes, embed, device,
                                            cfg.eval_batch_size, cfg.algo.num_samples,
                                            seed=cfg.seed)
    metrics = {f'eval/{k}': v for k, v in evaluate_critic.summarise(scores).items()}
    metrics['charts/q_vs_mc'] = metrics['eval/q_mc_pearson']
    return metrics, scores


def q_vs_mc_figure(scores: evaluate_critic.Scores, step: int, max_points: int = 2000):
    """Scatter of Q(s, a_data) against the Monte-Carlo return, coloured by episode outcome."""
    from matplotlib.figure import Figure

    pick = np.random.default_rng(0).permutation(len(scores.q_data))[:max_points]
    figure = Figure(figsize=(4, 4))
    axes = figure.add_subplot()
    for success, colour in ((True, 'tab:green'), (False, 'tab:red')):
        rows = pick[scores.success[pick] == success]
        axes.scatter(scores.mc_returns[rows], scores.q_data[rows], s=4, c=colour,
                     label='success' if success else 'failure')
    axes.set(xlabel='Monte-Carlo return', ylabel='Q(s, a_data)', title=f'step {step}')
    axes.legend(loc='upper left')
    return figure


class TrainResult(NamedTuple):
    algo: CalQL
    step: int                      # updates done
    run_dir: Path
    metrics: Dict[str, float]      # the last evaluation's (empty without one)
    action_space: ActionSpace


def main(cfg: TrainCriticConfig) -> TrainResult:
    """Train a critic as configured; returns the trained algorithm and the last metrics."""
    cfg.validate()
    world = learner.init_world(cfg.device)
    try:
        if cfg.batch_size % world.size:
            raise ValueError(f'batch_size {cfg.batch_size} does not split over {world.size} '
                             'ranks')
        run = make_run(cfg)
        rng, generator = seed_everything(cfg, world, run.start_step)
        algo = make_algo(cfg, world, generator)
        if run.start_step:  # before reading data: a checkpoint that does not fit fails fast
            learner.load_training_checkpoint(run.checkpoints / 'last', algo)
        data = make_data(cfg, world, rng, run.action_space)
        share_across_ranks(algo, world)
        embed = learner.make_embed(cfg.critic.lang_dim, cfg.language_model, world.device)
        return train(cfg, world, run, data, algo, embed, rng, generator)
    finally:
        learner.close_world(world)


def train(cfg: TrainCriticConfig, world: learner.World, run: learner.Run, data: TrainData,
          algo: CalQL, embed: learner.Embed, rng: np.random.Generator,
          generator: torch.Generator) -> TrainResult:
    """The training loop, from run.start_step to cfg.steps."""
    if world.is_main:
        run.checkpoints.mkdir(parents=True, exist_ok=True)
    logger = learner.Logger(run.directory, world)
    logger.config(cfg, run.directory, run.start_step)
    augment = None
    if cfg.augment.enabled:
        augment = functools.partial(learner.augment_pair, cfg=cfg.augment, generator=generator)
    saver = Checkpointer(cfg, run, algo, data.action_space, world)
    window: List[CalQLStats] = []
    busy = 0.0  # seconds spent sampling and updating since the last log
    metrics: Dict[str, float] = {}
    progress = tqdm(range(run.start_step, cfg.steps), initial=run.start_step, total=cfg.steps,
                    unit='step', disable=not world.is_main, dynamic_ncols=True)
    try:
        for step in progress:
            tick = time.perf_counter()
            batch = learner.to_calql_batch(next(data.batches), embed, world.device, augment)
            try:
                window.append(update(algo, batch, world, step))
            except FloatingPointError as err:
                raise FloatingPointError(f'{err}. Stopped; {saver.describe_last()}') from None
            busy += time.perf_counter() - tick
            done = step + 1
            if learner.due(done, cfg.log_every, cfg.steps):
                logger.scalars(_window_means(window, len(window) / busy), done)
                progress.set_postfix(loss_td=f'{window[-1].loss_td:.3g}',
                                     q=f'{window[-1].q_data:.3g}')
                window, busy = [], 0.0
            evaluate_now = learner.due(done, cfg.eval_every, cfg.steps)
            if world.is_main and data.eval_episodes and evaluate_now:
                metrics, scores = evaluate(algo, data.eval_episodes, embed, cfg, world.device)
                logger.scalars(metrics, done)
                logger.figure('charts/q_vs_mc', q_vs_mc_figure(scores, done), done)
                saver.offer_best(metrics, done)
            if learner.due(done, cfg.checkpoint_every, cfg.steps):
                saver.save_last(done, metrics)
    finally:
        progress.close()
        logger.close()
    return TrainResult(algo, max(cfg.steps, run.start_step), run.directory, metrics,
                       data.action_space)


def _window_means(window: List[CalQLStats], steps_per_second: float) -> Dict[str, float]:
    """train/<stat> means over the logging interval, plus time/steps_per_second."""
    names = [f.name for f in dataclasses.fields(CalQLStats)]
    means = np.mean([dataclasses.astuple(s) for s in window], axis=0)
    out = {f'train/{n}': float(v) for n, v in zip(names, means)}
    out['time/steps_per_second'] = steps_per_second
    return out


class Checkpointer:
    """Rank 0 writes step directories under checkpoints/ and moves `last` / `best` to them."""

    def __init__(self, cfg: TrainCriticConfig, run: learner.Run, algo: CalQL,
                 action_space: ActionSpace, world: learner.World):
        self.cfg, self.run, self.algo, self.space = cfg, run, algo, action_space
        self.enabled = world.is_main
        self.world_size = world.size  # a resumed run may use another: step counts are global
        self.best = run.best
        self.last_step = run.start_step if run.start_step else None

    def describe_last(self) -> str:
        if self.last_step is None:
            return 'no checkpoint was written'
        return (f'the last good checkpoint, {self.run.checkpoints / "last"} (step '
                f'{self.last_step}), is untouched')

    def offer_best(self, metrics: Dict[str, float], step: int) -> None:
        value = metrics.get(self.cfg.best_metric, math.nan)
        if self.enabled and math.isfinite(value) and value > self.best:
            self.best = value
            self._publish(step, metrics, 'best')

    def save_last(self, step: int, metrics: Dict[str, float]) -> None:
        if self.enabled:
            self._publish(step, metrics, 'last')
            self.last_step = step

    def _publish(self, step: int, metrics: Dict[str, float], alias: str) -> None:
        directory = self.run.checkpoints / f'step_{step:09d}'
        if not directory.exists():
            meta = {'step': step, 'best': self.best, 'best_metric': self.cfg.best_metric,
                    'metrics': metrics, 'config': dataclasses.asdict(self.cfg),
                    'world_size': self.world_size,
                    'versions': {'robot_rl': _package_version(), 'torch': torch.__version__,
                                 'python': platform.python_version()}}
            learner.save_training_checkpoint(directory, self.algo, self.space,
                                             actor_layout(self.cfg, self.algo), meta)
        learner.publish_alias(self.run.checkpoints, directory, alias)
        learner.prune_checkpoints(self.run.checkpoints, ('last', 'best'))


def _package_version() -> str:
    try:
        return importlib.metadata.version('robot_rl')
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return 'unknown'
