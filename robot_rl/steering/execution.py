"""Turning chosen action chunks into one safe action per control step.

TemporalEnsembler: every step a new chunk of H actions arrives; the action executed now is the
weighted mean of what the last H chunks predicted for now (Octo's ensembling: weights
exp(-k * i), oldest prediction first). StickyGripper: on the WidowX a gripper switch is repeated
for 3 steps, so one noisy sample cannot open a closing gripper halfway.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Optional

import numpy as np

from robot_rl.types import ACTION_DIM, ActionSpace

GRIPPER = 6
GRIPPER_THRESHOLD = 0.5
"""Gripper commands above it open the gripper (1), others close it (0)."""
STICKY_STEPS = 3


class TemporalEnsembler:
    """Weighted mean over the overlapping predictions of the last H chunks."""

    def __init__(self, horizon: int, exp_weight: float = 0.01):
        if horizon < 1:
            raise ValueError(f'horizon must be >= 1, got {horizon}')
        self.horizon = horizon
        self.exp_weight = exp_weight
        self.chunks: Deque[np.ndarray] = deque(maxlen=horizon)

    def reset(self) -> None:
        self.chunks.clear()

    def __call__(self, chunk: np.ndarray) -> np.ndarray:
        """chunk (H, 7) starting now -> the action (7,) to execute now."""
        chunk = np.asarray(chunk, np.float32)
        if chunk.shape != (self.horizon, ACTION_DIM):
            raise ValueError(f'expected a chunk ({self.horizon}, {ACTION_DIM}), got {chunk.shape}')
        self.chunks.append(chunk)
        # The chunk received i steps before the newest predicts now at its row i.
        count = len(self.chunks)
        now = np.stack([c[count - 1 - j] for j, c in enumerate(self.chunks)])  # oldest first
        weights = np.exp(-self.exp_weight * np.arange(count))
        return (weights[:, None] * now).sum(0) / weights.sum()


class StickyGripper:
    """Binarise the gripper command (1 open, 0 closed); hold a switch for `steps` steps."""

    def __init__(self, steps: int = STICKY_STEPS, threshold: float = GRIPPER_THRESHOLD):
        self.steps = steps
        self.threshold = threshold
        self.state: Optional[float] = None
        self.hold = 0

    def reset(self) -> None:
        self.state, self.hold = None, 0

    def __call__(self, command: float) -> float:
        wanted = 1.0 if command > self.threshold else 0.0
        if self.state is None:
            self.state = wanted
        elif self.hold > 0:
            self.hold -= 1
        elif wanted != self.state:
            self.state, self.hold = wanted, self.steps - 1
        return self.state


class ChunkExecutor:
    """Chosen chunks in, bounded actions out: ensembling, sticky gripper, the robot's limits."""

    def __init__(self, horizon: int, bounds: ActionSpace, exp_weight: float = 0.01,
                 sticky_steps: int = STICKY_STEPS):
        self.ensembler = TemporalEnsembler(horizon, exp_weight)
        self.gripper = StickyGripper(sticky_steps)
        self.bounds = bounds

    def reset(self) -> None:
        self.ensembler.reset()
        self.gripper.reset()

    @property
    def gripper_state(self) -> float:
        """The last gripper command (1 open when nothing was commanded yet)."""
        return 1.0 if self.gripper.state is None else self.gripper.state

    def __call__(self, chunk: np.ndarray) -> np.ndarray:
        action = self.ensembler(chunk)
        action[GRIPPER] = self.gripper(float(action[GRIPPER]))
        return self.bounds.clip(action).astype(np.float32)

    def hold(self) -> np.ndarray:
        """Zero motion, gripper unchanged: the safe action when no candidate is usable."""
        action = np.zeros(ACTION_DIM, np.float32)
        action[GRIPPER] = self.gripper_state
        return action
