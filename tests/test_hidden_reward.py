"""Fine-tuning with the simulator's success hidden: a success classifier gives the rewards and the
simulator answers only when the classifier is unsure (robot_rl.rewards.hidden)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from robot_rl.cli import finetune as cli
from robot_rl.envs import make_env, TASKS
from robot_rl.envs.experts import ExpertConfig, ScriptedExpert
from robot_rl.rewards.classifier import ClassifierConfig, save_classifier, SuccessClassifier
from robot_rl.rewards.hidden import CLASSIFIER, ClassifierRewardEnv, PERSON
from robot_rl.rl import finetune as ft
from robot_rl.types import REWARD_STEP, REWARD_SUCCESS
from tests.test_finetune import IMAGE, pretrained, TASK

pytestmark = pytest.mark.usefixtures('one_torch_thread')


def expert_episode(env: ClassifierRewardEnv, seed: int = 5):
    """The clean scripted expert (it succeeds) through the wrapper; every (reward, terminated,
    truncated, info)."""
    expert = ScriptedExpert(env.env, ExpertConfig())
    obs, _ = env.reset(seed=seed)
    expert.reset(seed=seed)
    steps, done = [], False
    while not done:
        obs, reward, terminated, truncated, info = env.step(expert.act(obs))
        steps.append((reward, terminated, truncated, info))
        done = terminated or truncated
    return steps


def test_an_unsure_classifier_hands_the_final_frame_to_the_simulator():
    env = ClassifierRewardEnv(make_env(TASK, image_size=IMAGE), lambda frame, text: 0.5,
                              confidence=0.8, check_every_steps=5)
    steps = expert_episode(env)
    # The expert succeeds well before the limit, but the hidden success ends nothing.
    assert len(steps) == env.max_steps
    seen = [info['true_success'] for *_, info in steps]
    assert any(seen[:-1]) and seen == sorted(seen)  # once seen to succeed, it stays so
    assert all(r == REWARD_STEP and not t for r, t, *_ in steps[:-1])
    reward, terminated, truncated, info = steps[-1]
    assert info['label_source'] == PERSON and info['success'] and info['true_success']
    assert reward == REWARD_SUCCESS and terminated and not truncated
    assert env.queries == 1


def test_a_success_undone_later_still_counts_as_seen():
    env = ClassifierRewardEnv(make_env(TASK, image_size=IMAGE), lambda frame, text: 0.5,
                              check_every_steps=0)
    expert = ScriptedExpert(env.env, ExpertConfig())
    obs, _ = env.reset(seed=5)
    expert.reset(seed=5)
    start = env.env.snapshot()
    info = {'true_success': False}
    while not info['true_success']:
        obs, _, terminated, truncated, info = env.step(expert.act(obs))
        assert not (terminated or truncated)
    env.env.restore(start)  # the object back where it began: the success is undone
    hold, done = np.array([0, 0, 0, 0, 0, 0, 1], np.float32), False
    while not done:
        _, _, terminated, truncated, info = env.step(hold)
        done = terminated or truncated
        assert not env.env.is_success() and info['true_success']
    # Asked at the end, the person (the simulator) reports what happened during the episode.
    assert info['label_source'] == PERSON and info['success'] and terminated


def test_confident_labels_are_the_classifiers_right_or_wrong():
    looks = []

    def sure_success(frame, instruction):
        looks.append((frame.shape, instruction))
        return 0.97

    env = ClassifierRewardEnv(make_env(TASK, image_size=IMAGE), sure_success,
                              check_every_steps=4)
    steps = expert_episode(env)
    assert len(steps) == 4 and len(looks) == 1  # it looked once, at step 4, and ended it
    assert looks[0] == ((IMAGE, IMAGE, 3), TASKS[TASK].instruction)
    reward, terminated, truncated, info = steps[-1]
    assert terminated and reward == REWARD_SUCCESS and info['label_source'] == CLASSIFIER
    assert not info['true_success']  # a false positive: what the learner is told is the label

    env = ClassifierRewardEnv(make_env(TASK, image_size=IMAGE), lambda frame, text: 0.02,
                              check_every_steps=0)
    steps = expert_episode(env)
    reward, terminated, truncated, info = steps[-1]
    assert len(steps) == env.max_steps and truncated and not terminated
    assert info['label_source'] == CLASSIFIER and not info['success'] and info['true_success']
    assert env.queries == 0


def test_a_broken_classifier_or_bad_settings_are_errors():
    with pytest.raises(ValueError, match='confidence'):
        ClassifierRewardEnv(make_env(TASK, image_size=IMAGE), lambda f, t: 0.5, confidence=0.3)
    env = ClassifierRewardEnv(make_env(TASK, image_size=IMAGE), lambda f, t: float('nan'),
                              check_every_steps=1)
    env.reset(seed=0)
    with pytest.raises(ValueError, match='not a probability'):
        env.step(np.zeros(7, np.float32))


def test_the_learner_trains_on_the_classifiers_labels(tmp_path):
    cfg = pretrained(tmp_path / 'pretrained')
    learner = ft.Learner(cfg, tmp_path / 'run', torch.device('cpu'))
    actor = ft.Actor(ft.Models(cfg, torch.device('cpu'), 0), cfg.parl)
    env = ClassifierRewardEnv(make_env(TASK, image_size=IMAGE), lambda frame, text: 0.99,
                              check_every_steps=3)
    summaries = ft.run_sync(learner, actor, {TASK: env}, {TASK: TASKS[TASK].instruction},
                            ft.episode_plan([TASK], 2, seed=0))
    assert all(s['success'] and s['label_source'] == CLASSIFIER and not s['true_success']
               for s in summaries)
    for episode in learner.online.episodes():  # told success at step 3: terminal, reward 0
        assert episode.num_transitions == 3 and episode.is_terminal[-1]
        assert list(episode.rewards[:3]) == [REWARD_STEP, REWARD_STEP, REWARD_SUCCESS]


def test_finetune_with_a_classifier_checkpoint_plots_labels_and_true_success(tmp_path):
    learner_cfg = pretrained(tmp_path / 'pretrained')
    torch.manual_seed(0)
    model = SuccessClassifier(ClassifierConfig(encoder_depth=10, encoder_width=8, hidden=16,
                                               image_size=IMAGE))
    save_classifier(tmp_path / 'classifier.safetensors', model)
    cfg = cli.FinetuneConfig(
        learner=learner_cfg, tasks=[TASK], episodes=2, device='cpu', output_dir=str(tmp_path),
        run_name='hidden', reward=cli.RewardConfig(
            classifier_path=str(tmp_path / 'classifier.safetensors'), confidence=0.99,
            check_every_steps=0))
    run_dir = cli.run(cfg)
    outcomes = [json.loads(line) for line in
                (run_dir / cli.OUTCOMES_FILE).read_text().splitlines()]
    assert len(outcomes) == cfg.total_episodes
    # A random classifier is never 99% sure: every label came from the simulator.
    assert all(o['label_source'] == PERSON and o['success'] == o['true_success']
               for o in outcomes)
    curve = cli.read_curve(run_dir)
    truth = cli.true_success_curve(curve, run_dir)
    assert [c['success'] for c in truth] == [o['true_success'] for o in outcomes]
    assert (run_dir / 'curve.png').stat().st_size > 0
    with pytest.raises(ValueError, match='reward.confidence'):
        cli.FinetuneConfig(learner=learner_cfg, reward=dataclasses.replace(
            cfg.reward, confidence=0.2)).validate()
