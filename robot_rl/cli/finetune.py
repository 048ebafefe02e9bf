"""robot-rl-finetune: PA-RL online fine-tuning of a pre-trained policy on a Cal-QL critic.

    robot-rl-finetune learner.policy_path=BC_RUN/checkpoints/best/policy.safetensors \
        learner.critic_path=CRITIC_RUN/checkpoints/best tasks=[carrot_on_plate] episodes=100
    robot-rl-finetune ... mode=processes            # actor and learner as two processes
    robot-rl-finetune ... mode=learner port=5555    # on the GPU machine
    robot-rl-finetune ... mode=actor host=GPU_HOST port=5555
    robot-rl-finetune ... learner.offline_ratio=0 learner.warmup_episodes=5   # WSRL variant

Modes: 'sync' runs the published loop in one process (collect an episode, then updates); the
others run the actor (paced at control_hz, never waiting) and the learner (robot_rl.rl.finetune)
apart, over TCP. Rerunning with the same run_name resumes a run (replay and checkpoint).
Writes to output_dir/run_name: replay/, checkpoints/last/ (policy.safetensors is what
robot-rl-eval and the policy node load), curve.jsonl and curve.png.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
import subprocess
import sys
import time
from typing import Dict, List, Optional

from hydra.core.config_store import ConfigStore
import numpy as np
from tqdm import tqdm

from robot_rl.cli.config import hydra_main
from robot_rl.envs import check_tasks, TASKS
from robot_rl.rl.finetune import CURVE_FILE, LearnerConfig

MODES = ('sync', 'processes', 'learner', 'actor')
PORT_FILE = 'learner.port'
OUTCOMES_FILE = 'outcomes.jsonl'
"""The actor's view of each episode (task, success, and with a classifier how it was labelled
and the simulator's verdict), one JSON line per episode."""
logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RewardConfig:
    """Where episode outcomes come from: the simulator (default), or a learned success
    classifier with the simulator hidden and answering only when the classifier is unsure
    (robot_rl.rewards.hidden), as a person would on the robot."""

    classifier_path: Optional[str] = None
    """robot-rl-train-reward checkpoint; null = the simulator's ground truth."""
    confidence: float = 0.8
    """The classifier labels when max(p, 1 - p) is at least this; below, the simulator does."""
    check_every_steps: int = 5
    """While an episode runs, a confident success every N steps ends it (0: final frame only)."""
    language_model: Optional[str] = None
    """Sentence encoder of the classifier's instructions (null: the bundled MiniLM)."""


