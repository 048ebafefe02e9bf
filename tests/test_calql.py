"""Cal-QL: every loss term against a hand computation, alpha, Polyak and the update loop."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from robot_rl.models.actor import TanhGaussianActor
from robot_rl.models.critic import Critic, CriticConfig
from robot_rl.rl.calql import (CalQL, CalQLBatch, CalQLConfig, critic_loss, min_over_heads,
                               polyak_update)

B, N, A, E = 2, 2, 2, 2  # batch, samples per kind, action dim, heads
W = [1.0, -2.0]                   # Q_e(s, a) = W[e] * z(s) + C[e] . a
C = [[0.5, -1.0], [2.0, 0.25]]


class LinearStubCritic(nn.Module):
    """Q_e(s, a) = W[e] * z(s) + C[e] . a with z(s) = mean pixel / 255: computable by hand."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(W))
        self.c = nn.Parameter(torch.tensor(C))
        self.config = SimpleNamespace(action_dim=A)

    def encode(self, images, lang_emb, states=None):
        return images.float().mean(dim=(1, 2, 3))[:, None] / 255

    def q(self, z, actions):
        return self.w[:, None, None] * z[None] + torch.einsum('bka,ea->ebk', actions, self.c)

    def td_loss(self, z, actions, target):
        q = self.q(z, actions[:, None])[..., 0]
        return (q - target).pow(2).mean(), q


def image(value):
    return torch.full((4, 4, 3), value, dtype=torch.uint8)


def make_batch(mc_returns=(-0.2, -5.0)):
    return CalQLBatch(images=torch.stack([image(51), image(204)]),            # z = 0.2, 0.8
                      lang_emb=torch.zeros(B, 1),
                      actions=torch.tensor([[0.1, -0.3], [0.7, 0.2]]),
                      rewards=torch.tensor([-1.0, 0.0]),
                      next_images=torch.stack([image(102), image(153)]),     # z' = 0.4, 0.6
                      dones=torch.tensor([0.0, 1.0]),
                      mc_returns=torch.tensor(mc_returns))


POLICY = torch.tensor([[[0.9, 0.1], [-0.4, 0.6]], [[0.2, -0.8], [0.5, 0.5]]])        # at s
POLICY_LOGP = torch.tensor([[0.3, -1.2], [0.8, -0.1]])
NEXT = torch.tensor([[[-0.7, 0.3], [0.6, 0.9]], [[0.1, 0.1], [-0.9, -0.2]]])         # at s'
NEXT_LOGP = torch.tensor([[-0.5, 0.4], [1.1, -0.9]])


def fixed_sampler(batch, with_log_prob=True):
    """Deterministic policy samples: POLICY at the batch's s, NEXT at its s'."""
    def sample(obs, n):
        assert n == N
        actions, logp = (POLICY, POLICY_LOGP) if obs.images is batch.images else (NEXT, NEXT_LOGP)
        return actions, logp if with_log_prob else None
    return sample


def uniform_draws(seed):
    return 2 * torch.rand(B, N, A, generator=torch.Generator().manual_seed(seed)) - 1


def hand_q(e, z, a):
    return W[e] * z + sum(C[e][i] * float(a[i]) for i in range(A))


def hand_terms(batch, cfg, alpha, uniform, with_log_prob=True):
    """Cal-QL terms with plain Python loops, written from the paper's definitions."""
    z = [float(v) / 255 for v in batch.images.float().mean(dim=(1, 2, 3))]
    z_next = [float(v) / 255 for v in batch.next_images.float().mean(dim=(1, 2, 3))]
    y, backed_up = [], []
    for b in range(B):
        candidates = NEXT[b] if cfg.max_target_backup else NEXT[b][:1]
        best = max(min(hand_q(e, z_next[b], a) for e in range(E)) for a in candidates)
        backed_up.append(best)
        y.append(float(batch.rewards[b]) + cfg.gamma * (1 - float(batch.dones[b])) * best)
    q_data = [[hand_q(e, z[b], batch.actions[b]) for b in range(B)] for e in range(E)]
    gaps, below = [], []
    for e in range(E):
        for b in range(B):
            mc = float(batch.mc_returns[b])
            values = [hand_q(e, z[b], a) + (A * math.log(2) if cfg.importance_sampling else 0)
                      for a in uniform[b]]
            policy = list(zip(POLICY[b], POLICY_LOGP[b])) + list(zip(NEXT[b], NEXT_LOGP[b]))
            for a, logp in policy:
                q = hand_q(e, z[b], a)
                below.append(q < mc)
                q = max(q, mc) if cfg.calibrate else q
                values.append(q - float(logp) if cfg.importance_sampling and with_log_prob else q)
            gaps.append(math.log(sum(math.exp(v) for v in values)) - q_data[e][b])
    loss_td = sum((q_data[e][b] - y[b]) ** 2 for e in range(E) for b in range(B)) / (E * B)
    loss_cql = sum(gaps) / len(gaps)
    return {'loss_td': loss_td, 'loss_cql': loss_cql, 'loss': loss_td + alpha * loss_cql,
            'q_data': sum(map(sum, q_data)) / (E * B), 'bound_rate': sum(below) / len(below),
            'target_q': sum(backed_up) / B}


