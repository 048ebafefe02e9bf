"""robot-rl-gen-data: a multi-task Bridge-format (RLDS/TFDS) dataset from the scripted experts.

    robot-rl-gen-data episodes_per_task=200 expert=mixed output_dir=data
    robot-rl-gen-data policy_path=RUN/checkpoints/last/policy.safetensors name=rollouts
    robot-rl-gen-data --help            # every option, with hydra's override syntax

Each episode is a seeded rollout of one task's scripted expert in the simulated WidowX, or with
`policy_path` of a trained policy acting as the base arm of robot-rl-eval does (one sample per
step, the same execution): the policy's own attempts, from which a critic learns to rank that
policy's actions. The simulator labels success, Monte-Carlo returns are stored per step
(mc_return), and the dataset directory is readable by `tensorflow_datasets.builder_from_directory`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Dict, Iterator, List, Optional

from hydra.core.config_store import ConfigStore
import numpy as np
from tqdm import tqdm

from robot_rl.cli.config import hydra_main
from robot_rl.envs import check_tasks, ExpertConfig, make_env, rollout_episode, ScriptedExpert
from robot_rl.envs import TASKS
from robot_rl.types import Episode

log = logging.getLogger(__name__)


@dataclasses.dataclass
class GenDataConfig:
    tasks: List[str] = dataclasses.field(default_factory=lambda: list(TASKS))
    """Task names (robot_rl.envs.TASKS)."""
    episodes_per_task: int = 50
    """Episodes per task, train and val together."""
    val_fraction: float = 0.1
    """Share of each task's episodes (the last seeds) written to the 'val' split."""
    image_size: int = 128
    """Camera resolution in pixels (square, 64..256)."""
    seed: int = 0
    """Episode i of every task uses seed `seed + i` (scene layout, expert noise, failures)."""
    output_dir: str = 'data'
    """The dataset is written to <output_dir>/<name>/<version>."""
    name: str = 'robot_rl_sim'
    version: str = '1.0.0'
    image_format: str = 'jpeg'
    """'jpeg' (as Bridge) or 'png' (lossless)."""
    gamma: float = 0.99
    """Discount of the stored Monte-Carlo returns (mc_return)."""
    overwrite: bool = False
    expert: ExpertConfig = dataclasses.field(default_factory=ExpertConfig)
    policy_path: Optional[str] = None
    """A robot-rl-train-bc checkpoint (.safetensors) that acts instead of the scripted expert."""
    device: str = 'cpu'
    """Where the policy runs (policy_path only)."""

    def validate(self) -> 'GenDataConfig':
        check_tasks(self.tasks)
        if self.episodes_per_task < 1:
            raise ValueError(f'episodes_per_task must be >= 1, got {self.episodes_per_task}')
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f'val_fraction must be in [0, 1), got {self.val_fraction}')
        if not 0.0 < self.gamma < 1.0:
            raise ValueError(f'gamma must be in (0, 1), got {self.gamma}')
        return self


ConfigStore.instance().store(name='gen_data_schema', node=GenDataConfig)


class PolicyRollout:
    """A trained policy in the expert's seat: K = 1 sampling through the execution every
    evaluation arm uses (temporal ensembling, sticky gripper, the robot's limits)."""

    def __init__(self, policy, instruction: str, policy_path: str, device: str):
        from robot_rl.steering import ValueGuidedSteering

        self.instruction, self.policy_path = instruction, policy_path
        self.steering = ValueGuidedSteering(policy, None, None, num_samples=1, device=device)

    def reset(self, seed: Optional[int] = None) -> None:
        self.steering.reset(seed=seed)

    def act(self, obs: dict):
        return self.steering.act(obs, self.instruction)

    def metadata(self) -> dict:
        return {'failure_mode': None, 'policy': self.policy_path}


def split_seeds(cfg: GenDataConfig) -> Dict[str, range]:
    """Seeds of each split: the last `val_fraction` of each task's episodes go to 'val'."""
    n_val = int(round(cfg.val_fraction * cfg.episodes_per_task))
    n_train = cfg.episodes_per_task - n_val
    splits = {'train': range(cfg.seed, cfg.seed + n_train)}
    if n_val:
        splits['val'] = range(cfg.seed + n_train, cfg.seed + cfg.episodes_per_task)
    return splits


def generate(cfg: GenDataConfig, seeds: range, progress: tqdm,
             outcomes: Dict[str, List[bool]]) -> Iterator[Episode]:
    """Roll out every task's expert (or policy) on `seeds`, yielding episodes with mc_returns;
    each episode's success is appended to outcomes[task]."""
    from robot_rl.data.returns import with_mc_returns

    policy = None
    if cfg.policy_path is not None:
        from policies.common import load_policy
        policy = load_policy(cfg.policy_path, device=cfg.device, seed=cfg.seed)
    for task in cfg.tasks:
        env = make_env(task, image_size=cfg.image_size)
        expert = (ScriptedExpert(env, cfg.expert) if policy is None
                  else PolicyRollout(policy, env.instruction, cfg.policy_path, cfg.device))
        try:
            for seed in seeds:
                episode = rollout_episode(env, expert, seed)
                episode.metadata['gamma'] = cfg.gamma
                progress.update(1)
                progress.set_postfix(task=task, success=episode.success)
                outcomes.setdefault(task, []).append(episode.success)
                yield with_mc_returns(episode, cfg.gamma)
        finally:
            env.close()


def run(cfg: GenDataConfig):
    """Generate and write the dataset; returns its directory."""
    from robot_rl.data.rlds import write_dataset

    cfg.validate()
    seeds = split_seeds(cfg)
    total = len(cfg.tasks) * cfg.episodes_per_task
    who = f'policy {cfg.policy_path}' if cfg.policy_path else f'scripted experts, {cfg.expert}'
    outcomes: Dict[str, List[bool]] = {}
    with tqdm(total=total, desc='episodes', unit='ep') as progress:
        path = write_dataset({split: generate(cfg, s, progress, outcomes)
                              for split, s in seeds.items()},
                             cfg.output_dir, name=cfg.name, version=cfg.version,
                             image_format=cfg.image_format, overwrite=cfg.overwrite,
                             description=f'Simulated WidowX episodes (robot_rl) of {who}')
    counts = ', '.join(f'{split}: {len(s) * len(cfg.tasks)} episodes'
                       for split, s in seeds.items())
    log.info('wrote %d episodes to %s', total, path)
    rates = ', '.join(f'{task} {np.mean(v):.0%}' for task, v in outcomes.items())
    print(f'Dataset: {path}  ({counts})\n{"Policy" if cfg.policy_path else "Expert"} '
          f'success: {rates}')
    return path


main = hydra_main('gen_data', run)


if __name__ == '__main__':
    main()
