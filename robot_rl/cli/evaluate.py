"""robot-rl-eval: success rates of a policy with and without V-GPS steering, in simulation.

    robot-rl-eval policy_path=RUN/checkpoints/best/policy.safetensors \
        critic_path=CRITIC_RUN/checkpoints/best
    robot-rl-eval policy_path=... critic_path=... episodes_per_task=100 num_samples=[5,10,30,50]
    robot-rl-eval policy_path=... num_samples=[]   # the base policy alone

Arms: 'base' (K = 1, no critic), 'vgps K=k' for every k in num_samples, and 'random K=r', the
control that re-ranks r samples uniformly. Every arm runs the same episodes: episode i of a
task uses environment seed `seed + i` in every arm, and the policy's sampling stream restarts
from that seed, so each episode can be re-run on its own. Execution (temporal ensembling, sticky
gripper, the robot's limits) is the same in every arm, so only the choice among samples differs.

Writes to output_dir: results.json, success_vs_k.png, videos/<arm>.mp4, and prints a table of
success rates with 95% Wilson intervals.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
import time
from typing import Dict, List, Optional, Tuple

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING
import numpy as np
from tqdm import tqdm

from robot_rl.cli.config import hydra_main
from robot_rl.envs import check_tasks, make_env, TASKS
from robot_rl.types import CONTROL_HZ
from robot_rl.viz import caption, write_video


@dataclasses.dataclass
class EvalConfig:
    policy_path: str = MISSING
    """Policy checkpoint (.safetensors from robot-rl-train-bc)."""
    critic_path: Optional[str] = None
    """Critic: a robot-rl-train-critic checkpoint directory (its target critic is used, as in
    V-GPS) or a critic .safetensors file; null runs the base and random arms only."""
    ensemble_critic_paths: List[str] = dataclasses.field(default_factory=list)
    """More critics (e.g. other training seeds) to score with critic_path: a candidate's score
    is the mean of the critics' min-over-heads Q."""
    tasks: List[str] = dataclasses.field(default_factory=lambda: list(TASKS))
    episodes_per_task: int = 100
    num_samples: List[int] = dataclasses.field(default_factory=lambda: [5, 10, 30])
    """K of the steered arms."""
    random_num_samples: Optional[int] = 10
    """K of the random re-ranking control arm; null: no such arm."""
    temperature: float = 0.0
    """0: execute the argmax; > 0: sample softmax(Q / temperature)."""
    scoring: str = 'first_action'
    """What the critic scores: each chunk's first action (V-GPS) or the whole chunk ('chunk':
    the mean Q of its actions at the frame)."""
    image_size: int = 64
    """Camera resolution: the size the policy and critic were trained at."""
    seed: int = 0
    videos_per_task: int = 1
    """Episodes per task and arm recorded into videos/<arm>.mp4 (0: none)."""
    video_size: int = 256
    device: str = 'auto'
    language_model: Optional[str] = None
    output_dir: str = 'outputs/eval'

    def validate(self) -> 'EvalConfig':
        from robot_rl.steering.vgps import SCORINGS
        check_tasks(self.tasks)
        problems = [text for ok, text in (
            (self.episodes_per_task >= 1, 'episodes_per_task >= 1'),
            (all(k >= 1 for k in self.num_samples), 'every num_samples >= 1'),
            (self.random_num_samples is None or self.random_num_samples >= 1,
             'random_num_samples >= 1 or null'),
            (self.temperature >= 0, 'temperature >= 0'),
            (self.scoring in SCORINGS, f'scoring in {SCORINGS}'),
            (self.critic_path is not None or not self.num_samples,
             'a critic for the steered arms (or num_samples=[])'),
            (self.critic_path is not None or not self.ensemble_critic_paths,
             'critic_path with ensemble_critic_paths')) if not ok]
        if problems:
            raise ValueError('invalid eval config: need ' + '; '.join(problems))
        return self


