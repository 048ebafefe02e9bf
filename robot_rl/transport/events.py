"""Episode events (robot/sim -> policy, recorder) and the actor's step tracker.

An event is a small JSON object carried as a string, published once per control step with the
same stamp as the camera frame it belongs to:

    {"type": "step", "episode": int, "step": int, "stamp_ns": int, "state": [7 floats],
     "reward": float | null, "terminated": bool, "truncated": bool, "success": bool,
     "instruction": str}

`reward` is r_{t-1}, the reward that followed the previous action (null at step 0 or where no
reward source exists, e.g. the real robot). `ActorTracker` turns (observation, event, action)
triples into RLDS step records for the learner.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Optional

import numpy as np

from robot_rl.transport.steps import StepRecord
from robot_rl.types import ACTION_DIM, REWARD_STEP, STATE_DIM


@dataclasses.dataclass(frozen=True)
class StepEvent:
    episode: int
    step: int
    stamp_ns: int
    state: np.ndarray
    reward: Optional[float]
    terminated: bool
    truncated: bool
    success: bool
    instruction: str

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d['state'] = [float(x) for x in self.state]
        return json.dumps({'type': 'step', **d})


def parse_event(text: str) -> StepEvent:
    """JSON -> StepEvent; ValueError names the first bad field."""
    try:
        d: Dict[str, Any] = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f'event is not JSON: {exc}') from exc
    if not isinstance(d, dict) or d.get('type') != 'step':
        raise ValueError('event must be an object with "type": "step"')
    for name in ('episode', 'step', 'stamp_ns'):
        if not isinstance(d.get(name), int) or d[name] < 0:
            raise ValueError(f'event.{name} must be a non-negative integer')
    state = np.asarray(d.get('state'), dtype=np.float32)
    if state.shape != (STATE_DIM,) or not np.isfinite(state).all():
        raise ValueError(f'event.state must be {STATE_DIM} finite numbers')
    reward = d.get('reward')
    if reward is not None and not (isinstance(reward, (int, float)) and np.isfinite(reward)):
        raise ValueError('event.reward must be a finite number or null')
    flags = {k: d.get(k, False) for k in ('terminated', 'truncated', 'success')}
    if not all(isinstance(v, bool) for v in flags.values()):
        raise ValueError('event.terminated/truncated/success must be booleans')
    return StepEvent(episode=d['episode'], step=d['step'], stamp_ns=d['stamp_ns'], state=state,
                     reward=None if reward is None else float(reward),
                     instruction=str(d.get('instruction', '')), **flags)


class ActorTracker:
    """Pairs each action with the observation it was chosen from and the reward that followed.

    Call `observe(image, event)` with a new observation: it returns the step records that became
    complete (the pending step, now that r_t is known, and the final step when the event ends the
    episode). Call `acted(image, event, action, version)` after publishing an action.
    """

    def __init__(self):
        self._pending: Optional[StepRecord] = None
        self._pending_episode = -1

    def observe(self, image: np.ndarray, event: StepEvent) -> List[StepRecord]:
        out = []
        pending, self._pending = self._pending, None
        if pending is not None and self._pending_episode == event.episode \
                and event.step == pending.step + 1:
            pending.reward = REWARD_STEP if event.reward is None else event.reward
            out.append(pending)
            if event.done:
                out.append(StepRecord(step=event.step, image=image, state=event.state,
                                      action=np.zeros(ACTION_DIM, np.float32), reward=0.0,
                                      is_first=False, is_last=True,
                                      is_terminal=event.terminated,
                                      policy_version=pending.policy_version))
        return out

    def acted(self, image: np.ndarray, event: StepEvent, action: np.ndarray,
              version: int, intervention: bool = False) -> None:
        """`action` was sent from `event`'s observation; `intervention`: a person's action."""
        self._pending = StepRecord(step=event.step, image=image, state=event.state,
                                   action=np.asarray(action, np.float32), reward=0.0,
                                   is_first=event.step == 0, is_last=False, is_terminal=False,
                                   policy_version=version, intervention=intervention)
        self._pending_episode = event.episode
