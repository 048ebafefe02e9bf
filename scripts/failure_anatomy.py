"""Where does a policy fail? Follow its episodes and classify each from the simulator's state.

For every episode: the outcome, and for failures whether the source object was ever lifted
(more than 2 cm) or lifted and not placed; where the gripper first closed, relative to the
source object's centre (cm; a grasp that closes too high or to the side never lifts it); how
often the gripper closed. Steer the policy with a critic (--critic, --k) to see what steering
changes.

    .venv/bin/python scripts/failure_anatomy.py --task carrot_on_plate --episodes 40
    .venv/bin/python scripts/failure_anatomy.py --critic runs/<critic run>/checkpoints/last --k 10

Prints one line per episode and a summary (counts per kind, median first-close offsets, over
all episodes and over the successes); writes both as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from tqdm import tqdm

from robot_rl.cli import evaluate
from robot_rl.envs import make_env, TASKS
from robot_rl.steering import ValueGuidedSteering
from robot_rl.steering.execution import GRIPPER, GRIPPER_THRESHOLD

SHIPPED = Path(__file__).resolve().parents[1] / 'robot_rl' / 'checkpoints' / 'sim'
LIFTED = 0.02  # m the source object must rise for a grasp to count as having lifted it


def run_episode(env, steering: ValueGuidedSteering, instruction: str, seed: int) -> Dict:
    """One episode: outcome, kind of failure, first gripper close relative to the source."""
    obs, _ = env.reset(seed=seed)
    steering.reset(seed=seed)
    source = env.task.source.name
    start_z = env.object_poses()[source].pos[2]
    highest, closes, first_close, was_open = start_z, 0, None, True
    done = success = False
    while not done:
        action = steering.act(obs, instruction)
        obs, _, terminated, truncated, info = env.step(action)
        done, success = terminated or truncated, success or bool(info['success'])
        pose = env.object_poses()[source]
        highest = max(highest, pose.pos[2])
        is_open = action[GRIPPER] > GRIPPER_THRESHOLD
        if was_open and not is_open:
            closes += 1
            if first_close is None:
                offset = (env.ee_pose()[0] - pose.pos) * 100
                first_close = [round(float(v), 2) for v in offset]
        was_open = is_open
    lifted = highest - start_z > LIFTED
    kind = 'success' if success else ('lifted_not_placed' if lifted else 'never_lifted')
    return {'seed': seed, 'kind': kind, 'lift_cm': round(float(highest - start_z) * 100, 2),
            'closes': closes, 'first_close_offset_cm': first_close}


def summarise(episodes: List[Dict]) -> Dict:
    def median_offsets(rows):
        offsets = [r['first_close_offset_cm'] for r in rows if r['first_close_offset_cm']]
        return np.median(offsets, axis=0).round(2).tolist() if offsets else None
    kinds = [r['kind'] for r in episodes]
    return {'episodes': len(episodes),
            'kinds': {k: kinds.count(k) for k in sorted(set(kinds))},
            'median_first_close_offset_cm': median_offsets(episodes),
            'median_first_close_offset_cm_successes':
                median_offsets([r for r in episodes if r['kind'] == 'success'])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--task', default='carrot_on_plate', choices=sorted(TASKS))
    parser.add_argument('--policy', default=str(SHIPPED / 'policy.safetensors'))
    parser.add_argument('--critic', default=None, help='steer with this critic (needs --k > 1)')
    parser.add_argument('--k', type=int, default=1, help='candidates per step (1: the policy)')
    parser.add_argument('--episodes', type=int, default=40)
    parser.add_argument('--seed', type=int, default=10000, help='first layout (held out)')
    parser.add_argument('--out', default='outputs/failure_anatomy.json')
    args = parser.parse_args()
    if args.k > 1 and args.critic is None:
        parser.error('--k > 1 steers the policy: give the critic with --critic')
    torch.set_num_threads(1)

    cfg = evaluate.EvalConfig(policy_path=args.policy, critic_path=args.critic,
                              tasks=[args.task], device='cpu')
    policy, critic, space, embed, _ = evaluate.load_models(cfg)
    steering = ValueGuidedSteering(policy, critic, space, num_samples=args.k, embed=embed,
                                   image_size=cfg.image_size, device='cpu')
    env = make_env(args.task, image_size=cfg.image_size)
    instruction = TASKS[args.task].instruction
    episodes = []
    for i in tqdm(range(args.episodes), desc='episodes', unit='ep'):
        episodes.append(run_episode(env, steering, instruction, args.seed + i))
        tqdm.write(json.dumps(episodes[-1]))
    env.close()
    summary = {'task': args.task, 'policy': args.policy, 'critic': args.critic, 'k': args.k,
               **summarise(episodes)}
    print(json.dumps(summary, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({'summary': summary, 'episodes': episodes}, indent=2))


if __name__ == '__main__':
    main()
