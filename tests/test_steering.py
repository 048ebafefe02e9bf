"""V-GPS steering: selection, execution and bad candidates (robot_rl/steering)."""

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from robot_rl.models.critic import Critic, CriticConfig
from robot_rl.steering import ChunkExecutor, StickyGripper, TemporalEnsembler
from robot_rl.steering import ValueGuidedSteering
from robot_rl.types import ActionSpace, IMAGE_KEY, STATE_KEY

SPACE = ActionSpace.bridge()
INSTRUCTION = 'put carrot on plate'


class FixedCandidates:
    """A policy whose K candidates are given; records how it was called."""

    action_horizon = 2

    def __init__(self, chunks):
        self.chunks = chunks
        self.calls = []

    def reset(self, seed=None):
        pass

    def sample_actions(self, obs, instruction, num_samples):
        self.calls.append(num_samples)
        return self.chunks


class KnownCritic(nn.Module):
    """Q(s, a) = -|a - best|^2 in normalised units, the same for both heads; counts encodes."""

    def __init__(self, best):
        super().__init__()
        self.best = torch.as_tensor(best, dtype=torch.float32)
        self.encodes = 0
        self.config = SimpleNamespace(state_dim=0)

    def encode(self, images, lang, states=None):
        self.encodes += 1
        return torch.zeros(images.shape[0], 1)

    def q(self, z, actions):
        q = -((actions - self.best) ** 2).sum(-1)
        return torch.stack([q, q + 1.0])  # (E=2, B, K): the min is the first head


def obs(size=32):
    return {IMAGE_KEY: np.zeros((size, size, 3), np.uint8), STATE_KEY: np.zeros(7, np.float32)}


def embed(texts):
    return torch.zeros(len(texts), 4)


def candidates(k=6, seed=0):
    rng = np.random.default_rng(seed)
    chunks = rng.uniform(SPACE.low, SPACE.high, (k, 2, 7)).astype(np.float32)
    chunks[..., 6] = 1.0
    return chunks


def steering(chunks, best_index=3, **kwargs):
    best = SPACE.normalise(chunks[best_index, 0])
    kwargs = {'num_samples': len(chunks), 'embed': embed, **kwargs}
    return ValueGuidedSteering(FixedCandidates(chunks), KnownCritic(best), SPACE, **kwargs)


def test_picks_the_argmax_of_a_known_critic_with_one_encoding():
    chunks = candidates()
    for best_index in range(len(chunks)):
        s = steering(chunks, best_index)
        action = s.act(obs(), INSTRUCTION)
        assert s.last.chosen == best_index
        assert s.critics[0].encodes == 1
        np.testing.assert_allclose(action[:6], chunks[best_index, 0, :6], atol=1e-6)
        assert s.last.q.shape == (len(chunks),) and np.argmax(s.last.q) == best_index


def test_chunk_scoring_ranks_whole_chunks_from_one_encoding():
    chunks = candidates(k=4)
    target = chunks[0, 0].copy()
    chunks[1] = [target + 0.002, target + 0.002]   # near the target all along
    chunks[0, 1] = SPACE.low                       # the target first, then far from it
    first = steering(chunks, 0)
    first.act(obs(), INSTRUCTION)
    assert first.last.chosen == 0
    whole = steering(chunks, 0, scoring='chunk')
    whole.act(obs(), INSTRUCTION)
    assert whole.last.chosen == 1 and whole.critics[0].encodes == 1
    best = torch.from_numpy(SPACE.normalise(target))
    scored = torch.from_numpy(np.clip(SPACE.normalise(chunks), -1.0, 1.0))  # as steering does
    q = -((scored - best) ** 2).sum(-1)  # (K, H), the first (lower) head
    np.testing.assert_allclose(whole.last.q, q.mean(1).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match='scoring must be one of'):
        steering(chunks, 0, scoring='last_action')


def test_temperature_zero_is_deterministic_and_softmax_prefers_high_q():
    chunks = candidates(k=8)
    picks = {steering(chunks, 5, seed=seed).act(obs(), INSTRUCTION).tobytes()
             for seed in range(5)}
    assert len(picks) == 1
    s = steering(chunks, 5, temperature=1.0, seed=0)
    chosen = []
    for _ in range(2000):
        s.reset()
        s.act(obs(), INSTRUCTION)
        chosen.append(s.last.chosen)
    expected = np.exp(s.last.q - s.last.q.max())
    expected /= expected.sum()
    frequency = np.bincount(chosen, minlength=8) / len(chosen)
    np.testing.assert_allclose(frequency, expected, atol=0.04)  # softmax(Q / 1)
    assert (frequency > 0).sum() > 1  # it samples, unlike argmax
    with pytest.raises(ValueError, match='temperature'):
        steering(chunks, temperature=-1.0)


