"""How well does a critic rank a policy's candidate actions? Ask the simulator.

Along episodes of the base policy, every `--every` steps: sample K chunks from the policy, score
their first actions with the critic (as V-GPS does), then follow each candidate from a snapshot
of the scene: execute it, let the base policy finish the episode, M times. Each candidate's
success rate is its value under the base policy; the critic's ranking is compared with it.

    .venv/bin/python scripts/critic_ranking.py --task carrot_on_plate --episodes 10

Prints, over the states visited: in how many the candidates' outcomes differ, the median
Spearman correlation of Q with the outcomes there, and the gain in success of picking the
critic's argmax (and the best candidate, an upper bound inflated by the noise of M rollouts)
over a random candidate. Several critics (--critic A B ...) are judged on the same states and
rollouts, each also by the mean Q of all H actions of a candidate chunk at the state (what
the chunk as a whole asks for, not only its first action). Writes every state's Q (per critic)
and outcomes as JSON (--out).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from robot_rl.cli import evaluate
from robot_rl.envs import make_env, TASKS
from robot_rl.steering import ValueGuidedSteering

SHIPPED = Path(__file__).resolve().parents[1] / 'robot_rl' / 'checkpoints' / 'sim'


def spearman(a, b) -> float:
    """Rank correlation (tied values share their mean rank); NaN when either is constant."""
    def ranks(x):
        x = np.asarray(x, np.float64)
        r = np.empty(len(x))
        r[x.argsort(kind='stable')] = np.arange(len(x))
        for value in np.unique(x):
            r[x == value] = r[x == value].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float('nan')
    return float(np.corrcoef(ra, rb)[0, 1])


def finish(env, obs, steering, instruction: str) -> bool:
    """Run `steering` to the end of the episode; whether it succeeded."""
    while True:
        obs, _, terminated, truncated, info = env.step(steering.act(obs, instruction))
        if terminated or truncated:
            return bool(info['success'])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--task', default='carrot_on_plate', choices=sorted(TASKS))
    parser.add_argument('--policy', default=str(SHIPPED / 'policy.safetensors'))
    parser.add_argument('--critic', nargs='+', default=[str(SHIPPED / 'critic')],
                        help='one or more critic checkpoints, judged on the same rollouts')
    parser.add_argument('--episodes', type=int, default=10)
    parser.add_argument('--candidates', type=int, default=8, help='K')
    parser.add_argument('--rollouts', type=int, default=2, help='M per candidate')
    parser.add_argument('--every', type=int, default=5, help='steps between probed states')
    parser.add_argument('--until', type=int, default=40, help='last step probed')
    parser.add_argument('--seed', type=int, default=5000, help='first layout (held out)')
    parser.add_argument('--out', default='outputs/critic_ranking.json')
    args = parser.parse_args()
    torch.set_num_threads(1)

    scorers = {}
    for path in args.critic:
        cfg = evaluate.EvalConfig(policy_path=args.policy, critic_path=path,
                                  tasks=[args.task], device='cpu')
        policy, critic, space, embed, _ = evaluate.load_models(cfg)
        scorers[path] = ValueGuidedSteering(policy, critic, space, num_samples=args.candidates,
                                            embed=embed, device='cpu')

    def steering(k: int) -> ValueGuidedSteering:  # the base policy: K = 1 needs no critic
        return ValueGuidedSteering(policy, None, None, num_samples=k, device='cpu')

    instruction = TASKS[args.task].instruction
    env = make_env(args.task, image_size=cfg.image_size)
    base = steering(1)
    states = []
    for episode in tqdm(range(args.episodes), desc='episodes', unit='ep'):
        seed = args.seed + episode
        obs, _ = env.reset(seed=seed)
        base.reset(seed=seed)
        done, t = False, 0
        while not done and t <= args.until:
            if t > 0 and t % args.every == 0:
                snapshot, executor = env.snapshot(), copy.deepcopy(base.executor)
                chunks = policy.sample_actions(obs, instruction, args.candidates)
                # Q of every action of each chunk at this state: [0] is what V-GPS scores.
                q_steps = {path: np.stack([scorer.score(obs, instruction, chunks[:, i])
                                           for i in range(chunks.shape[1])], 1)
                           for path, scorer in scorers.items()}
                outcomes = []
                for chunk in chunks:
                    wins = 0
                    for _ in range(args.rollouts):
                        env.restore(snapshot)
                        follower = steering(1)
                        follower.executor = copy.deepcopy(executor)
                        after, _, terminated, truncated, info = env.step(follower.executor(chunk))
                        wins += (bool(info['success']) if terminated or truncated
                                 else finish(env, after, follower, instruction))
                    outcomes.append(wins / args.rollouts)
                states.append({'seed': seed, 'step': t, 'outcome': outcomes,
                               'q': {path: q[:, 0].tolist() for path, q in q_steps.items()},
                               'q_chunk_mean': {path: q.mean(1).tolist()
                                                for path, q in q_steps.items()}})
                obs = env.restore(snapshot)
            obs, _, terminated, truncated, _ = env.step(base.act(obs, instruction))
            done, t = terminated or truncated, t + 1

    differ = [s for s in states if np.ptp(s['outcome']) > 0]
    summary = {
        'task': args.task, 'states': len(states), 'states_where_outcomes_differ': len(differ),
        'mean_outcome': float(np.mean([np.mean(s['outcome']) for s in states])),
        'best_pick_gain': float(np.mean([max(s['outcome']) - np.mean(s['outcome'])
                                         for s in states])),
        'critics': {}}
    for path in scorers:
        summary['critics'][path] = {}
        for key in ('q', 'q_chunk_mean'):  # scoring the first action / the whole chunk
            rho = [spearman(s[key][path], s['outcome']) for s in differ]
            summary['critics'][path][key] = {
                'spearman_median': float(np.nanmedian(rho)) if rho else None,
                'critic_pick_gain': float(np.mean([s['outcome'][int(np.argmax(s[key][path]))]
                                                   - np.mean(s['outcome']) for s in states]))}
    print(json.dumps(summary, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({'summary': summary, 'config': vars(args), 'states': states}))
    print(f'States: {out}')


if __name__ == '__main__':
    main()
