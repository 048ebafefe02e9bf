"""Simulated WidowX 250 with Bridge's 5 Hz delta end-effector control and a fixed camera.

Control: each step integrates the 7-d action into an end-effector target pose (kept inside a
workspace box), maps it to joint targets with damped-least-squares IK, and lets joint position
servos (with gravity compensation) track them for 0.2 s of simulated time.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional, Tuple

import gymnasium
from gymnasium import spaces
import mujoco
import numpy as np

from robot_rl.envs.camera import OffscreenCamera
from robot_rl.envs.kinematics import DampedLeastSquaresIK, euler_to_mat, mat_to_euler
from robot_rl.envs.tasks import build_model, get_task, on_target, TaskSpec
from robot_rl.types import (ActionSpace, CONTROL_HZ, IMAGE_KEY, Observation, REWARD_STEP,
                            REWARD_SUCCESS, STATE_DIM, STATE_KEY)

ARM_JOINTS = ('waist', 'shoulder', 'elbow', 'forearm_roll', 'wrist_angle', 'wrist_rotate')
FINGER_JOINTS = ('left_finger', 'right_finger')
FINGER_CLOSED, FINGER_OPEN = 0.015, 0.037  # each finger's slide position (m)
HOME_JOINTS = np.array([0.0, -0.96, 1.16, 0.0, -0.3, 0.0])
READY_POS = np.array([0.25, 0.0, 0.16])
"""Tool centre at reset (m), gripper pointing down (rotation = identity)."""
WORKSPACE_LOW = np.array([0.12, -0.25, 0.015, -0.8, -0.8, -2.0])
WORKSPACE_HIGH = np.array([0.45, 0.25, 0.25, 0.8, 0.8, 2.0])
"""Bounds of the end-effector target [x, y, z (m), roll, pitch, yaw (rad)]."""
STATE_LOW = np.array([-1.0, -1.0, -1.0, -np.pi, -np.pi / 2, -np.pi, 0.0], dtype=np.float32)
STATE_HIGH = np.array([1.0, 1.0, 1.0, np.pi, np.pi / 2, np.pi, 1.0], dtype=np.float32)
"""Loose bounds of the observed state (the arm reaches < 0.7 m from its base)."""
SETTLE_TIME = 0.1  # s of physics after placing objects, so they rest before the first frame
SPAWN_ATTEMPTS = 100
STATE_SPEC = mujoco.mjtState.mjSTATE_INTEGRATION
"""What a snapshot keeps of MuJoCo's state: all a simulation step depends on."""


@dataclasses.dataclass(frozen=True)
class ObjectPose:
    """Pose of a task object (copies): position (3,) m, quaternion (4,) wxyz, yaw (rad)."""

    pos: np.ndarray
    quat: np.ndarray
    yaw: float


@dataclasses.dataclass(frozen=True)
class EnvSnapshot:
    """Everything a rollout continues from: the physics state and the controller's own."""
    physics: np.ndarray      # mj_getState, mjSTATE_INTEGRATION (time, qpos, qvel, act, ctrl, ...)
    steps: int
    joint_target: np.ndarray
    target_pos: np.ndarray
    target_rot: np.ndarray


