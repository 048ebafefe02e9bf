"""Rotation helpers and damped-least-squares inverse kinematics for the WidowX arm.

Euler angles follow Bridge (``transformations`` 'sxyz'): static axes, roll about x, then pitch
about y, then yaw about z, i.e. R = Rz(yaw) @ Ry(pitch) @ Rx(roll). Angles in radians.
"""

from __future__ import annotations

from typing import Sequence

import mujoco
import numpy as np


def euler_to_mat(rpy: np.ndarray) -> np.ndarray:
    """(3,) [roll, pitch, yaw] -> (3, 3) rotation matrix."""
    cr, cp, cy = np.cos(rpy)
    sr, sp, sy = np.sin(rpy)
    return np.array([
        [cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
        [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
        [-sp, cp * sr, cp * cr],
    ])


def mat_to_euler(mat: np.ndarray) -> np.ndarray:
    """(3, 3) rotation matrix -> (3,) [roll, pitch, yaw]; pitch in [-pi/2, pi/2]."""
    cos_pitch = np.hypot(mat[0, 0], mat[1, 0])
    if cos_pitch > 1e-9:
        return np.array([np.arctan2(mat[2, 1], mat[2, 2]), np.arctan2(-mat[2, 0], cos_pitch),
                         np.arctan2(mat[1, 0], mat[0, 0])])
    # Gimbal lock: only roll - yaw is defined; put it all in roll.
    return np.array([np.arctan2(-mat[1, 2], mat[1, 1]), np.arctan2(-mat[2, 0], cos_pitch), 0.0])


def rotation_error(target: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Axis-angle vector (3,) in the world frame rotating `current` onto `target` (3, 3 each)."""
    quat = np.empty(4)
    mujoco.mju_mat2Quat(quat, (target @ current.T).reshape(-1))
    vel = np.empty(3)
    mujoco.mju_quat2Vel(vel, quat, 1.0)
    return vel


def wrap_angle(angle: float, period: float = 2 * np.pi) -> float:
    """Wrap an angle (rad) into [-period/2, period/2)."""
    return float((angle + period / 2) % period - period / 2)


class DampedLeastSquaresIK:
    """Site-pose IK: joint targets q (n,) for a desired site position (3,) m and rotation (3, 3).

    Runs on its own MjData so the simulation state is never touched. Each iteration solves
    dq = J^T (J J^T + lambda^2 I)^-1 e with e = [position error; rotation error] and clips q
    to the joint ranges, so the result is always a valid joint target.
    """

    def __init__(self, model: mujoco.MjModel, site: str, joints: Sequence[str],
                 damping: float = 0.05, iterations: int = 20, tolerance: float = 1e-4):
        self._model = model
        self._data = mujoco.MjData(model)
        self._site = model.site(site).id
        joint_ids = [model.joint(name).id for name in joints]
        self._qpos_idx = np.array([model.jnt_qposadr[j] for j in joint_ids])
        self._dof_idx = np.array([model.jnt_dofadr[j] for j in joint_ids])
        self.lower = model.jnt_range[joint_ids, 0].copy()
        self.upper = model.jnt_range[joint_ids, 1].copy()
        self._damping_sq = damping ** 2
        self._iterations = iterations
        self._tolerance = tolerance
        self._jac = np.zeros((6, model.nv))

    def forward(self, q: np.ndarray):
        """Site (position (3,), rotation (3, 3)) for joint positions q (n,)."""
        self._data.qpos[self._qpos_idx] = q
        mujoco.mj_kinematics(self._model, self._data)
        return (self._data.site_xpos[self._site].copy(),
                self._data.site_xmat[self._site].reshape(3, 3).copy())

    def solve(self, q_init: np.ndarray, pos: np.ndarray, rot: np.ndarray) -> np.ndarray:
        """Joint targets (n,) reaching (pos, rot) as closely as the damping and limits allow."""
        q = np.clip(np.asarray(q_init, dtype=np.float64), self.lower, self.upper)
        for _ in range(self._iterations):
            site_pos, site_rot = self.forward(q)
            err = np.concatenate([pos - site_pos, rotation_error(rot, site_rot)])
            if np.max(np.abs(err)) < self._tolerance:
                break
            mujoco.mj_comPos(self._model, self._data)  # mj_jacSite needs cdof and subtree COM
            mujoco.mj_jacSite(self._model, self._data, self._jac[:3], self._jac[3:], self._site)
            jac = self._jac[:, self._dof_idx]
            step = jac.T @ np.linalg.solve(jac @ jac.T + self._damping_sq * np.eye(6), err)
            q = np.clip(q + step, self.lower, self.upper)
        return q
