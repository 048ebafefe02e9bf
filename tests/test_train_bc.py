"""Behaviour cloning (robot-rl-train-bc), chunked examples, and robot-rl-eval end to end.

Training data is the real Bridge sample beside the project (64 px); the evaluation runs the
cloned policy, with and without steering by a (randomly initialised) critic checkpoint, in the
MuJoCo simulation.
"""

import json
import math
from pathlib import Path
import subprocess
import sys

import numpy as np
from omegaconf import OmegaConf
import pytest

import robot_rl.cli.train_bc  # noqa: F401  (stores the hydra schema)
from policies.common import load_policy
from robot_rl.cli.config import compose
from robot_rl.data.chunks import ChunkDataset
from robot_rl.rl.train_bc import learning_rate, main
from robot_rl.types import ActionSpace, Episode

BIN = Path(sys.executable).parent
TINY = ['policy=gaussian', 'policy.encoder.width=8', 'policy.head.hidden_dims=[32,32]',
        'device=cpu', 'batch_size=16', 'eval_batches=2']


def episode(actions, instruction='pick', size=8):
    n = len(actions) + 1
    last = np.arange(n) == n - 1
    return Episode(images=np.full((n, size, size, 3), len(actions), np.uint8),
                   states=np.zeros((n, 7), np.float32),
                   actions=np.concatenate([actions, np.zeros((1, 7))]).astype(np.float32),
                   rewards=np.where(last, 0.0, -1.0).astype(np.float32),
                   discounts=np.ones(n, np.float32), is_first=np.arange(n) == 0, is_last=last,
                   is_terminal=np.zeros(n, bool), language_instruction=instruction)


def test_chunks_cover_every_transition_and_mask_past_the_end():
    space = ActionSpace(low=np.zeros(7), high=np.full(7, 10.0))
    a = np.arange(3)[:, None] * np.ones((1, 7))            # actions 0, 1, 2
    b = (np.arange(2)[:, None] + 5) * np.ones((1, 7))      # actions 5, 6
    data = ChunkDataset([episode(a, 'first'), episode(b, 'second')], horizon=3,
                        action_space=space)
    assert len(data) == 5  # every transition, none dropped
    batch = data.get(np.arange(5))
    firsts = space.unnormalise(batch.actions)[:, :, 0]
    np.testing.assert_allclose(firsts, [[0, 1, 2], [1, 2, 2], [2, 2, 2], [5, 6, 6], [6, 6, 6]],
                               atol=1e-5)
    np.testing.assert_array_equal(batch.mask, [[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 0],
                                               [1, 0, 0]])
    assert batch.instructions == ['first'] * 3 + ['second'] * 2
    assert batch.images[3, 0, 0, 0] == 2  # frames stay with their episode
    with pytest.raises(ValueError, match='several sizes'):
        ChunkDataset([episode(a), episode(b, size=16)], 2, space)
    with pytest.raises(ValueError, match='horizon'):
        ChunkDataset([episode(a)], 0, space)


def config(data_dir, tmp_path, *overrides):
    cfg = compose('train_bc', ['data=bridge_debug', f'data.sources.0.path={data_dir}',
                               f'output_dir={tmp_path / "runs"}', *TINY, *overrides])
    return OmegaConf.to_object(cfg)


def test_validate_names_the_policy_and_the_numbers(bridge_debug_dir, tmp_path):
    with pytest.raises(ValueError, match=r"steps > 0; policy.name one of \['autoregressive'"):
        main(config(bridge_debug_dir, tmp_path, 'policy.name=hold', 'steps=0'))


