"""Does a policy class survive PA-RL's distillation? Train it on its own samples and see.

PA-RL improves a policy by its own supervised loss on actions it sampled (the critic only picks
among them). This probe takes the critic out: on frames of the offline data's successful
episodes it draws one chunk per frame as the target and takes `--updates` Adam steps of the
policy's `supervised_loss` on them, then runs the policy alone in the simulator. Targets:

- self:   a sample of the policy being trained (PA-RL's feedback loop, no preference);
- frozen: a sample of a frozen copy of the starting policy;
- data:   the data's own chunk (behaviour cloning continued: the control).

For a class whose loss is an exact log-likelihood (gaussian, autoregressive) the expected
gradient on its own samples is zero (E_{a~pi}[grad log pi(a)] = 0), yet the sampling noise of
each step accumulates with nothing pulling the policy back to its data; the diffusion loss is
a bound on the likelihood, and on its own samples its expected gradient is not zero either.
Also reported: the spread of sampled chunks (std over 16 draws per frame, per action
dimension, on a fixed batch of frames) before and after, and how far the samples moved.

    .venv/bin/python scripts/self_distillation.py --data data/robot_rl_sim/1.0.0 \\
        --targets self --updates 300 --task carrot_on_plate --episodes 100
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from policies.common import load_policy, PolicyBatch
from robot_rl.cli import evaluate
from robot_rl.data.chunks import ChunkDataset
from robot_rl.envs import TASKS
from robot_rl.rl import learner as common
from robot_rl.rl import parl
from robot_rl.rl.train_bc import to_policy_batch
from robot_rl.steering import ValueGuidedSteering

SHIPPED = Path(__file__).resolve().parents[1] / 'robot_rl' / 'checkpoints' / 'sim'
SPREAD_DRAWS = 16


def success_rate(policy, task: str, episodes: int, seed: int) -> float:
    """The policy alone (K = 1) on `episodes` layouts from `seed`, as robot-rl-eval's base arm."""
    cfg = evaluate.EvalConfig(policy_path='', tasks=[task], episodes_per_task=episodes,
                              seed=seed, videos_per_task=0, device='cpu')
    policy.eval()
    steering = ValueGuidedSteering(policy, None, None, num_samples=1, device='cpu')
    with tqdm(total=episodes, desc=f'{task} alone', unit='ep', leave=False) as progress:
        result = evaluate.run_arm(cfg, steering, 'base', progress)
    return result['tasks'][task]['success_rate']


@torch.no_grad()
def spread(policy, batch: PolicyBatch, seed: int) -> np.ndarray:
    """(B, draws, H, 7) sampled chunks on `batch`'s frames from a fixed sampling seed."""
    policy.eval()
    policy.reset(seed)
    return parl.sample_chunks(policy, batch.images, batch.lang_emb, SPREAD_DRAWS).cpu().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--policy', default=str(SHIPPED / 'policy.safetensors'))
    parser.add_argument('--data', required=True, help='RLDS directory of the offline data')
    parser.add_argument('--targets', choices=('self', 'frozen', 'data'), default='self')
    parser.add_argument('--updates', type=int, default=300)
    parser.add_argument('--lr', type=float, default=1e-4)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--binary-gripper', action='store_true',
                        help='distil sampled gripper commands open/closed, as executed')
    parser.add_argument('--task', default='carrot_on_plate', choices=sorted(TASKS))
    parser.add_argument('--episodes', type=int, default=100, help='0: skip the evaluations')
    parser.add_argument('--eval-seed', type=int, default=0, help='first layout evaluated')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default='outputs/self_distillation.json')
    args = parser.parse_args()
    if args.updates < 0 or args.batch_size < 1 or args.lr <= 0:
        parser.error('need --updates >= 0, --batch-size >= 1 and --lr > 0')
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    policy = load_policy(args.policy, device='cpu', seed=args.seed)
    frozen = copy.deepcopy(policy).eval()
    size = policy.encoder_config.image_size
    episodes = [e for e in common.read_source(args.data, 'train', 'dataset', size) if e.success]
    if not episodes:
        parser.error(f'{args.data} holds no successful episodes')
    chunks = ChunkDataset(episodes, policy.action_horizon, policy.action_space)
    probe = to_policy_batch(chunks.sample(64, rng), policy)

    before = (success_rate(policy, args.task, args.episodes, args.eval_seed)
              if args.episodes else None)
    samples_before = spread(policy, probe, args.seed)

    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)
    losses = []
    for _ in tqdm(range(args.updates), desc=f'distilling ({args.targets})', unit='update'):
        batch = to_policy_batch(chunks.sample(args.batch_size, rng), policy)
        if args.targets != 'data':
            source = policy if args.targets == 'self' else frozen
            source.eval()
            actions = parl.sample_chunks(source, batch.images, batch.lang_emb, 1)[:, 0]
            if args.binary_gripper:
                actions = parl.executed_gripper(actions, policy.action_space)
            batch = batch._replace(actions=actions, mask=torch.ones_like(batch.mask))
        losses.append(parl.distil(policy, optimizer, batch))

    samples_after = spread(policy, probe, args.seed)
    after = (success_rate(policy, args.task, args.episodes, args.eval_seed)
             if args.episodes else None)
    std_before = samples_before.std(axis=1).mean(axis=(0, 1))
    std_after = samples_after.std(axis=1).mean(axis=(0, 1))
    report = {
        'policy': args.policy, 'class': policy.name, 'targets': args.targets,
        'updates': args.updates, 'lr': args.lr, 'batch_size': args.batch_size,
        'binary_gripper': args.binary_gripper, 'task': args.task, 'episodes': args.episodes,
        'success_before': before, 'success_after': after,
        'sample_std_per_dim_before': std_before.round(4).tolist(),
        'sample_std_per_dim_after': std_after.round(4).tolist(),
        'mean_abs_shift_of_samples': float(np.abs(samples_after - samples_before).mean()),
        'loss_first_10': float(np.mean(losses[:10])) if losses else None,
        'loss_last_10': float(np.mean(losses[-10:])) if losses else None}
    print(json.dumps(report, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + '\n')
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
