"""The Policy protocol: what steering, fine-tuning, evaluation and the ROS nodes rely on.

A policy maps an observation and an instruction to chunks of H future actions. Steering asks for
many candidate chunks at once, so `sample_actions` is ONE batched call that encodes the
observation once and samples `num_samples` chunks from it.
"""

from __future__ import annotations

from typing import (Any, Callable, Dict, Mapping, Optional, Protocol, runtime_checkable, Sequence,
                    Type)

import numpy as np

from robot_rl.types import ACTION_DIM, Observation


@runtime_checkable
class Policy(Protocol):
    action_horizon: int
    """H: the length of the action chunk the policy predicts."""

    def reset(self, seed: Optional[int] = None) -> None:
        """Forget any per-episode state (history, temporal ensembles).

        With a seed, the sampling stream restarts from it, so an episode's samples do not
        depend on the episodes before it.
        """

    def sample_actions(self, obs: Observation, instruction: str,
                       num_samples: int) -> np.ndarray:
        """float32 (num_samples, H, 7) action chunks in environment units."""


@runtime_checkable
class TrainablePolicy(Policy, Protocol):
    def supervised_loss(self, batch: Any) -> Any:
        """Scalar torch loss on a batch of (observation, instruction, action chunk) examples.

        The one loss used for behaviour cloning and for PA-RL distillation.
        """


POLICIES: Dict[str, Type] = {}
"""Registry: policy name -> class (filled by `register_policy`)."""


def register_policy(name: str) -> Callable[[Type], Type]:
    """Class decorator registering a policy class under `name` (one name, one class)."""
    def decorator(cls: Type) -> Type:
        if name in POLICIES and POLICIES[name] is not cls:
            raise ValueError(f'policy name {name!r} is already registered to {POLICIES[name]}')
        POLICIES[name] = cls
        return cls
    return decorator


def check_action_chunks(actions: np.ndarray, num_samples: int, horizon: int) -> np.ndarray:
    """Validate a policy's output: float32 (num_samples, H, 7), all finite."""
    actions = np.asarray(actions, dtype=np.float32)
    expected = (num_samples, horizon, ACTION_DIM)
    if actions.shape != expected:
        raise ValueError(f'policy returned actions of shape {actions.shape}, expected {expected}')
    if not np.isfinite(actions).all():
        raise ValueError('policy returned non-finite actions')
    return actions


def dataset_action_stats(table: Mapping[str, Any], dataset_key: str, fields: Sequence[str],
                         source: str) -> Dict[str, np.ndarray]:
    """`fields` (float64) and 'mask' (bool), each (7,), of `dataset_key`'s action statistics in
    an Open X-Embodiment-style table {dataset key: {'action': {field: values}}} (Octo's
    dataset_statistics, OpenVLA's norm_stats).

    A missing key, entry or field, a wrong length or a non-finite value is a ValueError naming
    the dataset key (and the keys that exist): un-normalising with another dataset's statistics,
    or none, would move the robot by the wrong amounts without any other sign. A missing `mask`
    means every dimension is normalised (both models' default).
    """
    if dataset_key not in table:
        raise ValueError(f'{source} has no action statistics for dataset key {dataset_key!r}; '
                         f'it has {sorted(table)}')
    entry = table[dataset_key]
    action = entry.get('action') if isinstance(entry, Mapping) else None
    if not isinstance(action, Mapping):
        raise ValueError(f'statistics of dataset key {dataset_key!r} in {source} have no '
                         "'action' entry")
    missing = [name for name in fields if name not in action]
    if missing:
        raise ValueError(f'action statistics of dataset key {dataset_key!r} in {source} lack '
                         f'{missing}')
    stats = {name: np.asarray(action[name], np.float64).reshape(-1) for name in fields}
    stats['mask'] = np.asarray(action.get('mask', np.ones(ACTION_DIM, bool)), bool).reshape(-1)
    for name, value in stats.items():
        if value.shape != (ACTION_DIM,):
            raise ValueError(f'action statistics {name!r} of dataset key {dataset_key!r} have '
                             f'{value.shape[0]} entries; this robot acts in {ACTION_DIM}')
    if not all(np.isfinite(stats[name]).all() for name in fields):
        raise ValueError(f'action statistics of dataset key {dataset_key!r} are not finite')
    return stats