class WidowXEnv(gymnasium.Env):
    """Gymnasium environment for one task of the simulated Bridge setup.

    Observation: {'image_primary': uint8 (S, S, 3), 'state': float32 (7,)
    [x, y, z (m), roll, pitch, yaw (rad), gripper opening in [0, 1] (1 = open)]}.
    Action: float32 (7,) [dx, dy, dz (m), droll, dpitch, dyaw (rad), gripper (1 = open)],
    validated and clipped by ActionSpace.bridge(). Reward: REWARD_SUCCESS on the step success
    is reached (terminated), REWARD_STEP otherwise; truncated at the task's step limit.
    info: {'success': bool, 'instruction': str}.

    Args: task, a name in TASKS; image_size, camera pixels per side (64..256); render_mode,
    None or 'rgb_array' (render() returns the latest frame); ik_damping, the DLS lambda.
    """

    metadata = {'render_modes': ['rgb_array'], 'render_fps': int(CONTROL_HZ)}

    def __init__(self, task: str = 'spoon_on_towel', image_size: int = 128,
                 render_mode: Optional[str] = None, ik_damping: float = 0.05):
        if not 64 <= int(image_size) <= 256:
            raise ValueError(f'image_size must be in [64, 256], got {image_size}')
        if render_mode not in (None, 'rgb_array'):
            raise ValueError(f'render_mode must be None or "rgb_array", got {render_mode!r}')
        self.task: TaskSpec = get_task(task)
        self.instruction: str = self.task.instruction
        self.image_size = int(image_size)
        self.render_mode = render_mode
        self.action_bounds = ActionSpace.bridge()
        self.observation_space = spaces.Dict({
            IMAGE_KEY: spaces.Box(0, 255, (self.image_size, self.image_size, 3), np.uint8),
            STATE_KEY: spaces.Box(STATE_LOW, STATE_HIGH, (STATE_DIM,), np.float32),
        })
        self.action_space = spaces.Box(self.action_bounds.low, self.action_bounds.high,
                                       dtype=np.float32)
        self._model = build_model(self.task)
        self._data = mujoco.MjData(self._model)
        self._substeps = int(round(1.0 / (CONTROL_HZ * self._model.opt.timestep)))
        self._ik = DampedLeastSquaresIK(self._model, 'ee', ARM_JOINTS, damping=ik_damping)
        self._index_model()
        self._ready_joints = self._ik.solve(HOME_JOINTS, READY_POS, np.eye(3))
        self._camera: Optional[OffscreenCamera] = OffscreenCamera(self._model, 'primary',
                                                                  self.image_size)
        self._steps = 0
        self._joint_target = self._ready_joints.copy()
        self._target_pos, self._target_rot = self._ik.forward(self._ready_joints)
        self._image: Optional[np.ndarray] = None

    def _index_model(self) -> None:
        """Cache the qpos/actuator/geom indices used every step."""
        m = self._model
        self._arm_qpos = np.array([m.joint(j).qposadr[0] for j in ARM_JOINTS])
        self._finger_qpos = np.array([m.joint(j).qposadr[0] for j in FINGER_JOINTS])
        self._arm_ctrl = np.array([m.actuator(j).id for j in ARM_JOINTS])
        self._finger_ctrl = np.array([m.actuator(j).id for j in FINGER_JOINTS])
        self._ee_site = m.site('ee').id
        self._source_body = m.body(self.task.source.name).id
        self._target_body = m.body(self.task.target.name).id
        self._source_qpos = m.joint(self.task.source.name).qposadr[0]
        self._target_qpos = m.joint(self.task.target.name).qposadr[0]
        self._finger_geoms = np.array([m.geom('left_pad').id, m.geom('right_pad').id])

    # ----------------------------------------------------------------------------------------
    # gymnasium API

    def reset(self, *, seed: Optional[int] = None, options: Optional[Dict[str, Any]] = None
              ) -> Tuple[Observation, Dict[str, Any]]:
        """Arm at the ready pose, gripper open, objects at poses drawn from `self.np_random`."""
        super().reset(seed=seed)
        m, d = self._model, self._data
        mujoco.mj_resetData(m, d)
        self._steps = 0
        self._joint_target = self._ready_joints.copy()
        self._target_pos, self._target_rot = self._ik.forward(self._ready_joints)
        d.qpos[self._arm_qpos] = self._ready_joints
        d.qpos[self._finger_qpos] = FINGER_OPEN
        self._apply_controls(gripper=1.0)
        self._place_objects()
        self._simulate(int(round(SETTLE_TIME / m.opt.timestep)))
        return self._observation(), self._info(False)

    def step(self, action: Any) -> Tuple[Observation, float, bool, bool, Dict[str, Any]]:
        """Apply one 0.2 s control step; see the class docstring for the action layout."""
        act = self.action_bounds.check(action)
        self._move_target(act[:3].astype(np.float64), act[3:6].astype(np.float64))
        self._joint_target = self._ik.solve(self._joint_target, self._target_pos,
                                            self._target_rot)
        self._apply_controls(gripper=float(act[6]))
        self._simulate(self._substeps)
        self._steps += 1
        success = self.is_success()
        truncated = not success and self._steps >= self.task.max_steps
        reward = REWARD_SUCCESS if success else REWARD_STEP
        return self._observation(), reward, success, truncated, self._info(success)

    def snapshot(self) -> EnvSnapshot:
        """The scene as it is now, to `restore` later (e.g. to try several actions from one
        state and follow each to its outcome)."""
        physics = np.empty(mujoco.mj_stateSize(self._model, STATE_SPEC))
        mujoco.mj_getState(self._model, self._data, physics, STATE_SPEC)
        return EnvSnapshot(physics, self._steps, self._joint_target.copy(),
                           self._target_pos.copy(), self._target_rot.copy())

    def restore(self, snapshot: EnvSnapshot) -> Observation:
        """Put the scene back as `snapshot` found it; returns its observation."""
        if snapshot.physics.shape != (mujoco.mj_stateSize(self._model, STATE_SPEC),):
            raise ValueError(f'snapshot of {snapshot.physics.shape} physics values does not fit '
                             f'the {self.task.name} scene')
        mujoco.mj_setState(self._model, self._data, snapshot.physics, STATE_SPEC)
        mujoco.mj_forward(self._model, self._data)
        self._steps = snapshot.steps
        self._joint_target = snapshot.joint_target.copy()
        self._target_pos, self._target_rot = snapshot.target_pos.copy(), snapshot.target_rot.copy()
        return self._observation()

    def render(self) -> Optional[np.ndarray]:
        """The latest primary-camera frame, uint8 (S, S, 3), when render_mode is 'rgb_array'."""
        if self.render_mode != 'rgb_array':
            return None
        if self._image is None:
            self._image = self._render()
        return self._image.copy()

    def close(self) -> None:
        if self._camera is not None:
            self._camera.close()
            self._camera = None

    # ----------------------------------------------------------------------------------------
    # privileged read-only accessors (scripted experts, tests, evaluation)

    @property
    def max_steps(self) -> int:
        return self.task.max_steps

    @property
    def gl_renderer(self) -> str:
        """MUJOCO_GL backend and OpenGL renderer, for benchmark reports."""
        return f'{os.environ.get("MUJOCO_GL", "egl")}: {self._camera.gl_renderer()}'

    def object_poses(self) -> Dict[str, ObjectPose]:
        """{object name: ObjectPose} for the task's source and target (copies)."""
        return {self.task.source.name: self._pose(self._source_body),
                self.task.target.name: self._pose(self._target_body)}

    def ee_target(self) -> Tuple[np.ndarray, np.ndarray]:
        """The commanded end-effector target: position (3,) m, [roll, pitch, yaw] (3,) rad."""
        return self._target_pos.copy(), mat_to_euler(self._target_rot)

    def ee_pose(self) -> Tuple[np.ndarray, np.ndarray]:
        """The measured end-effector pose: position (3,) m, rotation matrix (3, 3)."""
        return (self._data.site_xpos[self._ee_site].copy(),
                self._data.site_xmat[self._ee_site].reshape(3, 3).copy())

    def joint_positions(self) -> np.ndarray:
        """Measured arm joint angles (6,) rad, waist .. wrist_rotate."""
        return self._data.qpos[self._arm_qpos].copy()

    def joint_limits(self) -> Tuple[np.ndarray, np.ndarray]:
        """Arm joint ranges: lower (6,), upper (6,) rad."""
        return self._ik.lower.copy(), self._ik.upper.copy()

    def source_touches_fingers(self) -> bool:
        """Whether a finger pad touches the source object (it is held or being pushed)."""
        return bool(self._touching(self._source_body, self._finger_geoms))

    def is_success(self) -> bool:
        """SIMPLER-like: source over the target footprint at the stacked height, touching the
        target, and not touching the fingers."""
        d = self._data
        placed = on_target(self.task, d.xpos[self._source_body], d.xpos[self._target_body],
                           d.xmat[self._target_body].reshape(3, 3))
        if not placed or self.source_touches_fingers():
            return False
        target_geoms = np.flatnonzero(self._model.geom_bodyid == self._target_body)
        return bool(self._touching(self._source_body, target_geoms))

    # ----------------------------------------------------------------------------------------
    # internals

    def _place_objects(self) -> None:
        """Draw both object poses (rejection sampling keeps them apart) and write them to qpos."""
        task, rng = self.task, self.np_random
        for _ in range(SPAWN_ATTEMPTS):
            src_xy = rng.uniform(task.spawn_low, task.spawn_high)
            tgt_xy = rng.uniform(task.spawn_low, task.spawn_high)
            if np.linalg.norm(src_xy - tgt_xy) >= task.min_separation:
                break
        else:
            raise RuntimeError(f'could not place the objects of {task.name} apart')
        src_yaw = rng.uniform(*task.source_yaw)
        tgt_yaw = rng.uniform(*task.target_yaw)
        self._set_free_pose(self._source_qpos, src_xy, task.source.rest_height, src_yaw)
        self._set_free_pose(self._target_qpos, tgt_xy, task.target.rest_height, tgt_yaw)

    def _set_free_pose(self, adr: int, xy: np.ndarray, z: float, yaw: float) -> None:
        self._data.qpos[adr:adr + 3] = (xy[0], xy[1], z)
        self._data.qpos[adr + 3:adr + 7] = (np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2))

    def _simulate(self, nstep: int) -> None:
        mujoco.mj_step(self._model, self._data, nstep=nstep)
        # mj_step leaves positions and contacts one substep stale; refresh them for the
        # observation and the success test (no effect on the trajectory).
        mujoco.mj_forward(self._model, self._data)

    def _move_target(self, dpos: np.ndarray, drot: np.ndarray) -> None:
        """target += delta (rotation composed in the world frame), kept in the workspace box."""
        pos = np.clip(self._target_pos + dpos, WORKSPACE_LOW[:3], WORKSPACE_HIGH[:3])
        rpy = mat_to_euler(euler_to_mat(drot) @ self._target_rot)
        rpy = np.clip(rpy, WORKSPACE_LOW[3:], WORKSPACE_HIGH[3:])
        self._target_pos, self._target_rot = pos, euler_to_mat(rpy)

    def _apply_controls(self, gripper: float) -> None:
        d = self._data
        d.ctrl[self._arm_ctrl] = self._joint_target
        d.ctrl[self._finger_ctrl] = FINGER_CLOSED + gripper * (FINGER_OPEN - FINGER_CLOSED)

    def _touching(self, body: int, geoms: np.ndarray) -> bool:
        """Whether any active contact pairs a geom of `body` with one of `geoms`."""
        d = self._data
        pairs = d.contact.geom[:d.ncon]
        if not len(pairs):
            return False
        bodies = self._model.geom_bodyid[pairs]
        hit = ((bodies[:, 0] == body) & np.isin(pairs[:, 1], geoms)) | \
              ((bodies[:, 1] == body) & np.isin(pairs[:, 0], geoms))
        return bool(hit.any())

    def _pose(self, body: int) -> ObjectPose:
        d = self._data
        quat = d.xquat[body].copy()
        yaw = float(mat_to_euler(d.xmat[body].reshape(3, 3))[2])
        return ObjectPose(pos=d.xpos[body].copy(), quat=quat, yaw=yaw)

    def _state(self) -> np.ndarray:
        pos, rot = self.ee_pose()
        opening = (np.mean(self._data.qpos[self._finger_qpos]) - FINGER_CLOSED) / \
            (FINGER_OPEN - FINGER_CLOSED)
        return np.concatenate([pos, mat_to_euler(rot), [np.clip(opening, 0.0, 1.0)]]
                              ).astype(np.float32)

    def _render(self) -> np.ndarray:
        return self._camera.render(self._model, self._data)

    def _observation(self) -> Observation:
        self._image = self._render()
        return {IMAGE_KEY: self._image.copy(), STATE_KEY: self._state()}

    def _info(self, success: bool) -> Dict[str, Any]:
        return {'success': bool(success), 'instruction': self.instruction}
