"""Task registry: the four SIMPLER WidowX tasks, their objects, and the scene builder.

Each task moves one graspable *source* object onto a *target* object. Objects are free bodies
made of MuJoCo primitives; positions are in metres in the object's frame, whose origin is the
object's centre as it rests on the table (so its rest height above the table is `rest_height`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, Tuple

import mujoco
import numpy as np

ASSET_PATH = os.path.join(os.path.dirname(__file__), 'assets', 'widowx250.xml')

_X_ALONG_Z = (0.70710678, 0.0, 0.70710678, 0.0)  # turns a capsule's z axis onto x (lying down)
# Light, slender objects have tiny inertia about their long axis (~1e-7 kg m^2); squeezed
# between a pad and the table they can spin up until the 5 ms step goes unstable. A little
# damping on the free joints (rolling resistance; negligible for translation) prevents it.
OBJECT_DAMPING = 2e-4  # N s/m and N m s/rad


@dataclasses.dataclass(frozen=True)
class Part:
    """One primitive geom of an object: MuJoCo type name, size (MuJoCo convention), pose."""

    type: str
    size: Tuple[float, ...]
    pos: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    quat: Tuple[float, float, float, float] = (1.0, 0.0, 0.0, 0.0)


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """A task object.

    rest_height:    z of the origin above the table when resting upright (m)
    top_height:     z of its highest point above the origin (m)
    surface_height: z above the origin of the surface a placed object rests on (targets, m)
    footprint:      half extents (x, y) of the region counted as "on it" (targets, m)
    round:          footprint is a disc of radius footprint[0] instead of a box
    grasp_period:   symmetry of the grasp yaw about z (rad): pi for long objects, pi/2 cubes
    """

    name: str
    parts: Tuple[Part, ...]
    rgba: Tuple[float, float, float, float]
    mass: float
    rest_height: float
    top_height: float
    surface_height: float = 0.0
    footprint: Tuple[float, float] = (0.0, 0.0)
    round: bool = False
    grasp_period: float = np.pi

    @property
    def radius(self) -> float:
        """Circumradius of the xy outline (m), used to keep objects apart."""
        return max(np.hypot(abs(p.pos[0]) + _half_x(p), abs(p.pos[1]) + _half_y(p))
                   for p in self.parts)


def _half_x(part: Part) -> float:
    if part.type == 'capsule':  # lying along x
        return part.size[0] + part.size[1]
    return part.size[0]


def _half_y(part: Part) -> float:
    return part.size[0] if part.type in ('capsule', 'cylinder') else part.size[1]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task: SIMPLER's instruction and step limit, its objects and where they spawn.

    spawn_low/high: xy box (m) for both object centres; yaw ranges in rad.
    """

    name: str
    instruction: str
    max_steps: int
    source: ObjectSpec
    target: ObjectSpec
    spawn_low: Tuple[float, float] = (0.20, -0.17)
    spawn_high: Tuple[float, float] = (0.40, 0.17)
    source_yaw: Tuple[float, float] = (-np.pi / 2, np.pi / 2)
    target_yaw: Tuple[float, float] = (-0.3, 0.3)

    @property
    def min_separation(self) -> float:
        """Closest the two object centres may spawn (m): outlines plus 3 cm."""
        return self.source.radius + self.target.radius + 0.03


SPOON = ObjectSpec(
    name='spoon', rgba=(0.78, 0.78, 0.82, 1.0), mass=0.02, rest_height=0.004, top_height=0.006,
    parts=(Part('box', (0.05, 0.006, 0.004), pos=(-0.02, 0.0, 0.0)),
           Part('ellipsoid', (0.022, 0.014, 0.005), pos=(0.052, 0.0, 0.001))))
TOWEL = ObjectSpec(
    name='towel', rgba=(0.35, 0.55, 0.85, 1.0), mass=0.03, rest_height=0.002, top_height=0.002,
    surface_height=0.002, footprint=(0.065, 0.065), parts=(Part('box', (0.065, 0.065, 0.002)),))
CARROT = ObjectSpec(
    name='carrot', rgba=(0.95, 0.45, 0.08, 1.0), mass=0.03, rest_height=0.012, top_height=0.012,
    parts=(Part('capsule', (0.012, 0.035), quat=_X_ALONG_Z),))
PLATE = ObjectSpec(
    name='plate', rgba=(0.93, 0.93, 0.9, 1.0), mass=0.1, rest_height=0.005, top_height=0.005,
    surface_height=0.005, footprint=(0.075, 0.075), round=True,
    parts=(Part('cylinder', (0.075, 0.005)),))
GREEN_BLOCK = ObjectSpec(
    name='green_block', rgba=(0.2, 0.7, 0.25, 1.0), mass=0.03, rest_height=0.015,
    top_height=0.015, grasp_period=np.pi / 2, parts=(Part('box', (0.015, 0.015, 0.015)),))
