"""Scripted experts: waypoint controllers that use the simulator's object poses.

One controller serves all four tasks (the task's object specs set the heights and the grasp
yaw): approach above the source, descend, close, lift, carry, descend, release, retreat.
Optional Gaussian action noise and scripted failure modes produce mixed-quality data whose
success labels come from the simulator.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import numpy as np

from robot_rl.envs.kinematics import euler_to_mat, mat_to_euler, wrap_angle
from robot_rl.envs.widowx_env import WidowXEnv, WORKSPACE_HIGH, WORKSPACE_LOW
from robot_rl.types import Episode, IMAGE_KEY, STATE_KEY

FAILURE_MODES = ('late_grasp', 'drop', 'wrong_target')
"""In the order they would occur in an episode; the first one drawn is executed."""

MIN_GRASP_Z = 0.016  # lowest tool-centre height for a grasp (m): pad tips just clear the table
HOVER = 0.07  # approach height above the grasp height (m)
RELEASE_GAP = 0.015  # the object is let go this far above its resting height (m)
MISS_CLEARANCE = 0.035  # late grasp: tool centre this far above the object's top (m)
MAX_WAYPOINT_STEPS = 15  # move on even if a waypoint is not reached (e.g. blocked)


@dataclasses.dataclass  # not frozen: hydra configs nest it and override its fields
class ExpertConfig:
    """Noise and failure settings of a ScriptedExpert.

    Success each setting promises (success rates measured on reset seeds 0..49 per task):
    - clean (all zero): >= 95% on every task (measured 100% on all four; tested >= 9/10).
    - any failure mode with probability 1: 0% (measured 0/20 per task and mode; tested).
    - failure probabilities p_i: success ~= base * (1 - P(any)), P(any) = 1 - prod(1 - p_i),
      since every drawn mode fails and nothing else does (p_i = 0.1 each: 74% per task,
      predicted 72.9%).
    - noise_pos = 0.005 m, noise_rot = 0.05 rad: spoon 78%, carrot 100%, blocks 92%,
      eggplant 98% (the thin spoon and the 2 cm stacking footprint suffer most).
    - noise_pos = 0.01 m, noise_rot = 0.1 rad (30 seeds): spoon 30%, carrot 90%,
      blocks 23%, eggplant 87%.

    noise_pos: std of Gaussian noise added to dx, dy, dz (m per step)
    noise_rot: std of Gaussian noise added to droll, dpitch, dyaw (rad per step)
    p_late_grasp: probability of closing the gripper too high, so it grasps nothing
    p_drop: probability of opening the gripper early in the carry (10-30% of the way)
    p_wrong_target: probability of placing the object beside the target instead of on it
    """

    noise_pos: float = 0.0
    noise_rot: float = 0.0
    p_late_grasp: float = 0.0
    p_drop: float = 0.0
    p_wrong_target: float = 0.0

    def __post_init__(self):
        for name in ('noise_pos', 'noise_rot'):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f'ExpertConfig.{name} must be >= 0, got {getattr(self, name)}')
        for mode in FAILURE_MODES:
            p = getattr(self, f'p_{mode}')
            if not 0.0 <= p <= 1.0:
                raise ValueError(f'ExpertConfig.p_{mode} must be in [0, 1], got {p}')

    @property
    def p_any_failure(self) -> float:
        return 1.0 - float(np.prod([1.0 - getattr(self, f'p_{m}') for m in FAILURE_MODES]))


@dataclasses.dataclass(frozen=True)
class Waypoint:
    """A commanded tool-centre goal: position (3,) m, yaw (rad), gripper (1 = open).

    speed: largest translation per step (m); settle: extra steps to wait once reached.
    """

    pos: np.ndarray
    yaw: float
    gripper: float
    speed: float = 0.05
    settle: int = 0


class ScriptedExpert:
    """Waypoint controller for a WidowXEnv, closed loop on the env's commanded pose.

    Usage: `obs, _ = env.reset(seed=s); expert.reset(seed=s); action = expert.act(obs)`.
    Actions are float32 (7,) inside ActionSpace.bridge(). `failure_mode` names the failure
    drawn for the current episode (None when it runs clean).
    """

    def __init__(self, env: WidowXEnv, config: ExpertConfig = ExpertConfig(),
                 seed: Optional[int] = None):
        self.env = env
        self.config = config
        self.failure_mode: Optional[str] = None
        self._rng = np.random.default_rng(seed)
        self._plan: List[Waypoint] = []
        self._index = 0
        self._steps_here = 0
        self._settled = 0

    def reset(self, seed: Optional[int] = None) -> None:
        """Draw this episode's failure mode and plan from the env's current object poses."""
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        drawn = [m for m in FAILURE_MODES if self._rng.random() < getattr(self.config, f'p_{m}')]
        self.failure_mode = drawn[0] if drawn else None
        self._plan = self._make_plan()
        self._index = self._steps_here = self._settled = 0

    def metadata(self) -> dict:
        """What an episode records about its expert: this episode's failure mode, the config."""
        return {'failure_mode': self.failure_mode, 'expert': dataclasses.asdict(self.config)}

    def act(self, obs: Optional[dict] = None) -> np.ndarray:
        """Next action (7,) float32. `obs` is unused: the expert reads privileged state."""
        pos, rpy = self.env.ee_target()
        waypoint = self._current_waypoint(pos, rpy)
        dpos = np.clip(waypoint.pos - pos, -waypoint.speed, waypoint.speed)
        # The env composes rotation deltas in the world frame: delta = desired @ current^T.
        drot = mat_to_euler(euler_to_mat(np.array([0.0, 0.0, waypoint.yaw])) @ euler_to_mat(rpy).T)
        action = np.concatenate([dpos, drot, [waypoint.gripper]])
        action[:3] += self._rng.normal(0.0, self.config.noise_pos, 3)
        action[3:6] += self._rng.normal(0.0, self.config.noise_rot, 3)
        self._steps_here += 1
        return self.env.action_bounds.clip(action)

    # ----------------------------------------------------------------------------------------

    def _current_waypoint(self, pos: np.ndarray, rpy: np.ndarray) -> Waypoint:
        """Advance past waypoints that are reached and settled (or timed out)."""
        while self._index < len(self._plan) - 1:
            waypoint = self._plan[self._index]
            if self._reached(waypoint, pos, rpy):
                self._settled += 1
            if self._settled > waypoint.settle or self._steps_here >= MAX_WAYPOINT_STEPS:
                self._index += 1
                self._steps_here = self._settled = 0
                continue
            break
        return self._plan[self._index]

    def _reached(self, waypoint: Waypoint, pos: np.ndarray, rpy: np.ndarray) -> bool:
        tol_pos = 0.002 + 2.0 * self.config.noise_pos
        tol_rot = 0.02 + 2.0 * self.config.noise_rot
        return bool(np.max(np.abs(waypoint.pos - pos)) <= tol_pos
                    and abs(wrap_angle(waypoint.yaw - rpy[2])) <= tol_rot)

    def _make_plan(self) -> List[Waypoint]:
        """Waypoints for this episode from the objects' current poses (and the failure mode)."""
        task = self.env.task
        poses = self.env.object_poses()
        src, tgt = poses[task.source.name], poses[task.target.name]
        period = task.source.grasp_period
        grasp_yaw = wrap_angle(src.yaw, period)
        # Cube-like sources are turned to line up with the target (stacking needs it).
        carry_yaw = grasp_yaw + (wrap_angle(tgt.yaw - src.yaw, period) if period < np.pi else 0.0)
        grasp_z = max(src.pos[2], MIN_GRASP_Z)
        held_below = grasp_z - src.pos[2]  # object centre below the tool centre while held
        place_xy, place_z = tgt.pos[:2], (tgt.pos[2] + task.target.surface_height
                                          + task.source.rest_height + held_below + RELEASE_GAP)
        if self.failure_mode == 'wrong_target':
            place_xy = self._beside_target(tgt.pos[:2])
            place_z = task.source.rest_height + held_below + RELEASE_GAP
        carry_z = max(grasp_z + HOVER, place_z + 0.05, tgt.pos[2] + task.target.top_height
                      + task.source.rest_height + held_below + 0.04)
        if self.failure_mode == 'late_grasp':
            grasp_z = src.pos[2] + task.source.top_height + MISS_CLEARANCE
        return (self._grasp(src.pos[:2], grasp_z, carry_z, grasp_yaw)
                + self._carry(src.pos[:2], place_xy, carry_z, carry_yaw)
                + self._release(place_xy, place_z, carry_z, carry_yaw))

    @staticmethod
    def _grasp(xy: np.ndarray, grasp_z: float, carry_z: float, yaw: float) -> List[Waypoint]:
        """Approach above, descend, close, lift."""
        return [Waypoint(_xyz(xy, grasp_z + HOVER), yaw, 1.0),
                Waypoint(_xyz(xy, grasp_z), yaw, 1.0, speed=0.03, settle=1),
                Waypoint(_xyz(xy, grasp_z), yaw, 0.0, settle=2),
                Waypoint(_xyz(xy, carry_z), yaw, 0.0, speed=0.04)]

    def _release(self, xy: np.ndarray, place_z: float, carry_z: float,
                 yaw: float) -> List[Waypoint]:
        """Descend, open, retreat (the gripper is already open after a drop)."""
        lowering_grip = 1.0 if self.failure_mode == 'drop' else 0.0
        return [Waypoint(_xyz(xy, place_z), yaw, lowering_grip, speed=0.03, settle=1),
                Waypoint(_xyz(xy, place_z), yaw, 1.0, settle=2),
                Waypoint(_xyz(xy, carry_z), yaw, 1.0)]

    def _carry(self, start_xy: np.ndarray, place_xy: np.ndarray, carry_z: float,
               yaw: float) -> List[Waypoint]:
        """Carry waypoints; a drop opens the gripper 10-30% of the way and carries on empty."""
        if self.failure_mode != 'drop':
            return [Waypoint(_xyz(place_xy, carry_z), yaw, 0.0)]
        drop_xy = start_xy + self._rng.uniform(0.1, 0.3) * (place_xy - start_xy)
        return [Waypoint(_xyz(drop_xy, carry_z), yaw, 0.0),
                Waypoint(_xyz(drop_xy, carry_z), yaw, 1.0, settle=1),
                Waypoint(_xyz(place_xy, carry_z), yaw, 1.0)]

    def _beside_target(self, target_xy: np.ndarray) -> np.ndarray:
        """A reachable spot just outside the target's outline (random side)."""
        task = self.env.task
        distance = task.target.radius + task.source.radius + 0.02
        angles = np.linspace(0.0, 2 * np.pi, 16, endpoint=False)
        spots = target_xy + distance * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        inside = np.all((spots >= WORKSPACE_LOW[:2] + 0.03) & (spots <= WORKSPACE_HIGH[:2] - 0.03),
                        axis=1)
        if not inside.any():
            centre = 0.5 * (WORKSPACE_LOW[:2] + WORKSPACE_HIGH[:2])
            return spots[np.argmin(np.linalg.norm(spots - centre, axis=1))]
        return spots[self._rng.choice(np.flatnonzero(inside))]


