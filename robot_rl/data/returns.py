"""Monte-Carlo returns-to-go for Cal-QL calibration, with the failed-trajectory rule.

An episode of N steps (RLDS layout, see `robot_rl.types.Episode`) has N - 1 transitions
(step t, step t + 1). Transition t carries reward r_t = rewards[t] and is done when step t + 1 is
a true terminal (is_terminal[t + 1]). A time-limit truncation is not a terminal: the return of a
truncated episode simply stops at its last observed reward (no bootstrap).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from robot_rl.types import Episode, REWARD_STEP


def monte_carlo_returns(rewards, terminals, gamma: float,
                        failure_reward: float = REWARD_STEP) -> np.ndarray:
    """Discounted returns-to-go of one episode's transitions.

    rewards:   (T,) reward r_t of transition t
    terminals: (T,) bool, done_t: transition t ends in a true terminal
    Returns float32 (T,): G_t = r_t + gamma * (1 - done_t) * G_{t+1}, with G_T = 0.

    Failed-trajectory rule (Cal-QL): when every reward equals `failure_reward` the task never
    succeeded, and G_t = failure_reward / (1 - gamma) for every t (-100 for r = -1, gamma 0.99):
    the value of failing forever, not just for the steps the time limit allowed.

    Raises ValueError for mismatched shapes, gamma outside [0, 1) or a non-finite reward (naming
    the step).
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    terminals = np.asarray(terminals, dtype=bool)
    if rewards.ndim != 1 or terminals.shape != rewards.shape:
        raise ValueError(f'rewards {rewards.shape} and terminals {terminals.shape} must be '
                         'matching 1-d arrays')
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f'gamma must be in [0, 1), got {gamma}')
    bad = np.flatnonzero(~np.isfinite(rewards))
    if bad.size:
        raise ValueError(f'reward at step {bad[0]} is not finite: {rewards[bad[0]]}')
    if rewards.size and np.all(rewards == failure_reward):
        return np.full(rewards.shape, failure_reward / (1.0 - gamma), dtype=np.float32)
    returns = np.empty_like(rewards)
    running = 0.0
    # Backwards over one episode (about a hundred steps); runs once per closed episode.
    for t in range(rewards.size - 1, -1, -1):
        running = rewards[t] + gamma * (0.0 if terminals[t] else running)
        returns[t] = running
    return returns.astype(np.float32)


def episode_mc_returns(episode: Episode, gamma: float,
                       failure_reward: float = REWARD_STEP) -> np.ndarray:
    """float32 (N,) returns-to-go for every step of `episode`.

    Entries 0..N-2 are the returns of the N - 1 transitions (reward rewards[t], done
    is_terminal[t + 1]). The last step starts no transition, so its entry is padding: 0.0, the
    return of an empty future (the value of a terminal state; for a truncated episode, the
    bootstrap-free estimate). It never enters a sampled batch. The last step's reward is padding
    too and takes no part, not even in the failed-trajectory test.
    """
    n = len(episode)
    returns = np.zeros(n, dtype=np.float32)
    if n > 1:
        returns[:-1] = monte_carlo_returns(episode.rewards[:-1], episode.is_terminal[1:], gamma,
                                           failure_reward)
    return returns


def with_mc_returns(episode: Episode, gamma: float,
                    failure_reward: float = REWARD_STEP) -> Episode:
    """A new Episode (arrays shared, input untouched) with `mc_returns` filled."""
    return dataclasses.replace(episode,
                               mc_returns=episode_mc_returns(episode, gamma, failure_reward))
