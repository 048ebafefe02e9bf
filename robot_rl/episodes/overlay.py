"""The actor's view of managed episodes: robot steps renumbered into the manager's episodes.

Without an episode manager the robot (or simulator) says where episodes start and end and what
the reward was. With one, the manager does: its `episode/state` messages say which episode runs,
its results say how each one ended (a person's or a classifier's label). `EpisodeOverlay`
rewrites the robot's step events accordingly, so the simulator's ground-truth reward never
reaches the learner, and holds each episode's last steps until its result arrives (a late label
lands on the right episode while the next one already runs).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from robot_rl.episodes.manager import PHASES, RUNNING
from robot_rl.transport.events import StepEvent
from robot_rl.transport.steps import StepRecord
from robot_rl.types import REWARD_STEP


@dataclasses.dataclass(frozen=True)
class EpisodeState:
    """The manager's latched state: phase, episode id, instruction."""

    phase: str
    episode: int
    instruction: str

    @property
    def running(self) -> bool:
        return self.phase == RUNNING


def parse_state(text: str) -> EpisodeState:
    """JSON of `EpisodeManager.status()` -> EpisodeState; ValueError names the bad field."""
    d = _json_object(text, 'episode state')
    if d.get('phase') not in PHASES:
        raise ValueError(f'episode state: phase must be one of {PHASES}, got {d.get("phase")!r}')
    if not isinstance(d.get('episode'), int) or d['episode'] < -1:
        raise ValueError('episode state: episode must be an integer >= -1')
    if not isinstance(d.get('instruction', ''), str):
        raise ValueError('episode state: instruction must be a string')
    return EpisodeState(d['phase'], d['episode'], d.get('instruction', ''))


@dataclasses.dataclass(frozen=True)
class ResultMessage:
    episode: int
    success: bool
    reward: float
    terminal: bool


def parse_result(text: str) -> ResultMessage:
    """JSON of `EpisodeResult.to_dict()` -> the fields the actor needs; ValueError otherwise."""
    d = _json_object(text, 'episode result')
    if not isinstance(d.get('episode'), int) or d['episode'] < 0:
        raise ValueError('episode result: episode must be a non-negative integer')
    if not isinstance(d.get('success'), bool):
        raise ValueError('episode result: success must be a boolean')
    reward = d.get('reward')
    if not isinstance(reward, (int, float)) or not np.isfinite(reward):
        raise ValueError('episode result: reward must be a finite number')
    return ResultMessage(d['episode'], d['success'], float(reward), bool(d.get('terminal')))


def _json_object(text: str, what: str) -> Dict[str, Any]:
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f'{what} is not JSON: {exc}') from exc
    if not isinstance(d, dict):
        raise ValueError(f'{what} must be a JSON object')
    return d


class EpisodeOverlay:
    """Renumbers robot steps into managed episodes and closes them with the manager's result.

    `rewrite(stamp_ns, state)` -> the StepEvent of a new observation while an episode runs
    (None otherwise); `ended()` -> the id of the episode that just stopped running (once);
    `hold(episode, records)` keeps an ended episode's last two records (the final observation
    and the step before it, whose reward the label decides); `close(result)` returns them with
    the label's reward and terminal flag applied.
    """

    def __init__(self):
        self.state: Optional[EpisodeState] = None
        self._step = 0
        self._running: Optional[int] = None
        self._held: Dict[int, List[StepRecord]] = {}
        self._early: Dict[int, ResultMessage] = {}

    @property
    def managed(self) -> bool:
        return self.state is not None

    def on_state(self, state: EpisodeState) -> Optional[int]:
        """Take a new manager state; return the episode that stopped running, if one did."""
        self.state = state
        stopped = None
        if self._running is not None and not (state.running and state.episode == self._running):
            if not (state.phase == 'paused' and state.episode == self._running):
                stopped, self._running = self._running, None
        if state.running and self._running is None:
            self._running, self._step = state.episode, 0
        return stopped

    def rewrite(self, stamp_ns: int, state: np.ndarray) -> Optional[StepEvent]:
        """The managed step event of a new observation (reward r_{t-1} = -1: the outcome is
        the label's, applied at `close`); None when no episode runs."""
        if self._running is None or not self.state.running:
            return None
        event = StepEvent(episode=self._running, step=self._step, stamp_ns=int(stamp_ns),
                          state=np.asarray(state, np.float32),
                          reward=None if self._step == 0 else REWARD_STEP, terminated=False,
                          truncated=False, success=False, instruction=self.state.instruction)
        self._step += 1
        return event

    def final_event(self, episode: int, stamp_ns: int, state: np.ndarray) -> StepEvent:
        """The closing observation of `episode` (reward and terminal filled in by `close`)."""
        return StepEvent(episode=episode, step=self._step, stamp_ns=int(stamp_ns),
                         state=np.asarray(state, np.float32), reward=REWARD_STEP,
                         terminated=False, truncated=True, success=False,
                         instruction=self.state.instruction if self.state else '')

    def hold(self, episode: int, records: List[StepRecord]) -> List[StepRecord]:
        """Keep `episode`'s final records until its result; return them at once if it came."""
        self._held[episode] = list(records)
        if episode in self._early:
            return self.close(self._early.pop(episode))
        return []

    def close(self, result: ResultMessage) -> List[StepRecord]:
        """The held final records of `result.episode` with its reward and terminal flag."""
        records = self._held.pop(result.episode, None)
        if records is None:
            self._early[result.episode] = result  # the label beat the episode's last frame
            while len(self._early) > 64:  # results of episodes that had no step at all
                self._early.pop(min(self._early))
            return []
        if len(records) >= 2:
            records[-2].reward = result.reward
        if records:
            records[-1].is_terminal = result.terminal
        return records

    @property
    def awaiting(self) -> List[int]:
        return sorted(self._held)


def result_metadata(result: Mapping[str, Any]) -> Dict[str, Any]:
    """The label fields recorded with an episode (RLDS episode metadata); the success
    classifier's P(success) when one looked at the episode."""
    return {'label': {k: result[k] for k in ('success', 'label_source', 'late', 'ended_by',
                                             'reward', 'classifier_probability')
                      if result.get(k) is not None}}
