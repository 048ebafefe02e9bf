"""Simulated WidowX 250 (MuJoCo): Bridge-style tasks, scripted experts, gymnasium ids.

Importing this package sets MUJOCO_GL=egl (unless set), guards software rendering against
TensorFlow's bundled LLVM (see offscreen.py; any import order of TensorFlow works) and
registers the gymnasium ids in ENV_IDS, e.g. gymnasium.make('robot_rl/WidowX-StackBlocks-v0').
"""

from robot_rl.envs import offscreen  # noqa: F401, I100  (first: GL set-up before any render)

from robot_rl.envs.experts import ExpertConfig, rollout_episode, ScriptedExpert
from robot_rl.envs.registration import ENV_IDS, make_env, register_envs
from robot_rl.envs.tasks import check_tasks, get_task, ObjectSpec, TASKS, TaskSpec
from robot_rl.envs.widowx_env import ObjectPose, WidowXEnv

register_envs()

__all__ = ['check_tasks', 'ENV_IDS', 'ExpertConfig', 'get_task', 'make_env', 'ObjectPose',
           'ObjectSpec', 'register_envs', 'rollout_episode', 'ScriptedExpert', 'TASKS', 'TaskSpec',
           'WidowXEnv']
