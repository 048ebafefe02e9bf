"""PA-RL fine-tuning benchmark: learner updates per second, and the actor's step period while
a learner process trains flat out beside it.

    python benchmarks/bench_finetune.py                      # shipped checkpoints, CPU
    python benchmarks/bench_finetune.py --steps 300 --batch-sizes 32 64

1. Learner: one update = a Cal-QL critic step whose TD target uses PA-RL-optimised actions at s'
   plus one PA-RL distillation step (robot_rl.rl.finetune.Learner.update), on a replay of real
   simulated episodes. Median seconds per update -> updates per second, per batch size.
2. Actor: `run_actor` at 5 Hz (200 ms) on the simulated WidowX, alone and then with a learner
   process (robot-rl-finetune mode=learner, updates_per_step 1000: never throttled) on the
   same machine receiving its transitions; p50 / p99 / max of the step period.
"""

import argparse
import os
from pathlib import Path
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from machine import describe_cpu
import torch

from robot_rl.envs import make_env, TASKS
from robot_rl.rl import finetune as ft
from robot_rl.rl.calql import CalQLConfig
from robot_rl.transport.link import ActorLink

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / 'robot_rl' / 'checkpoints' / 'sim'
TASK = 'carrot_on_plate'


def learner_config(batch_size: int, updates_per_step: float = 1.0, policy_tau: float = 1.0,
                   train_critic: bool = True, scoring: str = 'first_action',
                   num_samples: int = 8) -> ft.LearnerConfig:
    return ft.LearnerConfig(policy_path=str(SHIPPED / 'policy.safetensors'),
                            critic_path=str(SHIPPED / 'critic'), offline_ratio=0.0,
                            warmup_episodes=1, updates_per_step=updates_per_step,
                            batch_size=batch_size, policy_tau=policy_tau,
                            train_critic=train_critic,
                            algo=CalQLConfig(gamma=0.98, num_samples=4),
                            parl=ft.parl.PARLConfig(num_samples=num_samples, top_m=4,
                                                    gradient_steps=3, scoring=scoring))


def bench_learner(batch_sizes, updates: int, **settings) -> None:
    device = torch.device('cpu')
    env = make_env(TASK, image_size=64)
    instruction = TASKS[TASK].instruction
    for batch in batch_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = learner_config(batch, **settings)
            learner = ft.Learner(cfg, Path(tmp), device)
            actor = ft.Actor(ft.Models(cfg, device, 0), cfg.parl)
            for episode in range(2):
                records, _ = actor.run_episode(env, instruction, seed=episode)
                learner.ingest(ft.StepBatch('bench', episode, instruction, episode, records))
            learner.update()  # warm-up
            times = []
            for _ in range(updates):
                start = time.perf_counter()
                learner.update()
                times.append(time.perf_counter() - start)
            median = statistics.median(times)
            print(f'learner update, batch {batch:>3}, {settings}: '
                  f'median {1e3 * median:7.1f} ms '
                  f'-> {1 / median:5.2f} updates/s')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def bench_actor(steps: int, with_learner: bool) -> dict:
    cfg = learner_config(32, updates_per_step=1000.0)
    port = free_port()
    child = None
    with tempfile.TemporaryDirectory() as tmp:
        if with_learner:
            child = subprocess.Popen(
                [sys.executable, '-m', 'robot_rl.cli.finetune', 'mode=learner',
                 f'port={port}', f'output_dir={tmp}', 'run_name=bench', f'tasks=[{TASK}]',
                 'episodes=1000', 'threads=1', 'device=cpu',
                 f'learner.policy_path={cfg.policy_path}',
                 f'learner.critic_path={cfg.critic_path}', 'learner.offline_ratio=0',
                 'learner.warmup_episodes=1', 'learner.updates_per_step=1000',
                 'learner.batch_size=32', 'learner.parl.num_samples=8', 'learner.parl.top_m=4',
                 'learner.parl.gradient_steps=3', 'learner.algo.num_samples=4'],
                env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(REPO)),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while not (Path(tmp) / 'bench' / 'learner.port').exists():
                time.sleep(0.2)
        try:
            actor = ft.Actor(ft.Models(cfg, torch.device('cpu'), 0), cfg.parl)
            link = ActorLink('127.0.0.1', port, retry_s=0.5)
            timing = ft.ActorTiming()
            env = make_env(TASK, image_size=64)
            actor.act(env.reset(seed=0)[0], TASKS[TASK].instruction)  # load the encoders first
            episodes = max(1, steps // 60)
            plan = ft.episode_plan([TASK], episodes, seed=0)
            ft.run_actor(actor, link, {TASK: env}, {TASK: TASKS[TASK].instruction}, plan,
                         control_hz=5.0, timing=timing)
            link.close()
            return timing.summary(0.2) | {'weights_version': actor.version}
        finally:
            if child is not None:
                child.kill()
                child.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[32, 64])
    parser.add_argument('--updates', type=int, default=20)
    parser.add_argument('--steps', type=int, default=300, help='actor steps per condition')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--policy-tau', type=float, default=1.0,
                        help='learner.policy_tau (below 1: an acting copy, one Polyak step '
                             'per update)')
    parser.add_argument('--fixed-critic', action='store_true',
                        help='learner.train_critic=false: distillation steps only')
    parser.add_argument('--scoring', choices=ft.parl.SCORINGS, default='first_action',
                        help='parl.scoring')
    parser.add_argument('--num-samples', type=int, default=8, help='parl.num_samples')
    parser.add_argument('--learner-only', action='store_true', help='skip the actor figures')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(describe_cpu(), f'torch threads {args.threads}')
    bench_learner(args.batch_sizes, args.updates, policy_tau=args.policy_tau,
                  train_critic=not args.fixed_critic, scoring=args.scoring,
                  num_samples=args.num_samples)
    for with_learner in (() if args.learner_only else (False, True)):
        r = bench_actor(args.steps, with_learner)
        label = 'with a learner training flat out' if with_learner else 'alone'
        print(f'actor at 5 Hz {label}: {r["steps"]} steps, period p50 {r["p50_ms"]:.1f} ms, '
              f'p99 {r["p99_ms"]:.1f} ms, max {r["max_ms"]:.1f} ms (target 200 ms); '
              f'weights version reached {r["weights_version"]}')


if __name__ == '__main__':
    main()