def _xyz(xy: np.ndarray, z: float) -> np.ndarray:
    return np.array([xy[0], xy[1], z])


def rollout_episode(env: WidowXEnv, expert: ScriptedExpert, seed: int) -> Episode:
    """Run one episode (env and expert both seeded with `seed`) and return it in RLDS layout.

    `expert` is anything with reset(seed), act(obs) and metadata() (a scripted expert, or
    robot_rl.cli.gen_data.PolicyRollout for a trained policy's own attempts).

    N = T + 1 steps for T actions: the last step holds the final observation with a zero action
    and zero reward as padding; is_terminal marks success; discount is 0 only on a terminal
    step. metadata: task, seed, success and the expert's metadata().
    """
    obs, _ = env.reset(seed=seed)
    expert.reset(seed=seed)
    images, states, actions, rewards = [obs[IMAGE_KEY]], [obs[STATE_KEY]], [], []
    success, done = False, False
    while not done:
        action = expert.act(obs)
        obs, reward, terminated, truncated, info = env.step(action)
        images.append(obs[IMAGE_KEY])
        states.append(obs[STATE_KEY])
        actions.append(action)
        rewards.append(reward)
        success, done = bool(info['success']), terminated or truncated
    n = len(images)
    actions.append(np.zeros_like(actions[0]))
    rewards.append(0.0)
    is_first, is_last = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    is_first[0], is_last[-1] = True, True
    return Episode(
        images=np.stack(images), states=np.stack(states),
        actions=np.stack(actions).astype(np.float32),
        rewards=np.asarray(rewards, dtype=np.float32),
        discounts=np.where(is_last & success, 0.0, 1.0).astype(np.float32),
        is_first=is_first, is_last=is_last, is_terminal=is_last & success,
        language_instruction=env.instruction,
        metadata={'task': env.task.name, 'seed': int(seed), 'success': success,
                  **expert.metadata()},
    ).validate()
