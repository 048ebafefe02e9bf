"""The success classifier (robot_rl/rewards/classifier.py) and robot-rl-train-reward."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from robot_rl.rewards import classifier as rc
from robot_rl.types import Episode

BIN = Path(sys.executable).parent
TINY = rc.ClassifierConfig(encoder_depth=10, encoder_width=8, lang_dim=0, hidden=16,
                           image_size=32)
pytestmark = pytest.mark.usefixtures('one_torch_thread')


def episode(n, success, colour):
    images = np.zeros((n, 32, 32, 3), np.uint8)
    images[-1] = colour  # the final frame shows the outcome
    is_terminal = np.arange(n) == n - 1 if success else np.zeros(n, bool)
    return Episode(images=images, states=np.zeros((n, 7), np.float32),
                   actions=np.zeros((n, 7), np.float32), rewards=np.full(n, -1, np.float32),
                   discounts=np.ones(n, np.float32), is_first=np.arange(n) == 0,
                   is_last=np.arange(n) == n - 1, is_terminal=is_terminal,
                   language_instruction='stack the block')


def test_frames_label_final_frames_by_outcome_and_early_frames_negative():
    frames = rc.frames_from_episodes([episode(10, True, 200), episode(10, False, 90)],
                                     negatives_per_episode=3)
    assert frames.labels.tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
    assert frames.episodes.tolist() == [0] * 4 + [1] * 4
    # Negatives of a success stop short of its end; a failure's reach its last steps.
    succeeded, failed = episode(10, True, 200), episode(10, False, 90)
    succeeded.images[:] = np.arange(10)[:, None, None, None]
    failed.images[:] = np.arange(10)[:, None, None, None]
    frames = rc.frames_from_episodes([succeeded, failed], negatives_per_episode=3)
    steps = frames.images[:, 0, 0, 0].tolist()
    assert steps == [0, 2, 5, 9, 0, 4, 8, 9]
    demos = rc.frames_from_episodes([episode(10, False, 90)], 'final_success', 2)
    assert demos.labels.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match='labelling must be one of'):
        rc.frames_from_episodes([episode(4, True, 1)], 'ground_truth')


def test_the_classifier_learns_a_visible_success_and_round_trips(tmp_path):
    torch.manual_seed(0)
    episodes = [episode(8, i % 2 == 0, 250 if i % 2 == 0 else 0) for i in range(8)]
    frames = rc.frames_from_episodes(episodes, negatives_per_episode=2)
    model = rc.SuccessClassifier(TINY)
    embed = (lambda texts: None)
    losses = rc.train(model, frames, embed, steps=60, batch_size=16, lr=3e-3)
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    probs = rc.probabilities(model, frames.images, frames.instructions, embed)
    m = rc.metrics(probs, frames.labels)
    assert m['precision'] == 1.0 and m['recall'] == 1.0
    rc.save_classifier(tmp_path / 'c.safetensors', model)
    again = rc.load_classifier(tmp_path / 'c.safetensors')
    np.testing.assert_allclose(rc.probabilities(again, frames.images, frames.instructions,
                                                embed), probs, atol=1e-6)


def test_single_class_training_data_and_foreign_checkpoints_are_rejected(tmp_path):
    frames = rc.frames_from_episodes([episode(6, False, 0)], negatives_per_episode=2)
    with pytest.raises(ValueError, match='single class'):
        rc.train(rc.SuccessClassifier(TINY), frames, lambda t: None, steps=1)
    from robot_rl.models.checkpoint import save_checkpoint
    save_checkpoint(tmp_path / 'x.safetensors', torch.nn.Linear(2, 2), {'format': 'other'})
    with pytest.raises(ValueError, match='not a success classifier'):
        rc.load_classifier(tmp_path / 'x.safetensors')


def test_metrics_and_proposals():
    m = rc.metrics(np.array([0.9, 0.8, 0.3, 0.6]), np.array([1, 0, 1, 0.0]), confidence=0.75)
    assert (m['precision'], m['recall'], m['accuracy']) == (1 / 3, 0.5, 0.25)
    assert m['ask_rate'] == 0.5  # 0.3 -> 0.7 and 0.6 -> 0.6 are below 0.75
    assert rc.propose(0.95, 0.9) == rc.Proposal('success', 0.95, 0.95)
    assert rc.propose(0.02, 0.9).decision == 'failure'
    assert rc.propose(0.7, 0.9).decision == rc.ASK
    with pytest.raises(ValueError, match='confidence_threshold'):
        rc.propose(0.7, 0.3)


def run_script(*args, cwd):
    result = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=cwd, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_train_reward_on_simulated_episodes_reports_held_out_precision_recall(tmp_path):
    run_script('robot-rl-gen-data', 'tasks=[carrot_on_plate]', 'episodes_per_task=4',
               'val_fraction=0.5', 'image_size=64', 'expert=mixed', f'output_dir={tmp_path}',
               cwd=tmp_path)
    data = tmp_path / 'robot_rl_sim' / '1.0.0'
    out = run_script('robot-rl-train-reward', f'train=[{{path: {data}}}]', 'steps=5',
                     'batch_size=8', 'model.encoder_depth=10', 'model.encoder_width=8',
                     'model.hidden=16', 'model.image_size=64', 'device=cpu',
                     f'output_dir={tmp_path / "reward"}', cwd=tmp_path)
    metrics = json.loads((tmp_path / 'reward' / 'metrics.json').read_text())
    printed = [line for line in out.splitlines() if line.startswith('{')]
    assert [json.loads(line) for line in printed] == [metrics]
    assert metrics['eval/positives'] + metrics['eval/negatives'] == 2 * 4  # 2 held-out episodes
    assert metrics['train/frames'] == 2 * 4
    assert 0.0 <= metrics['eval/accuracy'] <= 1.0
    model = rc.load_classifier(tmp_path / 'reward' / 'classifier.safetensors')
    assert model.config.lang_dim == 384  # language-conditioned (MiniLM) by default
