"""Streamed Cal-QL transitions (robot_rl.data.transitions) against the in-memory replay path.

Datasets: a small Bridge-format directory written with rlds.write_dataset (episodes of 2 to 13
steps, successes with a real success transition, truncated failures), a small RT-1
fractal-layout directory (test_oxe.write_fractal), and the real Bridge sample for a short
streaming run of robot-rl-train-critic.
"""

from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
import pytest
from test_oxe import write_fractal
from test_rlds import make_episode

import robot_rl.cli.train_critic  # noqa: F401  (stores the hydra schema)
from robot_rl.cli.config import compose
from robot_rl.data import oxe, rlds, transitions
from robot_rl.models.critic import load_critic
from robot_rl.rl import learner
from robot_rl.rl.train_critic import main
from robot_rl.types import ActionSpace

LENGTHS = (2, 5, 9, 13, 4, 3, 7)
GAMMA = 0.9


def bridge_episodes(seed: int):
    """Episodes of LENGTHS; the even ones succeed on their last transition (reward 0,
    terminal), the odd ones are truncated failures (every reward -1)."""
    rng = np.random.default_rng(seed)
    episodes = []
    for index, n in enumerate(LENGTHS):
        episode = make_episode(rng, n, index, success=index % 2 == 0, smooth=True)
        episode.rewards[-2] = 0.0 if index % 2 == 0 else -1.0
        episode.actions[:] = rng.normal(0, 0.03, episode.actions.shape)
        episodes.append(episode)
    return episodes


@pytest.fixture(scope='module')
def bridge_dir(tmp_path_factory):
    return rlds.write_dataset({'train': bridge_episodes(0), 'val': bridge_episodes(1)[:2]},
                              tmp_path_factory.mktemp('bridge'), name='bridge_test')


@pytest.fixture(scope='module')
def fractal_dir(tmp_path_factory):
    return write_fractal(tmp_path_factory.mktemp('fractal'))[0]


def replay_transitions(path, layout: str, labelling: str, space: ActionSpace):
    """Every transition of the in-memory path (read_source -> normalise -> make_replay), in
    storage order, as the streamed batch fields."""
    episodes = learner.read_source(str(path), 'train', labelling, layout=layout)
    buffer = learner.make_replay((learner.normalise_actions(e, space) for e in episodes), GAMMA)
    fields = {key: [] for key in ('images', 'next_images', 'states', 'next_states', 'actions',
                                  'rewards', 'dones', 'mc_returns', 'instructions')}
    for e in buffer.episodes():
        fields['images'].append(e.images[:-1])
        fields['next_images'].append(e.images[1:])
        fields['states'].append(e.states[:-1])
        fields['next_states'].append(e.states[1:])
        fields['actions'].append(e.actions[:-1])
        fields['rewards'].append(e.rewards[:-1])
        fields['dones'].append(e.is_terminal[1:].astype(np.float32))
        fields['mc_returns'].append(e.mc_returns[:-1])
        fields['instructions'].append(np.array([e.language_instruction] * (len(e) - 1)))
    return {key: np.concatenate(value) for key, value in fields.items()}


def one_pass(sources, space, **options):
    """Every transition of one unshuffled pass over `sources`, as one TransitionBatch."""
    ds = transitions.transition_dataset(sources, batch_size=10_000, gamma=GAMMA,
                                        action_space=space, shuffle_buffer=0, repeat=False,
                                        drop_remainder=False, **options)
    batches = list(transitions.transition_batches(ds))
    assert len(batches) == 1
    return batches[0]


@pytest.mark.parametrize('layout', ['bridge', 'fractal'])
@pytest.mark.parametrize('labelling', ['dataset', 'vgps'])
def test_streamed_transitions_equal_the_replay_buffers(bridge_dir, fractal_dir, layout,
                                                       labelling):
    path = bridge_dir if layout == 'bridge' else fractal_dir
    episodes = learner.read_source(str(path), 'train', labelling, layout=layout)
    space = learner.fit_action_space(episodes)
    want = replay_transitions(path, layout, labelling, space)
    source = transitions.TransitionSource('a', str(path), layout=layout, labelling=labelling)
    got = one_pass([source], space)
    assert len(got.rewards) == sum(len(e) - 1 for e in rlds.iter_episodes(path, layout=layout))
    for field in ('images', 'next_images', 'states', 'next_states', 'actions', 'rewards',
                  'dones', 'mc_returns'):
        np.testing.assert_array_equal(getattr(got, field), want[field], err_msg=field)
    np.testing.assert_array_equal(np.array(got.instructions)[got.instruction_ids],
                                  want['instructions'])
    assert np.abs(got.actions).max() <= 1.0
    if labelling == 'dataset' and layout == 'bridge':
        # Truncated failures: never done, every return the failed-trajectory value -1 / (1 - g).
        assert got.dones.sum() == 4 and (got.mc_returns == -10.0).sum() == 4 + 12 + 2
    if labelling == 'vgps':  # three success transitions per episode (one for a 2-step one)
        lengths = [len(e) - 1 for e in rlds.iter_episodes(path, layout=layout)]
        assert got.dones.sum() == sum(min(n, 3) for n in lengths)
        assert set(got.rewards[got.dones == 1]) == {0.0}
        assert set(got.rewards[got.dones == 0]) <= {-1.0}


