"""Replay sampling speed and memory per stored step, on synthetic image episodes.

    python benchmarks/bench_replay.py                      # 50k steps of 128x128, batch 256
    python benchmarks/bench_replay.py --mixed              # also a 50/50 MixedSampler
    python benchmarks/bench_replay.py --directory /tmp/rb  # also disk writes and reopening

Prints the median and p90 of `sample(batch_size)` in ms, bytes per stored step, and the machine.
"""

import argparse
import os
from pathlib import Path
import time

from machine import describe_cpu
import numpy as np

from robot_rl.data.replay import EpisodeBuilder, MixedSampler, ReplayBuffer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--steps', type=int, default=50_000, help='steps to store in total')
    parser.add_argument('--episode-length', type=int, default=100, help='steps per episode')
    parser.add_argument('--image-size', type=int, default=128, help='frames are SIZE x SIZE x 3')
    parser.add_argument('--batch-size', type=int, default=256)
    parser.add_argument('--repeats', type=int, default=300, help='timed sample() calls')
    parser.add_argument('--mixed', action='store_true',
                        help='also time a 50/50 MixedSampler over two half-size buffers')
    parser.add_argument('--directory', type=Path, default=None,
                        help='back the buffer with episode files here (times writes, reopening)')
    parser.add_argument('--seed', type=int, default=0)
    return parser.parse_args(argv)


def synthetic_episode(rng, pool, length, index):
    """An episode of `length` steps whose frames come from a pool of random frames (cheap)."""
    builder = EpisodeBuilder(f'task {index % 10}')
    frames = pool[(np.arange(length) + index) % len(pool)]
    for t in range(length - 1):
        obs = {'image_primary': frames[t], 'state': rng.normal(size=7)}
        builder.add_step(obs, rng.uniform(-1, 1, 7), -1.0 if t < length - 2 else 0.0)
    return builder.finish({'image_primary': frames[-1], 'state': rng.normal(size=7)},
                          terminal=bool(index % 2))


def fill(buffer, steps, args, rng, pool):
    start = time.perf_counter()
    index = 0
    while buffer.num_steps < steps:
        length = min(args.episode_length, steps - buffer.num_steps)
        buffer.add_episode(synthetic_episode(rng, pool, max(length, 2), index))
        index += 1
    return time.perf_counter() - start


def time_sampling(sampler, args, rng, reuse=False):
    """Milliseconds per sample(batch_size) call (reuse: into the previous batch's arrays)."""
    batch = None
    for _ in range(10):
        batch = sampler.sample(args.batch_size, rng)
    times = np.empty(args.repeats)
    for i in range(args.repeats):
        start = time.perf_counter()
        batch = sampler.sample(args.batch_size, rng, out=batch if reuse else None)
        times[i] = time.perf_counter() - start
    return 1e3 * times


def report_sampling(name, times_ms, args):
    frame_mb = 2 * args.batch_size * args.image_size ** 2 * 3 / 1e6  # o_t and o_{t+1}
    median = float(np.median(times_ms))
    print(f'{name}: sample({args.batch_size}) median {median:.2f} ms, '
          f'p90 {np.percentile(times_ms, 90):.2f} ms, min {times_ms.min():.2f} ms '
          f'({args.repeats} repeats; frames gathered at {frame_mb / median:.1f} GB/s)')


def resident_bytes() -> int:
    """Resident set size of this process (Linux; 0 elsewhere)."""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except (OSError, ValueError):
        return 0


def report_both(name, sampler, args, rng):
    """Time fresh batches, then batches written into the previous one's arrays (out=)."""
    report_sampling(name, time_sampling(sampler, args, rng), args)
    report_sampling(f'{name}, out=previous batch', time_sampling(sampler, args, rng, True), args)


def report_memory(buffer, args, resident_growth):
    frame = args.image_size ** 2 * 3
    nbytes = buffer.nbytes
    rows = nbytes['images'] // frame  # reserved steps
    per_step = sum(nbytes.values()) / rows
    print(f'memory: {per_step:.0f} bytes per stored step = one {frame}-byte frame + '
          f'{per_step - frame:.0f} bytes of vectors ({per_step / frame:.4f} frames); '
          f'{sum(nbytes.values()) / 2 ** 30:.2f} GiB reserved for {rows} rows; resident set '
          f'grew {resident_growth / buffer.num_steps:.0f} bytes per stored step')


def main(argv=None):
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    pool = rng.integers(0, 256, (64, args.image_size, args.image_size, 3), dtype=np.uint8)
    print(f'machine: {describe_cpu()}')
    buffer = ReplayBuffer(args.directory, capacity=args.steps)
    resident = resident_bytes()
    seconds = fill(buffer, args.steps, args, rng, pool)
    resident = resident_bytes() - resident
    where = 'memory' if args.directory is None else f'memory + {args.directory}'
    print(f'filled {buffer.num_steps} steps ({len(buffer)} episodes, '
          f'{args.image_size}x{args.image_size}, {where}) in {seconds:.1f} s '
          f'({buffer.num_steps / seconds:.0f} steps/s)')
    report_memory(buffer, args, resident)
    report_both('ReplayBuffer', buffer, args, rng)
    if args.directory is not None:
        start = time.perf_counter()
        reopened = ReplayBuffer(args.directory, capacity=args.steps)
        print(f'reopened {reopened.num_steps} steps from disk in '
              f'{time.perf_counter() - start:.1f} s ({len(reopened.dropped)} files dropped)')
        del reopened
    if args.mixed:
        del buffer
        halves = [ReplayBuffer(capacity=args.steps // 2) for _ in range(2)]
        for half in halves:
            fill(half, args.steps // 2, args, rng, pool)
        sampler = MixedSampler([(halves[0], 0.5), (halves[1], 0.5)])
        report_both('MixedSampler 50/50', sampler, args, rng)


if __name__ == '__main__':
    main()