YELLOW_BLOCK = ObjectSpec(
    name='yellow_block', rgba=(0.95, 0.85, 0.15, 1.0), mass=0.05, rest_height=0.02,
    top_height=0.02, surface_height=0.02, footprint=(0.02, 0.02),
    parts=(Part('box', (0.02, 0.02, 0.02)),))
EGGPLANT = ObjectSpec(
    name='eggplant', rgba=(0.36, 0.12, 0.45, 1.0), mass=0.05, rest_height=0.018,
    top_height=0.018, parts=(Part('capsule', (0.018, 0.028), quat=_X_ALONG_Z),))
BASKET = ObjectSpec(
    name='basket', rgba=(0.92, 0.8, 0.2, 1.0), mass=0.15, rest_height=0.004, top_height=0.046,
    surface_height=0.004, footprint=(0.077, 0.092),
    parts=(Part('box', (0.085, 0.1, 0.004)),
           Part('box', (0.004, 0.1, 0.025), pos=(0.081, 0.0, 0.021)),
           Part('box', (0.004, 0.1, 0.025), pos=(-0.081, 0.0, 0.021)),
           Part('box', (0.085, 0.004, 0.025), pos=(0.0, 0.096, 0.021)),
           Part('box', (0.085, 0.004, 0.025), pos=(0.0, -0.096, 0.021))))

TASKS: Dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec('spoon_on_towel', 'put the spoon on the towel', 60, SPOON, TOWEL),
    TaskSpec('carrot_on_plate', 'put carrot on plate', 60, CARROT, PLATE),
    TaskSpec('stack_blocks', 'stack the green block on the yellow block', 60, GREEN_BLOCK,
             YELLOW_BLOCK, source_yaw=(-np.pi / 4, np.pi / 4)),
    TaskSpec('eggplant_in_basket', 'put eggplant into yellow basket', 120, EGGPLANT, BASKET),
)}


def get_task(name: str) -> TaskSpec:
    """The registered TaskSpec called `name`; ValueError listing the choices otherwise."""
    if name not in TASKS:
        raise ValueError(f'unknown task {name!r}; choose one of {sorted(TASKS)}')
    return TASKS[name]


def check_tasks(names) -> None:
    """ValueError unless `names` is a non-empty list of registered task names."""
    unknown = sorted(set(names) - set(TASKS))
    if unknown or not names:
        raise ValueError(f'tasks must be a non-empty subset of {sorted(TASKS)}; '
                         f'unknown: {unknown}')


def build_model(task: TaskSpec) -> mujoco.MjModel:
    """Compile the robot scene with the task's two objects as free bodies."""
    spec = mujoco.MjSpec.from_file(ASSET_PATH)
    for obj in (task.source, task.target):
        body = spec.worldbody.add_body(name=obj.name, pos=[0.0, 0.0, obj.rest_height])
        body.add_freejoint(name=obj.name).damping = [OBJECT_DAMPING, 0.0, 0.0]  # linear term
        for i, part in enumerate(obj.parts):
            size = list(part.size) + [0.0] * (3 - len(part.size))
            geom_type = getattr(mujoco.mjtGeom, f'mjGEOM_{part.type.upper()}')
            body.add_geom(name=f'{obj.name}_{i}', type=geom_type, size=size, pos=list(part.pos),
                          quat=list(part.quat), rgba=list(obj.rgba))
    model = spec.compile()
    for obj in (task.source, task.target):
        # Geoms carry uniform density; scaling mass and inertia together keeps the shape.
        body_id = model.body(obj.name).id
        scale = obj.mass / model.body_mass[body_id]
        model.body_mass[body_id] *= scale
        model.body_inertia[body_id] *= scale
    return model


def on_target(task: TaskSpec, source_pos: np.ndarray, target_pos: np.ndarray,
              target_rot: np.ndarray, xy_margin: float = 0.003, z_tolerance: float = 0.02
              ) -> bool:
    """Geometric half of the success test: source centre over the target's footprint
    (+xy_margin, m) at the stacked height (within z_tolerance, m).

    source_pos, target_pos: (3,) world positions (m); target_rot: (3, 3) target rotation.
    """
    local = target_rot.T @ (np.asarray(source_pos) - np.asarray(target_pos))
    half = np.asarray(task.target.footprint) + xy_margin
    if task.target.round:
        inside = np.hypot(local[0], local[1]) <= half[0]
    else:
        inside = bool(np.all(np.abs(local[:2]) <= half))
    stacked = task.target.surface_height + task.source.rest_height
    return bool(inside and abs(local[2] - stacked) <= z_tolerance)
