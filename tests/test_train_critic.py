"""Offline critic training: labelling, normaliser, augmentation, checkpoints, the console
script, resume, bad input, two gloo ranks, and a learning signal on held-out episodes.

Datasets are real Bridge-format TFDS directories: a synthetic "move right" task written with
write_dataset (a bright bar shows the gripper's x; pushing right, a[0] > 0, reaches the goal and
succeeds, pushing left fails), and the real Bridge sample where present.
"""

import math
from pathlib import Path
import subprocess
import sys

import numpy as np
from omegaconf import OmegaConf
import pytest
import torch
from torchrun_harness import run_critic_ranks

import robot_rl.cli.train_critic  # noqa: F401  (stores the hydra schema)
from robot_rl.cli.config import compose
from robot_rl.data.replay import ReplayBuffer
from robot_rl.models.critic import load_critic
from robot_rl.rl import evaluate_critic, learner
from robot_rl.rl.calql import CalQL
from robot_rl.rl.train_critic import main
from robot_rl.types import ActionSpace, Episode

BIN = Path(sys.executable).parent
SIZE = 32
INSTRUCTION = 'move the gripper to the right edge'
# A tiny critic and actor; the tests' budgets are steps, not minutes.
TINY = ['critic=tiny', 'critic.encoder_width=8', 'critic.hidden_dims=[64,64]',
        'actor.hidden_dims=[64,64]', 'device=cpu', 'batch_size=32']


# ----------------------------------------------------------------------------- data


def bar_episode(rng: np.random.Generator, success: bool, horizon: int = 8) -> Episode:
    """One episode of the synthetic task: x starts mid-image and moves by 0.12 * a[0] a step.

    Successful episodes push right (a[0] > 0) until x >= 0.95: reward 0, terminal. Failed ones
    push left and are truncated after `horizon` transitions, every reward -1.
    """
    x, xs, actions = rng.uniform(0.35, 0.65), [], []
    while True:
        xs.append(x)
        if (success and x >= 0.95) or len(actions) == horizon:
            break
        push = rng.uniform(0.4, 1.0) * (1 if success else -1)
        actions.append(np.r_[push, rng.uniform(-0.5, 0.5, 5), rng.integers(0, 2)])
        x = float(np.clip(x + 0.12 * push, 0.0, 1.0))
    n = len(xs)
    images = rng.integers(20, 60, (n, SIZE, SIZE, 3), dtype=np.uint8)
    for i, xi in enumerate(xs):
        column = int(round(xi * (SIZE - 1)))
        images[i, :, max(column - 1, 0):column + 2] = 230
    rewards = np.full(n, -1.0, np.float32)
    rewards[-1] = 0.0  # padding
    if success:
        rewards[-2] = 0.0
    last = np.arange(n) == n - 1
    return Episode(
        images=images, states=np.zeros((n, 7), np.float32),
        actions=np.concatenate([np.array(actions, np.float32) * 0.05,
                                np.zeros((1, 7), np.float32)]),
        rewards=rewards, discounts=np.where(last & success, 0.0, 1.0).astype(np.float32),
        is_first=np.arange(n) == 0, is_last=last, is_terminal=last & success,
        language_instruction=INSTRUCTION, metadata={'success': success})


def bar_episodes(seed: int, count: int):
    rng = np.random.default_rng(seed)
    return [bar_episode(rng, success=i % 2 == 0) for i in range(count)]


def write_bar_dataset(directory: Path, train: int = 24, val: int = 8, seed: int = 0,
                      corrupt=None) -> str:
    """Write the synthetic task as a Bridge-format directory; returns its version dir."""
    from robot_rl.data.rlds import write_dataset

    splits = {'train': bar_episodes(seed, train), 'val': bar_episodes(seed + 1, val)}
    if corrupt is not None:
        corrupt(splits['train'])
    return str(write_dataset(splits, directory, name='bars', image_format='png'))


@pytest.fixture(scope='module')
def bars(tmp_path_factory):
    return write_bar_dataset(tmp_path_factory.mktemp('bars'))


def config(data_dir, tmp_path, *overrides):
    """The composed, typed config of robot-rl-train-critic for `data_dir`."""
    cfg = compose('train_critic', ['data=sim', f'data.sources.0.path={data_dir}',
                                   f'output_dir={tmp_path / "runs"}', *TINY, *overrides])
    return OmegaConf.to_object(cfg)