ConfigStore.instance().store(name='evaluate_schema', node=EvalConfig)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> Tuple[float, float]:
    """95% Wilson score interval of a success rate (sensible at 0% and 100%, unlike +-2 SE)."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def arms(cfg: EvalConfig) -> List[Tuple[str, int, str]]:
    """(name, K, selection) of every arm, base first."""
    out = [('base', 1, 'value')]
    out += [(f'vgps K={k}', k, 'value') for k in cfg.num_samples]
    if cfg.random_num_samples is not None:
        out.append((f'random K={cfg.random_num_samples}', cfg.random_num_samples, 'random'))
    return out


def load_models(cfg: EvalConfig):
    """(policy, critics, critic action space, embed, device) on the configured device."""
    from policies.common import load_policy
    from robot_rl.rl import learner
    from robot_rl.steering import load_steering_critics

    device = learner.resolve_device(cfg.device)
    policy = load_policy(cfg.policy_path, device=device, seed=cfg.seed)
    if cfg.critic_path is None:
        return policy, None, None, None, device
    critics, space = load_steering_critics([cfg.critic_path, *cfg.ensemble_critic_paths],
                                           device)
    embed = learner.make_embed(critics[0].config.lang_dim, cfg.language_model, device)
    return policy, critics, space, embed, device


def run_arm(cfg: EvalConfig, steering, name: str, progress: tqdm) -> Dict:
    """Every task's episodes under one arm: successes, step times and video frames."""
    results, frames, step_seconds = {}, [], []
    for task in cfg.tasks:
        env = make_env(task, image_size=cfg.image_size)
        instruction = TASKS[task].instruction
        outcomes = []
        for i in range(cfg.episodes_per_task):
            seed = cfg.seed + i
            obs, _ = env.reset(seed=seed)
            steering.reset(seed=seed)
            record = i < cfg.videos_per_task
            done = success = False
            t = 0
            while not done:
                tick = time.perf_counter()
                action = steering.act(obs, instruction)
                step_seconds.append(time.perf_counter() - tick)
                if record:
                    q = steering.last.q
                    chosen = (f'Q {q[steering.last.chosen]:.2f}' if q is not None else '')
                    frames.append(caption(obs['image_primary'], [
                        f'{name}: {instruction}', f'seed {seed} step {t} {chosen}'],
                        cfg.video_size))
                obs, _, terminated, truncated, info = env.step(action)
                success, done, t = bool(info['success']), terminated or truncated, t + 1
            if record:
                colour = (80, 255, 80) if success else (255, 90, 90)
                frames += [caption(obs['image_primary'], [f'{name}: {instruction}',
                                   'SUCCESS' if success else 'failure'], cfg.video_size,
                                   colour)] * int(CONTROL_HZ)
            outcomes.append(success)
            progress.update(1)
            progress.set_postfix(arm=name, task=task, success=f'{np.mean(outcomes):.2f}')
        env.close()
        wins = int(np.sum(outcomes))
        results[task] = {'successes': wins, 'episodes': len(outcomes),
                         'success_rate': wins / len(outcomes),
                         'ci95': wilson_interval(wins, len(outcomes))}
    wins = sum(r['successes'] for r in results.values())
    total = sum(r['episodes'] for r in results.values())
    rate = float(np.mean([r['success_rate'] for r in results.values()]))
    results['mean'] = {'successes': wins, 'episodes': total, 'success_rate': rate,
                       'ci95': wilson_interval(wins, total)}
    return {'tasks': results, 'ms_per_step_median': 1e3 * float(np.median(step_seconds)),
            'frames': frames}


