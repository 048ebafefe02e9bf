"""PA-RL (Sobol Mark et al., 2024): policy-agnostic actor-critic, top to bottom.

The policy-gradient step is replaced by supervised learning on optimised actions, so any policy
class with `sample_actions`-style sampling and a `supervised_loss` can be improved:

1. global optimisation: sample N actions per observation from the policy, score them with the
   critic (mean over the ensemble), keep the top m;
2. local optimisation: a few steps of gradient ascent on each kept action,
   a <- clip(a + step_size * dQ/da), keeping the best value seen;
3. pick the argmax (or sample softmax(Q / temperature));
4. distil: one step of the policy's own `supervised_loss` on the optimised actions (when
   distilling, the dataset action replaces the worst candidate first; gripper commands are
   distilled open or closed, as executed).

The critic is Cal-QL (robot_rl.rl.calql) with `parl_sampler` as its policy sampler, so its TD
target uses Q(s', optimised action). Actions are optimised in the critic's normalised units and
converted to the policy's units to distil: the two checkpoints may carry different normalisers.
Chunk policies (H > 1): with scoring 'first_action' (as published) the critic scores and
optimises the chunk's first action, and the actor executes, and distillation imitates, the
chosen sampled chunk with that first action replaced; with scoring 'chunk' a candidate is the
whole chunk, valued by the mean Q of its actions at the current observation (V-GPS's chunk
scoring), and every action of it is optimised, executed and imitated.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch

from policies.common import ChunkPolicy, PolicyBatch
from robot_rl.models.critic import Critic
from robot_rl.rl.calql import PolicyInput, PolicySampler, Samples
from robot_rl.steering.execution import GRIPPER, GRIPPER_THRESHOLD
from robot_rl.types import ActionSpace


SCORINGS = ('first_action', 'chunk')


@dataclasses.dataclass
class PARLConfig:
    num_samples: int = 32
    """N: actions sampled from the policy per observation (global step)."""
    top_m: int = 10
    """m: candidates kept for gradient ascent."""
    gradient_steps: int = 10
    step_size: float = 3e-4
    """Gradient-ascent step on normalised actions (the published 3e-4)."""
    temperature: float = 0.0
    """0: the argmax of Q; > 0: sample softmax(Q / temperature)."""
    scoring: str = 'first_action'
    """What a candidate is: the chunk's first action ('first_action', PA-RL as published) or
    the whole chunk, valued by the mean Q of its actions ('chunk': what steers this project's
    simulated generalist, README)."""
    binary_gripper: bool = True
    """Distil gripper commands as the robot executes them, open or closed (the sticky
    gripper's threshold): a sampler's in-between values, distilled, become more frequent in
    the next samples until the gripper stops closing."""

    def __post_init__(self):
        if not 1 <= self.top_m <= self.num_samples:
            raise ValueError(f'need 1 <= top_m <= num_samples, got {self.top_m} and '
                             f'{self.num_samples}')
        if self.scoring not in SCORINGS:
            raise ValueError(f'scoring must be one of {SCORINGS}, got {self.scoring!r}')
        if self.gradient_steps < 0 or self.step_size < 0 or self.temperature < 0:
            raise ValueError('gradient_steps, step_size and temperature must be >= 0')


class Optimised(NamedTuple):
    candidates: torch.Tensor  # (B, m, A) or (B, m, H, A) optimised, critic units, best first
    values: torch.Tensor      # (B, m) their ensemble-mean Q
    chosen: torch.Tensor      # (B,) index of the selected candidate
    sources: torch.Tensor     # (B, m) which of the N samples each came from (-1: the dataset's)


class UnitMap:
    """Affine map between two normalisers: policy units <-> critic units (torch, batched)."""

    def __init__(self, policy_space: ActionSpace, critic_space: ActionSpace,
                 device: torch.device):
        def half_and_mid(space):
            low, high = (torch.as_tensor(v, device=device) for v in (space.low, space.high))
            return (high - low) / 2, (high + low) / 2
        self.p_half, self.p_mid = half_and_mid(policy_space)
        self.c_half, self.c_mid = half_and_mid(critic_space)

    def to_critic(self, x: torch.Tensor) -> torch.Tensor:
        return ((x * self.p_half + self.p_mid - self.c_mid) / self.c_half).clamp(-1.0, 1.0)

    def to_policy(self, x: torch.Tensor) -> torch.Tensor:
        return ((x * self.c_half + self.c_mid - self.p_mid) / self.p_half).clamp(-1.0, 1.0)


def candidate_values(critic: Critic, z: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(B, N) ensemble-mean Q of candidates (B, N, A), or of chunks (B, N, H, A) as the mean
    over each chunk's actions, all valued at the current observation."""
    b, n = candidates.shape[:2]
    q = critic.q(z, candidates.reshape(b, -1, candidates.shape[-1])).mean(0)
    return q.reshape(b, n, -1).mean(-1)


def pick(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values (B, N, ...) at index (B, k) along dim 1 -> (B, k, ...)."""
    index = index.reshape(*index.shape, *[1] * (values.dim() - 2))
    return torch.gather(values, 1, index.expand(-1, -1, *values.shape[2:]))


def optimise_actions(critic: Critic, z: torch.Tensor, candidates: torch.Tensor,
                     cfg: PARLConfig, data_actions: Optional[torch.Tensor] = None,
                     generator: Optional[torch.Generator] = None) -> Optimised:
    """Steps 1-3 for z (B, F) and N candidates in the critic's units: actions (B, N, A) or
    chunks (B, N, H, A) (see `candidate_values`).

    data_actions (B, A), when given, replaces the worst optimised candidate (distillation; as a
    chunk, the data action at every step, so its value is its own Q).
    """
    z = z.detach()
    with torch.no_grad():  # 1. global: keep the top m by ensemble-mean Q
        q = candidate_values(critic, z, candidates)                      # (B, N)
        top = q.topk(cfg.top_m, dim=1).indices
        kept = pick(candidates, top)
    best, best_q, sources = kept.clone(), torch.gather(q, 1, top), top.clone()
    actions = kept.clone()

    def where(better, new, old):
        return torch.where(better.reshape(*better.shape, *[1] * (new.dim() - 2)), new, old)

    for _ in range(cfg.gradient_steps):  # 2. local: gradient ascent, keep the best seen
        actions.requires_grad_(True)
        value = candidate_values(critic, z, actions)                     # (B, m)
        grad, = torch.autograd.grad(value.sum(), actions)
        with torch.no_grad():
            better = value > best_q
            best = where(better, actions, best)
            best_q = torch.where(better, value, best_q)
            actions = (actions + cfg.step_size * grad).clamp(-1.0, 1.0)
    with torch.no_grad():
        final = candidate_values(critic, z, actions)
        better = final > best_q
        best = where(better, actions, best)
        best_q = torch.where(better, final, best_q)
        if data_actions is not None:
            worst = best_q.argmin(dim=1)
            rows = torch.arange(best.shape[0], device=best.device)
            data = data_actions.to(best.dtype)
            if best.dim() == 4:
                data = data[:, None].expand(-1, best.shape[2], -1)
            best[rows, worst] = data
            best_q[rows, worst] = candidate_values(critic, z, data[:, None].to(z.dtype))[:, 0]
            sources[rows, worst] = -1
        order = best_q.argsort(dim=1, descending=True)
        best = pick(best, order)
        best_q = torch.gather(best_q, 1, order)
        sources = torch.gather(sources, 1, order)
        if cfg.temperature == 0:  # 3. select
            chosen = torch.zeros(best.shape[0], dtype=torch.long, device=best.device)
        else:
            probs = torch.softmax(best_q / cfg.temperature, dim=1)
            chosen = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return Optimised(best.detach(), best_q, chosen, sources)


def sample_chunks(policy: ChunkPolicy, images: torch.Tensor, lang_emb: torch.Tensor,
                  n: int) -> torch.Tensor:
    """(B, n, H, A) chunks in the policy's units, from one encoding per observation."""
    with torch.no_grad():
        return policy.head_sample(policy.encode(images, lang_emb), n).clamp(-1.0, 1.0)


def scored(chunks: torch.Tensor, units: UnitMap, cfg: PARLConfig) -> torch.Tensor:
    """The candidates of sampled chunks (B, N, H, A), policy units, in the critic's units:
    their first actions (B, N, A), or whole chunks (B, N, H, A) when scoring 'chunk'."""
    return units.to_critic(chunks if cfg.scoring == 'chunk' else chunks[:, :, 0])


def parl_sampler(policy: ChunkPolicy, critic: Critic, units: UnitMap,
                 cfg: PARLConfig) -> PolicySampler:
    """Cal-QL's policy sampler for PA-RL: the first actions of the n best optimised candidates
    (log-probs unknown)."""
    def sample(obs: PolicyInput, n: int) -> Samples:
        chunks = sample_chunks(policy, obs.images, obs.lang_emb, cfg.num_samples)
        with torch.enable_grad():
            optimised = optimise_actions(critic, obs.z, scored(chunks, units, cfg), cfg)
        best = optimised.candidates[:, :min(n, cfg.top_m)]
        return (best[:, :, 0] if cfg.scoring == 'chunk' else best), None
    return sample


class Choice(NamedTuple):
    """The optimised policy's choice. chunk: the sampled chunk the candidate came from, its
    optimised part (first action, or all of it) put in; when the dataset action was chosen,
    the best sampled chunk with the dataset action first (its later steps are the policy's,
    not the data's)."""

    action: torch.Tensor     # (B, A) the selected optimised (first) action, critic units
    value: torch.Tensor      # (B,) its ensemble-mean Q
    chunk: torch.Tensor      # (B, H, A) policy units
    from_data: torch.Tensor  # (B,) bool: the dataset action was chosen


def optimised_actions(policy: ChunkPolicy, critic: Critic, images: torch.Tensor,
                      lang_emb: torch.Tensor, units: UnitMap, cfg: PARLConfig,
                      data_actions: Optional[torch.Tensor] = None,
                      generator: Optional[torch.Generator] = None,
                      states: Optional[torch.Tensor] = None) -> Choice:
    """Steps 1-3 from observations: the optimised policy's choice for each observation.

    What the actor executes online (the chunk) and what distillation imitates (the action).
    data_actions (B, A), critic units, replace the worst candidate (distillation only).
    states (B, S): the robot state, for a critic that reads it.
    """
    with torch.no_grad():
        z = critic.encode(images, lang_emb, states)
    chunks = sample_chunks(policy, images, lang_emb, cfg.num_samples)
    with torch.enable_grad():
        optimised = optimise_actions(critic, z, scored(chunks, units, cfg), cfg, data_actions,
                                     generator)
    rows = torch.arange(images.shape[0], device=images.device)
    selected = optimised.candidates[rows, optimised.chosen]   # (B, A) or (B, H, A)
    source = optimised.sources[rows, optimised.chosen]
    from_data = source < 0
    first_sampled = (optimised.sources >= 0).int().argmax(dim=1)  # best first: the top one
    best_sampled = optimised.sources[rows, first_sampled].clamp(min=0)
    source = torch.where(from_data, best_sampled, source)
    chunk = chunks[rows, source].clone()
    if cfg.scoring == 'chunk':
        chunk = torch.where(from_data[:, None, None], chunk, units.to_policy(selected))
        action = selected[:, 0]
    else:
        action = selected
    chunk[:, 0] = units.to_policy(action)
    return Choice(action, optimised.values[rows, optimised.chosen], chunk, from_data)


def executed_gripper(chunk: torch.Tensor, space: ActionSpace) -> torch.Tensor:
    """chunk (..., 7) in `space`'s normalised units with the gripper command binarised to
    open (1) or closed (0) at the sticky gripper's threshold, as the robot executes it."""
    low, high = float(space.low[GRIPPER]), float(space.high[GRIPPER])
    half, mid = (high - low) / 2, (high + low) / 2
    command = chunk[..., GRIPPER] * half + mid
    executed = (command > GRIPPER_THRESHOLD).to(chunk.dtype)
    out = chunk.clone()
    out[..., GRIPPER] = (executed - mid) / half
    return out


def distillation_batch(policy: ChunkPolicy, critic: Critic, images: torch.Tensor,
                       lang_emb: torch.Tensor, data_actions: torch.Tensor, units: UnitMap,
                       cfg: PARLConfig, generator: Optional[torch.Generator] = None,
                       states: Optional[torch.Tensor] = None) -> PolicyBatch:
    """Step 4's targets: the chosen chunk, its first action optimised.

    The whole sampled chunk is the target, so the policy keeps seeing chunks of its own kind
    (a chunk of one repeated action would pull it off its distribution); where the dataset
    action was chosen only that first step is supervised. data_actions (B, A) are in the
    critic's units (a replay batch's actions).
    """
    choice = optimised_actions(policy, critic, images, lang_emb, units, cfg, data_actions,
                               generator, states)
    mask = torch.ones(choice.chunk.shape[:2], device=images.device)
    mask[choice.from_data, 1:] = 0.0
    chunk = (executed_gripper(choice.chunk, policy.action_space) if cfg.binary_gripper
             else choice.chunk)
    return PolicyBatch(images, lang_emb, chunk, mask)


def distil(policy: ChunkPolicy, optimizer: torch.optim.Optimizer, batch: PolicyBatch,
           grad_clip: float = 1.0) -> float:
    """One supervised step of the policy's own loss on optimised actions -> the loss."""
    policy.train()
    loss = policy.supervised_loss(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip)
    optimizer.step()
    return loss.item()
