"""ActionSpace and Episode: the contracts every layer relies on."""

import numpy as np
import pytest

from robot_rl.types import ActionSpace, Episode


def make_episode(n=5, size=8):
    rng = np.random.default_rng(0)
    flags = np.zeros(n, bool)
    return Episode(
        images=rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8),
        states=rng.normal(size=(n, 7)).astype(np.float32),
        actions=rng.normal(size=(n, 7)).astype(np.float32),
        rewards=-np.ones(n, np.float32),
        discounts=np.ones(n, np.float32),
        is_first=np.r_[True, flags[1:]], is_last=np.r_[flags[:-1], True], is_terminal=flags.copy(),
        language_instruction='put carrot on plate')


def test_bridge_action_space_round_trips_normalisation():
    space = ActionSpace.bridge()
    actions = np.random.default_rng(1).uniform(space.low, space.high, size=(100, 7))
    normed = space.normalise(actions)
    assert normed.min() >= -1 and normed.max() <= 1
    np.testing.assert_allclose(space.unnormalise(normed), actions, atol=1e-6)
    np.testing.assert_allclose(space.normalise(space.low), -1)
    np.testing.assert_allclose(space.normalise(space.high), 1)
    assert ActionSpace.from_dict(space.to_dict()) == space
    assert ActionSpace.from_dict({'low': [0.0] * 7, 'high': [1.0] * 7}) != space


def test_check_clips_finite_and_rejects_bad_actions():
    space = ActionSpace.bridge()
    clipped = space.check([1.0, -1.0, 0.0, 9.0, 0.0, 0.0, 2.0])
    np.testing.assert_allclose(clipped, [0.05, -0.05, 0, 0.25, 0, 0, 1.0])
    with pytest.raises(ValueError, match='non-finite.*indices \\[2\\]'):
        space.check([0, 0, np.nan, 0, 0, 0, 1])
    with pytest.raises(ValueError, match='shape'):
        space.check(np.zeros(6))


def test_action_space_rejects_inverted_bounds():
    with pytest.raises(ValueError, match='exceed'):
        ActionSpace(low=np.zeros(2), high=np.array([1.0, 0.0]))


def test_episode_validate_names_the_bad_field():
    episode = make_episode()
    assert episode.validate() is episode
    assert episode.num_transitions == 4 and not episode.success
    episode.actions = episode.actions[:, :6]
    with pytest.raises(ValueError, match='episode.actions'):
        episode.validate()
    episode = make_episode()
    episode.is_terminal[2] = True
    with pytest.raises(ValueError, match='is_terminal'):
        episode.validate()
