"""robot-rl-train-reward: a success classifier from labelled episodes (Bridge-format RLDS).

    robot-rl-train-reward 'train=[{path: data/robot_rl_sim/1.0.0}]' steps=2000
    robot-rl-train-reward 'train=[{path: data/robot_rl_sim/1.0.0}, \
        {path: /data/bridge_debug/1.0.0, labelling: final_success}]'

Each source's `split` trains and its `eval_split` (held-out episodes) is scored: precision and
recall of the final-frame success calls, printed and saved beside the checkpoint
(<output_dir>/classifier.safetensors + .json, metrics.json).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import List, Optional, Tuple

from hydra.core.config_store import ConfigStore
import numpy as np

from robot_rl.cli.config import hydra_main
from robot_rl.rewards import classifier as rc

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RewardSource:
    path: str = ''
    """A Bridge-format RLDS dataset directory (<name>/<version>)."""
    labelling: str = 'terminal'
    """terminal (episode success flags, e.g. simulation) or final_success (demonstrations)."""
    split: str = 'train'
    eval_split: Optional[str] = 'val'
    """Held-out episodes to report precision/recall on (None = none)."""
    max_episodes: Optional[int] = None


@dataclasses.dataclass
class TrainRewardConfig:
    train: List[RewardSource] = dataclasses.field(default_factory=list)
    model: rc.ClassifierConfig = dataclasses.field(default_factory=rc.ClassifierConfig)
    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-4
    negatives_per_episode: int = 3
    threshold: float = 0.5
    """P(success) at or above which a frame is called a success (precision/recall)."""
    confidence: float = 0.9
    """Below this confidence the classifier asks a person (reported as ask_rate)."""
    language_model: Optional[str] = None
    """Local sentence-encoder directory; None = the bundled MiniLM."""
    device: str = 'auto'
    seed: int = 0
    output_dir: str = 'reward'

    def validate(self) -> 'TrainRewardConfig':
        if not self.train:
            raise ValueError('train: give at least one dataset source ({path: ...})')
        for source in self.train:
            if source.labelling not in rc.LABELLINGS:
                raise ValueError(f'{source.path}: labelling must be one of {rc.LABELLINGS}')
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError('steps and batch_size must be >= 1')
        return self


ConfigStore.instance().store(name='train_reward_schema', node=TrainRewardConfig)


def read_frames(cfg: TrainRewardConfig, split_of) -> List[Tuple[str, rc.Frames]]:
    """(source path, its frames) of every source that has the split `split_of(source)`."""
    from robot_rl.data.rlds import iter_episodes

    parts = []
    size = (cfg.model.image_size, cfg.model.image_size)
    for source in cfg.train:
        split = split_of(source)
        if split is None:
            continue
        episodes = []
        for i, episode in enumerate(iter_episodes(source.path, split, image_size=size)):
            if source.max_episodes is not None and i >= source.max_episodes:
                break
            episodes.append(episode)
        parts.append((source.path, rc.frames_from_episodes(episodes, source.labelling,
                                                           cfg.negatives_per_episode)))
    return parts


def run(cfg: TrainRewardConfig) -> dict:
    """Train, evaluate on held-out episodes (all sources, then each), save; returns metrics."""
    import torch

    from robot_rl.rl.learner import make_embed, resolve_device
    cfg.validate()
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    train_frames = rc.concat([f for _, f in read_frames(cfg, lambda s: s.split)])
    held_out = read_frames(cfg, lambda s: s.eval_split)
    model = rc.SuccessClassifier(cfg.model).to(device)
    embed = make_embed(cfg.model.lang_dim, cfg.language_model, device)
    losses = rc.train(model, train_frames, embed, cfg.steps, cfg.batch_size, cfg.lr, cfg.seed)
    results = {'train/loss_last100': float(sum(losses[-100:]) / len(losses[-100:])),
               'train/frames': len(train_frames)}
    scored = []
    for path, frames in held_out:
        probs = rc.probabilities(model, frames.images, frames.instructions, embed)
        scored.append((probs, frames.labels))
        if len(held_out) > 1:
            results.update({f'eval/{path}/{k}': v for k, v in rc.metrics(
                probs, frames.labels, cfg.threshold, cfg.confidence).items()})
    if scored:
        results.update({f'eval/{k}': v for k, v in rc.metrics(
            np.concatenate([p for p, _ in scored]), np.concatenate([y for _, y in scored]),
            cfg.threshold, cfg.confidence).items()})
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rc.save_classifier(out / 'classifier.safetensors', model, {'metrics': results})
    (out / 'metrics.json').write_text(json.dumps(results, indent=2))
    print(json.dumps(results))
    log.info('classifier saved to %s', out / 'classifier.safetensors')
    return results


main = hydra_main('train_reward', run)