def computed_terms(batch, cfg, alpha=5.0, with_log_prob=True, seed=0):
    critic = LinearStubCritic()
    terms = critic_loss(critic, copy.deepcopy(critic), batch, fixed_sampler(batch, with_log_prob),
                        alpha, cfg, generator=torch.Generator().manual_seed(seed))
    return {k: float(v.detach()) for k, v in terms._asdict().items() if k != 'z'}


@pytest.mark.parametrize('changes, with_log_prob', [
    ({}, True),
    ({'calibrate': False}, True),
    ({'importance_sampling': False}, True),
    ({'max_target_backup': False}, True),
    ({}, False),
])
def test_every_loss_term_matches_a_hand_computation(changes, with_log_prob):
    cfg = CalQLConfig(num_samples=N, **changes)
    batch = make_batch()
    got = computed_terms(batch, cfg, with_log_prob=with_log_prob)
    want = hand_terms(batch, cfg, 5.0, uniform_draws(0), with_log_prob)
    assert 0 < want['bound_rate'] < 1  # the batch exercises both sides of the bound
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert got['cql_gap'] == pytest.approx(want['loss_cql'], rel=1e-5)


def test_calibration_changes_cql_exactly_when_the_mc_return_exceeds_policy_q():
    calibrated, plain = CalQLConfig(num_samples=N), CalQLConfig(num_samples=N, calibrate=False)
    active = make_batch()
    calibrated_cql = computed_terms(active, calibrated)['loss_cql']
    assert calibrated_cql > computed_terms(active, plain)['loss_cql']
    inactive = make_batch(mc_returns=(-50.0, -50.0))
    got = computed_terms(inactive, calibrated)
    assert got['bound_rate'] == 0.0
    assert got['loss_cql'] == computed_terms(inactive, plain)['loss_cql']


def test_min_over_heads_all_or_a_random_subset():
    q = torch.tensor([[1.0, 5.0], [3.0, 2.0], [0.0, 4.0]])  # (E=3, B=2)
    torch.testing.assert_close(min_over_heads(q, None), torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(min_over_heads(q, 3), torch.tensor([0.0, 2.0]))
    pick = torch.randperm(3, generator=torch.Generator().manual_seed(4))[:2]
    got = min_over_heads(q, 2, torch.Generator().manual_seed(4))
    torch.testing.assert_close(got, q[pick].min(0).values)


# ----------------------------------------------------------------------------- alpha, Polyak


@pytest.mark.parametrize('target_gap, grows', [(-100.0, True), (100.0, False)])
def test_lagrange_alpha_moves_towards_the_target_gap(target_gap, grows):
    batch = make_batch()
    cfg = CalQLConfig(num_samples=N, lagrange=True, alpha=1.0, target_action_gap=target_gap)
    algo = CalQL(LinearStubCritic(), cfg, sampler=fixed_sampler(batch))
    stats = algo.update(batch)
    assert stats.alpha == pytest.approx(1.0)
    assert (float(algo.alpha) > 1.0) == grows and float(algo.alpha) != 1.0


def test_polyak_update_arithmetic():
    torch.manual_seed(0)
    online, target = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    for p in online.parameters():
        p.data.uniform_()
    online.running_mean.fill_(2.0)
    before = [p.clone() for p in target.parameters()]
    polyak_update(target, online, 0.1)
    for t, o, b in zip(target.parameters(), online.parameters(), before):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)
    torch.testing.assert_close(target.running_mean, online.running_mean)
    polyak_update(target, online, 1.0)
    for t, o in zip(target.parameters(), online.parameters()):
        torch.testing.assert_close(t, o)


# ----------------------------------------------------------------------------- CalQL object


