"""robot-rl-demo: the main job. Runs the scripted expert on every simulated WidowX task.

    robot-rl-demo                    # 8 episodes per task, mixed-quality expert
    robot-rl-demo expert=clean episodes_per_task=10 output_dir=outputs/demo_clean

Prints success rates per task next to the chance that the expert draws no failure mode, and
writes a captioned rollout video (MP4) and results.json to `output_dir`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
import time
from typing import Dict, List

from hydra.core.config_store import ConfigStore
import numpy as np
from tqdm import tqdm

from robot_rl.cli.config import hydra_main
from robot_rl.envs import check_tasks, ExpertConfig, make_env, rollout_episode, ScriptedExpert
from robot_rl.envs import TASKS
from robot_rl.types import CONTROL_HZ, Episode
from robot_rl.viz import caption, write_video


@dataclasses.dataclass
class DemoConfig:
    tasks: List[str] = dataclasses.field(default_factory=lambda: list(TASKS))
    """Task names (robot_rl.envs.TASKS)."""
    episodes_per_task: int = 8
    image_size: int = 128
    """Camera resolution in pixels (square, 64..256)."""
    seed: int = 0
    """Episode i of every task uses seed `seed + i`."""
    output_dir: str = 'outputs/demo'
    video_size: int = 384
    """Side of the (upscaled, captioned) video frames in pixels."""
    expert: ExpertConfig = dataclasses.field(default_factory=ExpertConfig)

    def validate(self) -> 'DemoConfig':
        check_tasks(self.tasks)
        if self.episodes_per_task < 1:
            raise ValueError(f'episodes_per_task must be >= 1, got {self.episodes_per_task}')
        if self.video_size < 64:
            raise ValueError(f'video_size must be >= 64, got {self.video_size}')
        return self


ConfigStore.instance().store(name='demo_schema', node=DemoConfig)


def episode_frames(episode: Episode, size: int) -> List[np.ndarray]:
    """Captioned video frames of one episode; the last frame says how it ended."""
    task, seed = episode.metadata['task'], episode.metadata['seed']
    outcome = 'SUCCESS' if episode.success else f'failure ({episode.metadata["failure_mode"]})'
    frames = [caption(image, [episode.language_instruction, f'seed {seed}  step {t}'], size)
              for t, image in enumerate(episode.images)]
    colour = (80, 255, 80) if episode.success else (255, 90, 90)
    final = caption(episode.images[-1], [episode.language_instruction, f'{task}: {outcome}'],
                    size, colour)
    return frames + [final] * int(CONTROL_HZ)  # hold the outcome for a second


def print_table(results: Dict[str, Dict[str, float]], no_failure: float) -> None:
    """Success per task; `no_failure` = P(no failure mode drawn), an upper bound under noise."""
    print(f'\n{"task":<22}{"success":>10}{"episodes":>10}{"P(no failure drawn)":>22}')
    for task, r in results.items():
        print(f'{task:<22}{r["success_rate"]:>10.0%}{r["episodes"]:>10d}{no_failure:>22.0%}')
    mean = np.mean([r['success_rate'] for r in results.values()])
    print(f'{"mean":<22}{mean:>10.0%}')


def run(cfg: DemoConfig) -> Dict[str, Dict[str, float]]:
    cfg.validate()
    out = Path(cfg.output_dir)
    frames: List[np.ndarray] = []
    results: Dict[str, Dict[str, float]] = {}
    start = time.perf_counter()
    total = len(cfg.tasks) * cfg.episodes_per_task
    with tqdm(total=total, desc='expert rollouts', unit='ep') as progress:
        for task in cfg.tasks:
            env = make_env(task, image_size=cfg.image_size)
            expert = ScriptedExpert(env, cfg.expert)
            successes = []
            for seed in range(cfg.seed, cfg.seed + cfg.episodes_per_task):
                episode = rollout_episode(env, expert, seed)
                successes.append(episode.success)
                frames += episode_frames(episode, cfg.video_size)
                progress.update(1)
            env.close()
            results[task] = {'success_rate': float(np.mean(successes)),
                             'episodes': len(successes), 'successes': int(np.sum(successes))}
    no_failure = 1.0 - cfg.expert.p_any_failure
    print_table(results, no_failure)
    video = write_video(out / 'rollouts.mp4', frames, fps=2 * CONTROL_HZ)
    summary = {'results': results, 'expert': dataclasses.asdict(cfg.expert),
               'p_no_failure_drawn': no_failure,
               'wall_clock_s': round(time.perf_counter() - start, 1)}
    (out / 'results.json').write_text(json.dumps(summary, indent=2))
    print(f'\nVideo: {video}\nResults: {out / "results.json"}')
    return results


main = hydra_main('demo', run)


if __name__ == '__main__':
    main()
