"""Simulated WidowX environment: spaces, action handling, IK tracking, determinism, tasks.

Real MuJoCo physics and offscreen rendering throughout (no mocks). Images are kept small
(64 px) where their content does not matter, to keep the suite fast on 2 cores.
"""

import dataclasses
import importlib.util
import os
import subprocess
import sys

import gymnasium
from gymnasium.utils.env_checker import check_env
import numpy as np
import pytest

from robot_rl.envs import ENV_IDS, make_env, TASKS, WidowXEnv
from robot_rl.envs.kinematics import euler_to_mat, mat_to_euler
from robot_rl.envs.tasks import on_target
from robot_rl.types import ActionSpace, IMAGE_KEY, REWARD_STEP, STATE_KEY

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOOP = np.array([0, 0, 0, 0, 0, 0, 1], dtype=np.float32)


@pytest.fixture(scope='module')
def env():
    env = make_env('stack_blocks', image_size=64)
    yield env
    env.close()


def _step_n(env, action, n):
    for _ in range(n):
        obs, reward, terminated, truncated, info = env.step(action)
    return obs, reward, terminated, truncated, info


@pytest.mark.parametrize('size', [64, 128])
def test_observation_shapes_and_dtypes(size):
    env = make_env('carrot_on_plate', image_size=size)
    obs, info = env.reset(seed=0)
    assert set(obs) == {IMAGE_KEY, STATE_KEY}
    assert obs[IMAGE_KEY].shape == (size, size, 3) and obs[IMAGE_KEY].dtype == np.uint8
    assert obs[STATE_KEY].shape == (7,) and obs[STATE_KEY].dtype == np.float32
    assert obs[IMAGE_KEY].std() > 5  # a real picture, not a blank buffer
    assert env.observation_space.contains(obs)
    assert info == {'success': False, 'instruction': 'put carrot on plate'}
    obs, reward, terminated, truncated, info = env.step(NOOP)
    assert env.observation_space.contains(obs) and info['success'] is False
    env.close()


@pytest.mark.parametrize('size', [63, 257])
def test_image_size_out_of_range_is_rejected(size):
    with pytest.raises(ValueError, match='image_size'):
        WidowXEnv('stack_blocks', image_size=size)


def test_unknown_task_names_the_choices():
    with pytest.raises(ValueError, match='spoon_on_towel'):
        make_env('fold_the_towel')


def test_invalid_actions_name_the_problem(env):
    env.reset(seed=0)
    with pytest.raises(ValueError, match='non-finite'):
        env.step(np.array([0, np.nan, 0, 0, 0, 0, 1]))
    with pytest.raises(ValueError, match='shape'):
        env.step(np.zeros(6))


def test_out_of_range_action_is_clipped_to_the_bound(env):
    env.reset(seed=0)
    start_target, _ = env.ee_target()
    start = env.ee_pose()[0]
    env.step(np.array([1.0, 0, 0, 0, 0, 0, 1]))  # 1 m asked, 5 cm allowed
    target, _ = env.ee_target()
    np.testing.assert_allclose(target - start_target, [0.05, 0, 0], atol=1e-9)
    _step_n(env, NOOP, 1)
    assert env.ee_pose()[0][0] - start[0] == pytest.approx(0.05, abs=0.004)


def test_ik_tracks_commanded_motion(env):
    env.reset(seed=1)
    start = env.ee_pose()[0]
    _step_n(env, np.array([0.02, 0, 0, 0, 0, 0, 1]), 3)
    _step_n(env, NOOP, 1)
    moved = env.ee_pose()[0] - start
    np.testing.assert_allclose(moved, [0.06, 0.0, 0.0], atol=0.004)
    _step_n(env, np.array([0, 0.03, -0.03, 0, 0, 0.2, 1]), 2)
    _step_n(env, NOOP, 1)
    np.testing.assert_allclose(env.ee_pose()[0] - start, [0.06, 0.06, -0.06], atol=0.004)
    assert mat_to_euler(env.ee_pose()[1])[2] == pytest.approx(0.4, abs=0.02)


