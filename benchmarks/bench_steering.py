"""Steering benchmark: the per-step cost of V-GPS on top of a policy.

    python benchmarks/bench_steering.py                          # 128 px, CPU, 1 thread
    python benchmarks/bench_steering.py --critics tiny 18 --ks 1 10 50 100
    python benchmarks/bench_steering.py --critics tiny --state --scoring chunk
    python benchmarks/bench_steering.py --critics tiny --state --scoring chunk --ensemble 4

One control step = `ValueGuidedSteering.act` (sample K chunks from the diffusion policy, score
the first actions or, with --scoring chunk, all of them, select, ensemble) on a 128x128 frame.
Measured: the base policy alone (K = 1, no critic), steering at each K with the critic's image
encoding shared by all candidates, and with the image re-encoded once per scored action (what a
critic without the encode/q split costs); plus the critic's scoring alone (encode once + q over
the K candidates). --ensemble N scores with N critics of the same size (their mean). Prints
medians and ratios to the base.
"""

import argparse
import os
import statistics
import time
from typing import Callable, List

from machine import describe_cpu
import numpy as np
import torch

from policies.diffusion import DiffusionPolicy
from robot_rl.models.critic import Critic, CriticConfig
from robot_rl.steering import ValueGuidedSteering
from robot_rl.types import ACTION_DIM, ActionSpace, IMAGE_KEY, STATE_KEY

INSTRUCTION = 'put the spoon on the towel'
CRITICS = {'tiny': dict(encoder_depth=10, encoder_width=16, hidden_dims=(128, 128)),
           '18': dict(encoder_depth=18, encoder_width=64, hidden_dims=(256, 256)),
           '34': dict(encoder_depth=34, encoder_width=64, hidden_dims=(256, 256))}


class ReEncodingSteering(ValueGuidedSteering):
    """The same steering, but the critic encodes the image once per candidate."""

    @torch.no_grad()
    def score(self, obs, instruction, actions):
        k = len(actions)
        actions = np.asarray(actions, np.float32).reshape(-1, ACTION_DIM)  # chunks: all
        n = len(actions)
        images = torch.from_numpy(obs[IMAGE_KEY]).to(self.device)[None].expand(n, -1, -1, -1)
        states = torch.from_numpy(obs[STATE_KEY]).to(self.device)[None].expand(n, -1)
        lang = self.embed([instruction]).expand(n, -1)
        normalised = torch.from_numpy(np.clip(self.critic_space.normalise(actions), -1.0, 1.0))
        scores = []
        for critic in self.critics:
            z = critic.encode(images, lang, states if critic.config.state_dim else None)
            q = critic.q(z, normalised.to(self.device)[:, None])  # (E, n, 1)
            scores.append(q.min(dim=0).values[:, 0])
        return torch.stack(scores).mean(0).cpu().numpy().reshape(k, -1).mean(axis=1)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times: List[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--image-size', type=int, default=128)
    p.add_argument('--critics', nargs='+', default=['tiny', '18'], choices=sorted(CRITICS))
    p.add_argument('--ks', type=int, nargs='+', default=[1, 10, 50, 100])
    p.add_argument('--repeats', type=int, default=20)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--state', action='store_true', help='critics that read the robot state')
    p.add_argument('--scoring', default='first_action', choices=['first_action', 'chunk'])
    p.add_argument('--ensemble', type=int, default=1, help='critics per steering (their mean)')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    space = ActionSpace.bridge()
    size = args.image_size
    policy = DiffusionPolicy(space, encoder={'image_size': size}).eval()
    rng = np.random.default_rng(0)
    obs = {IMAGE_KEY: rng.integers(0, 255, (size, size, 3), dtype=np.uint8),
           STATE_KEY: np.zeros(7, np.float32)}
    embed = policy.embed  # the shared MiniLM cache
    print(f'{describe_cpu()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s); '
          f'{size}x{size} frames; diffusion policy (5 DDIM steps, H=4)', flush=True)
    base = ValueGuidedSteering(policy, None, None, num_samples=1)
    base_ms = median_ms(lambda: base.act(obs, INSTRUCTION), args.repeats)
    print(f'base policy alone: {base_ms:.1f} ms per step')
    for name in args.critics:
        config = CriticConfig(**CRITICS[name], state_dim=7 if args.state else 0)
        critic = [Critic(config).eval() for _ in range(args.ensemble)]
        print(f'\ncritic {name} ({sum(p.numel() for p in critic[0].parameters()) / 1e6:.2f}M '
              f'params) x {args.ensemble}: median ms per step (ratio to the base policy)')
        print('| K | steering, shared encoding | steering, re-encode per candidate | '
              'scoring alone |')
        print('|---|---|---|---|')
        for k in args.ks:
            shared = ValueGuidedSteering(policy, critic, space, num_samples=k, embed=embed,
                                         scoring=args.scoring)
            again = ReEncodingSteering(policy, critic, space, num_samples=k, embed=embed,
                                       scoring=args.scoring)
            chunks = policy.sample_actions(obs, INSTRUCTION, k)
            actions = chunks[:, 0] if args.scoring == 'first_action' else chunks
            shared_ms = median_ms(lambda: shared.act(obs, INSTRUCTION), args.repeats)
            again_ms = median_ms(lambda: again.act(obs, INSTRUCTION), max(3, args.repeats // 4))
            score_ms = median_ms(lambda: shared.score(obs, INSTRUCTION, actions), args.repeats)
            print(f'| {k} | {shared_ms:.1f} ({shared_ms / base_ms:.2f}x) | {again_ms:.1f} '
                  f'({again_ms / base_ms:.2f}x) | {score_ms:.1f} |', flush=True)


if __name__ == '__main__':
    os.environ.setdefault('USE_TF', '0')
    main()
