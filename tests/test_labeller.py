"""T0 (no ROS): the success classifier labelling episodes at run time (robot_rl.episodes.
labeller), the probability it leaves on the episode's result and in the RLDS metadata, and the
probability function built from a real (tiny) classifier checkpoint."""

import json

import numpy as np
import pytest

from robot_rl.episodes.keyboard import status_line
from robot_rl.episodes.labeller import CLASSIFIER, ClassifierLabeller, load_probability
from robot_rl.episodes.manager import (EpisodeManager, EXPIRED, IDLE, LabelRejected,
                                       ManagerConfig, RUNNING)
from robot_rl.episodes.overlay import parse_result, result_metadata

INSTRUCTION = 'put the spoon on the towel'


class Scripted:
    """A probability function that answers P(success) from a table keyed by the frame's value
    (frames here are ints standing for camera frames); it records what it was asked."""

    def __init__(self, table):
        self.table = table
        self.calls = []

    def __call__(self, frame, instruction):
        self.calls.append((frame, instruction))
        return self.table[frame]


def session(table, confidence=0.8, check_every_steps=0, **config):
    manager = EpisodeManager(ManagerConfig(**{'max_steps': 10, 'late_label_window_s': 5.0,
                                              **config}))
    probability = Scripted(table)
    return manager, ClassifierLabeller(probability, confidence, check_every_steps), probability


def run_steps(manager, labeller, frames, now=0.0):
    """One executed step per frame (the frame is the latest camera frame after it), with the
    node's order: step, note; the labeller runs on the timer after every step."""
    judgements = []
    for i, frame in enumerate(frames):
        manager.step(now + i)
        labeller.note(manager, frame)
        judgements += labeller.run(manager, now + i + 0.1)
    return judgements


def start(manager, now=0.0):
    manager.start(INSTRUCTION, now)
    manager.reset_done(True, now)
    assert manager.phase == RUNNING


def test_a_confident_success_mid_episode_ends_it_with_the_classifier_as_label_source():
    m, labeller, probability = session({1: 0.1, 2: 0.7, 3: 0.95}, check_every_steps=2)
    start(m)
    judgements = run_steps(m, labeller, [1, 1, 2, 2, 3, 3])
    # Looked at steps 2 (p 0.1: failure, runs on), 4 (p 0.7: unsure, runs on), 6 (success).
    assert [f for f, _ in probability.calls] == [1, 2, 3]
    assert all(instruction == INSTRUCTION for _, instruction in probability.calls)
    assert [(j.decision, j.applied, j.final) for j in judgements] == [
        ('failure', False, False), ('ask', False, False), ('success', True, False)]
    assert m.phase == IDLE
    (result,) = m.pop_results()
    assert (result.success, result.label_source, result.ended_by, result.late) == (
        True, CLASSIFIER, 'label', False)
    assert result.steps == 6 and result.classifier_probability == pytest.approx(0.95)
    assert labeller.prompt(m) == ''  # nothing asked of a person


def test_a_check_without_a_camera_frame_says_so_and_the_episode_runs_on():
    m, labeller, probability = session({}, check_every_steps=1)
    start(m)
    (j,) = run_steps(m, labeller, [None])
    assert (j.decision, j.applied, j.final) == ('ask', False, False)
    assert j.reason == 'classifier failed: no camera frame received yet'
    assert m.phase == RUNNING and probability.calls == [] and labeller.prompt(m) == ''


def test_no_checks_while_running_when_check_every_steps_is_zero():
    m, labeller, probability = session({1: 0.99})
    start(m)
    run_steps(m, labeller, [1] * 5)
    assert m.phase == RUNNING and probability.calls == []


