"""Gymnasium ids for the four tasks and a plain factory."""

from __future__ import annotations

from typing import Any, Dict

import gymnasium

from robot_rl.envs.tasks import get_task
from robot_rl.envs.widowx_env import WidowXEnv

ENV_IDS: Dict[str, str] = {
    'spoon_on_towel': 'robot_rl/WidowX-SpoonOnTowel-v0',
    'carrot_on_plate': 'robot_rl/WidowX-CarrotOnPlate-v0',
    'stack_blocks': 'robot_rl/WidowX-StackBlocks-v0',
    'eggplant_in_basket': 'robot_rl/WidowX-EggplantInBasket-v0',
}
"""Task name -> gymnasium id (registered on import of robot_rl.envs)."""


def make_env(task: str, **kwargs: Any) -> WidowXEnv:
    """A WidowXEnv for the registered task name (kwargs go to WidowXEnv, e.g. image_size)."""
    get_task(task)  # fail early with the list of valid names
    return WidowXEnv(task=task, **kwargs)


def register_envs() -> None:
    """Register every task id with gymnasium; idempotent. The env truncates at the task's own
    step limit, so no TimeLimit wrapper is added."""
    for task, env_id in ENV_IDS.items():
        if env_id not in gymnasium.registry:
            gymnasium.register(id=env_id, entry_point='robot_rl.envs.widowx_env:WidowXEnv',
                               kwargs={'task': task})