def test_random_reranking_ignores_the_critic():
    chunks = candidates(k=10)
    s = steering(chunks, 0, selection='random')
    chosen = set()
    for _ in range(50):
        s.reset()
        s.act(obs(), INSTRUCTION)
        chosen.add(s.last.chosen)
    assert s.critics[0].encodes == 0 and len(chosen) > 3


def test_real_critic_scores_k_candidates_from_one_encoding():
    torch.manual_seed(0)
    config = CriticConfig(encoder_depth=10, encoder_width=8, lang_dim=4, hidden_dims=(16,))
    critic = Critic(config)
    calls = []
    critic.encoder.register_forward_hook(lambda *a: calls.append(1))
    chunks = candidates(k=50)
    s = ValueGuidedSteering(FixedCandidates(chunks), critic, SPACE, num_samples=50, embed=embed)
    s.act(obs(), INSTRUCTION)
    assert len(calls) == 1
    with torch.no_grad():
        z = critic.encode(torch.zeros(1, 32, 32, 3, dtype=torch.uint8), embed(['x']))
        q = critic.q(z, torch.from_numpy(SPACE.normalise(chunks[:, 0]))[None])
    np.testing.assert_allclose(s.last.q, q.min(0).values[0].numpy(), rtol=1e-5, atol=1e-5)
    assert s.last.chosen == int(q.min(0).values[0].argmax())


def test_a_state_critic_scores_with_the_observed_state():
    torch.manual_seed(0)
    critic = Critic(CriticConfig(encoder_depth=10, encoder_width=8, lang_dim=4,
                                 hidden_dims=(16,), state_dim=7))
    chunks = candidates(k=6)
    s = ValueGuidedSteering(FixedCandidates(chunks), critic, SPACE, num_samples=6, embed=embed)
    low, high = obs(), obs()
    low[STATE_KEY][:] = [0.3, 0.0, 0.02, 0.0, 0.0, 0.0, 1.0]
    high[STATE_KEY][:] = [0.3, 0.0, 0.05, 0.0, 0.0, 0.0, 1.0]
    scores = []
    for o in (low, high):
        s.reset()
        s.act(o, INSTRUCTION)
        with torch.no_grad():
            q = critic(torch.zeros(1, 32, 32, 3, dtype=torch.uint8), embed(['x']),
                       torch.from_numpy(SPACE.normalise(chunks[:, 0]))[None],
                       torch.from_numpy(o[STATE_KEY])[None])
        np.testing.assert_allclose(s.last.q, q.min(0).values[0].numpy(), rtol=1e-5, atol=1e-5)
        scores.append(s.last.q)
    assert not np.allclose(scores[0], scores[1])
    with pytest.raises(ValueError, match='reads the robot state too'):
        s.act({IMAGE_KEY: low[IMAGE_KEY]}, INSTRUCTION)


def test_bad_candidates_are_dropped_and_none_left_holds(caplog):
    chunks = candidates(k=4)
    chunks[3, 1, 2] = np.nan
    s = steering(chunks, best_index=3)
    with caplog.at_level(logging.WARNING):
        s.act(obs(), INSTRUCTION)
    assert s.last.candidates == 3 and 'non-finite' in caplog.text
    assert s.last.chosen == int(np.argmax(s.last.q))

    s = steering(candidates(k=4), 0)
    s.act(obs(), INSTRUCTION)  # gripper open now
    for bad in (np.full((4, 2, 7), np.inf, np.float32), np.zeros((4, 3, 7), np.float32),
                np.zeros((4, 2), np.float32), [[1, 2], [3]]):
        s.policy.chunks = bad
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            action = s.act(obs(), INSTRUCTION)
        np.testing.assert_array_equal(action, [0, 0, 0, 0, 0, 0, 1])
        assert 'holding still' in caplog.text


