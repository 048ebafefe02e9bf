"""PA-RL action optimisation and distillation (robot_rl/rl/parl.py), for every policy class."""

import numpy as np
import pytest
import torch
from torch import nn

import policies  # noqa: F401  (registers every policy class)
from policies.base import POLICIES
from robot_rl.models.critic import Critic, CriticConfig
from robot_rl.rl import parl
from robot_rl.rl.calql import CalQL, CalQLBatch, CalQLConfig
from robot_rl.types import ActionSpace

TARGET = torch.tensor([0.6, -0.4, 0.2, 0.0, 0.3, -0.2, 0.8])


class QuadraticCritic(nn.Module):
    """Q(s, a) = -|a - target|^2 (two identical heads); a known optimum."""

    def __init__(self, target: torch.Tensor = TARGET):
        super().__init__()
        self.target = target

    def encode(self, images, lang, states=None):
        return torch.zeros(images.shape[0], 1)

    def q(self, z, actions):
        q = -((actions - self.target) ** 2).sum(-1)
        return torch.stack([q, q])


pytestmark = pytest.mark.usefixtures('one_torch_thread')


def test_global_then_local_optimisation_never_loses_value():
    critic = QuadraticCritic()
    candidates = 2 * torch.rand(4, 32, 7, generator=torch.Generator().manual_seed(0)) - 1
    q_all = critic.q(None, candidates).mean(0)
    cfg = parl.PARLConfig(num_samples=32, top_m=5, gradient_steps=20, step_size=0.05)
    out = parl.optimise_actions(critic, torch.zeros(4, 1), candidates, cfg)
    assert out.candidates.shape == (4, 5, 7) and out.values.shape == (4, 5)
    assert (out.candidates.abs() <= 1).all()
    # Sorted best first, every kept value at least the best global sample's, and ascent helps.
    assert (out.values[:, :-1] >= out.values[:, 1:]).all()
    assert (out.values[:, 0] > q_all.max(1).values + 1e-3).all()
    np.testing.assert_allclose(out.values, critic.q(None, out.candidates).mean(0), rtol=1e-5)
    assert (out.chosen == 0).all()  # temperature 0: the argmax
    no_ascent = parl.optimise_actions(critic, torch.zeros(4, 1), candidates,
                                      parl.PARLConfig(32, 5, gradient_steps=0))
    np.testing.assert_allclose(no_ascent.values, q_all.topk(5, dim=1).values, rtol=1e-6)


def test_dataset_action_replaces_the_worst_candidate():
    critic = QuadraticCritic()
    candidates = 2 * torch.rand(3, 8, 7, generator=torch.Generator().manual_seed(1)) - 1
    data = torch.full((3, 7), -1.0)  # far from the optimum: it becomes the worst, last
    cfg = parl.PARLConfig(num_samples=8, top_m=4, gradient_steps=0)
    out = parl.optimise_actions(critic, torch.zeros(3, 1), candidates, cfg, data_actions=data)
    torch.testing.assert_close(out.candidates[:, -1], data)
    best_without = parl.optimise_actions(critic, torch.zeros(3, 1), candidates, cfg)
    torch.testing.assert_close(out.candidates[:, :3], best_without.candidates[:, :3])


def test_softmax_selection_samples_by_value():
    critic = QuadraticCritic()
    candidates = 2 * torch.rand(2000, 4, 7, generator=torch.Generator().manual_seed(2)) - 1
    cfg = parl.PARLConfig(num_samples=4, top_m=4, gradient_steps=0, temperature=1.0)
    out = parl.optimise_actions(critic, torch.zeros(2000, 1), candidates, cfg,
                                generator=torch.Generator().manual_seed(0))
    probs = torch.softmax(out.values, dim=1)
    expected = probs.mean(0)
    frequency = torch.bincount(out.chosen, minlength=4).float() / 2000
    torch.testing.assert_close(frequency, expected, atol=0.03, rtol=0)