def print_table(results: Dict[str, Dict], tasks: List[str]) -> str:
    """Success per task and arm, with 95% intervals; returned as text too (for the README)."""
    columns = tasks + ['mean']
    lines = ['| arm | ' + ' | '.join(columns) + ' | ms/step |',
             '|---|' + '---|' * (len(columns) + 1)]
    for arm, r in results.items():
        cells = []
        for task in columns:
            c = r['tasks'][task]
            lo, hi = c['ci95']
            cells.append(f'{c["success_rate"]:.0%} [{lo:.0%}, {hi:.0%}]')
        lines.append(f'| {arm} | ' + ' | '.join(cells) + f' | {r["ms_per_step_median"]:.1f} |')
    text = '\n'.join(lines)
    print('\n' + text)
    return text


def plot_success_vs_k(results: Dict[str, Dict], tasks: List[str], path: Path) -> Path:
    """Success rate against K: one line per task, the mean in bold, random re-ranking dashed."""
    from matplotlib.figure import Figure

    steered = [(1, results['base'])] + [(int(a.split('=')[1]), r) for a, r in results.items()
                                        if a.startswith('vgps')]
    steered.sort(key=lambda kr: kr[0])
    ks = [k for k, _ in steered]
    figure = Figure(figsize=(7.5, 4))
    axes = figure.add_subplot()
    for task in tasks:
        axes.plot(ks, [r['tasks'][task]['success_rate'] for _, r in steered], marker='o',
                  alpha=0.5, label=task)
    means = [r['tasks']['mean']['success_rate'] for _, r in steered]
    lows = [r['tasks']['mean']['ci95'][0] for _, r in steered]
    highs = [r['tasks']['mean']['ci95'][1] for _, r in steered]
    axes.plot(ks, means, marker='o', color='black', linewidth=2.5, label='mean (V-GPS)')
    axes.fill_between(ks, lows, highs, color='black', alpha=0.1)
    for arm, r in results.items():
        if arm.startswith('random'):
            axes.axhline(r['tasks']['mean']['success_rate'], color='tab:red', linestyle='--',
                         label=f'mean ({arm})')
    top = max([r['tasks'][t]['success_rate'] for r in results.values() for t in tasks]
              + highs)
    axes.set(xscale='log', xlabel='K (samples scored per step; 1 = base policy)',
             ylabel='success rate', ylim=(0, min(1.0, max(0.1, 1.15 * top))),
             title='V-GPS steering in simulation')
    axes.set_xticks(ks, [str(k) for k in ks])
    axes.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.02, 1.0))
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def run(cfg: EvalConfig) -> Dict[str, Dict]:
    from robot_rl.steering import ValueGuidedSteering

    cfg.validate()
    out = Path(cfg.output_dir)
    policy, critics, critic_space, embed, device = load_models(cfg)
    results: Dict[str, Dict] = {}
    total = len(arms(cfg)) * len(cfg.tasks) * cfg.episodes_per_task
    with tqdm(total=total, desc='evaluation', unit='ep', dynamic_ncols=True) as progress:
        for name, k, selection in arms(cfg):
            steering = ValueGuidedSteering(policy, critics, critic_space, num_samples=k,
                                           temperature=cfg.temperature, selection=selection,
                                           embed=embed, seed=cfg.seed, device=str(device),
                                           scoring=cfg.scoring)
            arm = run_arm(cfg, steering, name, progress)
            frames = arm.pop('frames')
            if frames:
                file = name.replace(' ', '_').replace('=', '')
                arm['video'] = str(write_video(out / 'videos' / f'{file}.mp4', frames,
                                               fps=2 * CONTROL_HZ))
            results[name] = arm
    table = print_table(results, cfg.tasks)
    plot = plot_success_vs_k(results, cfg.tasks, out / 'success_vs_k.png')
    (out / 'results.json').write_text(json.dumps(
        {'arms': results, 'table_markdown': table, 'config': dataclasses.asdict(cfg)}, indent=2))
    print(f'\nResults: {out / "results.json"}\nPlot: {plot}')
    return results


main = hydra_main('evaluate', run)


if __name__ == '__main__':
    main()
