"""Monte-Carlo returns: hand-computed cases and the failed-trajectory rule."""

import numpy as np
import pytest

from robot_rl.data.returns import episode_mc_returns, monte_carlo_returns, with_mc_returns
from robot_rl.types import Episode


def episode(rewards, terminal):
    """An Episode with the given per-step rewards (the last one is padding)."""
    n = len(rewards)
    last = np.arange(n) == n - 1
    return Episode(
        images=np.zeros((n, 2, 2, 3), np.uint8), states=np.zeros((n, 7), np.float32),
        actions=np.zeros((n, 7), np.float32), rewards=np.asarray(rewards, np.float32),
        discounts=np.ones(n, np.float32), is_first=np.arange(n) == 0, is_last=last,
        is_terminal=last & terminal, language_instruction='open the drawer')


def test_success_episode_discounts_back_from_the_terminal():
    returns = monte_carlo_returns([-1, -1, 0], [False, False, True], 0.99)
    np.testing.assert_allclose(returns, [-1.99, -1.0, 0.0], rtol=1e-6)
    assert returns.dtype == np.float32


def test_failed_episode_gets_the_failure_constant_everywhere():
    np.testing.assert_allclose(monte_carlo_returns([-1] * 5, [False] * 5, 0.99), [-100.0] * 5,
                               rtol=1e-6)
    np.testing.assert_allclose(monte_carlo_returns([-1] * 3, [False] * 3, 0.9), [-10.0] * 3,
                               rtol=1e-6)
    np.testing.assert_allclose(monte_carlo_returns([-2] * 2, [False] * 2, 0.5, -2.0), [-4.0] * 2)


def test_truncated_non_failure_does_not_bootstrap():
    # A reward of 0 that was not terminal, then the time limit: the sum just stops.
    returns = monte_carlo_returns([-1, 0, -1], [False, False, False], 0.99)
    np.testing.assert_allclose(returns, [-1 + 0.99 * -0.99, -0.99, -1.0], rtol=1e-6)


@pytest.mark.parametrize('gamma, expected', [
    (0.0, [-1.0, -1.0, 0.0]),
    (0.5, [-1.5, -1.0, 0.0]),
    (0.98, [-1.98, -1.0, 0.0]),
])
def test_gamma_variants(gamma, expected):
    returns = monte_carlo_returns([-1, -1, 0], [False, False, True], gamma)
    np.testing.assert_allclose(returns, expected, rtol=1e-6)


def test_a_terminal_cuts_the_sum():
    np.testing.assert_allclose(monte_carlo_returns([1, 1, 1], [False, True, False], 0.5),
                               [1.5, 1.0, 1.0])


def test_empty_and_invalid_inputs():
    assert monte_carlo_returns([], [], 0.99).shape == (0,)
    with pytest.raises(ValueError, match='step 2'):
        monte_carlo_returns([-1, -1, np.nan], [False] * 3, 0.99)
    with pytest.raises(ValueError, match='gamma'):
        monte_carlo_returns([-1], [False], 1.0)
    with pytest.raises(ValueError, match='matching'):
        monte_carlo_returns([-1, -1], [False], 0.99)


def test_episode_returns_use_transitions_and_pad_the_last_step():
    success = episode([-1, -1, 0, 0], terminal=True)
    np.testing.assert_allclose(episode_mc_returns(success, 0.99), [-1.99, -1, 0, 0], rtol=1e-6)
    # The last step's reward is padding: it must not spoil the failed-trajectory test.
    failed = episode([-1, -1, -1, 0], terminal=False)
    np.testing.assert_allclose(episode_mc_returns(failed, 0.99), [-100, -100, -100, 0], rtol=1e-6)


def test_with_mc_returns_leaves_the_input_alone():
    original = episode([-1, 0, 0], terminal=True)
    filled = with_mc_returns(original, 0.99)
    assert original.mc_returns is None
    np.testing.assert_allclose(filled.mc_returns, [-1, 0, 0])
    filled.validate()


def test_non_finite_episode_reward_names_the_step():
    with pytest.raises(ValueError, match='step 1'):
        episode_mc_returns(episode([-1, np.inf, -1, 0], terminal=False), 0.99)