@pytest.mark.parametrize('p, success', [(0.93, True), (0.04, False)])
def test_a_confident_final_frame_labels_an_episode_that_hit_the_step_limit(p, success):
    m, labeller, probability = session({1: 0.5, 2: p}, max_steps=3)
    start(m)
    run_steps(m, labeller, [1, 1, 2])
    assert probability.calls == [(2, INSTRUCTION)]  # the final frame only
    (result,) = m.pop_results()
    assert (result.success, result.label_source, result.ended_by, result.late) == (
        success, CLASSIFIER, 'step limit', True)
    assert result.reward == (0.0 if success else -1.0)
    assert result.classifier_probability == pytest.approx(p)
    with pytest.raises(LabelRejected, match='already labelled .* \\(by classifier\\)'):
        m.label(not success, 'keyboard', 4.0, episode=0)


def test_end_command_final_frame_is_judged_and_an_estop_is_left_to_a_person():
    m, labeller, probability = session({1: 0.9, 2: 0.95})
    start(m)
    run_steps(m, labeller, [1])
    m.end(1.5)
    labeller.note(m, 1)
    labeller.run(m, 1.6)
    (result,) = m.pop_results()
    assert (result.label_source, result.ended_by, result.success) == (CLASSIFIER, 'end', True)
    start(m, 2.0)
    run_steps(m, labeller, [2], now=2.0)
    m.estop(3.5)
    labeller.note(m, 2)
    assert labeller.run(m, 3.6) == [] and m.awaiting_label == [1]
    assert len(probability.calls) == 1  # nothing asked about the e-stopped episode


def test_unsure_asks_a_person_whose_label_applies_and_keeps_the_probability():
    m, labeller, _ = session({1: 0.5, 2: 0.55}, max_steps=2)
    start(m)
    (judgement,) = run_steps(m, labeller, [1, 2])
    assert (judgement.decision, judgement.applied, judgement.final) == ('ask', False, True)
    assert m.awaiting_label == [0] and m.pop_results() == []
    prompt = labeller.prompt(m)
    assert prompt == 'classifier unsure (p=0.55) about episode 0: label with s/f'
    line = status_line({**m.status(), 'classifier': prompt}, None, 0)
    assert 'classifier unsure (p=0.55)' in line and 'label? [0]' in line
    result = m.label(False, 'keyboard', 3.0)
    assert (result.label_source, result.success, result.late) == ('keyboard', False, True)
    assert result.classifier_probability == pytest.approx(0.55)
    assert labeller.prompt(m) == ''  # answered: nothing asked any more


def test_unsure_and_no_label_closes_as_failure_when_the_window_expires():
    m, labeller, _ = session({1: 0.4}, max_steps=1, late_label_window_s=5.0)
    start(m)
    run_steps(m, labeller, [1])
    m.tick(4.0)
    assert m.pop_results() == [] and labeller.asking(m) == {0: pytest.approx(0.4)}
    m.tick(7.0)
    (result,) = m.pop_results()
    assert (result.success, result.label_source) == (False, EXPIRED)
    assert result.classifier_probability == pytest.approx(0.4)
    assert labeller.asking(m) == {} and labeller.prompt(m) == ''


def test_a_persons_label_before_the_classifier_looks_wins():
    m, labeller, probability = session({1: 0.99}, max_steps=2)
    start(m)
    m.step(0.0)
    labeller.note(m, 1)
    m.step(1.0)  # the step limit: the final frame is kept for the timer ...
    labeller.note(m, 1)
    m.label(False, 'pedal', 1.05)  # ... but a person labels first
    assert labeller.run(m, 1.1) == [] and probability.calls == []
    (result,) = m.pop_results()
    assert (result.label_source, result.success, result.classifier_probability) == (
        'pedal', False, None)


def test_a_persons_label_mid_episode_wins_over_a_pending_check():
    m, labeller, probability = session({1: 0.99}, check_every_steps=1)
    start(m)
    m.step(0.0)
    labeller.note(m, 1)
    m.label(False, 'keyboard', 0.5)  # before the timer runs the check
    assert labeller.run(m, 0.6) == [] and probability.calls == []
    (result,) = m.pop_results()
    assert (result.label_source, result.success) == ('keyboard', False)