def test_mixture_weights_and_shuffled_pairs(bridge_dir, fractal_dir):
    sources = [transitions.TransitionSource('bridge', str(bridge_dir), weight=3.0,
                                            labelling='vgps'),
               transitions.TransitionSource('fractal', str(fractal_dir), layout='fractal',
                                            weight=1.0, labelling='vgps')]
    ds = transitions.transition_dataset(sources, batch_size=64, gamma=GAMMA,
                                        action_space=ActionSpace.bridge(),
                                        image_size=(24, 24), shuffle_buffer=50, seed=3)
    batches = [b for _, b in zip(range(25), rlds.numpy_batches(ds, 'mix'))]
    index = np.concatenate([b[oxe.DATASET_INDEX_KEY] for b in batches])
    assert len(index) == 1600
    assert np.mean(index == 0) == pytest.approx(0.75, abs=0.04)  # 3 : 1 (sd 0.011)
    first = batches[0]
    assert first['image_primary'].shape == first['next_image_primary'].shape == (64, 24, 24, 3)
    # Shuffled across episodes, yet each row keeps its own labels: V-GPS rewards are 0 or -1
    # and a done row has reward 0 and return 0.
    done = first['done'] == 1
    assert set(first['reward'][done]) == {0.0} and set(first['mc_return'][done]) == {0.0}
    assert np.all(first['mc_return'][~done] < 0)
    assert len(set(first['language_instruction'])) > 2


def test_shards_are_disjoint_and_cover_the_split(bridge_dir):
    source = transitions.TransitionSource('a', str(bridge_dir))
    space = ActionSpace.bridge()
    every = one_pass([source], space)
    parts = [one_pass([source], space, shard=(rank, 3)) for rank in range(3)]
    keys = [{tuple(row) for row in p.states} for p in parts]
    assert all(keys) and sum(len(k) for k in keys) == len(every.states)
    assert set.union(*keys) == {tuple(row) for row in every.states}
    limited = one_pass([source], space, shard=(1, 2), max_episodes=4)  # episodes 2, 3 only
    assert len(limited.rewards) == LENGTHS[2] - 1 + LENGTHS[3] - 1
    with pytest.raises(ValueError, match='fewer than the 8 shards'):
        one_pass([source], space, shard=(0, 8))


def test_bad_episodes_are_named(tmp_path):
    episodes = bridge_episodes(0)
    episodes[3].rewards[2] = np.nan
    path = rlds.write_dataset({'train': episodes}, tmp_path, name='broken')
    source = transitions.TransitionSource('broken', str(path))
    with pytest.raises(ValueError, match=r'broken/1.0.0 \[train\].*reward is not finite at '
                                         r'step 2'):
        one_pass([source], ActionSpace.bridge())
    with pytest.raises(ValueError, match="labelling must be one of .*'demo'"):
        transitions.TransitionSource('x', str(path), labelling='demo')


def test_action_space_from_stats_spans_every_source(bridge_dir, fractal_dir):
    stats = [rlds.compute_dataset_stats(bridge_dir, cache=False).action,
             rlds.compute_dataset_stats(fractal_dir, layout='fractal', cache=False).action]
    space = learner.action_space_from_stats(stats, 'data', margin=0.1)
    actions = [np.concatenate([e.actions for e in rlds.iter_episodes(d, layout=layout)])
               for d, layout in ((bridge_dir, 'bridge'), (fractal_dir, 'fractal'))]
    p01 = np.minimum(*[np.percentile(a, 1, axis=0) for a in actions])
    p99 = np.maximum(*[np.percentile(a, 99, axis=0) for a in actions])
    np.testing.assert_allclose(space.low[:6], p01[:6] - 0.1 * (p99 - p01)[:6], rtol=1e-5)
    np.testing.assert_allclose(space.high[:6], p99[:6] + 0.1 * (p99 - p01)[:6], rtol=1e-5)
    assert learner.action_space_from_stats(stats, 'bridge') == ActionSpace.bridge()


def test_streaming_train_critic_on_the_bridge_sample(bridge_debug_dir, tmp_path):
    cfg = OmegaConf.to_object(compose('train_critic', [
        'data=bridge_debug', f'data.sources.0.path={bridge_debug_dir}', 'data.streaming=true',
        'data.shuffle_buffer=64', 'data.eval_max_episodes=2', 'data.image_size=32',
        f'output_dir={tmp_path / "runs"}', 'run_name=stream', 'critic=tiny',
        'critic.encoder_width=8', 'critic.hidden_dims=[32,32]', 'actor.hidden_dims=[32,32]',
        'critic.lang_dim=0', 'device=cpu', 'batch_size=8', 'steps=3', 'log_every=1',
        'eval_every=3', 'checkpoint_every=3', 'algo.autocast=false']))
    result = main(cfg)
    assert result.step == 3 and np.isfinite(result.metrics['eval/q_mc_pearson'])
    last = Path(result.run_dir) / 'checkpoints' / 'last'
    space = load_critic(last / learner.CRITIC_FILE).action_space
    stats = rlds.compute_dataset_stats(bridge_debug_dir, 'train').action
    assert space == learner.action_space_from_stats([stats], 'data', 0.1)
