"""A learned success classifier labelling episodes at run time, with a person as the fallback.

`ClassifierLabeller` watches an `EpisodeManager` and asks a probability function
(frame, instruction) -> P(success) about two moments:

- while an episode runs, every `check_every_steps` executed steps (0 = never): a confident
  success (P >= confidence) ends the episode with the label source 'classifier'; anything else
  lets it run on (the task may still succeed later);
- when an episode ended unlabelled by the step limit or `end`, its final frame: a confident call
  (max(P, 1 - P) >= confidence, robot_rl.rewards.classifier.propose) labels it success or
  failure (source 'classifier', a late label); below the threshold the classifier asks and a
  person labels it (keyboard, topic or service) within the late-label window, after which it
  closes as a failure as any unlabelled episode does. An e-stopped episode is left to a person.

A person's label that comes first wins (the classifier skips labelled episodes, and a person's
label after the classifier's is rejected as for any second label). Every probability the
classifier computed for an episode goes to the manager (`record_probability`), so the episode's
result carries the latest one whoever labelled it.

The work is split in two so the model never runs inside a subscription callback: `note` (cheap,
after every change) keeps the frames that need a look, `run` (from a timer) runs the model on
them and applies its labels. Frames are opaque here: whatever the probability function takes
(a uint8 HxWx3 array, or a camera message the node decodes).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple

from robot_rl.episodes.manager import EpisodeManager, LabelRejected, RUNNING

CLASSIFIER = 'classifier'
"""Label source of the classifier's labels."""
JUDGED_ENDS = ('step limit', 'end')
"""Unlabelled ends whose final frame the classifier judges (an e-stop is left to a person)."""

ProbabilityFn = Callable[[Any, str], float]
"""(frame, instruction) -> P(success) in [0, 1]."""


@dataclasses.dataclass(frozen=True)
class Judgement:
    """One look of the classifier at an episode."""

    episode: int
    decision: str
    """'success', 'failure' or 'ask' (robot_rl.rewards.classifier.propose)."""
    probability: Optional[float]
    """P(success); None when the classifier could not run (see `reason`)."""
    final: bool
    """The episode's final frame (else a check while it runs)."""
    applied: bool
    """The label reached the manager (a confident final call, or a confident mid-episode
    success)."""
    reason: str = ''
    """Why the classifier could not run or its label was rejected; empty otherwise."""


