"""A simulated task with its success hidden: a learned classifier gives the reward, as on a robot.

On a real WidowX nothing says when a task succeeded; the episode manager takes labels from the
success classifier and asks a person when it is unsure (robot_rl.episodes.labeller). This
wrapper runs the same rule inside the fine-tuning loop, with the simulator standing in for the
person, so classifier-driven fine-tuning can be compared with ground-truth rewards:

- every `check_every_steps` steps the classifier looks at the frame; a confident success ends
  the episode as a success (label source 'classifier');
- at the task's step limit the final frame is judged: confident -> success or failure
  ('classifier'); unsure -> the simulator says whether the task succeeded at any step of the
  episode ('person', counted as a query: a person watching would have seen it);
- the simulator's own success never ends an episode or gives a reward.

Rewards and terminals follow the sparse convention (robot_rl.types): REWARD_SUCCESS on the
transition labelled a success (terminal), REWARD_STEP otherwise. `info` carries the label
(`success`), how it was made (`label_source`, `p_success`) and, for evaluation only, whether
the simulator has seen the task succeed so far in the episode (`true_success`: what ground-truth
rewards would have ended it on); the learner sees only rewards and terminals.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from robot_rl.rewards.classifier import ASK, checked_probability, propose
from robot_rl.types import IMAGE_KEY, REWARD_STEP, REWARD_SUCCESS

ProbabilityFn = Callable[[np.ndarray, str], float]
"""(uint8 HxWx3 frame, instruction) -> P(success) (robot_rl.episodes.labeller.load_probability)."""

CLASSIFIER, PERSON = 'classifier', 'person'


class ClassifierRewardEnv:
    """Wraps a simulated task (robot_rl.envs.WidowXEnv); see the module docstring."""

    def __init__(self, env, probability: ProbabilityFn, confidence: float = 0.8,
                 check_every_steps: int = 5):
        if not 0.5 <= confidence <= 1.0:
            raise ValueError(f'classifier confidence must be in [0.5, 1], got {confidence}')
        if check_every_steps < 0:
            raise ValueError(f'check_every_steps must be >= 0 (0: only the final frame), got '
                             f'{check_every_steps}')
        self.env = env
        self.probability = probability
        self.confidence = float(confidence)
        self.check_every_steps = int(check_every_steps)
        self.steps = 0
        self.succeeded = False
        """The simulator has seen the task succeed in this episode."""
        self.queries = 0
        """Episodes the classifier left to the person (here the simulator), over the run."""

    @property
    def max_steps(self) -> int:
        return self.env.max_steps

    def reset(self, seed: Optional[int] = None) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
        self.steps, self.succeeded = 0, False
        return self.env.reset(seed=seed)

    def step(self, action: np.ndarray):
        obs, _, _, _, info = self.env.step(action)  # the simulator's success stays hidden
        self.steps += 1
        self.succeeded = self.succeeded or bool(info['success'])
        at_limit = self.steps >= self.env.max_steps
        looks = at_limit or (self.check_every_steps > 0
                             and self.steps % self.check_every_steps == 0)
        label, source, p = False, None, None
        if looks:
            p = checked_probability(self.probability(obs[IMAGE_KEY], info['instruction']))
            decision = propose(p, self.confidence).decision
            if decision == 'success' or (at_limit and decision == 'failure'):
                label, source = decision == 'success', CLASSIFIER
            elif at_limit and decision == ASK:
                label, source = self.succeeded, PERSON
                self.queries += 1
        info = {**info, 'success': label, 'true_success': self.succeeded, 'label_source': source,
                'p_success': p}
        reward = REWARD_SUCCESS if label else REWARD_STEP
        return obs, reward, label, at_limit and not label, info