def tiny_algo(**cfg):
    torch.manual_seed(0)
    critic = Critic(CriticConfig(encoder_depth=10, encoder_width=8, lang_dim=8,
                                 hidden_dims=(32, 32)))
    actor = TanhGaussianActor(critic.feature_dim, 7, hidden_dims=(32,))
    algo = CalQL(critic, CalQLConfig(num_samples=4, **cfg), actor=actor,
                 generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    frames = torch.randint(0, 256, (9, 16, 16, 3), dtype=torch.uint8, generator=g)
    batch = CalQLBatch(frames[:-1], torch.randn(8, 8, generator=g),
                       2 * torch.rand(8, 7, generator=g) - 1, -torch.ones(8), frames[1:],
                       torch.zeros(8), torch.linspace(-60.0, -5.0, 8))
    return algo, batch


def test_update_reduces_the_td_loss_on_a_fixed_batch():
    algo, batch = tiny_algo()
    losses = [algo.update(batch).loss_td for _ in range(15)]
    assert losses[-1] < 0.75 * losses[0]
    stats = algo.update(batch)
    assert all(math.isfinite(v) for v in vars(stats).values())


def test_target_critic_is_outside_the_optimisers_and_follows_by_polyak():
    algo, batch = tiny_algo()
    optimised = {id(p) for g in algo.critic_opt.param_groups for p in g['params']}
    assert not optimised & {id(p) for p in algo.target_critic.parameters()}
    assert not any(p.requires_grad for p in algo.target_critic.parameters())
    target_before = copy.deepcopy(algo.target_critic)
    algo.update(batch)
    for t, b, o in zip(algo.target_critic.parameters(), target_before.parameters(),
                       algo.critic.parameters()):
        torch.testing.assert_close(t, 0.995 * b + 0.005 * o)


def test_reset_optimizers_clears_adam_state():
    algo, batch = tiny_algo()
    algo.update(batch)
    assert algo.critic_opt.state and algo.actor_opt.state
    algo.reset_optimizers()
    assert not algo.critic_opt.state and not algo.actor_opt.state


def test_calql_needs_exactly_one_policy_source():
    critic = LinearStubCritic()
    with pytest.raises(ValueError, match='exactly one'):
        CalQL(critic)


def test_config_validation():
    with pytest.raises(ValueError, match='gamma'):
        CalQLConfig(gamma=1.0)
    with pytest.raises(ValueError, match='lagrange'):
        CalQLConfig(alpha=0.0, lagrange=True)


# ----------------------------------------------------------------------------- calibration


class RegionCritic(nn.Module):
    """One learnable value per head and action region: near a_data, near a_pi, elsewhere.

    Uniform samples in 7-d never land near either anchor, so the policy region is moved by the
    policy samples' CQL term alone.
    """

    def __init__(self, a_data, a_pi):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(2, 3))
        self.anchors = torch.stack([a_data, a_pi])
        self.config = SimpleNamespace(action_dim=a_data.shape[-1])

    def encode(self, images, lang_emb, states=None):
        return torch.zeros(images.shape[0], 1)

    def q(self, z, actions):
        near = (actions[:, :, None] - self.anchors).abs().amax(-1) < 0.05  # (B, K, 2)
        region = torch.where(near[..., 0], 0, torch.where(near[..., 1], 1, 2))
        return self.theta[:, region]

    def td_loss(self, z, actions, target):
        q = self.q(z, actions[:, None])[..., 0]
        return (q - target).pow(2).mean(), q


@pytest.mark.parametrize('calibrate', [True, False])
def test_calibration_keeps_policy_q_above_the_mc_return(calibrate):
    """Bandit with return -0.5: plain CQL pushes the policy's Q far below it; Cal-QL stops."""
    a_data, a_pi, mc = torch.full((7,), 0.5), torch.full((7,), -0.5), -0.5
    critic = RegionCritic(a_data, a_pi)
    images = torch.zeros(4, 2, 2, 3, dtype=torch.uint8)
    batch = CalQLBatch(images, torch.zeros(4, 1), a_data.expand(4, 7), torch.full((4,), mc),
                       images, torch.ones(4), torch.full((4,), mc))
    cfg = CalQLConfig(num_samples=4, alpha=1.0, calibrate=calibrate, importance_sampling=False,
                      critic_lr=0.01)
    algo = CalQL(critic, cfg, sampler=lambda obs, n: (a_pi.expand(4, n, 7), None),
                 generator=torch.Generator().manual_seed(0))
    for _ in range(300):
        algo.update(batch)
    q_pi = critic.theta[:, 1]
    if calibrate:
        assert (q_pi >= mc - 0.15).all()  # reaches the bound, then only Adam momentum is left
    else:
        assert (q_pi < mc - 1.0).all()


def test_a_state_critic_learns_what_the_frame_does_not_show():
    """One frame, two gripper heights: closing low succeeds, closing 10 cm higher fails. Only
    the state tells them apart, and the TD-learned values must (no CQL term: alpha 0)."""
    torch.manual_seed(0)
    critic = Critic(CriticConfig(encoder_depth=10, encoder_width=8, lang_dim=8,
                                 hidden_dims=(32, 32), state_dim=7))
    actor = TanhGaussianActor(critic.feature_dim, 7, hidden_dims=(32,))
    algo = CalQL(critic, CalQLConfig(num_samples=4, alpha=0.0), actor=actor,
                 generator=torch.Generator().manual_seed(1))
    low = torch.tensor([0.3, 0.0, 0.02, 0.0, 0.0, 0.0, 1.0])
    high = low + torch.tensor([0.0, 0.0, 0.1, 0.0, 0.0, 0.0, 0.0])
    states = torch.stack([low, high]).repeat(4, 1)                   # (8, 7), alternating
    frame = torch.full((8, 16, 16, 3), 90, dtype=torch.uint8)
    close = torch.zeros(8, 7)
    close[:, 6] = -1.0                                                # gripper closed
    success = torch.tensor([1.0, 0.0]).repeat(4)
    done = torch.ones(8)  # one-step episodes: Q is the reward, 0 or -1
    batch = CalQLBatch(frame, torch.zeros(8, 8), close, success - 1.0, frame, done,
                       success - 1.0, states=states, next_states=states)
    for _ in range(300):
        algo.update(batch)
    with torch.no_grad():
        q = critic(frame[:2], torch.zeros(2, 8), close[:2, None], states[:2]).min(0).values[:, 0]
    assert q[0] - q[1] > 0.5, q