class ClassifierLabeller:
    """Proposes labels to an EpisodeManager from P(success); see the module docstring."""

    def __init__(self, probability: ProbabilityFn, confidence: float = 0.8,
                 check_every_steps: int = 0):
        if not callable(probability):
            raise TypeError(f'probability must be a function (frame, instruction) -> '
                            f'P(success), got {type(probability).__name__}')
        if (isinstance(confidence, bool) or not isinstance(confidence, (int, float))
                or not 0.5 <= confidence <= 1.0):
            raise ValueError(f'classifier confidence must be in [0.5, 1] (max(p, 1 - p) at or '
                             f'above it is confident), got {confidence!r}')
        if (isinstance(check_every_steps, bool) or not isinstance(check_every_steps, int)
                or check_every_steps < 0):
            raise ValueError(f'check_every_steps must be an integer >= 0 (0 = no checks while '
                             f'an episode runs), got {check_every_steps!r}')
        self.probability = probability
        self.confidence = float(confidence)
        self.check_every_steps = check_every_steps
        self._check: Optional[Tuple[int, int, Any]] = None  # (episode, step, frame) to look at
        self._checked: Tuple[int, int] = (-1, -1)
        self._finals: Dict[int, Any] = {}  # ended episode -> its final frame, to look at
        self._seen_ends: set = set()
        self._asking: Dict[int, Optional[float]] = {}

    def note(self, manager: EpisodeManager, frame: Any) -> None:
        """Keep what needs a look, with the latest frame (None = none yet). Cheap: call it after
        every change of the manager (an executed step, an end)."""
        k = self.check_every_steps
        at = (manager.episode, manager.steps)
        if (k and manager.phase == RUNNING and manager.steps and manager.steps % k == 0
                and at != self._checked):  # no frame: the look says so
            self._check, self._checked = (manager.episode, manager.steps, frame), at
        for episode in manager.awaiting_label:
            if episode not in self._seen_ends:
                self._seen_ends.add(episode)
                if manager.ended(episode).ended_by in JUDGED_ENDS:
                    self._finals[episode] = frame

    def run(self, manager: EpisodeManager, now: float) -> List[Judgement]:
        """Run the classifier on what `note` kept; apply its confident labels to `manager`."""
        out = []
        if self._check is not None:
            episode, _, frame = self._check
            self._check = None
            if manager.phase == RUNNING and manager.episode == episode:
                out.append(self._look(manager, episode, frame, now, final=False))
        for episode in sorted(self._finals):
            frame = self._finals.pop(episode)
            if episode in manager.awaiting_label:  # else a person's label came first
                out.append(self._look(manager, episode, frame, now, final=True))
        return out

    def asking(self, manager: EpisodeManager) -> Dict[int, Optional[float]]:
        """Episodes the classifier left to a person that still await a label -> P(success)
        (None when it could not run)."""
        waiting = set(manager.awaiting_label)
        self._asking = {e: p for e, p in self._asking.items() if e in waiting}
        return dict(self._asking)

    def prompt(self, manager: EpisodeManager) -> str:
        """The status-line request to a person ('' when the classifier asks nothing)."""
        asks = self.asking(manager)
        if not asks:
            return ''
        episode = max(asks)
        p = asks[episode]
        return (f'classifier unsure (p={p:.2f}) about episode {episode}: label with s/f'
                if p is not None else
                f'classifier could not judge episode {episode}: label with s/f')

    def _look(self, manager: EpisodeManager, episode: int, frame: Any, now: float,
              final: bool) -> Judgement:
        from robot_rl.rewards.classifier import ASK, propose
        try:
            if frame is None:
                raise ValueError('no camera frame received yet')
            p = self._probability(frame, manager.ended(episode).instruction if final
                                  else manager.instruction)
        except ValueError as exc:
            if final:
                self._asking[episode] = None
            return Judgement(episode, ASK, None, final, False, f'classifier failed: {exc}')
        manager.record_probability(episode, p)
        decision = propose(p, self.confidence).decision
        if final and decision == ASK:
            self._asking[episode] = p
        if decision == ASK or (not final and decision != 'success'):
            return Judgement(episode, decision, p, final, False)
        try:
            manager.label(decision == 'success', CLASSIFIER, now, episode=episode)
        except LabelRejected as exc:
            return Judgement(episode, decision, p, final, False, str(exc))
        return Judgement(episode, decision, p, final, True)

    def _probability(self, frame: Any, instruction: str) -> float:
        from robot_rl.rewards.classifier import checked_probability  # torch: only when used
        return checked_probability(self.probability(frame, instruction))


def load_probability(path: str, language_model: Optional[str] = None,
                     device: str = 'cpu') -> ProbabilityFn:
    """P(success) of one uint8 HxWx3 frame from a robot-rl-train-reward checkpoint
    (robot_rl.rewards.classifier.load_classifier; the instruction embedded by the same
    sentence encoder as in training, `language_model` None = the bundled MiniLM)."""
    import numpy as np
    import torch

    from robot_rl.rewards import classifier as rc
    from robot_rl.rl.learner import make_embed
    model = rc.load_classifier(path, device)
    embed = make_embed(model.config.lang_dim, language_model or None, torch.device(device))

    def probability(frame: np.ndarray, instruction: str) -> float:
        """A frame of another shape or type: ValueError naming it (robot_rl.types.fit_image)."""
        return float(rc.probabilities(model, np.asarray(frame)[None], [instruction], embed)[0])
    return probability
