"""Who moves the arm this control step: e-stop > teleoperation > hold > policy.

The actor (the policy node) asks `ActionArbiter.decide(now)` before every action:

    estop    the e-stop is engaged: nothing is sent, whatever is queued (the caller also drops
             its queued chunk, so nothing queued before the stop runs after the release)
    teleop   a person has taken over and their device spoke within `teleop_timeout_s`: the
             device's action runs and is stored, flagged as an intervention
    hold     a person has taken over but the device went quiet (unplugged, the SSH session
             dropped): zero motion, gripper unchanged. Control never falls back to the policy
             on its own; the person hands it back by ending the intervention
    policy   otherwise: the policy's (steered) action

Each teleop message is one step's delta and runs once; a device that is alive but sent nothing
new since the last step holds still (zero motion, its last gripper command).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from robot_rl.types import ACTION_DIM, ActionSpace

ESTOP, TELEOP, HOLD, POLICY = 'estop', 'teleop', 'hold', 'policy'
GRIPPER = ACTION_DIM - 1


def hold_action(gripper: float) -> np.ndarray:
    """Zero end-effector motion with the gripper left where it was."""
    action = np.zeros(ACTION_DIM, np.float32)
    action[GRIPPER] = gripper
    return action


@dataclasses.dataclass(frozen=True)
class Decision:
    source: str
    """ESTOP, TELEOP, HOLD or POLICY."""
    action: Optional[np.ndarray]
    """The action to send (teleop, hold); None for ESTOP (send nothing) and POLICY (ask it)."""

    @property
    def intervention(self) -> bool:
        """Whether the step is a human's action (its own replay source)."""
        return self.source == TELEOP


class ActionArbiter:
    """E-stop, intervention and teleop inputs in; one Decision per control step out."""

    def __init__(self, teleop_timeout_s: float = 0.5, bounds: Optional[ActionSpace] = None):
        if teleop_timeout_s <= 0:
            raise ValueError(f'teleop_timeout_s must be > 0, got {teleop_timeout_s}')
        self.teleop_timeout_s = teleop_timeout_s
        self.bounds = bounds or ActionSpace.bridge()
        self.estop = False
        self.intervening = False
        self.gripper = 1.0
        """The last gripper command sent (1 = open), what a hold keeps."""
        self._teleop: Optional[np.ndarray] = None
        self._teleop_time = -np.inf
        self._teleop_fresh = False

    def set_estop(self, engaged: bool) -> None:
        self.estop = bool(engaged)

    def set_intervention(self, active: bool) -> None:
        """A person takes over (True) or hands control back to the policy (False)."""
        self.intervening = bool(active)
        if not active:
            self._teleop, self._teleop_fresh = None, False

    def teleop(self, action, now: float) -> None:
        """A device's action (7,), checked and clipped; ValueError names a malformed one."""
        self._teleop = self.bounds.check(action)
        self._teleop_time = now
        self._teleop_fresh = True

    def device_alive(self, now: float) -> bool:
        return self._teleop is not None and now - self._teleop_time <= self.teleop_timeout_s

    def decide(self, now: float) -> Decision:
        if self.estop:
            return Decision(ESTOP, None)
        if not self.intervening:
            return Decision(POLICY, None)
        if not self.device_alive(now):
            return Decision(HOLD, hold_action(self.gripper))
        if self._teleop_fresh:
            self._teleop_fresh = False
            return Decision(TELEOP, self._teleop.copy())
        return Decision(TELEOP, hold_action(float(self._teleop[GRIPPER])))

    def sent(self, action: np.ndarray) -> None:
        """Record what was actually sent (the gripper a later hold keeps)."""
        self.gripper = float(action[GRIPPER])
