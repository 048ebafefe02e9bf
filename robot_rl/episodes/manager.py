"""The episode state machine of a real-robot (or simulated) session, with no ROS inside.

On hardware nothing says when a task succeeded, so a person (or a classifier) labels episodes.
`EpisodeManager` owns the rules; the episode manager node feeds it keys, labels, executed steps
and the clock, and publishes what it returns.

Phases:
    idle       no episode; `start` begins the reset routine
    resetting  the arm goes home (reset routine, `reset_timeout_s`); success -> running,
               timeout -> idle with the reason in `message`
    running    an episode: every executed step is counted; `max_steps` ends it unlabelled
    paused     the same episode, no actions; `resume` -> running
    estop      emergency stop: ends the running episode unlabelled; `release` -> idle

Labels (success or failure) close an episode with the sparse reward convention: success = final
reward 0 on a terminal step, failure = final reward -1 on a truncated (non-terminal) step. An
episode that ended unlabelled (step limit, e-stop, `end`) still accepts one label for
`late_label_window_s` after it ended; when the window passes with none, it closes as a failure
labelled by 'window expired'. Rejected labels raise `LabelRejected` with the reason.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

from robot_rl.types import REWARD_STEP, REWARD_SUCCESS

IDLE, RESETTING, RUNNING, PAUSED, ESTOP = 'idle', 'resetting', 'running', 'paused', 'estop'
PHASES = (IDLE, RESETTING, RUNNING, PAUSED, ESTOP)
EXPIRED = 'window expired'
"""Label source of an episode that ended unlabelled and got no label within the window."""


class LabelRejected(ValueError):
    """A label that cannot apply; the message says why (unknown episode, labelled, too late)."""


class CommandRejected(ValueError):
    """A command that does not apply in the current phase; the message says why."""


@dataclasses.dataclass(frozen=True)
class ManagerConfig:
    max_steps: int = 0
    """End the episode (unlabelled) after this many executed steps; 0 = no limit."""
    late_label_window_s: float = 10.0
    """How long after an unlabelled end a label still applies (s)."""
    reset_timeout_s: float = 20.0
    """The reset routine fails after this long (s)."""

    def __post_init__(self):
        if self.max_steps < 0:
            raise ValueError(f'max_steps must be >= 0, got {self.max_steps}')
        if self.late_label_window_s < 0:
            raise ValueError(f'late_label_window_s must be >= 0, got {self.late_label_window_s}')
        if self.reset_timeout_s <= 0:
            raise ValueError(f'reset_timeout_s must be > 0, got {self.reset_timeout_s}')


@dataclasses.dataclass(frozen=True)
class EpisodeResult:
    """A closed episode: what the learner and the recorder need to know about its end."""

    episode: int
    success: bool
    steps: int
    label_source: str
    """'keyboard', 'topic', 'service', 'classifier', ... or EXPIRED."""
    late: bool
    """The label arrived after the episode had ended."""
    ended_by: str
    """'label', 'step limit', 'estop' or 'end'."""
    instruction: str
    classifier_probability: Optional[float] = None
    """The success classifier's latest P(success) for the episode (its final frame once it
    ended); None when no classifier looked at it."""

    @property
    def reward(self) -> float:
        """The final transition's reward (sparse convention)."""
        return REWARD_SUCCESS if self.success else REWARD_STEP

    @property
    def terminal(self) -> bool:
        """Success ends the task (terminal); a failure is a truncation."""
        return self.success

    def to_dict(self) -> Dict[str, object]:
        return {**dataclasses.asdict(self), 'reward': self.reward, 'terminal': self.terminal}


@dataclasses.dataclass
class Ended:
    """An episode that ended unlabelled and awaits a label."""

    steps: int
    ended_at: float
    ended_by: str
    instruction: str


