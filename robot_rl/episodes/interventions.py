"""Intervention steps as their own replay source (as in HIL-SERL).

A person's teleoperated steps are stored in the episode like any other (the executed action),
flagged per step. The learner additionally keeps every run of consecutive flagged steps as a
short episode in a separate replay buffer, and draws a fixed share of each batch from it.

A segment of flagged steps i..j keeps step j + 1 as its final observation, so transition j still
has its true next observation and done flag. Its Monte-Carlo returns, recomputed over the
segment, are exact when the segment reaches the success and otherwise the failed-trajectory
value (-1 / (1 - gamma)), a lower bound of the true return: Cal-QL's calibration only raises Q
to the bound, so a low bound is inactive, never wrong.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Sequence

import numpy as np

from robot_rl.transport.steps import StepRecord
from robot_rl.types import Episode

INTERVENTION_STEPS = 'intervention_steps'
"""Episode metadata key: indices of the steps whose action was a person's."""


def step_metadata(steps: Sequence[StepRecord]) -> Dict[str, Any]:
    """Episode metadata for per-step annotations of `steps` (empty when there are none)."""
    flagged = [i for i, s in enumerate(steps) if s.intervention]
    return {INTERVENTION_STEPS: flagged} if flagged else {}


def intervention_flags(episode: Episode) -> np.ndarray:
    """bool (N,): the steps `episode.metadata` marks as interventions; ValueError if invalid."""
    flags = np.zeros(len(episode), bool)
    indices = episode.metadata.get(INTERVENTION_STEPS, [])
    bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < len(episode) - 1]
    if bad:
        raise ValueError(f'episode metadata {INTERVENTION_STEPS}: {bad} are not steps that '
                         f'start a transition (0..{len(episode) - 2})')
    flags[list(indices)] = True
    return flags


def intervention_segments(episode: Episode) -> List[Episode]:
    """Each run of consecutive intervention steps i..j as an episode of steps i..j + 1."""
    flags = intervention_flags(episode)
    segments = []
    t = 0
    while t < len(episode) - 1:
        if not flags[t]:
            t += 1
            continue
        start = t
        while t < len(episode) - 1 and flags[t]:
            t += 1
        steps = slice(start, t + 1)  # t is the first unflagged step: the final observation
        n = t + 1 - start
        is_terminal = np.zeros(n, bool)
        is_terminal[-1] = episode.is_terminal[t]
        segments.append(dataclasses.replace(
            episode, images=episode.images[steps], states=episode.states[steps],
            actions=episode.actions[steps], rewards=episode.rewards[steps],
            discounts=np.where(is_terminal, 0.0, 1.0).astype(np.float32),
            is_first=np.arange(n) == 0, is_last=np.arange(n) == n - 1, is_terminal=is_terminal,
            mc_returns=None, metadata={**{k: v for k, v in episode.metadata.items()
                                          if k != INTERVENTION_STEPS},
                                       'segment_start': start}).validate())
    return segments
