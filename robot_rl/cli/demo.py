"""robot-rl-demo: the main job. Base generalist, V-GPS steering, then PA-RL fine-tuning.

    robot-rl-demo                                   # the shipped checkpoints, ~15 min on 2 cores
    robot-rl-demo finetune_episodes=100 eval_episodes=100 tasks=[carrot_on_plate,stack_blocks]
    robot-rl-demo checkpoints=runs/my_checkpoints   # policy.safetensors + critic/ of your own

On the simulated WidowX, for every task: evaluate the shipped generalist (K = 1), steer it with
the shipped Cal-QL critic (V-GPS, K = num_samples), fine-tune it online with PA-RL (one
process: collect an episode, update, reload), then evaluate the fine-tuned policy acting with
PA-RL's action optimisation. Every arm runs the same evaluation seeds (never the fine-tuning
ones). Prints one table (base / V-GPS / PA-RL per task) and writes to output_dir:
results.json, curve.png (PA-RL learning curve against episodes and wall-clock, with the base and
V-GPS success as reference lines), videos/<arm>.mp4 and finetune/ (the run: replay,
checkpoints/last/policy.safetensors, curve.jsonl).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
import time
from typing import Dict, List, Optional

from hydra.core.config_store import ConfigStore
import numpy as np
from tqdm import tqdm

from robot_rl.cli import evaluate, finetune
from robot_rl.cli.config import hydra_main
from robot_rl.envs import check_tasks
from robot_rl.rl.finetune import LearnerConfig
from robot_rl.types import CONTROL_HZ
from robot_rl.viz import write_video

SHIPPED = Path(__file__).resolve().parents[1] / 'checkpoints' / 'sim'
"""The small checkpoints shipped in the package (see robot_rl/checkpoints/README.md)."""


@dataclasses.dataclass
class DemoConfig:
    checkpoints: Optional[str] = None
    """Directory with policy.safetensors and critic/ (a Cal-QL checkpoint directory);
    null = the shipped simulation checkpoints."""
    tasks: List[str] = dataclasses.field(default_factory=lambda: ['carrot_on_plate'])
    eval_episodes: int = 50
    """Evaluation episodes per task and arm (the same seeds in every arm)."""
    num_samples: int = 10
    """V-GPS K."""
    finetune_episodes: int = 30
    """PA-RL online episodes (after the warm-up), tasks round-robin."""
    seed: int = 0
    device: str = 'auto'
    threads: int = 0
    """torch CPU threads (0: torch's default)."""
    videos_per_task: int = 1
    video_size: int = 256
    output_dir: str = 'outputs/demo'
    learner: LearnerConfig = dataclasses.field(default_factory=LearnerConfig)
    """PA-RL settings (configs/demo.yaml: WSRL-style, no offline data shipped)."""

    def validate(self) -> 'DemoConfig':
        check_tasks(self.tasks)
        if min(self.eval_episodes, self.num_samples, self.finetune_episodes) < 1:
            raise ValueError('eval_episodes, num_samples and finetune_episodes must be >= 1')
        root = Path(self.checkpoints) if self.checkpoints else SHIPPED
        for path in (root / 'policy.safetensors', root / 'critic' / 'critic.safetensors'):
            if not path.is_file():
                raise FileNotFoundError(f'demo checkpoint missing: {path} (checkpoints= must '
                                        'hold policy.safetensors and critic/)')
        self.learner.policy_path = str(root / 'policy.safetensors')
        self.learner.critic_path = str(root / 'critic')
        return self


ConfigStore.instance().store(name='demo_schema', node=DemoConfig)


def eval_config(cfg: DemoConfig) -> evaluate.EvalConfig:
    return evaluate.EvalConfig(
        policy_path=cfg.learner.policy_path, critic_path=cfg.learner.critic_path,
        tasks=list(cfg.tasks), episodes_per_task=cfg.eval_episodes,
        num_samples=[cfg.num_samples], random_num_samples=None,
        seed=cfg.seed, videos_per_task=cfg.videos_per_task, video_size=cfg.video_size,
        device=cfg.device, language_model=cfg.learner.language_model,
        output_dir=cfg.output_dir).validate()


def run_arms(cfg: DemoConfig, ecfg: evaluate.EvalConfig, arms: Dict[str, object],
             out: Path) -> Dict[str, Dict]:
    """Evaluate each named actor (act/reset/last) on the evaluation seeds; videos per arm."""
    results = {}
    total = len(arms) * len(cfg.tasks) * cfg.eval_episodes
    with tqdm(total=total, desc='evaluation', unit='ep', dynamic_ncols=True) as progress:
        for name, acting in arms.items():
            arm = evaluate.run_arm(ecfg, acting, name, progress)
            frames = arm.pop('frames')
            if frames:
                file = name.split()[0].replace('-', '').lower()
                arm['video'] = str(write_video(out / 'videos' / f'{file}.mp4', frames,
                                               fps=2 * CONTROL_HZ))
            results[name] = arm
    return results


def run(cfg: DemoConfig) -> Dict[str, Dict]:
    from robot_rl.rl import finetune as ft
    from robot_rl.steering import ValueGuidedSteering

    cfg.validate()
    start = time.perf_counter()
    out = Path(cfg.output_dir)
    fcfg = finetune.FinetuneConfig(learner=cfg.learner, tasks=list(cfg.tasks),
                                   episodes=cfg.finetune_episodes, seed=cfg.seed,
                                   device=cfg.device, threads=cfg.threads,
                                   output_dir=str(out), run_name='finetune')
    device = finetune.setup_torch(fcfg)
    run_dir = fcfg.run_dir()
    if run_dir.exists():
        raise ValueError(f'{run_dir} exists: choose another output_dir (a demo starts fresh)')

    # 1-2. The shipped generalist alone and steered by the shipped critic.
    ecfg = eval_config(cfg)
    policy, critics, critic_space, embed, _ = evaluate.load_models(ecfg)
    ecfg = dataclasses.replace(ecfg, image_size=policy.encoder_config.image_size)
    steer = {name: ValueGuidedSteering(policy, critics, critic_space, num_samples=k,
                                       embed=embed, seed=cfg.seed, device=str(device))
             for name, k in (('base', 1), (f'V-GPS K={cfg.num_samples}', cfg.num_samples))}
    results = run_arms(cfg, ecfg, steer, out)

    # 3. PA-RL online fine-tuning, in one process.
    learner = ft.Learner(cfg.learner, run_dir, device, cfg.seed)
    actor = ft.Actor(ft.Models(cfg.learner, device, cfg.seed), cfg.learner.parl, seed=cfg.seed)
    envs, instructions = finetune.make_environments(fcfg, learner.models.image_size)
    plan = ft.episode_plan(cfg.tasks, fcfg.total_episodes, cfg.seed)
    with tqdm(total=len(plan), desc='PA-RL fine-tuning', unit='ep', dynamic_ncols=True) as bar:
        ft.run_sync(learner, actor, envs, instructions, plan, bar)
    for env in envs.values():
        env.close()

    # 4. The fine-tuned policy, acting with PA-RL's action optimisation.
    results.update(run_arms(cfg, ecfg, {'PA-RL': actor}, out))
    table = evaluate.print_table(results, cfg.tasks)
    curve = finetune.read_curve(run_dir)
    reference = {name: r['tasks']['mean']['success_rate'] for name, r in results.items()
                 if name != 'PA-RL'}
    plot = finetune.plot_curves({'PA-RL': curve}, out / 'curve.png',
                                window=max(1, min(10, cfg.finetune_episodes // 3)),
                                reference=reference)
    wall = time.perf_counter() - start
    (out / 'results.json').write_text(json.dumps(
        {'arms': results, 'table_markdown': table, 'wall_clock_s': round(wall, 1),
         'finetune': {'episodes': len([c for c in curve if not c['warmup']]),
                      'updates': learner.updates, 'run': str(run_dir),
                      'online_success': float(np.mean([c['success'] for c in curve
                                                       if not c['warmup']]))},
         'config': dataclasses.asdict(cfg)}, indent=2))
    print(f'\nDemo wall-clock: {wall / 60:.1f} min\nResults: {out / "results.json"}\n'
          f'Learning curve: {plot}\nFine-tuned policy: '
          f'{run_dir / "checkpoints" / "last" / ft.POLICY_FILE}')
    return results


main = hydra_main('demo', run)


if __name__ == '__main__':
    main()