@pytest.fixture(scope='module')
def bc_run(tmp_path_factory):
    """robot-rl-train-bc run as a console script: 20 steps, then resumed to 30."""
    from conftest import BRIDGE_DEBUG
    if not BRIDGE_DEBUG.is_dir():
        pytest.skip(f'real Bridge sample not found at {BRIDGE_DEBUG}')
    tmp = tmp_path_factory.mktemp('bc')
    args = [str(BIN / 'robot-rl-train-bc'), 'data=bridge_debug',
            f'data.sources.0.path={BRIDGE_DEBUG}', f'output_dir={tmp / "runs"}', *TINY,
            'log_every=5', 'eval_every=10', 'checkpoint_every=10', 'run_name=smoke']
    outputs = []
    for extra in (['steps=20'], ['steps=30', 'resume=true']):
        result = subprocess.run(args + extra, cwd=tmp, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        outputs.append(result.stdout)
    return tmp / 'runs' / 'smoke', outputs


def test_console_script_checkpoints_logs_and_resumes(bc_run):
    from test_train_critic import scalars

    run_dir, outputs = bc_run
    last = run_dir / 'checkpoints' / 'last'
    assert last.resolve().name == 'step_000000030'
    assert (run_dir / 'config.yaml').is_file() and 'eval/first_action_mae' in outputs[0]
    assert [s for s, _ in scalars(run_dir, 'train/loss')] == [5, 10, 15, 20, 25, 30]
    assert [s for s, _ in scalars(run_dir, 'eval/loss')] == [10, 20, 30]
    policy = load_policy(last / 'policy.safetensors')
    meta = json.loads((last / 'policy.json').read_text())
    assert meta['extra']['step'] == 30 and policy.name == 'gaussian'
    first = json.loads((run_dir / 'checkpoints' / 'best' / 'policy.json').read_text())
    assert ActionSpace.from_dict(first['action_space']) == policy.action_space
    obs = {'image_primary': np.zeros((128, 128, 3), np.uint8), 'state': np.zeros(7, np.float32)}
    chunks = policy.sample_actions(obs, 'put the spoon on the towel', 5)
    assert chunks.shape == (5, 4, 7)
    assert (chunks >= policy.action_space.low - 1e-6).all()
    assert (chunks <= policy.action_space.high + 1e-6).all()


def test_a_cosine_schedule_decays_the_rate_to_zero_and_follows_the_step_on_resume(
        bridge_debug_dir, tmp_path):
    from test_train_critic import scalars

    def run(steps, *extra):
        return main(config(bridge_debug_dir, tmp_path, f'steps={steps}', 'lr=1e-3',
                           'lr_schedule=cosine', 'log_every=4', 'eval_every=100',
                           'checkpoint_every=4', 'run_name=cosine', *extra))

    run(8)
    result = run(12, 'resume=true')
    logged = scalars(result.run_dir, 'train/lr')
    # The rate of each logged step's last update: the first run's curve spans its 8 steps,
    # the resumed run continues at step 8 on the curve of its own 12.
    expected = [0.5e-3 * (1 + math.cos(math.pi * (step - 1) / total))
                for step, total in ((4, 8), (8, 8), (12, 12))]
    assert [s for s, _ in logged] == [4, 8, 12]
    np.testing.assert_allclose([v for _, v in logged], expected, rtol=1e-5)
    assert logged[-1][1] < 0.03e-3
    constant = config(bridge_debug_dir, tmp_path, 'lr=1e-3')
    assert learning_rate(constant, 0) == learning_rate(constant, 11) == 1e-3
    with pytest.raises(ValueError, match='lr_schedule one of'):
        main(config(bridge_debug_dir, tmp_path, 'lr_schedule=linear'))


def test_resume_with_another_policy_shape_is_refused(bc_run, bridge_debug_dir):
    run_dir, _ = bc_run
    cfg = config(bridge_debug_dir, run_dir.parent.parent, 'run_name=smoke', 'resume=true',
                 'steps=40', 'policy.horizon=2')
    with pytest.raises(ValueError, match='horizon'):
        main(cfg)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(bridge_debug_dir, tmp_path,
                                                           monkeypatch):
    from policies.gaussian import GaussianPolicy

    calls = []
    original = GaussianPolicy.supervised_loss

    def loss_then_nan(self, batch):
        calls.append(1)
        loss = original(self, batch)
        return loss * float('nan') if len(calls) > 12 and self.training else loss

    monkeypatch.setattr(GaussianPolicy, 'supervised_loss', loss_then_nan)
    cfg = config(bridge_debug_dir, tmp_path, 'steps=20', 'checkpoint_every=5', 'eval_every=100',
                 'run_name=nan')
    with pytest.raises(FloatingPointError, match='non-finite loss at step 13.*step 10'):
        main(cfg)
    assert (tmp_path / 'runs' / 'nan' / 'checkpoints' / 'last').resolve().name == \
        'step_000000010'


def test_eval_runs_every_arm_on_the_same_episodes(bc_run, tmp_path):
    import torch

    from robot_rl.models.critic import Critic, CriticConfig, save_critic

    run_dir, _ = bc_run
    policy_path = run_dir / 'checkpoints' / 'last' / 'policy.safetensors'
    torch.manual_seed(0)
    critic_path = tmp_path / 'critic.safetensors'
    save_critic(critic_path, Critic(CriticConfig(encoder_depth=10, encoder_width=8,
                                                 hidden_dims=(32,))), ActionSpace.bridge())
    out = tmp_path / 'eval'
    result = subprocess.run(
        [str(BIN / 'robot-rl-eval'), f'policy_path={policy_path}',
         f'critic_path={critic_path}', 'tasks=[carrot_on_plate]', 'episodes_per_task=2',
         'num_samples=[3]', 'random_num_samples=3', 'device=cpu', f'output_dir={out}',
         'video_size=96', 'scoring=chunk'],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads((out / 'results.json').read_text())
    assert list(report['arms']) == ['base', 'vgps K=3', 'random K=3']
    for arm in report['arms'].values():
        cell = arm['tasks']['carrot_on_plate']
        assert cell['episodes'] == 2 and 0 <= cell['ci95'][0] <= cell['success_rate'] \
            <= cell['ci95'][1] <= 1
        assert Path(arm['video']).stat().st_size > 1000
    assert (out / 'success_vs_k.png').stat().st_size > 1000
    assert '| vgps K=3 |' in result.stdout


def test_eval_config_names_an_unknown_scoring():
    from robot_rl.cli.evaluate import EvalConfig

    with pytest.raises(ValueError, match=r"scoring in \('first_action', 'chunk'\)"):
        EvalConfig(policy_path='policy.safetensors', scoring='last_action').validate()


def test_wilson_interval_by_hand():
    from robot_rl.cli.evaluate import wilson_interval

    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(0, 20)[1] > 0.1


def test_one_view_augmentation_matches_the_pair_version():
    """BC augments one view per row; it must be the critic's pair augmentation, not a variant."""
    import torch

    from robot_rl.rl import learner

    cfg = learner.AugmentConfig()
    images = torch.randint(0, 255, (5, 16, 16, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    single, = learner.augment_views([images], cfg, torch.Generator().manual_seed(3))
    first, second = learner.augment_pair(images, images, cfg, torch.Generator().manual_seed(3))
    torch.testing.assert_close(single, first)
    torch.testing.assert_close(first, second)
    assert not torch.allclose(single, images.float() / 255.0)