def test_unit_map_round_trips_between_normalisers():
    policy_space = ActionSpace(low=-np.ones(7) * 0.05, high=np.ones(7) * 0.05)
    critic_space = ActionSpace(low=-np.ones(7) * 0.1, high=np.ones(7) * 0.02)
    units = parl.UnitMap(policy_space, critic_space, torch.device('cpu'))
    x = torch.rand(5, 7) * 1.2 - 0.6
    y = units.to_critic(x)
    env = policy_space.unnormalise(x.numpy())
    np.testing.assert_allclose(y.numpy(), np.clip(critic_space.normalise(env), -1, 1), atol=1e-5)
    inside = (y.abs() < 1).all(dim=1)
    torch.testing.assert_close(units.to_policy(y)[inside], x[inside], atol=1e-5, rtol=0)


def tiny_policy(name):
    heads = {'gaussian': dict(hidden_dims=(32,)), 'diffusion': dict(hidden=32, blocks=1),
             'autoregressive': dict(d_model=32, layers=1, heads=2)}
    return POLICIES[name](horizon=2, encoder=dict(depth=10, width=8, image_size=16, lang_dim=4),
                          seed=0, **heads[name])


@pytest.mark.parametrize('name', ['gaussian', 'diffusion', 'autoregressive'])
def test_distillation_moves_every_policy_class_towards_the_critics_optimum(name):
    """The same code improves each class: its samples' first actions approach the argmax."""
    policy = tiny_policy(name)
    critic = QuadraticCritic()
    space = ActionSpace.bridge()
    units = parl.UnitMap(space, space, torch.device('cpu'))
    images = torch.randint(0, 255, (16, 16, 16, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    lang = torch.nn.functional.normalize(torch.ones(16, 4), dim=1)
    data = 2 * torch.rand(16, 7, generator=torch.Generator().manual_seed(1)) - 1
    cfg = parl.PARLConfig(num_samples=8, top_m=4, gradient_steps=5, step_size=0.05)
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)

    def distance():
        chunks = parl.sample_chunks(policy.eval(), images, lang, 8)
        first = units.to_critic(chunks[:, :, 0])
        return (first - TARGET).norm(dim=-1).mean().item()

    before = distance()
    for _ in range(150):
        batch = parl.distillation_batch(policy, critic, images, lang, data, units, cfg)
        assert batch.actions.shape == (16, 2, 7) and batch.mask[:, 0].eq(1).all()
        loss = parl.distil(policy, optimizer, batch)
        assert np.isfinite(loss)
    after = distance()
    assert after < 0.6 * before, (before, after)


def test_calql_with_the_parl_sampler_backs_up_optimised_actions():
    """One Cal-QL update whose policy samples (CQL term and TD target) are PA-RL's."""
    torch.manual_seed(0)
    critic = Critic(CriticConfig(encoder_depth=10, encoder_width=8, lang_dim=4,
                                 hidden_dims=(16,)))
    policy = tiny_policy('diffusion')
    space = ActionSpace.bridge()
    cfg = parl.PARLConfig(num_samples=6, top_m=3, gradient_steps=2)
    calls = []
    sampler = parl.parl_sampler(policy, critic, parl.UnitMap(space, space, torch.device('cpu')),
                                cfg)

    def counting(obs, n):
        actions, log_prob = sampler(obs, n)
        calls.append(actions.shape)
        return actions, log_prob

    algo = CalQL(critic, CalQLConfig(num_samples=3), sampler=counting)
    b = 4
    images = torch.randint(0, 255, (b, 16, 16, 3), dtype=torch.uint8)
    batch = CalQLBatch(images=images, lang_emb=torch.ones(b, 4) / 2, actions=torch.zeros(b, 7),
                       rewards=-torch.ones(b), next_images=images, dones=torch.zeros(b),
                       mc_returns=-5 * torch.ones(b), states=torch.zeros(b, 7),
                       next_states=torch.zeros(b, 7))
    stats = algo.update(batch)
    assert calls == [(b, 3, 7), (b, 3, 7)]  # at s (CQL term) and at s' (CQL term + TD target)
    assert np.isfinite(stats.loss) and np.isfinite(stats.target_q)


def three_observations():
    """A tiny diffusion policy, one normaliser for policy and critic, 3 random observations."""
    torch.manual_seed(0)
    policy = tiny_policy('diffusion').eval()
    units = parl.UnitMap(ActionSpace.bridge(), ActionSpace.bridge(), torch.device('cpu'))
    images = torch.randint(0, 255, (3, 16, 16, 3), dtype=torch.uint8)
    return policy, units, images, torch.randn(3, 4)


def test_the_chosen_chunk_carries_the_optimised_first_action():
    policy, units, images, lang = three_observations()
    cfg = parl.PARLConfig(num_samples=8, top_m=3, gradient_steps=5, step_size=0.05)
    choice = parl.optimised_actions(policy, QuadraticCritic(), images, lang, units, cfg)
    assert choice.chunk.shape == (3, policy.action_horizon, 7)
    np.testing.assert_allclose(choice.chunk[:, 0], units.to_policy(choice.action), atol=1e-6)
    np.testing.assert_allclose(choice.value, QuadraticCritic().q(None, choice.action).mean(0),
                               rtol=1e-5)
    assert not choice.from_data.any()
    # The dataset action chosen: it leads the best sampled chunk; distillation supervises
    # only that first step.
    data = TARGET.expand(3, 7)  # the critic's optimum: always chosen
    with_data = parl.optimised_actions(policy, QuadraticCritic(), images, lang, units,
                                       parl.PARLConfig(8, top_m=3, gradient_steps=0), data)
    assert with_data.from_data.all()
    np.testing.assert_allclose(with_data.chunk[:, 0], units.to_policy(data), atol=1e-6)
    batch = parl.distillation_batch(policy, QuadraticCritic(), images, lang, data, units,
                                    parl.PARLConfig(8, top_m=3, gradient_steps=0))
    assert batch.mask[:, 0].all() and not batch.mask[:, 1:].any()


def test_chunk_scoring_values_and_optimises_whole_chunks():
    critic = QuadraticCritic()
    # Chunk 0 starts at the optimum and then goes far from it; chunk 1 stays near it.
    near = TARGET + 0.1
    chunks = torch.stack([torch.stack([TARGET, -TARGET, -TARGET]),
                          torch.stack([near, near, near])])[None]          # (1, 2, 3, 7)
    first = parl.optimise_actions(critic, torch.zeros(1, 1), chunks[:, :, 0],
                                  parl.PARLConfig(2, top_m=2, gradient_steps=0))
    whole = parl.optimise_actions(critic, torch.zeros(1, 1), chunks,
                                  parl.PARLConfig(2, top_m=2, gradient_steps=0))
    assert first.sources[0, 0] == 0 and whole.sources[0, 0] == 1
    expected = critic.q(None, chunks[0]).mean(0).mean(-1)                 # (2,) chunk means
    torch.testing.assert_close(whole.values[0], expected.sort(descending=True).values)

    # Gradient ascent moves every action of a kept chunk, never losing value.
    random = 2 * torch.rand(4, 16, 3, 7, generator=torch.Generator().manual_seed(3)) - 1
    cfg = parl.PARLConfig(16, top_m=3, gradient_steps=20, step_size=0.05, scoring='chunk')
    out = parl.optimise_actions(critic, torch.zeros(4, 1), random, cfg)
    assert out.candidates.shape == (4, 3, 3, 7)
    kept = random[torch.arange(4), out.sources[:, 0]]
    assert ((out.candidates[:, 0] - TARGET).norm(dim=-1)
            < (kept - TARGET).norm(dim=-1)).all()                      # each step nearer
    # A dataset action stands in as a chunk of itself, valued at its own Q.
    data = torch.full((4, 7), -1.0)
    with_data = parl.optimise_actions(critic, torch.zeros(4, 1), random, cfg, data)
    torch.testing.assert_close(with_data.candidates[:, -1], data[:, None].expand(-1, 3, -1))
    torch.testing.assert_close(with_data.values[:, -1], critic.q(None, data).mean(0))
    with pytest.raises(ValueError, match='scoring'):
        parl.PARLConfig(scoring='mean')


def test_the_chosen_chunk_is_optimised_whole_when_scoring_chunks():
    policy, units, images, lang = three_observations()
    cfg = parl.PARLConfig(num_samples=8, top_m=3, gradient_steps=5, step_size=0.05,
                          scoring='chunk')
    policy.reset(0)
    sampled = units.to_critic(parl.sample_chunks(policy, images, lang, 8))   # (3, 8, H, 7)
    policy.reset(0)
    choice = parl.optimised_actions(policy, QuadraticCritic(), images, lang, units, cfg)
    optimised = units.to_critic(choice.chunk)                              # (3, H, 7)
    values = QuadraticCritic().q(None, optimised).mean(0).mean(-1)
    torch.testing.assert_close(choice.value, values, rtol=1e-5, atol=1e-5)
    best_sampled = QuadraticCritic().q(None, sampled.flatten(1, 2)).mean(0)
    best_sampled = best_sampled.view(3, 8, -1).mean(-1).max(1).values
    assert (values > best_sampled).all()  # ascent improved on every sampled chunk
    torch.testing.assert_close(units.to_critic(choice.chunk[:, 0]), choice.action)
    # The TD target's sampler gives first actions of the optimised chunks.
    sample = parl.parl_sampler(policy, QuadraticCritic(), units, cfg)
    obs = type('Obs', (), {'images': images, 'lang_emb': lang, 'z': torch.zeros(3, 1)})
    actions, log_probs = sample(obs, 2)
    assert actions.shape == (3, 2, 7) and log_probs is None

    data = TARGET.expand(3, 7)  # the critic's optimum: always chosen, first step supervised
    batch = parl.distillation_batch(policy, QuadraticCritic(), images, lang, data, units,
                                    parl.PARLConfig(8, top_m=3, gradient_steps=0,
                                                    scoring='chunk'))
    assert batch.mask[:, 0].all() and not batch.mask[:, 1:].any()
    np.testing.assert_allclose(units.to_critic(batch.actions[:, 0])[:, :6], data[:, :6], atol=1e-6)


def test_distilled_gripper_commands_are_open_or_closed_as_executed():
    space = ActionSpace(low=np.r_[np.full(6, -0.1), -0.1].astype(np.float32),
                        high=np.r_[np.full(6, 0.1), 1.1].astype(np.float32))
    chunk = torch.tensor([[0.1, 0, 0, 0, 0, 0, 0.9], [0.2, 0, 0, 0, 0, 0, -0.2],
                          [0.3, 0, 0, 0, 0, 0, 0.05]])
    out = parl.executed_gripper(chunk, space)
    # 0.9 -> 1.04 in robot units: open; -0.2 -> 0.38: closed; 0.05 -> 0.53: open (> 0.5).
    opened, closed = space.normalise(np.r_[np.zeros(6), 1.0])[6], space.normalise(np.zeros(7))[6]
    np.testing.assert_allclose(out[:, 6], [opened, closed, opened], rtol=1e-6)
    torch.testing.assert_close(out[:, :6], chunk[:, :6])  # motion untouched

    torch.manual_seed(0)
    policy = tiny_policy('diffusion').eval()
    units = parl.UnitMap(ActionSpace.bridge(), ActionSpace.bridge(), torch.device('cpu'))
    images = torch.randint(0, 255, (4, 16, 16, 3), dtype=torch.uint8)
    batch = parl.distillation_batch(policy, QuadraticCritic(), images, torch.randn(4, 4),
                                    torch.zeros(4, 7), units, parl.PARLConfig(8, top_m=3))
    bridge = ActionSpace.bridge()
    executed = {round(float(bridge.normalise(np.r_[np.zeros(6), g])[6]), 5) for g in (0, 1)}
    assert {round(float(g), 5) for g in batch.actions[..., 6].flatten()} <= executed
