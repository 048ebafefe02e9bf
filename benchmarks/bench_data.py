"""Benchmark: RLDS steps read and decoded per second (256x256 JPEG frames).

Writes (or reuses) a synthetic Bridge-layout dataset with robot_rl.data.rlds.write_dataset, then
times full passes of the training-step pipeline (iter_steps) and of the episode reader
(iter_episodes), and prints the median rate over repeats with the machine it ran on. Besides
wall-clock steps/s it prints steps per CPU-second of this process (all its threads), which
other load on shared cores disturbs far less; CPU rate x usable cores bounds the idle rate.

    PYTHONPATH=. python benchmarks/bench_data.py [--episodes 40 --steps 50 --repeats 5]
"""

import argparse
import os
from pathlib import Path
import statistics
import tempfile
import time

import cv2
from machine import describe_cpu
import numpy as np

from robot_rl.data import rlds
from robot_rl.data.bridge_spec import import_tf
from robot_rl.types import Episode

DATASET_NAME = 'bench_steps'


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data-dir', type=Path, default=None,
                        help='where to write the dataset, reused when already there '
                             '(default: a temporary directory, deleted afterwards)')
    parser.add_argument('--episodes', type=int, default=40, help='episodes to generate')
    parser.add_argument('--steps', type=int, default=50, help='steps per episode')
    parser.add_argument('--image-size', type=int, default=256, help='frame height = width')
    parser.add_argument('--batch-size', type=int, default=256, help='steps per batch')
    parser.add_argument('--shuffle-buffer', type=int, default=0,
                        help='step shuffle buffer for iter_steps (0 = file order)')
    parser.add_argument('--repeats', type=int, default=5, help='timed passes (after 1 warm-up)')
    return parser.parse_args(argv)


def synthetic_episode(rng: np.random.Generator, steps: int, size: int) -> Episode:
    """A camera-like episode: smooth background, a moving block, sensor noise (JPEG-realistic)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack([120 + 80 * xx, 100 + 60 * yy, 90 + 40 * xx * yy], axis=-1)
    noise = rng.normal(0.0, 3.0, (4,) + base.shape).astype(np.float32)  # reused: fast to make
    images = np.empty((steps, size, size, 3), np.uint8)
    corner = rng.uniform(0.1, 0.6, size=2)
    for t in range(steps):
        frame = base + noise[t % len(noise)]
        y, x = ((corner + 0.004 * t) * size).astype(int)
        cv2.rectangle(frame, (x, y), (x + size // 6, y + size // 8), (200, 40, 40), -1)
        images[t] = np.clip(frame, 0, 255).astype(np.uint8)
    flags = np.arange(steps)
    return Episode(
        images=images,
        states=rng.normal(size=(steps, 7)).astype(np.float32),
        actions=rng.normal(scale=0.01, size=(steps, 7)).astype(np.float32),
        rewards=np.full(steps, -1.0, np.float32), discounts=np.ones(steps, np.float32),
        is_first=flags == 0, is_last=flags == steps - 1, is_terminal=flags == steps - 1,
        language_instruction='put the red block in the bowl',
        mc_returns=-np.arange(steps, 0, -1, dtype=np.float32) + 1.0)


def ensure_dataset(data_dir: Path, args: argparse.Namespace) -> Path:
    directory = data_dir / DATASET_NAME / '1.0.0'
    if (directory / 'dataset_info.json').is_file():
        print(f'reusing {directory}')
        return directory
    rng = np.random.default_rng(0)
    making = [0.0]  # seconds spent generating episodes, kept out of the write rate

    def episodes():
        for _ in range(args.episodes):
            start = time.perf_counter()
            episode = synthetic_episode(rng, args.steps, args.image_size)
            making[0] += time.perf_counter() - start
            yield episode

    import_tf()  # keep TensorFlow's import time (seconds) out of the write rate
    start = time.perf_counter()
    rlds.write_dataset({'train': episodes()}, data_dir, name=DATASET_NAME,
                       max_shard_bytes=8 * 2 ** 20)
    seconds = time.perf_counter() - start - making[0]
    steps = args.episodes * args.steps
    print(f'write_dataset: {steps} steps in {seconds:.1f} s ({steps / seconds:.0f} steps/s, '
          'JPEG encoding included)')
    return directory


def timed_rates(count_pass, repeats: int):
    """Medians of (steps / wall second, steps / CPU second) over passes, after a warm-up."""
    count_pass()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        count = count_pass()
        wall.append(count / (time.perf_counter() - start))
        cpu.append(count / (time.process_time() - start_cpu))
    return statistics.median(wall), statistics.median(cpu)


def run(directory: Path, args: argparse.Namespace) -> None:
    shards = sorted(directory.glob('*.tfrecord-*'))
    frame_kb = sum(p.stat().st_size for p in shards) / (args.episodes * args.steps) / 1024
    print(f'dataset: {directory} ({len(shards)} shards, {frame_kb:.1f} KiB per step)')

    def steps_pass() -> int:
        return sum(len(batch['action']) for batch in rlds.iter_steps(
            directory, batch_size=args.batch_size, shuffle_buffer=args.shuffle_buffer))

    def episodes_pass() -> int:
        return sum(len(episode) for episode in rlds.iter_episodes(directory))

    print(f'machine: {describe_cpu()}; load average {os.getloadavg()[0]:.2f} at start')
    for label, count_pass in (('iter_steps', steps_pass), ('iter_episodes', episodes_pass)):
        wall, cpu = timed_rates(count_pass, args.repeats)
        print(f'{label}: {wall:.0f} steps/s read and decoded ({args.image_size}x'
              f'{args.image_size} JPEG, median of {args.repeats}); {cpu:.0f} steps per '
              'CPU-second')
    print(f'load average {os.getloadavg()[0]:.2f} at end')


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.data_dir is not None:
        run(ensure_dataset(args.data_dir, args), args)
        return
    with tempfile.TemporaryDirectory(prefix='bench_data_') as tmp:
        run(ensure_dataset(Path(tmp), args), args)


if __name__ == '__main__':
    main()
