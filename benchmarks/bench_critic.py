"""Critic benchmark: Cal-QL updates per second, and the cost of scoring K candidates (steering).

    python benchmarks/bench_critic.py                      # batch 256, 128x128, ResNet-18 and -34
    python benchmarks/bench_critic.py --batch 16 --steps 3 # a quick CPU run

Update rate: one `CalQL.update` (critic step, actor and entropy steps, Polyak) on a random batch
of uint8 images, bf16 autocast on CUDA. TFLOP/s is estimated from torch's FLOP counter over one
update (convolutions and matmuls, forward and backward). Steering: for one observation, scoring K
candidates from one encoding versus re-encoding the observation once per candidate (batched).
Prints medians with the machine they ran on.
"""

import argparse
import os
import statistics
import time
from typing import Callable, List

from machine import cpu_name
import torch
from torch.utils.flop_counter import FlopCounterMode

from robot_rl.models.actor import TanhGaussianActor
from robot_rl.models.critic import Critic, CriticConfig, num_parameters
from robot_rl.rl.calql import CalQL, CalQLBatch, CalQLConfig

LANG_DIM = 384  # all-MiniLM-L6-v2


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--batch', type=int, default=256, help='transitions per update')
    p.add_argument('--image-size', type=int, default=128, help='square image side (pixels)')
    p.add_argument('--depths', type=int, nargs='+', default=[18, 34], help='ResNet depths')
    p.add_argument('--ensemble', type=int, default=2, help='Q heads')
    p.add_argument('--num-samples', type=int, default=10, help='Cal-QL n actions per kind')
    p.add_argument('--steps', type=int, default=5, help='timed updates (after one warm-up)')
    p.add_argument('--ks', type=int, nargs='+', default=[1, 10, 50, 100],
                   help='candidate counts for the steering measurement')
    p.add_argument('--repeats', type=int, default=10, help='timed repeats per steering point')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--threads', type=int, default=0, help='CPU threads (0 = torch default)')
    return p.parse_args()


def machine(device: torch.device) -> str:
    if device.type == 'cuda':
        return f'{torch.cuda.get_device_name(device)} (torch {torch.__version__}, bf16 autocast)'
    return (f'{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads '
            f'(torch {torch.__version__}, float32)')


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of `fn` over `repeats` calls after one warm-up call."""
    times: List[float] = []
    for i in range(repeats + 1):
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_batch(args: argparse.Namespace, device: torch.device) -> CalQLBatch:
    b, s = args.batch, args.image_size
    frames = torch.randint(0, 256, (2, b, s, s, 3), dtype=torch.uint8, device=device)
    return CalQLBatch(images=frames[0], lang_emb=torch.randn(b, LANG_DIM, device=device),
                      actions=torch.rand(b, 7, device=device) * 2 - 1,
                      rewards=-torch.ones(b, device=device), next_images=frames[1],
                      dones=torch.zeros(b, device=device),
                      mc_returns=-50 * torch.rand(b, device=device))


def build(depth: int, args: argparse.Namespace, device: torch.device) -> CalQL:
    critic = Critic(CriticConfig(encoder_depth=depth, lang_dim=LANG_DIM,
                                 ensemble_size=args.ensemble)).to(device)
    actor = TanhGaussianActor(critic.feature_dim, 7).to(device)
    return CalQL(critic, CalQLConfig(num_samples=args.num_samples), actor=actor)


def bench_updates(depth: int, args: argparse.Namespace, device: torch.device) -> None:
    algo, batch = build(depth, args, device), random_batch(args, device)
    with FlopCounterMode(display=False) as counter:
        algo.update(batch)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median_seconds(lambda: algo.update(batch), args.steps, device)
    line = (f'ResNet-{depth} ({num_parameters(algo.critic) / 1e6:.2f}M critic params), '
            f'batch {args.batch}, {args.image_size}px: {1 / seconds:.3f} updates/s '
            f'({args.batch / seconds:.1f} transitions/s), '
            f'{counter.get_total_flops() / 1e12:.2f} TFLOP/update, '
            f'{counter.get_total_flops() / seconds / 1e12:.2f} TFLOP/s')
    if device.type == 'cuda':
        line += f', peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB'
    print(line, flush=True)


@torch.no_grad()
def bench_steering(depth: int, args: argparse.Namespace, device: torch.device) -> None:
    critic = build(depth, args, device).critic.eval()
    s = args.image_size
    image = torch.randint(0, 256, (1, s, s, 3), dtype=torch.uint8, device=device)
    lang = torch.randn(1, LANG_DIM, device=device)
    autocast = torch.autocast('cuda', torch.bfloat16, enabled=device.type == 'cuda')
    print(f'steering, ResNet-{depth}, one {s}px observation (median ms):', flush=True)
    for k in args.ks:
        actions = torch.rand(1, k, 7, device=device) * 2 - 1

        def once():
            with autocast:
                return critic.q(critic.encode(image, lang), actions)

        def score_only(z=critic.encode(image, lang)):
            with autocast:
                return critic.q(z, actions)

        def per_candidate():
            with autocast:
                z = critic.encode(image.expand(k, -1, -1, -1), lang.expand(k, -1))
                return critic.q(z, actions.view(k, 1, 7))

        t_once = median_seconds(once, args.repeats, device)
        t_score = median_seconds(score_only, args.repeats, device)
        t_each = median_seconds(per_candidate, args.repeats, device)
        print(f'  K={k:4d}: encode once + score K {1e3 * t_once:8.2f} '
              f'(scoring alone {1e3 * t_score:6.2f})   re-encode per candidate '
              f'{1e3 * t_each:8.2f}   ratio {t_each / t_once:6.1f}x', flush=True)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f'machine: {machine(device)}', flush=True)
    for depth in args.depths:
        bench_updates(depth, args, device)
    for depth in args.depths:
        bench_steering(depth, args, device)


if __name__ == '__main__':
    main()
