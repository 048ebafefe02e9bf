"""Benchmark: OXE steps decoded per second from RLDS into PyTorch training batches.

Writes (or reuses) two synthetic datasets in their release layouts: Bridge (256x256 JPEG,
robot_rl.data.rlds.write_dataset) and RT-1 fractal (256x320 JPEG, dictionary actions,
layouts.fractal_features through rlds.write_examples). Then times the mixture pipeline
(robot_rl.data.oxe.mixture_dataset -> torch_batches: standardise, shuffle, parallel JPEG
decode + resize, per-dataset normalisation, weighted interleave, batch, numpy -> torch) on each
dataset alone and on the 1 : 0.54 mixture of configs/data/oxe_mix.yaml. tf.data runs on a
private pool of --threads threads and the process is pinned to --cores cores; each figure is
the median over repeats of a fixed number of batches, after a warm-up pass, with the machine.

--transitions times the Cal-QL transition stream instead (robot_rl.data.transitions:
V-GPS labels, Monte-Carlo returns, actions normalised by an ActionSpace from the cached
statistics, (o_t, o_{t+1}) pairs decoded after shuffling) into replay.TransitionBatch, the
batches robot-rl-train-critic trains on with data.streaming=true.

    PYTHONPATH=. python benchmarks/bench_oxe.py [--cores 2 --batches 20 --repeats 5]
    PYTHONPATH=. python benchmarks/bench_oxe.py --transitions
"""

import argparse
import os
from pathlib import Path
import tempfile
import time

from bench_data import synthetic_episode, timed_rates
import cv2
from machine import describe_cpu
import numpy as np

from robot_rl.data import layouts, oxe, rlds, transitions
from robot_rl.data.bridge_spec import import_tf
from robot_rl.rl import learner

FRACTAL_FRAME = (256, 320, 3)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data-dir', type=Path, default=None,
                        help='where to write the datasets, reused when already there '
                             '(default: a temporary directory, deleted afterwards)')
    parser.add_argument('--episodes', type=int, default=40, help='episodes per dataset')
    parser.add_argument('--steps', type=int, default=50, help='steps per episode')
    parser.add_argument('--image-size', type=int, default=128,
                        help='frames are resized to this square size (oxe_mix.yaml: 128)')
    parser.add_argument('--batch-size', type=int, default=256, help='steps per batch')
    parser.add_argument('--batches', type=int, default=20, help='batches per timed pass')
    parser.add_argument('--shuffle-buffer', type=int, default=1000, help='steps per source')
    parser.add_argument('--cores', type=int, default=2,
                        help='pin the process to this many cores (0 = leave as is)')
    parser.add_argument('--threads', type=int, default=None,
                        help='tf.data private pool size (default: --cores)')
    parser.add_argument('--repeats', type=int, default=5, help='timed passes (after 1 warm-up)')
    parser.add_argument('--transitions', action='store_true',
                        help='time Cal-QL transitions (transitions.transition_dataset) into '
                             'TransitionBatch instead of steps')
    return parser.parse_args(argv)


def fractal_record(rng: np.random.Generator, steps: int):
    """A synthetic RT-1 episode: camera-like frames at the release size, random commands."""
    bridge = synthetic_episode(rng, steps, FRACTAL_FRAME[0])
    images = np.stack([cv2.resize(f, FRACTAL_FRAME[1::-1], interpolation=cv2.INTER_LINEAR)
                       for f in bridge.images])
    pose = np.c_[rng.normal(0, 0.3, (steps, 3)), np.tile([0.0, 0.0, 0.0, 1.0], (steps, 1))]
    return layouts.fractal_record(
        images, rng.normal(0, 0.02, (steps, 3)), rng.normal(0, 0.05, (steps, 3)),
        rng.choice([-1.0, 0.0, 1.0], steps, p=[0.05, 0.9, 0.05]), pose,
        rng.integers(0, 2, steps), 'pick coke can')


