"""Scripted experts: clean success, forced failure modes, honest success labels, episodes."""

import numpy as np
import pytest

from robot_rl.envs import ExpertConfig, make_env, rollout_episode, ScriptedExpert, TASKS
from robot_rl.envs.experts import FAILURE_MODES
from robot_rl.types import ActionSpace, REWARD_STEP, REWARD_SUCCESS

TASK_NAMES = sorted(TASKS)


@pytest.fixture(scope='module', params=TASK_NAMES)
def env(request):
    env = make_env(request.param, image_size=64)
    yield env
    env.close()


def test_clean_expert_succeeds_on_at_least_9_of_10_seeds(env):
    expert = ScriptedExpert(env, ExpertConfig())
    episodes = [rollout_episode(env, expert, seed) for seed in range(10)]
    assert sum(ep.success for ep in episodes) >= 9
    for ep in episodes:
        assert ep.metadata['failure_mode'] is None
        assert len(ep) - 1 <= env.max_steps


@pytest.mark.parametrize('mode', FAILURE_MODES)
def test_forced_failure_mode_fails(env, mode):
    expert = ScriptedExpert(env, ExpertConfig(**{f'p_{mode}': 1.0}))
    for seed in range(3):
        ep = rollout_episode(env, expert, seed)
        assert ep.metadata['failure_mode'] == mode
        assert not ep.success and not ep.is_terminal.any()
        assert len(ep) - 1 == env.max_steps  # runs to the time limit
        assert np.all(ep.rewards[:-1] == REWARD_STEP)


def test_held_above_the_target_is_not_success(env):
    """Every step where the fingers touch the source must be a failure step, including the
    steps where it is carried over the target."""
    expert = ScriptedExpert(env, ExpertConfig())
    obs, _ = env.reset(seed=5)
    expert.reset(seed=5)
    task, held_over_target, done = env.task, 0, False
    while not done:
        obs, reward, terminated, truncated, info = env.step(expert.act(obs))
        done = terminated or truncated
        poses = env.object_poses()
        src, tgt = poses[task.source.name], poses[task.target.name]
        if env.source_touches_fingers():
            assert not info['success'] and reward == REWARD_STEP
            held_over_target += np.linalg.norm(src.pos[:2] - tgt.pos[:2]) < 0.01
    assert info['success'] and reward == REWARD_SUCCESS and terminated
    assert held_over_target >= 1  # the check above really saw the object over the target
    assert not env.source_touches_fingers()


def test_noisy_expert_is_reproducible_and_in_bounds():
    env = make_env('carrot_on_plate', image_size=64)
    config = ExpertConfig(noise_pos=0.01, noise_rot=0.1, p_drop=0.5, p_wrong_target=0.5)
    runs = [rollout_episode(env, ScriptedExpert(env, config), seed=3) for _ in range(2)]
    assert np.array_equal(runs[0].actions, runs[1].actions)
    assert np.array_equal(runs[0].images, runs[1].images)
    bounds = ActionSpace.bridge()
    assert np.all(runs[0].actions >= bounds.low) and np.all(runs[0].actions <= bounds.high)
    env.close()


def test_episode_layout_matches_the_rlds_convention():
    env = make_env('stack_blocks', image_size=64)
    ep = rollout_episode(env, ScriptedExpert(env), seed=0)
    env.close()
    assert ep.success and ep.is_terminal[-1] and ep.discounts[-1] == 0.0
    assert ep.is_first[0] and ep.is_last[-1] and ep.is_first.sum() == ep.is_last.sum() == 1
    assert ep.rewards[-2] == REWARD_SUCCESS and np.all(ep.rewards[:-2] == REWARD_STEP)
    assert np.all(ep.actions[-1] == 0.0)  # padding on the final observation's step
    assert ep.language_instruction == 'stack the green block on the yellow block'
    assert ep.images.shape[1:] == (64, 64, 3)


@pytest.mark.parametrize('bad', [{'p_drop': 1.5}, {'p_late_grasp': -0.1}, {'noise_pos': -1.0},
                                 {'noise_rot': float('nan')}])
def test_expert_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ExpertConfig(**bad)


def test_failure_probability_combines_independent_modes():
    config = ExpertConfig(p_late_grasp=0.1, p_drop=0.2, p_wrong_target=0.5)
    assert config.p_any_failure == pytest.approx(1 - 0.9 * 0.8 * 0.5)