def scalars(run_dir: Path, tag: str):
    """(step, value) pairs of one TensorBoard scalar, over every event file of a run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = []
    for events in sorted(run_dir.glob('events.out.tfevents.*')):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()['scalars']:
            points += [(e.step, e.value) for e in accumulator.Scalars(tag)]
    return sorted(points)


# ----------------------------------------------------------------------------- units


def test_vgps_labels_match_the_reference_rewards_dones_and_returns():
    episode = bar_episodes(0, 2)[1]  # 8 transitions, 9 steps
    parts = learner.label_vgps(episode)
    buffer = ReplayBuffer(gamma=0.9)
    for part in parts:
        buffer.add_episode(part)
    batch = buffer.sample(4096, np.random.default_rng(0))
    # Transition t is identified by its action; V-GPS: t < 5 -> (-1, not done), else (0, done).
    first = {float(a): t for t, a in enumerate(episode.actions[:-1, 0])}
    for action, reward, done, mc in zip(batch.actions[:, 0], batch.rewards, batch.dones,
                                        batch.mc_returns):
        t = first[float(action)]
        assert (reward, done) == ((-1.0, 0.0) if t < 5 else (0.0, 1.0))
        assert mc == pytest.approx(-(1 - 0.9 ** max(5 - t, 0)) / 0.1, abs=1e-5)
    assert buffer.num_transitions == episode.num_transitions


def test_action_space_from_percentiles_widened_with_fallback_for_constant_dims():
    episodes = bar_episodes(0, 20)
    for episode in episodes:
        episode.actions[:, 3] = 0.0  # a dimension that never varies
    space = learner.fit_action_space(episodes, 'data', margin=0.1)
    actions = np.concatenate([e.actions[:-1] for e in episodes])
    p01, p99 = np.percentile(actions[:, 0], [1, 99])
    assert space.low[0] == pytest.approx(p01 - 0.1 * (p99 - p01), rel=1e-5)
    assert space.high[0] == pytest.approx(p99 + 0.1 * (p99 - p01), rel=1e-5)
    assert (space.low[3], space.high[3]) == (ActionSpace.bridge().low[3],
                                             ActionSpace.bridge().high[3])
    assert np.abs(space.normalise(space.clip(actions))).max() <= 1.0
    assert learner.fit_action_space(episodes, 'bridge') == ActionSpace.bridge()


def test_augmentation_shares_one_draw_per_pair_and_can_be_the_identity():
    images = torch.randint(0, 256, (6, SIZE, SIZE, 3), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    out, out_next = learner.augment_pair(images, images.clone(), learner.AugmentConfig(),
                                         generator)
    assert out.shape == (6, SIZE, SIZE, 3) and out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    torch.testing.assert_close(out, out_next)  # same frame in, same crop and colours out
    assert not torch.allclose(out, images.float() / 255, atol=0.02)
    identity = learner.AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                                     brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    same, _ = learner.augment_pair(images, images, identity, generator)
    torch.testing.assert_close(same, images.float() / 255, atol=1e-4, rtol=0)


def test_roc_auc_and_pearson_by_hand():
    assert evaluate_critic.roc_auc(np.array([3.0, 2.0, 1.0, 0.0]),
                                   np.array([1, 1, 0, 0], bool)) == 1.0
    # Ties count half: one positive above one negative, one tie -> (1 + 0.5) / 2.
    assert evaluate_critic.roc_auc(np.array([2.0, 1.0, 1.0]),
                                   np.array([1, 1, 0], bool)) == pytest.approx(0.75)
    assert math.isnan(evaluate_critic.roc_auc(np.ones(3), np.ones(3, bool)))
    assert evaluate_critic.pearson(np.arange(5.0), 2 * np.arange(5.0) + 1) == pytest.approx(1)


def test_validate_names_every_problem(bars, tmp_path):
    cfg = config(bars, tmp_path, 'data.sources.0.labelling=demo', 'data.eval_split=test',
                 'batch_size=0')
    with pytest.raises(ValueError) as err:
        cfg.validate()
    for words in ("labelling 'demo'", "no split 'test'", 'batch_size'):
        assert words in str(err.value)


# ----------------------------------------------------------------------------- runs


def test_console_script_logs_checkpoints_and_resumes(bars, tmp_path):
    """The real console script: TensorBoard events, config, `last`; resume keeps counting."""
    args = [str(BIN / 'robot-rl-train-critic'), 'data=sim', f'data.sources.0.path={bars}',
            f'output_dir={tmp_path / "runs"}', *TINY, 'log_every=5', 'eval_every=10',
            'checkpoint_every=10', 'run_name=smoke']

    def run(*extra):
        result = subprocess.run(args + list(extra), cwd=tmp_path, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    run('steps=20')
    run_dir = tmp_path / 'runs' / 'smoke'
    last = run_dir / 'checkpoints' / 'last'
    assert last.resolve().name == 'step_000000020'
    assert (run_dir / 'config.yaml').is_file()
    for name in ('critic', 'target_critic', 'actor', 'state'):
        assert (last / f'{name}.safetensors').is_file() and (last / f'{name}.json').is_file()
    critic, space, extra = load_critic(last / 'critic.safetensors')
    assert extra['step'] == 20 and space is not None
    assert [s for s, _ in scalars(run_dir, 'train/loss_td')] == [5, 10, 15, 20]
    for tag in ('time/steps_per_second', 'eval/auc', 'charts/q_vs_mc', 'train/bound_rate'):
        assert scalars(run_dir, tag), tag

    run('steps=30', 'resume=true')
    assert last.resolve().name == 'step_000000030'
    assert [s for s, _ in scalars(run_dir, 'train/loss_td')] == [5, 10, 15, 20, 25, 30]
    _, resumed_space, _ = load_critic(last / 'critic.safetensors')
    assert resumed_space == space  # the one normaliser survives the resume


def test_resume_restores_every_tensor_and_rejects_other_shapes(bars, tmp_path):
    result = main(config(bars, tmp_path, 'steps=6', 'run_name=r', 'data.eval_split=null',
                         'algo.lagrange=true'))
    last = result.run_dir / 'checkpoints' / 'last'
    fresh = main(config(bars, tmp_path, 'steps=6', 'run_name=r', 'resume=true',
                        'algo.lagrange=true'))  # nothing left to do: just loads
    assert fresh.step == 6
    for a, b in ((result.algo.critic, fresh.algo.critic), (result.algo.actor, fresh.algo.actor),
                 (result.algo.target_critic, fresh.algo.target_critic)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name
    for name in ('critic_opt', 'actor_opt', 'entropy_opt', 'alpha_opt'):
        want, got = (getattr(r.algo, name).state_dict() for r in (result, fresh))
        for index, state in want['state'].items():
            for key, value in state.items():
                assert torch.equal(torch.as_tensor(value),
                                   torch.as_tensor(got['state'][index][key])), (name, key)
    assert fresh.algo.log_alpha.item() == result.algo.log_alpha.item()

    with pytest.raises(ValueError, match="tensor 'encoder.stem.0.weight' has shape"):
        main(config(bars, tmp_path, 'steps=8', 'run_name=r', 'resume=true',
                    'critic.encoder_width=16'))
    assert last.resolve().name == 'step_000000006'


def test_evaluation_reloads_the_checkpoint(bars, tmp_path, capsys):
    result = main(config(bars, tmp_path, 'steps=4', 'run_name=e'))
    last = result.run_dir / 'checkpoints' / 'last'
    metrics = evaluate_critic.evaluate_checkpoint(last)
    for name, value in result.metrics.items():  # same critic, same data, same actor samples
        if name.startswith('eval/'):
            assert metrics[name[len('eval/'):]] == pytest.approx(value, rel=1e-4, nan_ok=True)
    evaluate_critic.main([str(last), '--split', 'val'])
    assert 'calibration_gap' in capsys.readouterr().out


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(bars, tmp_path, monkeypatch):
    update, calls = CalQL.update, []

    def poisoned(self, batch):
        calls.append(1)
        if len(calls) == 8:  # a corrupted weight makes every loss NaN from here on
            with torch.no_grad():
                self.critic.head.out.bias.fill_(math.nan)
        return update(self, batch)

    monkeypatch.setattr(CalQL, 'update', poisoned)
    cfg = config(bars, tmp_path, 'steps=20', 'checkpoint_every=5', 'run_name=nan',
                 'data.eval_split=null')
    with pytest.raises(FloatingPointError, match=r'non-finite loss at step 8.*step 5\)'):
        main(cfg)
    last = tmp_path / 'runs' / 'nan' / 'checkpoints' / 'last'
    assert last.resolve().name == 'step_000000005'
    critic, _, _ = load_critic(last / 'critic.safetensors')
    assert all(torch.isfinite(p).all() for p in critic.parameters())


def test_non_finite_reward_names_the_episode(tmp_path):
    def corrupt(episodes):
        episodes[2].rewards[1] = np.nan

    data = write_bar_dataset(tmp_path / 'bad', train=4, val=2, corrupt=corrupt)
    with pytest.raises(ValueError, match=rf'{data} \[train\] episode 2: rewards is not finite'):
        main(config(data, tmp_path, 'steps=2'))


def test_bridge_sample_td_loss_falls(bridge_debug_dir, tmp_path):
    """V-GPS labels on the real Bridge sample: the TD loss of the last logging window is well
    below that of the first.

    alpha is 0.1 here, not V-GPS's 5: at a test budget of 150 steps the alpha = 5 CQL term
    holds Q(s, a_data) about alpha / 2 above its TD target (its push on the data action is
    only balanced once the sampled actions' values have separated), so the TD loss then says
    nothing about whether the critic fits its targets.
    """
    cfg = compose('train_critic', [f'data.sources.0.path={bridge_debug_dir}',
                                   'data.image_size=32', 'data.eval_split=null',
                                   f'output_dir={tmp_path / "runs"}', *TINY, 'steps=150',
                                   'log_every=10', 'algo.critic_lr=1e-3', 'algo.alpha=0.1'])
    result = main(OmegaConf.to_object(cfg))
    assert result.action_space != ActionSpace.bridge()  # fitted to the sample's actions
    losses = [v for _, v in scalars(result.run_dir, 'train/loss_td')]
    assert len(losses) == 15
    assert losses[-1] < 0.75 * losses[0], losses


def test_two_gloo_ranks_end_with_identical_weights(bars, tmp_path):
    """torchrun, 2 CPU processes on gloo: different batches per rank, one mean gradient."""
    rank0, rank1 = run_critic_ranks(tmp_path, 2, [
        'data=sim', f'data.sources.0.path={bars}', *TINY, 'critic.lang_dim=0', 'steps=6',
        'data.eval_split=null', f'output_dir={tmp_path / "runs"}'])
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    # Only rank 0 writes: one run directory.
    assert len(list((tmp_path / 'runs').iterdir())) == 1


def test_critic_ranks_successful_actions_above_failed_ones(tmp_path):
    """Held-out AUC of Q(s, a_data) over all transitions, and over first transitions only:
    those share one state distribution whatever the outcome, so there only the action can
    tell success from failure.

    In this task pushing left costs the optimal continuation only a step or two, so the true
    gap Q(s, right) - Q(s, left) is small; with V-GPS's alpha = 5 and random crops (which move
    the bar, the whole state here) the first-transition ranking swung with floating-point
    order (AUC 0.27-0.82 over seeds and thread counts). With alpha 1 and no crops the gap is
    2.1-2.6 and the critic prefers pushing right at every held-out first state.
    """
    data = write_bar_dataset(tmp_path / 'bars', train=60, val=20, seed=1)
    result = main(config(data, tmp_path, 'steps=800', 'eval_every=800', 'critic.lang_dim=0',
                         'algo.critic_lr=1e-3', 'algo.gamma=0.9', 'algo.tau=0.05',
                         'algo.alpha=1', 'augment.enabled=false'))
    assert result.metrics['eval/auc'] > 0.8, result.metrics
    assert result.metrics['eval/q_mc_pearson'] > 0.5, result.metrics
    held_out = bar_episodes(2, 40)
    critic = result.algo.critic
    images = torch.from_numpy(np.stack([e.images[0] for e in held_out]))
    actions = result.action_space.normalise(np.stack([e.actions[0] for e in held_out]))
    push = np.zeros((2, 7), np.float32)
    push[:, 0] = [0.05, -0.05]  # the strongest push right and left, nothing else
    push = torch.from_numpy(result.action_space.normalise(push))
    with torch.no_grad():
        z = critic.encode(images, None)
        q = critic.q(z, torch.from_numpy(actions)[:, None]).min(0).values[:, 0]
        q_right, q_left = critic.q(z, push[None].expand(len(z), -1, -1)).min(0).values.T
    auc = evaluate_critic.roc_auc(q.numpy(), np.array([e.success for e in held_out]))
    assert auc > 0.65, auc
    # At the same state, pushing right (towards success) is worth more than pushing left.
    assert (q_right > q_left).float().mean() > 0.8, (q_right - q_left)
