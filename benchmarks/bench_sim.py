"""Simulated WidowX throughput: environment steps per second, camera included.

Each repeat runs whole episodes (reset included) for a fixed number of steps on one CPU core
and reports steps/s; the figure is the median over repeats. Example:

    MUJOCO_GL=egl python benchmarks/bench_sim.py --image-size 128 --cpu 0
"""

import os

# Single-threaded numerics and rasteriser, set before numpy / Mesa load (one-core figure).
for _var in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS', 'LP_NUM_THREADS'):
    os.environ.setdefault(_var, '1')

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import mujoco  # noqa: E402
import numpy as np  # noqa: E402

from machine import cpu_name  # noqa: E402

from robot_rl.envs import ExpertConfig, make_env, ScriptedExpert, TASKS  # noqa: E402


def run_steps(env, expert, rng, steps: int, seed: int) -> float:
    """Time `steps` env steps (resets included) and return steps per second."""
    start = time.perf_counter()
    done = True
    for _ in range(steps):
        if done:
            seed += 1
            obs, _ = env.reset(seed=seed)
            if expert:
                expert.reset(seed=seed)
        bounds = env.action_bounds
        action = expert.act(obs) if expert else rng.uniform(bounds.low, bounds.high)
        obs, _, terminated, truncated, _ = env.step(action)
        done = terminated or truncated
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--tasks', nargs='+', default=sorted(TASKS), choices=sorted(TASKS))
    parser.add_argument('--image-size', type=int, default=128, help='camera size (pixels)')
    parser.add_argument('--policy', choices=('expert', 'random'), default='expert',
                        help='clean scripted expert (grasps, contacts) or uniform random actions')
    parser.add_argument('--steps', type=int, default=300, help='env steps per repeat')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--cpu', type=int, default=0,
                        help='pin the process to this core; -1 leaves the affinity alone')
    args = parser.parse_args()
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})

    print(f'machine: {cpu_name()}, {os.cpu_count()} cores, '
          f'pinned to {sorted(os.sched_getaffinity(0))}; python {platform.python_version()}, '
          f'mujoco {mujoco.__version__}')
    medians = []
    for task in args.tasks:
        env = make_env(task, image_size=args.image_size)
        expert = ScriptedExpert(env, ExpertConfig()) if args.policy == 'expert' else None
        rng = np.random.default_rng(0)
        run_steps(env, expert, rng, 20, seed=10_000)  # warm-up (GL pipeline, caches)
        rates = [run_steps(env, expert, rng, args.steps, seed=1000 * r)
                 for r in range(args.repeats)]
        medians.append(statistics.median(rates))
        print(f'{task:20s} {args.image_size}px {args.policy}: median {medians[-1]:7.1f} steps/s '
              f'(repeats: {", ".join(f"{r:.0f}" for r in rates)})')
        if task == args.tasks[-1]:
            print(f'renderer: {env.gl_renderer}')
        env.close()
    print(f'all tasks: median {statistics.median(medians):.1f} env steps/s on one core '
          f'(target >= 150)')


if __name__ == '__main__':
    main()