def test_joints_stay_within_limits_under_extreme_commands(env):
    env.reset(seed=2)
    lower, upper = env.joint_limits()
    extreme = np.array([1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 0.0])
    for sign in (1.0, -1.0):
        for _ in range(15):
            obs, *_ = env.step(sign * extreme + [0, 0, 0, 0, 0, 0, 0.5])
            q = env.joint_positions()
            assert np.all(q >= lower - 0.02) and np.all(q <= upper + 0.02)
            assert np.all(np.isfinite(obs[STATE_KEY]))


def test_gripper_state_follows_the_command(env):
    env.reset(seed=3)
    obs, *_ = env.step(NOOP)
    assert obs[STATE_KEY][6] == pytest.approx(1.0, abs=0.02)
    obs, *_ = _step_n(env, np.array([0, 0, 0, 0, 0, 0, 0.0]), 2)
    assert obs[STATE_KEY][6] == pytest.approx(0.0, abs=0.02)


def test_same_seed_same_actions_give_identical_episodes():
    actions = np.random.default_rng(0).uniform(ActionSpace.bridge().low,
                                               ActionSpace.bridge().high, (8, 7))
    runs = []
    for _ in range(2):
        env = make_env('spoon_on_towel', image_size=64)
        obs, _ = env.reset(seed=11)
        frames, states = [obs[IMAGE_KEY]], [obs[STATE_KEY]]
        for action in actions:
            obs, *_ = env.step(action)
            frames.append(obs[IMAGE_KEY])
            states.append(obs[STATE_KEY])
        runs.append((np.stack(frames), np.stack(states)))
        env.close()
    assert np.array_equal(runs[0][0], runs[1][0])
    assert np.array_equal(runs[0][1], runs[1][1])


def test_a_restored_snapshot_continues_exactly_as_the_scene_did():
    actions = np.random.default_rng(1).uniform(ActionSpace.bridge().low,
                                               ActionSpace.bridge().high, (10, 7))
    env = make_env('carrot_on_plate', image_size=64)
    env.reset(seed=3)
    for action in actions[:4]:
        env.step(action)
    snap = env.snapshot()

    def follow():
        out = [env.step(action) for action in actions[4:]]
        return (np.stack([o[IMAGE_KEY] for o, *_ in out]),
                np.stack([o[STATE_KEY] for o, *_ in out]), [r for _, r, *_ in out])

    first = follow()
    assert env.ee_target()[0].tolist() != snap.target_pos.tolist()  # the scene moved on
    other = np.zeros(7, np.float32)
    env.step(other)  # and further, so the restore has something to undo
    obs = env.restore(snap)
    assert np.allclose(env.ee_target()[0], snap.target_pos)
    again = follow()
    for a, b in zip(first[:2], again[:2]):
        assert np.array_equal(a, b)
    assert first[2] == again[2]
    assert obs[IMAGE_KEY].shape == (64, 64, 3)
    with pytest.raises(ValueError, match='does not fit the stack_blocks scene'):
        make_env('stack_blocks', image_size=64).restore(
            dataclasses.replace(snap, physics=snap.physics[:-3]))
    env.close()


def test_different_seeds_place_objects_differently(env):
    poses = []
    for seed in (0, 1, 2):
        env.reset(seed=seed)
        poses.append(np.concatenate([p.pos for p in env.object_poses().values()]))
    assert min(np.abs(poses[0] - poses[1]).max(), np.abs(poses[1] - poses[2]).max()) > 1e-3


@pytest.mark.parametrize('task', sorted(TASKS))
def test_spawned_objects_rest_apart(task):
    env = make_env(task, image_size=64)
    spec = TASKS[task]
    for seed in range(3):
        env.reset(seed=seed)
        poses = env.object_poses()
        src, tgt = poses[spec.source.name], poses[spec.target.name]
        assert np.linalg.norm(src.pos[:2] - tgt.pos[:2]) >= spec.min_separation - 1e-6
        assert src.pos[2] == pytest.approx(spec.source.rest_height, abs=0.003)
        assert not env.is_success()
    env.close()