@dataclasses.dataclass
class FinetuneConfig:
    learner: LearnerConfig = dataclasses.field(default_factory=LearnerConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    tasks: List[str] = dataclasses.field(default_factory=lambda: ['carrot_on_plate'])
    """Simulated tasks, episodes round-robin (robot_rl.envs.TASKS)."""
    episodes: int = 100
    """Online episodes after the warm-up."""
    mode: str = 'sync'
    """sync | processes | learner | actor (see the module docstring)."""
    host: str = '127.0.0.1'
    """Learner address the actor connects to (learner mode binds it)."""
    port: int = 0
    """Learner TCP port (0: any free port, written to RUN/learner.port)."""
    control_hz: float = 5.0
    """Actor step rate in the process modes (0: as fast as it can)."""
    send_every: int = 5
    """Steps per transition batch sent to the learner."""
    actor_name: str = 'actor'
    seed: int = 0
    device: str = 'auto'
    threads: int = 0
    """torch CPU threads per process (0: torch's default)."""
    output_dir: str = 'runs'
    run_name: Optional[str] = None
    """null: finetune__<tasks>__<seed>__<unix time>; an existing run is resumed."""
    curve_window: int = 10
    """Episodes in the moving average of curve.png."""

    def validate(self) -> 'FinetuneConfig':
        check_tasks(self.tasks)
        problems = self.learner.problems() + [text for ok, text in (
            (self.mode in MODES, f'mode in {MODES}'),
            (self.episodes >= 1, 'episodes >= 1'),
            (self.control_hz >= 0, 'control_hz >= 0'),
            (self.send_every >= 1, 'send_every >= 1'),
            (self.curve_window >= 1, 'curve_window >= 1'),
            (0.5 <= self.reward.confidence <= 1.0, 'reward.confidence in [0.5, 1]'),
            (self.reward.check_every_steps >= 0, 'reward.check_every_steps >= 0'),
            (0 <= self.port < 65536, 'port in [0, 65535]')) if not ok]
        if problems:
            raise ValueError('invalid finetune config: need ' + '; '.join(problems))
        return self

    @property
    def total_episodes(self) -> int:
        return self.learner.warmup_episodes + self.episodes

    def run_dir(self) -> Path:
        tasks = '+'.join(self.tasks)
        name = self.run_name or f'finetune__{tasks}__{self.seed}__{int(time.time())}'
        return Path(self.output_dir) / name


ConfigStore.instance().store(name='finetune_schema', node=FinetuneConfig)


# ----------------------------------------------------------------------------- curves


def read_curve(run_dir: Path) -> List[Dict]:
    path = Path(run_dir) / CURVE_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def true_success_curve(curve: List[Dict], run_dir: Path) -> List[Dict]:
    """The learner's curve with each episode's success replaced by the simulator's verdict,
    when a classifier gave the rewards (outcomes.jsonl has true_success); [] otherwise."""
    path = Path(run_dir) / OUTCOMES_FILE
    outcomes = ([json.loads(line) for line in path.read_text().splitlines()]
                if path.exists() else [])
    if not outcomes or len(outcomes) != len(curve) or any('true_success' not in o
                                                          for o in outcomes):
        return []
    return [{**c, 'success': bool(o['true_success'])} for c, o in zip(curve, outcomes)]


def moving_success(curve: List[Dict], window: int) -> np.ndarray:
    """Success rate over the last `window` online episodes, at each online episode."""
    wins = np.array([c['success'] for c in curve if not c['warmup']], float)
    if wins.size == 0:
        return wins
    kernel = np.ones(window)
    sums = np.convolve(wins, kernel)[:wins.size]
    counts = np.convolve(np.ones_like(wins), kernel)[:wins.size]
    return sums / counts


def plot_curves(curves: Dict[str, List[Dict]], path: Path, window: int,
                reference: Optional[Dict[str, float]] = None) -> Path:
    """Success (moving average) against online episodes and against wall-clock minutes."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for label, curve in curves.items():
        online = [c for c in curve if not c['warmup']]
        rate = moving_success(curve, window)
        if rate.size == 0:
            continue
        axes[0].plot(np.arange(1, rate.size + 1), rate, label=label)
        axes[1].plot([c['wall_s'] / 60 for c in online], rate, label=label)
    for name, value in (reference or {}).items():
        for ax in axes:
            ax.axhline(value, linestyle='--', linewidth=1, color='grey')
        axes[0].annotate(name, (1, value), fontsize=8, color='grey')
    axes[0].set_xlabel('online episodes')
    axes[1].set_xlabel('learner wall-clock (min)')
    axes[0].set_ylabel(f'success (last {window} episodes)')
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8)
    fig.suptitle('PA-RL online fine-tuning')
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- modes


def setup_torch(cfg: FinetuneConfig):
    import torch
    from robot_rl.rl import learner as common
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return common.resolve_device(cfg.device)


def make_environments(cfg: FinetuneConfig, image_size: int):
    from robot_rl.envs import make_env
    envs = {task: make_env(task, image_size=image_size) for task in cfg.tasks}
    if cfg.reward.classifier_path:
        from robot_rl.episodes.labeller import load_probability
        from robot_rl.rewards.hidden import ClassifierRewardEnv
        probability = load_probability(cfg.reward.classifier_path, cfg.reward.language_model)
        envs = {task: ClassifierRewardEnv(env, probability, cfg.reward.confidence,
                                          cfg.reward.check_every_steps)
                for task, env in envs.items()}
    return envs, {task: TASKS[task].instruction for task in cfg.tasks}


def write_outcomes(run_dir: Path, summaries: List[Dict]) -> None:
    with open(run_dir / OUTCOMES_FILE, 'a') as f:
        for summary in summaries:
            f.write(json.dumps(summary) + '\n')


def run_sync_mode(cfg: FinetuneConfig, run_dir: Path) -> None:
    from robot_rl.rl import finetune as ft
    device = setup_torch(cfg)
    learner = ft.Learner(cfg.learner, run_dir, device, cfg.seed)
    actor = ft.Actor(ft.Models(cfg.learner, device, cfg.seed), cfg.learner.parl,
                     cfg.actor_name, seed=cfg.seed)
    if learner.version:
        actor.load(ft.decode_weights(learner.weights_message()))
    envs, instructions = make_environments(cfg, learner.models.image_size)
    plan = ft.episode_plan(cfg.tasks, cfg.total_episodes, cfg.seed)
    with tqdm(total=len(plan), initial=learner.episodes, desc='PA-RL episodes',
              unit='ep') as progress:
        write_outcomes(run_dir, ft.run_sync(learner, actor, envs, instructions, plan, progress))


def run_learner_mode(cfg: FinetuneConfig, run_dir: Path) -> None:
    from robot_rl.rl import finetune as ft
    from robot_rl.transport.link import LearnerServer
    device = setup_torch(cfg)
    learner = ft.Learner(cfg.learner, run_dir, device, cfg.seed)
    server = LearnerServer(cfg.host, cfg.port)
    (run_dir / PORT_FILE).write_text(str(server.port))
    print(f'learner listening on {cfg.host}:{server.port} ({learner.episodes} episodes, '
          f'{learner.updates} updates so far)', flush=True)
    try:
        ft.run_learner(learner, server, cfg.total_episodes)
    finally:
        server.close()


def run_actor_mode(cfg: FinetuneConfig, run_dir: Path, port: Optional[int] = None) -> None:
    import os
    from robot_rl.rl import finetune as ft
    from robot_rl.transport.link import ActorLink
    device = setup_torch(cfg)
    actor = ft.Actor(ft.Models(cfg.learner, device, cfg.seed), cfg.learner.parl,
                     f'{cfg.actor_name}-{os.getpid()}-{int(time.time())}', seed=cfg.seed)
    envs, instructions = make_environments(cfg, actor.models.image_size)
    link = ActorLink(cfg.host, port or cfg.port)
    timing = ft.ActorTiming()
    plan = ft.episode_plan(cfg.tasks, cfg.total_episodes, cfg.seed)
    with tqdm(total=len(plan), desc='actor episodes', unit='ep') as progress:
        write_outcomes(run_dir, ft.run_actor(actor, link, envs, instructions, plan,
                                             cfg.control_hz, cfg.send_every, timing, progress))
    if not link.wait_until_acked(timeout=120):
        logger.error('%d transition batches were not confirmed by the learner', link.unacked)
    link.close()
    period = 1.0 / cfg.control_hz if cfg.control_hz else 0.0
    summary = timing.summary(period)
    (run_dir / 'actor_timing.json').write_text(json.dumps(summary, indent=2))
    print('actor step period: ' + ', '.join(f'{k} {v:.1f}' for k, v in summary.items()))


def run_processes_mode(cfg: FinetuneConfig, run_dir: Path) -> None:
    """Start the learner as a child process, then act here until the plan is done."""
    replaced = ('mode', 'run_name', 'port', 'output_dir')
    keep = [a for a in sys.argv[1:] if a.split('=', 1)[0] not in replaced]
    port_file = run_dir / PORT_FILE
    port_file.unlink(missing_ok=True)
    child = subprocess.Popen([sys.executable, '-m', 'robot_rl.cli.finetune', *keep,
                              'mode=learner', 'port=0', f'output_dir={cfg.output_dir}',
                              f'run_name={run_dir.name}'])
    try:
        deadline = time.monotonic() + 300
        while not port_file.exists():
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f'the learner process exited or did not start '
                                   f'(exit code {child.poll()})')
            time.sleep(0.2)
        run_actor_mode(cfg, run_dir, int(port_file.read_text()))
        child.wait()
    finally:
        if child.poll() is None:
            child.terminate()
    if child.returncode:
        raise RuntimeError(f'the learner process failed with exit code {child.returncode}')


def run(cfg: FinetuneConfig) -> Path:
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    cfg.validate()
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.mode != 'learner':  # the learner of processes mode is the child; the parent plots
        (run_dir / 'config.json').write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    {'sync': run_sync_mode, 'processes': run_processes_mode, 'learner': run_learner_mode,
     'actor': run_actor_mode}[cfg.mode](cfg, run_dir)
    curve = read_curve(run_dir)
    curves = {run_dir.name: curve}
    truth = true_success_curve(curve, run_dir)
    if truth:  # a classifier gave the rewards: plot what really happened beside what it said
        curves = {f'{run_dir.name} (classifier labels)': curve,
                  f'{run_dir.name} (true success)': truth}
    if cfg.mode != 'learner' and any(not c['warmup'] for c in curve):
        plot = plot_curves(curves, run_dir / 'curve.png', cfg.curve_window)
        for name, lines in curves.items():
            online = [c['success'] for c in lines if not c['warmup']]
            print(f'{name}: online success first {cfg.curve_window} episodes '
                  f'{np.mean(online[:cfg.curve_window]):.0%}, last {cfg.curve_window} '
                  f'{np.mean(online[-cfg.curve_window:]):.0%} ({len(online)} episodes)')
        print(f'Curve: {plot}')
    print(f'Run: {run_dir}')
    return run_dir


main = hydra_main('finetune', run)


if __name__ == '__main__':
    main()
