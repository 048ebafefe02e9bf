"""The PA-RL learner keeps a person's teleoperated steps as their own replay source."""

import dataclasses

import numpy as np
import pytest
import torch
from test_finetune import IMAGE, pretrained

from robot_rl.episodes.interventions import INTERVENTION_STEPS
from robot_rl.rl import finetune as ft
from robot_rl.transport import StepBatch, StepRecord
from robot_rl.types import ActionSpace

pytestmark = pytest.mark.usefixtures('one_torch_thread')
TELEOP = np.array([0.02, 0, 0, 0, 0, 0, 1.0], np.float32)


def batch(episode, flagged, success):
    rng = np.random.default_rng(episode)
    n = 6
    steps = [StepRecord(step=t, image=rng.integers(0, 255, (IMAGE, IMAGE, 3), dtype=np.uint8),
                        state=np.zeros(7, np.float32),
                        action=TELEOP if t in flagged else np.full(7, -0.01, np.float32),
                        reward=0.0 if success and t == n - 2 else -1.0, is_first=t == 0,
                        is_last=t == n - 1, is_terminal=success and t == n - 1,
                        intervention=t in flagged) for t in range(n)]
    steps[-1].action = np.zeros(7, np.float32)
    return StepBatch('robot', episode, 'put the carrot on the plate', episode, steps)


def test_intervention_steps_form_a_weighted_source_rebuilt_on_restart(tmp_path):
    cfg = dataclasses.replace(pretrained(tmp_path / 'pretrained'), intervention_ratio=0.25,
                              warmup_episodes=0)
    learner = ft.Learner(cfg, tmp_path / 'run', torch.device('cpu'))
    learner.ingest(batch(0, flagged=set(), success=False))
    assert learner.sampler.counts(8) == [8, 0]  # no intervention yet: online takes it all
    [stored] = learner.ingest(batch(1, flagged={2, 3}, success=True))
    assert stored.metadata[INTERVENTION_STEPS] == [2, 3]
    assert len(learner.interventions) == 1 and learner.interventions.num_transitions == 2
    assert learner.sampler.counts(8) == [6, 2]
    drawn = learner.sampler.sample(8, np.random.default_rng(0))
    teleop_units = ActionSpace.bridge().normalise(TELEOP)  # stored in the critic's units
    np.testing.assert_allclose(drawn.actions[6:], np.stack([teleop_units] * 2), atol=1e-6)
    learner.update()  # a batch mixing both sources trains

    restarted = ft.Learner(cfg, tmp_path / 'run', torch.device('cpu'))
    assert restarted.interventions.num_transitions == 2
    assert restarted.sampler.counts(8) == [6, 2]


def test_an_intervention_share_that_leaves_no_online_data_is_rejected(tmp_path):
    cfg = dataclasses.replace(pretrained(tmp_path / 'pretrained'), offline_ratio=0.5,
                              intervention_ratio=0.5, offline=[ft.OfflineSource(path='x')])
    with pytest.raises(ValueError, match='offline_ratio \\+ intervention_ratio < 1'):
        ft.Learner(cfg, tmp_path / 'run', torch.device('cpu'))