def test_idle_episode_is_truncated_at_the_step_limit():
    env = make_env('spoon_on_towel', image_size=64)
    env.reset(seed=0)
    for t in range(1, env.max_steps + 1):
        _, reward, terminated, truncated, info = env.step(NOOP)
        assert reward == REWARD_STEP and not terminated and info['success'] is False
        assert truncated == (t == env.max_steps)
        assert info['instruction'] == 'put the spoon on the towel' == env.instruction
    env.close()


def test_task_registry_matches_simpler():
    expected = {'spoon_on_towel': ('put the spoon on the towel', 60),
                'carrot_on_plate': ('put carrot on plate', 60),
                'stack_blocks': ('stack the green block on the yellow block', 60),
                'eggplant_in_basket': ('put eggplant into yellow basket', 120)}
    assert {k: (t.instruction, t.max_steps) for k, t in TASKS.items()} == expected


def test_on_target_geometry():
    task = TASKS['stack_blocks']
    target = np.array([0.3, 0.0, 0.02])
    rot = euler_to_mat(np.array([0.0, 0.0, 0.5]))
    stacked = target + [0.0, 0.0, 0.035]
    assert on_target(task, stacked, target, rot)
    inside = target + rot @ [0.022, 0.0, 0.0] + [0, 0, 0.035]  # within footprint + 3 mm
    assert on_target(task, inside, target, rot)
    assert not on_target(task, target + rot @ [0.024, 0, 0] + [0, 0, 0.035], target, rot)
    assert not on_target(task, stacked + [0, 0, 0.025], target, rot)  # hovering above it


def test_euler_round_trip():
    rng = np.random.default_rng(0)
    for rpy in rng.uniform([-3, -1.5, -3], [3, 1.5, 3], (50, 3)):
        np.testing.assert_allclose(mat_to_euler(euler_to_mat(rpy)), rpy, atol=1e-9)


@pytest.mark.parametrize('task', sorted(ENV_IDS))
def test_gymnasium_make_works_for_every_registered_id(task):
    env = gymnasium.make(ENV_IDS[task], image_size=64)
    obs, info = env.reset(seed=0)
    assert obs[IMAGE_KEY].shape == (64, 64, 3)
    assert info['instruction'] == TASKS[task].instruction
    _, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert reward == REWARD_STEP and 'success' in info
    env.close()


def test_gymnasium_env_checker_passes():
    env = gymnasium.make(ENV_IDS['carrot_on_plate'], image_size=64, render_mode='rgb_array')
    check_env(env.unwrapped, skip_render_check=False)
    env.close()


TF_FIRST = ('import tensorflow\n'
            'from robot_rl.envs import make_env\nenv = make_env("stack_blocks", image_size=64)\n')
ENV_FIRST = ('from robot_rl.envs import make_env\nenv = make_env("stack_blocks", image_size=64)\n'
             'import tensorflow\n')


@pytest.mark.skipif(importlib.util.find_spec('tensorflow') is None,
                    reason='tensorflow is not installed')
@pytest.mark.parametrize('order', [TF_FIRST, ENV_FIRST], ids=['tensorflow-first', 'env-first'])
def test_rendering_survives_tensorflow_in_either_import_order(order):
    """TF's bundled LLVM crashes Mesa's llvmpipe, or the reverse, unless handled (offscreen.py)."""
    code = order + ('obs, _ = env.reset(seed=0)\n'
                    'obs, *_ = env.step([0.01, 0, 0, 0, 0, 0, 1])\n'
                    'assert obs["image_primary"].std() > 5\n'
                    'assert float(tensorflow.reduce_sum(tensorflow.ones(3))) == 3.0\n'
                    'print("rendered", obs["image_primary"].shape)\n')
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL='3')
    result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'rendered (64, 64, 3)' in result.stdout