def ensure_datasets(data_dir: Path, args: argparse.Namespace):
    """{'bridge': directory, 'fractal': directory}, written when not already there."""
    import_tf()
    rng = np.random.default_rng(0)
    out = {}
    writers = {
        'bridge': lambda: rlds.write_dataset(
            {'train': (synthetic_episode(rng, args.steps, 256) for _ in range(args.episodes))},
            data_dir, name='bench_bridge', max_shard_bytes=8 * 2 ** 20),
        'fractal': lambda: rlds.write_examples(
            {'train': (fractal_record(rng, args.steps) for _ in range(args.episodes))},
            layouts.fractal_features(FRACTAL_FRAME), data_dir, name='bench_fractal',
            max_shard_bytes=8 * 2 ** 20),
    }
    for key, write in writers.items():
        directory = data_dir / f'bench_{key}' / '1.0.0'
        if (directory / 'dataset_info.json').is_file():
            print(f'reusing {directory}')
        else:
            start = time.perf_counter()
            write()
            print(f'wrote {directory} ({args.episodes * args.steps} steps) in '
                  f'{time.perf_counter() - start:.1f} s')
        out[key] = directory
    return out


def run(directories, args: argparse.Namespace) -> None:
    sources = {'bridge': oxe.OxeSource('bridge', str(directories['bridge'])),
               'fractal': oxe.OxeSource('fractal', str(directories['fractal']),
                                        layout='fractal', weight=0.54)}
    start = time.perf_counter()
    stats = oxe.load_stats(list(sources.values()))
    print(f'statistics (cached beside the data): {time.perf_counter() - start:.2f} s')
    threads = args.threads or args.cores or os.cpu_count()
    print(f'machine: {describe_cpu()}; pinned to {len(os.sched_getaffinity(0))} cores, '
          f'tf.data pool {threads} threads')
    size = (args.image_size, args.image_size)
    # The critic trainer's normaliser under streaming (data.action_bounds='data').
    space = learner.action_space_from_stats([stats[k].action for k in sources])
    unit = 'transitions' if args.transitions else 'steps'
    for label, keys in (('bridge', ['bridge']), ('fractal', ['fractal']),
                        ('bridge + fractal (1 : 0.54)', ['bridge', 'fractal'])):
        if args.transitions:
            chosen = [transitions.TransitionSource(s.key, s.path, layout=s.layout,
                                                   weight=s.weight, labelling='vgps')
                      for s in (sources[k] for k in keys)]
            ds = transitions.transition_dataset(
                chosen, batch_size=args.batch_size, gamma=0.98, action_space=space,
                image_size=size, shuffle_buffer=args.shuffle_buffer, seed=0,
                num_threads=threads)
            batches = (b.actions for b in transitions.transition_batches(ds, label))
        else:
            ds = oxe.mixture_dataset([sources[k] for k in keys], batch_size=args.batch_size,
                                     image_size=size, shuffle_buffer=args.shuffle_buffer,
                                     seed=0, normalise='bounds', stats=stats,
                                     num_threads=threads)
            batches = (b['action'] for b in oxe.torch_batches(ds, label))
        # One endless iterator: passes continue it.

        def count_pass() -> int:
            return sum(len(next(batches)) for _ in range(args.batches))

        wall, cpu = timed_rates(count_pass, args.repeats)
        kind = 'TransitionBatch' if args.transitions else 'torch'
        print(f'{label}: {wall:.0f} {unit}/s into {kind} batches of {args.batch_size} '
              f'({args.image_size}x{args.image_size}; median of {args.repeats} passes of '
              f'{args.batches} batches); {cpu:.0f} {unit} per CPU-second')
    print(f'load average {os.getloadavg()[0]:.2f} at end')


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.cores:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cores])
    if args.data_dir is not None:
        run(ensure_datasets(args.data_dir, args), args)
        return
    with tempfile.TemporaryDirectory(prefix='bench_oxe_') as tmp:
        run(ensure_datasets(Path(tmp), args), args)


if __name__ == '__main__':
    main()