def test_a_failing_classifier_or_a_missing_frame_asks_a_person_with_the_reason():
    m, labeller, _ = session({1: float('nan')}, max_steps=1)
    start(m)
    (j,) = run_steps(m, labeller, [1])
    assert (j.decision, j.probability, j.applied) == ('ask', None, False)
    assert 'returned nan, not a probability in [0, 1]' in j.reason
    assert labeller.prompt(m) == 'classifier could not judge episode 0: label with s/f'
    start(m, 1.0)
    m.step(1.0)
    labeller.note(m, None)  # no camera frame ever arrived
    (j,) = labeller.run(m, 1.1)
    assert j.reason == 'classifier failed: no camera frame received yet'
    assert m.awaiting_label == [0, 1]


@pytest.mark.parametrize('kwargs, message', [
    ({'confidence': 0.4}, 'classifier confidence must be in \\[0.5, 1\\]'),
    ({'confidence': 1.5}, 'classifier confidence must be in \\[0.5, 1\\]'),
    ({'confidence': float('nan')}, 'classifier confidence must be in'),
    ({'check_every_steps': -1}, 'check_every_steps must be an integer >= 0'),
    ({'check_every_steps': 2.5}, 'check_every_steps must be an integer >= 0'),
])
def test_bad_settings_are_rejected_with_the_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClassifierLabeller(lambda frame, instruction: 0.5, **kwargs)


def test_a_probability_function_is_required():
    with pytest.raises(TypeError, match='probability must be a function'):
        ClassifierLabeller(0.9)


def test_manager_rejects_probabilities_for_unknown_episodes_and_out_of_range():
    m = EpisodeManager()
    with pytest.raises(LabelRejected, match='episode 0 is neither running nor awaiting'):
        m.record_probability(0, 0.5)
    start(m)
    with pytest.raises(ValueError, match='must be in \\[0, 1\\], got 1.2'):
        m.record_probability(0, 1.2)
    with pytest.raises(KeyError, match='episode 0 is not awaiting a label'):
        m.ended(0)


def test_the_probability_reaches_the_result_json_and_the_rlds_label_metadata():
    m, labeller, _ = session({1: 0.91}, max_steps=1)
    start(m)
    run_steps(m, labeller, [1])
    (result,) = m.pop_results()
    text = json.dumps(result.to_dict())
    assert parse_result(text).success  # the actor's parser takes the extended result
    label = result_metadata(json.loads(text))['label']
    assert label == {'success': True, 'label_source': CLASSIFIER, 'late': True,
                     'ended_by': 'step limit', 'reward': 0.0,
                     'classifier_probability': pytest.approx(0.91)}
    m2 = EpisodeManager()
    start(m2)
    plain = m2.label(True, 'keyboard', 1.0).to_dict()
    assert plain['classifier_probability'] is None
    assert 'classifier_probability' not in result_metadata(plain)['label']


def tiny_checkpoint(path, bias):
    """A real SuccessClassifier (ResNet-10, width 4, 64 px, no language) whose output is
    sigmoid(bias) for every frame: its last layer's weights are zero."""
    import torch

    from robot_rl.rewards import classifier as rc
    torch.manual_seed(0)
    model = rc.SuccessClassifier(rc.ClassifierConfig(encoder_depth=10, encoder_width=4,
                                                     lang_dim=0, hidden=4, image_size=64))
    with torch.no_grad():
        model.head[-1].weight.zero_()
        model.head[-1].bias.fill_(bias)
    rc.save_classifier(path, model)
    return path


def test_load_probability_runs_a_saved_classifier_on_one_frame(tmp_path, one_torch_thread):
    path = tiny_checkpoint(tmp_path / 'classifier.safetensors', 2.0)
    probability = load_probability(str(path))
    frame = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    assert probability(frame, INSTRUCTION) == pytest.approx(1 / (1 + np.exp(-2.0)), abs=1e-5)
    with pytest.raises(ValueError, match='expects an RGB uint8 image .* got float32 \\(8, 8\\)'):
        probability(np.zeros((8, 8), np.float32), INSTRUCTION)
