"""Cal-QL: calibrated conservative Q-learning (Nakamoto et al., NeurIPS 2023), in one file.

Critic loss = TD regression + alpha * CQL regulariser, where the CQL regulariser's policy-action
Q-values are first clipped from below by the Monte-Carlo return (the calibration line in
`cql_regulariser`). Reads top to bottom: config and tensor types, Polyak, TD target, CQL
regulariser, critic loss, alpha and actor losses, then `CalQL`, which owns the networks and
optimisers and does one update per call.

Policy samples come from a pluggable `PolicySampler`: the tanh-Gaussian actor trained alongside
(V-GPS, Cal-QL) or any policy's `sample_actions` wrapped to return normalised actions (PA-RL).
A sampler that cannot give log-probabilities returns None; its samples then enter the
logsumexp without importance weights (the uniform samples keep theirs).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from typing import Callable, NamedTuple, Optional, Tuple

import torch
from torch import nn

from robot_rl.models.actor import TanhGaussianActor
from robot_rl.models.critic import Critic


@dataclasses.dataclass
class CalQLConfig:
    """Cal-QL hyper-parameters; defaults are the reference settings."""

    gamma: float = 0.99
    """Discount (V-GPS used 0.98)."""
    tau: float = 5e-3
    """Polyak rate of the target critic."""
    alpha: float = 5.0
    """CQL weight; the initial value when `lagrange` is on."""
    lagrange: bool = False
    """Tune alpha by dual gradient ascent so the CQL gap approaches `target_action_gap`."""
    target_action_gap: float = 1.0
    """Lagrange target for logsumexp(Q_sampled) - Q_data (a free choice; unused otherwise)."""
    num_samples: int = 10
    """n: actions per kind (uniform, policy at s, policy at s'); 10 reference, 4 in V-GPS."""
    calibrate: bool = True
    """Clip policy-action Q-values from below by the MC return (off = plain CQL)."""
    max_target_backup: bool = True
    """Back up the best of n next-state policy samples instead of a single sample."""
    target_heads: Optional[int] = None
    """Heads in the target's min: None = all, 2 = a random pair per update (PA-RL)."""
    importance_sampling: bool = True
    """Subtract the log sampling density from sampled actions' Q before the logsumexp."""
    critic_lr: float = 3e-4
    actor_lr: float = 1e-4
    alpha_lr: float = 3e-4
    """Adam rate of the Lagrange alpha and of the entropy temperature."""
    target_entropy: Optional[float] = None
    """Actor entropy target; None = -action_dim."""
    autocast: bool = True
    """bf16 autocast for the forward passes on CUDA (CPU always runs float32)."""

    def __post_init__(self):
        checks = [
            (0.0 <= self.gamma < 1.0, 'gamma in [0, 1)'),
            (0.0 < self.tau <= 1.0, 'tau in (0, 1]'),
            (self.alpha >= 0.0 and (self.alpha > 0.0 or not self.lagrange),
             'alpha >= 0 (> 0 with lagrange)'),
            (self.num_samples >= 1, 'num_samples >= 1'),
            (self.target_heads is None or self.target_heads >= 1, 'target_heads None or >= 1'),
            (min(self.critic_lr, self.actor_lr, self.alpha_lr) > 0, 'learning rates > 0'),
        ]
        failed = [rule for ok, rule in checks if not ok]
        if failed:
            raise ValueError(f'CalQLConfig: need {"; ".join(failed)}')


class CalQLBatch(NamedTuple):
    """B transitions as plain tensors on the critic's device, mapped from the replay batch."""

    images: torch.Tensor       # (B, H, W, 3) uint8
    lang_emb: torch.Tensor     # (B, D) instruction embeddings
    actions: torch.Tensor      # (B, A) normalised to [-1, 1]
    rewards: torch.Tensor      # (B,)
    next_images: torch.Tensor  # (B, H, W, 3) uint8
    dones: torch.Tensor        # (B,) 1 on termination only (a time-limit truncation is 0)
    mc_returns: torch.Tensor   # (B,) Monte-Carlo return of the data transition
    states: Optional[torch.Tensor] = None       # (B, S): for state critics and samplers
    next_states: Optional[torch.Tensor] = None  # (B, S)


class PolicyInput(NamedTuple):
    """What a policy sampler sees of one batch of observations."""

    z: torch.Tensor                 # (B, F) online critic feature, detached
    images: torch.Tensor            # (B, H, W, 3)
    lang_emb: torch.Tensor          # (B, D)
    states: Optional[torch.Tensor]  # (B, S) or None


Samples = Tuple[torch.Tensor, Optional[torch.Tensor]]
"""Actions (B, n, A) in [-1, 1] and their log-probabilities (B, n), or None when unknown."""
PolicySampler = Callable[[PolicyInput, int], Samples]


def actor_sampler(actor: TanhGaussianActor) -> PolicySampler:
    """A sampler drawing from the tanh-Gaussian actor on the critic's feature."""
    return lambda obs, n: actor.sample(obs.z, n)


@torch.no_grad()
def polyak_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """Move the target in place: target <- (1 - tau) * target + tau * online; copy buffers."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.lerp_(o, tau)
    for t, o in zip(target.buffers(), online.buffers()):
        t.copy_(o)


# ----------------------------------------------------------------------------- critic loss


class CriticLoss(NamedTuple):
    """Named terms of the critic loss; only `loss`, `loss_td` and `loss_cql` carry gradients."""

    loss: torch.Tensor       # loss_td + alpha * loss_cql
    loss_td: torch.Tensor
    loss_cql: torch.Tensor   # mean over heads and batch of logsumexp(Q_sampled) - Q_data
    q_data: torch.Tensor     # mean Q(s, a_data)
    cql_gap: torch.Tensor    # = loss_cql, detached (drives the Lagrange alpha)
    bound_rate: torch.Tensor  # fraction of policy-sample Q-values below the MC return
    target_q: torch.Tensor   # mean backed-up target Q(s', a'*)
    z: torch.Tensor          # (B, F) the batch's features, detached (reused by the actor step)


def uniform_actions(batch: int, n: int, dim: int, device: torch.device,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(batch, n, dim) uniform in [-1, 1]."""
    return 2.0 * torch.rand(batch, n, dim, device=device, generator=generator) - 1.0


def min_over_heads(q: torch.Tensor, heads: Optional[int],
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(E, ...) -> (...): min over all heads, or over a random subset of `heads` of them."""
    if heads is not None and heads < q.shape[0]:
        pick = torch.randperm(q.shape[0], generator=generator, device=q.device)[:heads]
        q = q[pick]
    return q.min(dim=0).values


@torch.no_grad()
def td_target(target_critic: Critic, batch: CalQLBatch, next_actions: torch.Tensor,
              cfg: CalQLConfig, generator: Optional[torch.Generator] = None
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backed-up y = r + gamma (1 - d) max_j min_heads Qtarget(s', a'_j) -> (y, Q'), each (B,).

    next_actions (B, n, A) are policy samples at s'; without the max-target backup only the first
    is used.
    """
    if not cfg.max_target_backup:
        next_actions = next_actions[:, :1]
    z_next = target_critic.encode(batch.next_images, batch.lang_emb, batch.next_states)
    q_next = min_over_heads(target_critic.q(z_next, next_actions), cfg.target_heads, generator)
    q_next = q_next.max(dim=-1).values  # max-target backup: the best of the n samples
    y = batch.rewards.float() + cfg.gamma * (1.0 - batch.dones.float()) * q_next
    return y, q_next


def cql_regulariser(critic: Critic, z: torch.Tensor, q_data: torch.Tensor,
                    random_actions: torch.Tensor, policy: Samples, policy_next: Samples,
                    mc_returns: torch.Tensor, cfg: CalQLConfig
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """CQL term: logsumexp (temperature 1) over sampled actions' Q minus Q(s, a_data), averaged.

    z (B, F), q_data (E, B), random_actions (B, n, A), policy / policy_next: samples at s and at
    s' (all evaluated at s), mc_returns (B,) -> (loss, fraction of policy Q below the MC return).
    """
    (a_pi, logp_pi), (a_next, logp_next) = policy, policy_next
    n_rand = random_actions.shape[1]
    q = critic.q(z, torch.cat([random_actions, a_pi, a_next], dim=1))  # one call for all samples
    q_rand, q_pi = q[..., :n_rand], q[..., n_rand:]                    # (E, B, n), (E, B, 2n)
    mc = mc_returns.float()[None, :, None]
    bound_rate = (q_pi < mc).float().mean().detach()
    if cfg.calibrate:
        q_pi = torch.maximum(q_pi, mc)  # Cal-QL: policy-action Q clipped from below by G_MC
    if cfg.importance_sampling:
        q_rand = q_rand + random_actions.shape[-1] * math.log(2.0)  # - log(2^-A), uniform density
        q_pi = q_pi - torch.cat([_log_prob_or_zero(logp_pi, a_pi),
                                 _log_prob_or_zero(logp_next, a_next)], dim=1)[None]
    gap = torch.logsumexp(torch.cat([q_rand, q_pi], dim=-1), dim=-1) - q_data  # (E, B)
    return gap.mean(), bound_rate


def _log_prob_or_zero(log_prob: Optional[torch.Tensor], actions: torch.Tensor) -> torch.Tensor:
    """Log-probs (B, n), or zeros (no importance weight) when the sampler cannot give them."""
    return torch.zeros(actions.shape[:2], device=actions.device) if log_prob is None else log_prob


def critic_loss(critic: Critic, target_critic: Critic, batch: CalQLBatch,
                sample_policy: PolicySampler, alpha: float | torch.Tensor, cfg: CalQLConfig,
                generator: Optional[torch.Generator] = None) -> CriticLoss:
    """Cal-QL critic loss on one batch. Random draws: uniform actions first, then head subsets.

    The n next-state policy samples serve both the max-target backup and the CQL term (both are
    i.i.d. draws from pi(. | s')), which halves the policy calls for expensive samplers.
    """
    z = critic.encode(batch.images, batch.lang_emb, batch.states)
    with torch.no_grad():
        z_next = critic.encode(batch.next_images, batch.lang_emb, batch.next_states)
        obs = PolicyInput(z.detach(), batch.images, batch.lang_emb, batch.states)
        next_obs = PolicyInput(z_next, batch.next_images, batch.lang_emb, batch.next_states)
        n = cfg.num_samples
        random_actions = uniform_actions(z.shape[0], n, batch.actions.shape[-1], z.device,
                                         generator)
        policy, policy_next = sample_policy(obs, n), sample_policy(next_obs, n)
        y, q_next = td_target(target_critic, batch, policy_next[0], cfg, generator)
    loss_td, q_data = critic.td_loss(z, batch.actions, y)
    loss_cql, bound_rate = cql_regulariser(critic, z, q_data, random_actions, policy,
                                           policy_next, batch.mc_returns, cfg)
    return CriticLoss(loss=loss_td + alpha * loss_cql, loss_td=loss_td, loss_cql=loss_cql,
                      q_data=q_data.mean().detach(), cql_gap=loss_cql.detach(),
                      bound_rate=bound_rate, target_q=q_next.mean(), z=z.detach())


# ----------------------------------------------------------------------------- alpha and actor


def lagrange_alpha_loss(log_alpha: torch.Tensor, cql_gap: torch.Tensor,
                        target_gap: float) -> torch.Tensor:
    """Dual ascent: alpha grows while the CQL gap exceeds its target and shrinks below it."""
    return -log_alpha.exp() * (cql_gap.detach() - target_gap)


def actor_loss(actor: TanhGaussianActor, critic: Critic, z: torch.Tensor,
               entropy_alpha: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """SAC actor loss E[alpha_ent log pi(a|s) - min_heads Q(s, a)] -> (loss, log-probs (B,))."""
    actions, log_prob = actor.sample(z.detach(), 1)          # (B, 1, A), (B, 1)
    q = critic.q(z.detach(), actions).min(dim=0).values      # (B, 1)
    return (entropy_alpha.detach() * log_prob - q).mean(), log_prob[:, 0]


def entropy_alpha_loss(log_entropy_alpha: torch.Tensor, log_prob: torch.Tensor,
                       target_entropy: float) -> torch.Tensor:
    """Automatic entropy temperature: raise it while the policy entropy is below target."""
    return -(log_entropy_alpha * (log_prob.detach() + target_entropy)).mean()


# ----------------------------------------------------------------------------- algorithm


@dataclasses.dataclass
class CalQLStats:
    """Scalars of one update (the learner logs them under train/)."""

    loss: float
    loss_td: float
    loss_cql: float
    q_data: float
    cql_gap: float
    bound_rate: float
    target_q: float
    alpha: float
    loss_actor: float = float('nan')
    entropy: float = float('nan')
    entropy_alpha: float = float('nan')


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


class CalQL:
    """Owns the critic, its target, the optional actor and the temperatures; `update` trains.

    Give either `actor` (trained alongside, and the source of policy samples) or `sampler`
    (an external policy, PA-RL). The target critic is a frozen copy, outside every optimiser.
    `generator` (on the critic's device) seeds the uniform actions and the target-head subsets.
    """

    def __init__(self, critic: Critic, cfg: Optional[CalQLConfig] = None,
                 actor: Optional[TanhGaussianActor] = None,
                 sampler: Optional[PolicySampler] = None,
                 generator: Optional[torch.Generator] = None):
        if (actor is None) == (sampler is None):
            raise ValueError('CalQL needs exactly one of actor (trained here) or sampler '
                             '(an external policy)')
        self.cfg = cfg or CalQLConfig()
        self.critic, self.actor, self.generator = critic, actor, generator
        self.target_critic = copy.deepcopy(critic).requires_grad_(False)
        self.sample_policy = sampler or actor_sampler(actor)
        device = next(critic.parameters()).device
        self.log_alpha = torch.tensor(math.log(max(self.cfg.alpha, 1e-8)), device=device,
                                      requires_grad=self.cfg.lagrange)
        self.log_entropy_alpha = torch.zeros((), device=device, requires_grad=True)
        action_dim = critic.config.action_dim
        self.target_entropy = (-float(action_dim) if self.cfg.target_entropy is None
                               else self.cfg.target_entropy)
        self.reset_optimizers()

    def reset_optimizers(self) -> None:
        """Fresh Adam states (the offline -> online switch)."""
        cfg = self.cfg
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr)
        self.alpha_opt = self.actor_opt = self.entropy_opt = None
        if cfg.lagrange:
            self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=cfg.alpha_lr)
        if self.actor is not None:
            self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.actor_lr)
            self.entropy_opt = torch.optim.Adam([self.log_entropy_alpha], lr=cfg.alpha_lr)

    @property
    def alpha(self) -> torch.Tensor:
        """Current CQL weight (a constant unless Lagrange)."""
        return self.log_alpha.exp().detach() if self.cfg.lagrange else torch.tensor(self.cfg.alpha)

    def _autocast(self):
        device = next(self.critic.parameters()).device
        if self.cfg.autocast and device.type == 'cuda':
            return torch.autocast('cuda', dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def update(self, batch: CalQLBatch) -> CalQLStats:
        """One critic step (+ Lagrange alpha, + actor and entropy steps), then Polyak."""
        alpha = self.alpha
        with self._autocast():
            terms = critic_loss(self.critic, self.target_critic, batch, self.sample_policy,
                                alpha, self.cfg, self.generator)
        _step(self.critic_opt, terms.loss)
        if self.cfg.lagrange:
            _step(self.alpha_opt, lagrange_alpha_loss(self.log_alpha, terms.cql_gap,
                                                      self.cfg.target_action_gap))
        stats = terms._asdict()
        z = stats.pop('z')
        if self.actor is not None:
            stats.update(self._actor_step(z))
        polyak_update(self.target_critic, self.critic, self.cfg.tau)
        values = torch.stack([v.detach().float().reshape(()) for v in stats.values()]).tolist()
        return CalQLStats(alpha=float(alpha), **dict(zip(stats, values)))

    def _actor_step(self, z: torch.Tensor) -> dict:
        """SAC actor and entropy-temperature steps on the features z (B, F) -> named terms."""
        entropy_alpha = self.log_entropy_alpha.exp()
        with self._autocast():
            loss, log_prob = actor_loss(self.actor, self.critic, z, entropy_alpha)
        _step(self.actor_opt, loss)
        _step(self.entropy_opt, entropy_alpha_loss(self.log_entropy_alpha, log_prob,
                                                   self.target_entropy))
        return {'loss_actor': loss, 'entropy': -log_prob.mean(), 'entropy_alpha': entropy_alpha}
