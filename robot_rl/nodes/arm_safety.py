"""Pure logic behind the widowx node (no rclpy): delta EE actions -> clamped joint targets.

The Interbotix driver checks no joint limits, so everything sent passes through here:
the action is checked and clipped (ActionSpace.bridge), the EE target is integrated
(target += delta) and kept inside a workspace box, damped-least-squares IK maps it to joints
clipped to the joint ranges of the WidowX MJCF, and each joint moves at most `max_joint_step`
per control period. A `Watchdog` says when to hold position (no fresh action within two
control periods). Homing (`ArmCommander.step_towards`) is a joint-space move through the same
joint-limit and per-step clamps.
"""

from __future__ import annotations

from importlib import resources
from typing import Optional, Sequence, Tuple

import numpy as np

from robot_rl.types import ActionSpace

ARM_JOINTS = ('waist', 'shoulder', 'elbow', 'forearm_roll', 'wrist_angle', 'wrist_rotate')
HOME_JOINTS = np.array([0.0, -0.96, 1.16, 0.0, -0.3, 0.0])
"""The home pose (rad, ARM_JOINTS order) the widowx node's `home` service moves to."""
READY_POS = np.array([0.25, 0.0, 0.16])
"""Start-up EE target (m), gripper pointing down, until joint states arrive."""


def clamp_joint_step(current: np.ndarray, target: np.ndarray, lower: np.ndarray,
                     upper: np.ndarray, max_step: float) -> np.ndarray:
    """Target clipped to [lower, upper] and to within max_step of `current` (all rad)."""
    step = np.clip(np.asarray(target) - current, -max_step, max_step)
    return np.clip(current + step, lower, upper)


class Watchdog:
    """`expired(now)` is True when no `feed` happened within `timeout` seconds."""

    def __init__(self, timeout: float):
        self.timeout = float(timeout)
        self._last: Optional[float] = None

    def feed(self, now: float) -> None:
        self._last = now

    def expired(self, now: float) -> bool:
        return self._last is None or now - self._last > self.timeout


class ArmCommander:
    """Integrates 7-d delta actions into safe joint targets for the 6 arm joints + gripper."""

    def __init__(self, workspace_low: Sequence[float], workspace_high: Sequence[float],
                 max_joint_step: float = 0.35, ik_damping: float = 0.05):
        import mujoco

        from robot_rl.envs.kinematics import DampedLeastSquaresIK, euler_to_mat, mat_to_euler
        self._euler_to_mat, self._mat_to_euler = euler_to_mat, mat_to_euler
        xml = resources.files('robot_rl.envs') / 'assets' / 'widowx250.xml'
        self.ik = DampedLeastSquaresIK(mujoco.MjModel.from_xml_path(str(xml)), 'ee', ARM_JOINTS,
                                       damping=ik_damping)
        self.low, self.high = np.asarray(workspace_low, float), np.asarray(workspace_high, float)
        if self.low.shape != (6,) or self.high.shape != (6,) or np.any(self.high <= self.low):
            raise ValueError('workspace bounds must be 6 values each with high > low')
        self.max_joint_step = float(max_joint_step)
        self.space = ActionSpace.bridge()
        self.joints = self.ik.solve(HOME_JOINTS, READY_POS, np.eye(3))
        self.sync(self.joints)

    def sync(self, joints: np.ndarray) -> None:
        """Re-anchor the EE target at measured joints (start-up, after a hold)."""
        self.joints = np.clip(np.asarray(joints, float), self.ik.lower, self.ik.upper)
        pos, rot = self.ik.forward(self.joints)
        self.target_pos, self.target_rpy = self._clip_pose(pos, self._mat_to_euler(rot))

    def _clip_pose(self, pos, rpy) -> Tuple[np.ndarray, np.ndarray]:
        return np.clip(pos, self.low[:3], self.high[:3]), np.clip(rpy, self.low[3:], self.high[3:])

    def step(self, action) -> Tuple[np.ndarray, float, np.ndarray]:
        """(joint targets (6,), gripper in [0, 1], the clipped action actually applied).

        Raises ValueError (wrong length, non-finite) without changing any state."""
        act = self.space.check(action)
        rot = self._euler_to_mat(act[3:6].astype(float)) @ self._euler_to_mat(self.target_rpy)
        pos, rpy = self._clip_pose(self.target_pos + act[:3], self._mat_to_euler(rot))
        q = self.ik.solve(self.joints, pos, self._euler_to_mat(rpy))
        self.joints = clamp_joint_step(self.joints, q, self.ik.lower, self.ik.upper,
                                       self.max_joint_step)
        self.target_pos, self.target_rpy = pos, rpy
        return self.joints.copy(), float(act[6]), act

    def step_towards(self, joints: np.ndarray) -> np.ndarray:
        """One control period of a joint-space move (homing): the next joint targets (6,),
        `joints` clipped to the joint limits and reached at most `max_joint_step` per joint
        per period; the EE target follows, so delta actions continue from there."""
        q = clamp_joint_step(self.joints, np.asarray(joints, float), self.ik.lower,
                             self.ik.upper, self.max_joint_step)
        self.sync(q)
        return self.joints.copy()

    def state(self) -> np.ndarray:
        """EE [x, y, z, roll, pitch, yaw] (6,) of the current joint targets."""
        pos, rot = self.ik.forward(self.joints)
        return np.concatenate([pos, self._mat_to_euler(rot)])
