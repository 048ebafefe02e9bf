"""Evaluate critics on held-out episodes; reloading a saved checkpoint proves the artifact.

    python -m robot_rl.rl.evaluate_critic RUN/checkpoints/last [OTHER/checkpoints/last ...]
        [--data DIR ...] [--split val] [--labelling dataset|vgps] [--max-episodes N]
        [--device cpu] [--samples K] [--json OUT]

Every held-out transition (s, a_data) with Monte-Carlo return G is scored with Q = the minimum
over the ensemble heads (what steering ranks by). Metrics:

    auc              ROC AUC of Q(s, a_data) separating transitions of successful episodes from
                     those of failed ones (NaN when the split has only one kind)
    q_mc_pearson     Pearson correlation of Q(s, a_data) with G
    calibration_gap  mean of Q(s, a ~ actor) - G (the mean over actor samples first): Cal-QL
                     keeps the learned policy's value at or above the data's return (>= 0);
                     plain CQL pushes it below (< 0)
    q_policy_below_mc  fraction of transitions whose mean actor-sample Q is below G
    q_data_mean, q_policy_mean, mc_mean, num_transitions, num_episodes

Without --data, each checkpoint is evaluated on its own training sources' held-out split, read
with the image size, reward labelling, discount and action normaliser it was trained with.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import sys
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence

import numpy as np
import torch

from robot_rl.data.returns import with_mc_returns
from robot_rl.models.actor import TanhGaussianActor
from robot_rl.models.critic import Critic, load_critic
from robot_rl.rl import learner
from robot_rl.types import ActionSpace, Episode


class Scores(NamedTuple):
    """Per held-out transition, float64 (T,) each; `success` is bool (T,)."""

    q_data: np.ndarray     # min-head Q(s, a_data)
    q_policy: np.ndarray   # mean over actor samples of min-head Q(s, a)
    mc_returns: np.ndarray
    success: np.ndarray    # the transition's episode succeeded


def _chunks(episodes: Sequence[Episode], size: int) -> Iterator[Dict[str, Any]]:
    """Transitions of all episodes in order, `size` at a time: images, states, actions,
    mc_returns, instructions (list of str) and success (bool) per row."""
    rows: List[Dict[str, Any]] = []
    for episode in episodes:
        t = episode.num_transitions
        rows.append({'images': episode.images[:t], 'states': episode.states[:t],
                     'actions': episode.actions[:t],
                     'mc_returns': episode.mc_returns[:t],
                     'instructions': [episode.language_instruction] * t,
                     'success': np.full(t, episode.success)})
    merged = {key: np.concatenate([r[key] for r in rows]) for key in rows[0]}
    for start in range(0, len(merged['mc_returns']), size):
        yield {key: value[start:start + size] for key, value in merged.items()}


@torch.no_grad()
def score_episodes(critic: Critic, actor: TanhGaussianActor, episodes: Sequence[Episode],
                   embed: learner.Embed, device: torch.device, batch_size: int = 256,
                   num_samples: int = 8, seed: int = 0) -> Scores:
    """Score every transition of `episodes` (actions normalised, mc_returns set).

    One encoding per observation serves the data action and `num_samples` actor samples.
    The actor draws from the global generator: it is seeded with `seed` here and restored
    afterwards, so evaluating in the middle of training leaves training's draws alone.
    """
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        torch.manual_seed(seed)
        return _score(critic, actor, episodes, embed, device, batch_size, num_samples)


def _score(critic: Critic, actor: TanhGaussianActor, episodes: Sequence[Episode],
           embed: learner.Embed, device: torch.device, batch_size: int,
           num_samples: int) -> Scores:
    parts: Dict[str, List[np.ndarray]] = {f: [] for f in Scores._fields}
    for chunk in _chunks(episodes, batch_size):
        images = torch.from_numpy(chunk['images']).to(device)
        lang = embed(list(chunk['instructions']))
        z = critic.encode(images, lang, torch.from_numpy(chunk['states']).to(device))
        actions = torch.from_numpy(chunk['actions']).to(device)[:, None]
        q_data = critic.q(z, actions).min(dim=0).values[:, 0]
        sampled, _ = actor.sample(z, num_samples)
        q_policy = critic.q(z, sampled).min(dim=0).values.mean(dim=-1)
        parts['q_data'].append(q_data.double().cpu().numpy())
        parts['q_policy'].append(q_policy.double().cpu().numpy())
        parts['mc_returns'].append(chunk['mc_returns'].astype(np.float64))
        parts['success'].append(chunk['success'])
    return Scores(**{f: np.concatenate(v) for f, v in parts.items()})


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney U)."""
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float('nan')
    order = np.argsort(scores, kind='stable')
    ranks = np.empty(len(scores), np.float64)
    ranks[order] = np.arange(1, len(scores) + 1)
    # Tied scores share the mean of their ranks.
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inverse, weights=ranks) / counts)[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    denominator = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    return float((dx * dy).sum() / denominator) if denominator > 0 else float('nan')


def summarise(scores: Scores) -> Dict[str, float]:
    """The metrics of the module docstring from per-transition scores."""
    gap = scores.q_policy - scores.mc_returns
    return {'auc': roc_auc(scores.q_data, scores.success),
            'q_mc_pearson': pearson(scores.q_data, scores.mc_returns),
            'calibration_gap': float(gap.mean()),
            'q_policy_below_mc': float((gap < 0).mean()),
            'q_data_mean': float(scores.q_data.mean()),
            'q_policy_mean': float(scores.q_policy.mean()),
            'mc_mean': float(scores.mc_returns.mean()),
            'num_transitions': float(len(scores.q_data))}


def prepare_episodes(episodes: Sequence[Episode], space: ActionSpace,
                     gamma: float) -> List[Episode]:
    """Labelled episodes -> actions normalised by `space`, Monte-Carlo returns at `gamma`."""
    out = []
    for episode in episodes:
        episode = with_mc_returns(learner.normalise_actions(episode, space), gamma)
        learner.check_finite(episode, episode.metadata.get(learner.SOURCE_KEY, 'episode'))
        out.append(episode)
    return out


# ----------------------------------------------------------------------------- checkpoints


class LoadedCritic(NamedTuple):
    critic: Critic
    actor: TanhGaussianActor
    action_space: ActionSpace
    config: Dict[str, Any]   # the training config (TrainCriticConfig as a dict)
    step: int


def load_checkpoint(directory: Path, device: torch.device) -> LoadedCritic:
    """Critic, actor, normaliser and training config of a `save_training_checkpoint` dir."""
    directory = Path(directory)
    critic, space, extra = load_critic(directory / learner.CRITIC_FILE, device)
    if space is None:
        raise ValueError(f'{directory}: the critic was saved without its action space')
    actor = learner.load_actor(directory / learner.ACTOR_FILE, device)
    return LoadedCritic(critic.eval(), actor.eval(), space, extra.get('config', {}),
                        int(extra.get('step', -1)))


def evaluate_checkpoint(directory: Path, data: Optional[Sequence[str]] = None,
                        split: Optional[str] = None, labelling: Optional[str] = None,
                        max_episodes: Optional[int] = None, device: str = 'cpu',
                        batch_size: int = 256,
                        num_samples: Optional[int] = None) -> Dict[str, float]:
    """Reload a checkpoint and evaluate it on held-out episodes.

    Defaults reproduce the run's own evaluation: its sources' eval split read as in training,
    its algo.num_samples actor samples per state and its seed. Other `data` directories are
    read with `labelling` (default: that of the run's first source). Returns summarise()'s
    metrics plus num_episodes (as stored, after labelling) and the checkpoint's step.
    """
    dev = learner.resolve_device(device)
    loaded = load_checkpoint(directory, dev)
    data_cfg = loaded.config['data']
    sources = [(s['path'], s['labelling'], s.get('layout', 'bridge'))
               for s in data_cfg['sources']]
    if data:
        sources = [(path, labelling or sources[0][1], 'bridge') for path in data]
    split = split or data_cfg['eval_split']
    episodes: List[Episode] = []
    for path, source_labelling, layout in sources:
        episodes += learner.read_source(path, split, source_labelling, data_cfg['image_size'],
                                        max_episodes, layout)
    episodes = prepare_episodes(episodes, loaded.action_space, loaded.config['algo']['gamma'])
    embed = learner.make_embed(loaded.critic.config.lang_dim,
                               loaded.config.get('language_model'), dev)
    scores = score_episodes(loaded.critic, loaded.actor, episodes, embed, dev, batch_size,
                            num_samples or loaded.config['algo']['num_samples'],
                            seed=loaded.config['seed'])
    return dict(summarise(scores), num_episodes=float(len(episodes)), step=float(loaded.step))


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('checkpoints', nargs='+', type=Path,
                        help='checkpoint directories (RUN/checkpoints/last or best)')
    parser.add_argument('--data', nargs='*', help='dataset directories (default: training)')
    parser.add_argument('--split', help="held-out split (default: the run's eval_split)")
    parser.add_argument('--labelling', choices=learner.LABELLINGS,
                        help="rewards for --data (default: the run's first source's)")
    parser.add_argument('--max-episodes', type=int, help='per dataset directory')
    parser.add_argument('--device', default='cpu', help='cpu, cuda or auto')
    parser.add_argument('--samples', type=int,
                        help="actor samples per state (default: the run's algo.num_samples)")
    parser.add_argument('--json', type=Path, help='also write the results here')
    args = parser.parse_args(argv)
    results = {}
    for directory in args.checkpoints:
        results[str(directory)] = evaluate_checkpoint(
            directory, args.data, args.split, args.labelling, args.max_episodes, args.device,
            num_samples=args.samples)
    _print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def _print_table(results: Dict[str, Dict[str, float]]) -> None:
    names = list(next(iter(results.values())))
    width = max(len(n) for n in names)
    for checkpoint_dir, metrics in results.items():
        print(checkpoint_dir)
        for name in names:
            print(f'  {name:<{width}}  {metrics[name]:.4f}')
    sys.stdout.flush()


if __name__ == '__main__':
    main()