class EpisodeManager:
    """Start/step/pause/resume/estop/label/reset rules; see the module docstring.

    `now` is a monotonic time in seconds, passed in so tests control the clock. Closed
    episodes come out of `pop_results()` in the order they closed.
    """

    def __init__(self, config: ManagerConfig = ManagerConfig()):
        self.config = config
        self.phase = IDLE
        self.episode = -1
        """Id of the current (or last) episode; -1 before the first."""
        self.steps = 0
        self.instruction = ''
        self.message = ''
        """Why the last thing that did not happen did not happen (shown in the status line)."""
        self._reset_deadline: Optional[float] = None
        self._labelled: Dict[int, EpisodeResult] = {}
        self._ended: Dict[int, Ended] = {}
        self._probabilities: Dict[int, float] = {}
        self._results: List[EpisodeResult] = []

    # ------------------------------------------------------------------ episodes

    def start(self, instruction: str, now: float) -> None:
        """Begin the reset routine that precedes the next episode (from idle only)."""
        if self.phase != IDLE:
            raise CommandRejected(f'cannot start an episode while {self.phase}')
        if not instruction.strip():
            raise CommandRejected('cannot start an episode without an instruction')
        self.instruction = instruction.strip()
        self.phase = RESETTING
        self._reset_deadline = now + self.config.reset_timeout_s
        self.message = ''

    def reset_done(self, ok: bool, now: float, reason: str = '') -> None:
        """The reset routine finished: ok -> a new episode runs; not ok -> idle, with reason."""
        if self.phase != RESETTING:
            return  # a late answer (after a timeout or an e-stop) changes nothing
        self._reset_deadline = None
        if not ok:
            self.phase = IDLE
            self.message = f'reset failed: {reason or "no reason given"}'
            return
        self.episode += 1
        self.steps = 0
        self.phase = RUNNING
        self.message = ''

    def step(self, now: float) -> None:
        """One executed action of the running episode (ignored in any other phase)."""
        if self.phase != RUNNING:
            return
        self.steps += 1
        if self.config.max_steps and self.steps >= self.config.max_steps:
            self._end('step limit', now)

    def end(self, now: float) -> None:
        """End the running or paused episode without a label (a late label may follow)."""
        if self.phase not in (RUNNING, PAUSED):
            raise CommandRejected(f'no episode to end while {self.phase}')
        self._end('end', now)

    def pause(self) -> None:
        if self.phase != RUNNING:
            raise CommandRejected(f'cannot pause while {self.phase}')
        self.phase = PAUSED

    def resume(self) -> None:
        if self.phase != PAUSED:
            raise CommandRejected(f'cannot resume while {self.phase}')
        self.phase = RUNNING

    def estop(self, now: float) -> None:
        """Emergency stop, from any phase: a running or paused episode ends unlabelled."""
        if self.phase in (RUNNING, PAUSED):
            self._end('estop', now)
        self.phase = ESTOP
        self._reset_deadline = None
        self.message = 'e-stop engaged'

    def release(self) -> None:
        if self.phase != ESTOP:
            raise CommandRejected('the e-stop is not engaged')
        self.phase = IDLE
        self.message = ''

    def tick(self, now: float) -> None:
        """Time passes: reset timeouts and expired late-label windows."""
        if self.phase == RESETTING and now >= self._reset_deadline:
            self._reset_deadline = None
            self.phase = IDLE
            self.message = (f'reset timed out after {self.config.reset_timeout_s:g} s: bring the '
                            'arm home by hand, then start again')
        for episode, ended in sorted(self._ended.items()):
            if now > ended.ended_at + self.config.late_label_window_s:
                self._close(episode, False, EXPIRED, late=True)

    # ------------------------------------------------------------------ labels

    def label(self, success: bool, source: str, now: float,
              episode: Optional[int] = None) -> EpisodeResult:
        """Apply a label; `episode` None = the running episode, else the latest unlabelled one.

        Raises LabelRejected naming the reason: no such episode, already labelled, or later
        than the late-label window.
        """
        target = self._target(episode)
        if target in self._labelled:
            done = self._labelled[target]
            if done.label_source == EXPIRED:
                raise LabelRejected(f'the late-label window of episode {target} closed '
                                    f'({self.config.late_label_window_s:g} s); it was closed '
                                    'as a failure')
            raise LabelRejected(f'episode {target} is already labelled '
                                f'{"success" if done.success else "failure"} '
                                f'(by {done.label_source})')
        if target == self.episode and self.phase in (RUNNING, PAUSED):
            self._end('label', now)
            return self._close(target, success, source, late=False)
        ended = self._ended[target]
        late_by = now - ended.ended_at
        if late_by > self.config.late_label_window_s:
            raise LabelRejected(f'the label for episode {target} came {late_by:.1f} s after it '
                                f'ended; the late-label window is '
                                f'{self.config.late_label_window_s:g} s')
        return self._close(target, success, source, late=True)

    def _target(self, episode: Optional[int]) -> int:
        if episode is None:
            if self.phase in (RUNNING, PAUSED):
                return self.episode
            if not self._ended:
                raise LabelRejected('no running episode and no ended episode awaits a label')
            return max(self._ended)
        if not isinstance(episode, int) or isinstance(episode, bool):
            raise LabelRejected(f'episode must be an integer, got {episode!r}')
        if episode < 0 or episode > self.episode:
            known = f'0..{self.episode}' if self.episode >= 0 else 'none yet'
            raise LabelRejected(f'episode {episode} does not exist (episodes: {known})')
        return episode

    def record_probability(self, episode: int, probability: float) -> None:
        """Keep a success classifier's P(success) for the running episode or one awaiting a
        label; it travels with the episode's result, whoever labels it."""
        if not (episode == self.episode and self.phase in (RUNNING, PAUSED)
                or episode in self._ended):
            raise LabelRejected(f'episode {episode} is neither running nor awaiting a label')
        if not 0.0 <= probability <= 1.0:  # also rejects NaN
            raise ValueError(f'classifier probability must be in [0, 1], got {probability!r}')
        self._probabilities[episode] = float(probability)

    def ended(self, episode: int) -> Ended:
        """An episode awaiting a label: its steps, end time, how it ended ('step limit',
        'estop' or 'end') and its instruction."""
        if episode not in self._ended:
            raise KeyError(f'episode {episode} is not awaiting a label '
                           f'(awaiting: {self.awaiting_label})')
        return dataclasses.replace(self._ended[episode])

    @property
    def awaiting_label(self) -> List[int]:
        """Episodes that ended unlabelled and whose late-label window is still open."""
        return sorted(self._ended)

    def pop_results(self) -> List[EpisodeResult]:
        out, self._results = self._results, []
        return out

    def _end(self, ended_by: str, now: float) -> None:
        self._ended[self.episode] = Ended(self.steps, now, ended_by, self.instruction)
        self.phase = IDLE

    def _close(self, episode: int, success: bool, source: str, late: bool) -> EpisodeResult:
        ended = self._ended.pop(episode)
        result = EpisodeResult(episode=episode, success=bool(success), steps=ended.steps,
                               label_source=source, late=late, ended_by=ended.ended_by,
                               instruction=ended.instruction,
                               classifier_probability=self._probabilities.pop(episode, None))
        self._labelled[episode] = result
        self._results.append(result)
        return result

    def status(self) -> Dict[str, object]:
        """A JSON-able snapshot: phase, episode, step, instruction, episodes awaiting a label."""
        return {'phase': self.phase, 'episode': self.episode, 'step': self.steps,
                'instruction': self.instruction, 'awaiting_label': self.awaiting_label,
                'message': self.message}


@dataclasses.dataclass(frozen=True)
class LabelMessage:
    success: bool
    episode: Optional[int]
    source: str


def parse_label(text: str, default_source: str = 'topic') -> LabelMessage:
    """A label message, JSON {"success": bool, "episode": int (optional), "source": str
    (optional)}; LabelRejected names what is wrong with it."""
    import json
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LabelRejected(f'label is not JSON: {exc}') from exc
    if not isinstance(d, dict):
        raise LabelRejected('label must be a JSON object with "success" (and "episode")')
    if not isinstance(d.get('success'), bool):
        raise LabelRejected(f'label.success must be true or false, got {d.get("success")!r}')
    episode = d.get('episode')
    if episode is not None and (not isinstance(episode, int) or isinstance(episode, bool)):
        raise LabelRejected(f'label.episode must be an integer, got {episode!r}')
    source = d.get('source', default_source)
    if not isinstance(source, str) or not source.strip():
        raise LabelRejected('label.source must be a non-empty string')
    return LabelMessage(d['success'], episode, source.strip())