def test_empty_instruction_and_wrong_image_are_errors_at_the_call():
    s = steering(candidates(), image_size=32)
    for bad in ('', '   ', None):
        with pytest.raises(ValueError, match='instruction'):
            s.act(obs(), bad)
    s.act(obs(64), INSTRUCTION)  # same aspect ratio: resized
    wide = {IMAGE_KEY: np.zeros((32, 48, 3), np.uint8), STATE_KEY: np.zeros(7, np.float32)}
    with pytest.raises(ValueError, match='32x32.*32x48'):
        s.act(wide, INSTRUCTION)


def test_value_selection_without_a_critic_is_refused():
    with pytest.raises(ValueError, match='needs a critic'):
        ValueGuidedSteering(FixedCandidates(candidates()), None, None, num_samples=4)
    base = ValueGuidedSteering(FixedCandidates(candidates(k=1)), None, None, num_samples=1)
    assert base.act(obs(), INSTRUCTION).shape == (7,)


def test_temporal_ensembler_averages_overlapping_predictions():
    ensembler = TemporalEnsembler(horizon=3, exp_weight=0.0)
    first = np.arange(21, dtype=np.float32).reshape(3, 7)
    second = first + 100
    np.testing.assert_allclose(ensembler(first), first[0])
    np.testing.assert_allclose(ensembler(second), (first[1] + second[0]) / 2)
    third = first + 200
    np.testing.assert_allclose(ensembler(third), (first[2] + second[1] + third[0]) / 3)
    fourth = first + 300  # the first chunk has run out
    np.testing.assert_allclose(ensembler(fourth), (second[2] + third[1] + fourth[0]) / 3)
    weighted = TemporalEnsembler(horizon=2, exp_weight=1.0)
    weighted(np.zeros((2, 7)))
    np.testing.assert_allclose(weighted(np.ones((2, 7))), np.exp(-1) / (1 + np.exp(-1)))


def test_sticky_gripper_repeats_a_switch_for_three_steps():
    sticky = StickyGripper(steps=3)
    commands = [0.9, 0.2, 0.9, 0.9, 0.9, 0.3, 0.3, 0.3]
    assert [sticky(c) for c in commands] == [1, 0, 0, 0, 1, 1, 1, 0]


def test_executor_never_leaves_the_robot_limits():
    executor = ChunkExecutor(horizon=1, bounds=SPACE)
    wild = np.full((1, 7), 10.0, np.float32)
    action = executor(wild)
    assert SPACE.check(action) is not None
    np.testing.assert_allclose(action[:6], SPACE.high[:6])


def test_an_ensemble_executes_the_candidate_its_mean_score_prefers():
    # Each critic alone picks its own favourite; their mean prefers the candidate between them.
    chunks = candidates(k=6)
    chunks[2, 0] = (chunks[1, 0] + chunks[4, 0]) / 2
    first, second = (KnownCritic(SPACE.normalise(chunks[i, 0])) for i in (1, 4))
    for critics, expected in (([first], 1), ([second], 4), ([first, second], 2)):
        s = ValueGuidedSteering(FixedCandidates(chunks), critics, SPACE, num_samples=6,
                                embed=embed)
        s.act(obs(), INSTRUCTION)
        assert s.last.chosen == expected
    assert first.encodes == second.encodes == 2  # one encoding per critic per step


def test_ensemble_critics_load_from_checkpoints_and_must_share_an_action_space(tmp_path):
    from robot_rl.models.critic import save_critic
    from robot_rl.steering.vgps import load_steering_critics

    config = CriticConfig(encoder_depth=10, encoder_width=8, lang_dim=4, hidden_dims=(16,))
    narrow = ActionSpace(SPACE.low / 2, SPACE.high / 2)
    for seed, name, space in ((0, 'a', SPACE), (1, 'b', SPACE), (2, 'c', narrow)):
        torch.manual_seed(seed)
        save_critic(tmp_path / f'{name}.safetensors', Critic(config), space)
    critics, space = load_steering_critics([tmp_path / 'a.safetensors',
                                            tmp_path / 'b.safetensors'])
    assert len(critics) == 2 and space.to_dict() == SPACE.to_dict()
    assert any(not torch.equal(a, b) for a, b in zip(critics[0].state_dict().values(),
                                                     critics[1].state_dict().values()))
    with pytest.raises(ValueError, match='c.safetensors: its action space'):
        load_steering_critics([tmp_path / 'a.safetensors', tmp_path / 'c.safetensors'])
