"""Open X-Embodiment ingestion: layouts (Bridge, RT-1 fractal), statistics and normalisation,
weighted mixtures fed to PyTorch, and critic pre-training on a mixture across world sizes.

Datasets: the real Bridge sample (bridge_debug_dir, conftest.py) and a small fractal-layout
dataset written here with TFDS's own serialisation (layouts.fractal_features): 48x64 JPEG
frames, dictionary actions with known gripper commands, poses with known quaternions.
"""

import json
from pathlib import Path
import shutil

import numpy as np
from omegaconf import OmegaConf
import pytest
from safetensors.torch import load_file
import torch
from torchrun_harness import run_critic_ranks

import robot_rl.cli.train_critic  # noqa: F401  (stores the hydra schema)
from robot_rl.cli.config import compose
from robot_rl.data import layouts, oxe, rlds
from robot_rl.data.bridge_spec import import_tf
from robot_rl.rl.train_critic import main
from robot_rl.types import IMAGE_KEY

FRAME = (48, 64, 3)
# gripper_closedness_action per episode (+1 close, -1 open, 0 no change) and the absolute
# gripper (1 open, 0 closed) the fractal layout must give.
GRIPPER_CASES = [
    ([0.0, 1.0, 0.0, 0.0, -1.0, 0.0], [1, 0, 0, 0, 1, 1]),
    ([0.05, -1.0, 0.0, 1.0], [0, 1, 1, 0]),       # first command opens: closed before it
    ([0.0, 0.0, 0.0], [1, 1, 1]),                 # no command at all: open throughout
]
TINY = ['critic=tiny', 'critic.encoder_width=8', 'critic.hidden_dims=[64,64]',
        'actor.hidden_dims=[64,64]', 'device=cpu', 'batch_size=16', 'critic.lang_dim=0']


def yaw_quaternion(yaw: np.ndarray) -> np.ndarray:
    """(N,) yaw angles -> (N, 4) quaternions (x, y, z, w) of rotations about z."""
    return np.stack([np.zeros_like(yaw), np.zeros_like(yaw), np.sin(yaw / 2), np.cos(yaw / 2)],
                    axis=-1)


def fractal_episode(rng: np.random.Generator, closedness, index: int):
    """(raw arrays, fractal record) of one episode with smooth frames (small JPEG error)."""
    n = len(closedness)
    small = rng.integers(0, 256, (n, 3, 4, 3)).astype(np.uint8)
    images = np.stack([np.kron(f, np.ones((16, 16, 1), np.uint8)) for f in small])
    raw = {
        'images': images,
        'world_vector': rng.normal(0, 0.02, (n, 3)), 'rotation_delta': rng.normal(0, 0.05, (n, 3)),
        'xyz': rng.normal(0, 0.3, (n, 3)), 'yaw': rng.uniform(-3, 3, n),
        'gripper_closed': (np.arange(n) % 2).astype(np.float32),
    }
    record = layouts.fractal_record(
        images, raw['world_vector'], raw['rotation_delta'], np.array(closedness),
        np.c_[raw['xyz'], yaw_quaternion(raw['yaw'])], raw['gripper_closed'],
        f'pick coke can {index}', success=index % 2 == 0)
    return raw, record


def write_fractal(data_dir: Path, seed: int = 0, name: str = 'fractal_test'):
    """A fractal-layout TFDS directory (train: the GRIPPER_CASES episodes, val: one more)."""
    rng = np.random.default_rng(seed)
    train = [fractal_episode(rng, c, i) for i, (c, _) in enumerate(GRIPPER_CASES)]
    val = [fractal_episode(rng, [0.0, 1.0, 0.0, 0.0, 0.0], 9)]
    directory = rlds.write_examples(
        {'train': [r for _, r in train], 'val': [r for _, r in val]},
        layouts.fractal_features(FRAME), data_dir, name=name)
    return directory, [raw for raw, _ in train]


@pytest.fixture(scope='module')
def fractal(tmp_path_factory):
    return write_fractal(tmp_path_factory.mktemp('fractal'))


# ----------------------------------------------------------------------------- layouts


def test_fractal_steps_are_standardised(fractal):
    directory, raws = fractal
    episodes = list(rlds.iter_episodes(directory, layout='fractal'))
    assert len(episodes) == len(GRIPPER_CASES)
    for episode, raw, (_, gripper) in zip(episodes, raws, GRIPPER_CASES):
        np.testing.assert_allclose(episode.actions[:, :3], raw['world_vector'], atol=1e-6)
        np.testing.assert_allclose(episode.actions[:, 3:6], raw['rotation_delta'], atol=1e-6)
        np.testing.assert_array_equal(episode.actions[:, 6], gripper)
        np.testing.assert_allclose(episode.states[:, :3], raw['xyz'], atol=1e-6)
        np.testing.assert_allclose(episode.states[:, 3:5], 0.0, atol=1e-6)
        np.testing.assert_allclose(episode.states[:, 5], raw['yaw'], atol=1e-5)
        np.testing.assert_array_equal(episode.states[:, 6], 1.0 - raw['gripper_closed'])
        assert episode.images.shape == (len(gripper),) + FRAME
        error = np.abs(episode.images.astype(int) - raw['images'].astype(int))
        assert error.mean() < 8.0  # JPEG at block edges (measured 3.4); a channel swap: ~80
    assert [e.language_instruction for e in episodes] == [f'pick coke can {i}' for i in range(3)]
    np.testing.assert_array_equal(episodes[0].rewards, [0, 0, 0, 0, 0, 1])  # RT-1: 1 on success
    assert episodes[0].is_terminal[-1] and not episodes[0].is_terminal[:-1].any()


def test_bridge_and_fractal_steps_have_identical_schemas(bridge_debug_dir, fractal):
    size = (32, 32)
    bridge = rlds.step_stream(bridge_debug_dir, image_size=size)
    fractal_ds = rlds.step_stream(fractal[0], image_size=size, layout='fractal')
    assert bridge.element_spec == fractal_ds.element_spec
    batches = [next(rlds.iter_steps(d, image_size=size, batch_size=4, layout=layout))
               for d, layout in ((bridge_debug_dir, 'bridge'), (fractal[0], 'fractal'))]
    schema = [{k: (v.shape, v.dtype) for k, v in b.items()} for b in batches]
    assert schema[0] == schema[1]
    assert set(schema[0]) == set(layouts.COLUMN_KEYS)
    assert schema[0][IMAGE_KEY] == ((4, 32, 32, 3), np.uint8)


def test_layout_mismatch_names_dataset_and_feature(bridge_debug_dir, fractal, tmp_path):
    with pytest.raises(ValueError, match=r"fractal_test/1.0.0 \(layout 'bridge'\): .*feature "
                                         r'steps/action is a FeaturesDict'):
        rlds.check_dataset(fractal[0])
    with pytest.raises(ValueError, match=r"bridge_debug/1.0.0 \(layout 'fractal'\): missing "
                                         r'required feature steps/observation/image '):
        list(rlds.iter_episodes(bridge_debug_dir, layout='fractal'))
    # A fractal dataset whose world_vector is declared 4-d: TFDS writes it, we refuse it.
    _, tfds = import_tf()
    features = layouts.fractal_features(FRAME)
    steps = features['steps'].feature
    steps['action']._feature_dict['world_vector'] = tfds.features.Tensor(shape=(4,),
                                                                         dtype=np.float32)
    _, record = fractal_episode(np.random.default_rng(0), [0.0, 1.0], 0)
    record['steps']['action']['world_vector'] = np.zeros((2, 4), np.float32)
    bad = rlds.write_examples({'train': [record]}, features, tmp_path, name='bad_fractal')
    with pytest.raises(ValueError, match=r"bad_fractal/1.0.0 \(layout 'fractal'\): feature "
                                         r'steps/action/world_vector is Tensor shape=\(4,\)'):
        rlds.compute_dataset_stats(bad, layout='fractal')
    with pytest.raises(ValueError, match="unknown dataset layout 'droid'; registered"):
        oxe.OxeSource('droid', str(bad), layout='droid')


# ----------------------------------------------------------------------------- statistics


def test_stats_cover_action_and_state_and_are_cached_beside_the_data(fractal, tmp_path):
    directory = tmp_path / 'copy' / '1.0.0'
    shutil.copytree(fractal[0], directory)
    stats = rlds.compute_dataset_stats(directory, layout='fractal')
    episodes = list(rlds.iter_episodes(directory, layout='fractal'))
    actions = np.concatenate([e.actions for e in episodes]).astype(np.float64)
    states = np.concatenate([e.states for e in episodes]).astype(np.float64)
    np.testing.assert_allclose(stats.action.mean, actions.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats.state.p99, np.percentile(states, 99, axis=0), rtol=1e-6)
    np.testing.assert_array_equal(stats.state.maximum, states.max(0))
    assert stats.num_episodes == 3 and stats.action.num_steps == len(actions)
    cached = json.loads((directory / rlds.STATS_FILE).read_text())['train']
    assert cached['layout'] == 'fractal' and cached['state_stats'] == stats.state.to_dict()
    cached['stats']['mean'] = [5.0] * 7  # the cache is what a later call returns
    (directory / rlds.STATS_FILE).write_text(json.dumps({'train': cached}))
    assert rlds.compute_dataset_stats(directory, layout='fractal').action.mean[0] == 5.0


def test_normalisation_round_trips(fractal):
    stats = rlds.compute_dataset_stats(fractal[0], layout='fractal', cache=False)
    episodes = list(rlds.iter_episodes(fractal[0], layout='fractal'))
    actions = np.concatenate([e.actions for e in episodes])
    for part, values in ((stats.action, actions),
                         (stats.state, np.concatenate([e.states for e in episodes]))):
        normal = part.normalise(values, 'normal')
        np.testing.assert_allclose(part.unnormalise(normal, 'normal'), values, atol=1e-5)
        inside = np.clip(values, part.p01, part.p99).astype(np.float32)
        bounded = part.normalise(inside, 'bounds')
        assert bounded.min() >= -1.0 and bounded.max() <= 1.0
        np.testing.assert_allclose(part.unnormalise(bounded, 'bounds'), inside, atol=1e-5)
    # Out of p01..p99: clipped to +-1; a dimension that never varies passes through.
    assert stats.action.normalise(stats.action.p99 + 1.0)[:6].tolist() == [1.0] * 6
    flat = stats.state.std < 1e-8
    assert flat[3] and flat[4]  # roll and pitch are 0 in every generated pose
    np.testing.assert_array_equal(stats.state.normalise(np.full(7, 0.25), 'normal')[flat], 0.25)
    mask = np.array([True] * 6 + [False])  # the 0/1 gripper left as it is
    np.testing.assert_array_equal(stats.action.normalise(actions, mask=mask)[:, 6],
                                  actions[:, 6])


def test_missing_stats_name_the_dataset_key(bridge_debug_dir, fractal):
    sources = [oxe.OxeSource('bridge', str(bridge_debug_dir)),
               oxe.OxeSource('fractal', str(fractal[0]), layout='fractal')]
    table = oxe.load_stats(sources[:1], cache=False)
    with pytest.raises(KeyError, match="no normalisation statistics for dataset key 'fractal'; "
                                       r"the table has \['bridge'\]"):
        table['fractal']
    with pytest.raises(oxe.MissingStatsError, match="dataset key 'fractal'"):
        oxe.mixture_dataset(sources, image_size=(32, 32), normalise='bounds', stats=table)
    with pytest.raises(ValueError, match='normalise needs stats'):
        oxe.mixture_dataset(sources, image_size=(32, 32), normalise='bounds')
    restored = oxe.StatsTable.from_dict(json.loads(json.dumps(table.to_dict())))
    np.testing.assert_array_equal(restored['bridge'].state.p01, table['bridge'].state.p01)


# ----------------------------------------------------------------------------- mixtures


def test_mixture_interleaves_by_weight_and_feeds_torch(bridge_debug_dir, fractal):
    sources = [oxe.OxeSource('bridge', str(bridge_debug_dir), weight=3.0),
               oxe.OxeSource('fractal', str(fractal[0]), layout='fractal', weight=1.0)]
    with pytest.raises(ValueError, match=r"frames differ in size \(\{'bridge': \(64, 64, 3\), "
                                         r"'fractal': \(48, 64, 3\)\}\)"):
        oxe.mixture_dataset(sources)
    stats = oxe.load_stats(sources, cache=False)
    ds = oxe.mixture_dataset(sources, batch_size=50, image_size=(32, 32), shuffle_buffer=64,
                             seed=0, normalise='bounds', stats=stats, num_threads=2)
    batches = [b for b, _ in zip(oxe.torch_batches(ds), range(4))]
    index = torch.cat([b[oxe.DATASET_INDEX_KEY] for b in batches]).numpy()
    assert 0.6 < (index == 0).mean() < 0.9  # 3:1 by weight, 200 draws
    batch = batches[0]
    assert batch[IMAGE_KEY].dtype == torch.uint8 and batch[IMAGE_KEY].shape == (50, 32, 32, 3)
    assert len(batch['language_instruction']) == 50
    actions = torch.cat([b['action'] for b in batches]).numpy()
    assert actions.min() >= -1.0 and actions.max() <= 1.0
    # Every fractal row is the normalisation of a real fractal action, with its own statistics.
    raw = np.concatenate([e.actions for e in rlds.iter_episodes(fractal[0], layout='fractal')])
    expected = stats['fractal'].action.normalise(raw)
    for row in actions[index == 1]:
        assert np.abs(expected - row).max(axis=1).min() < 1e-5


# ----------------------------------------------------------------------------- training


def last_state(run_dir: Path):
    """(sidecar extra, Adam step count of the critic optimiser) of the `last` checkpoint."""
    last = run_dir / 'checkpoints' / 'last'
    extra = json.loads((last / 'state.json').read_text())['extra']
    steps = load_file(last / 'state.safetensors')['critic_opt.0.step']
    return extra, int(steps.item())


def test_mixture_pretraining_resumes_across_world_sizes(bridge_debug_dir, fractal, tmp_path):
    """Bridge + fractal (V-GPS labels): 1 process to step 4, 2 gloo ranks to step 6, 1 process
    to step 8. The step count and every optimiser's state are global, so each resume goes on
    counting (Adam's step == the global step) whatever the world size, and both ranks end
    with identical weights."""
    overrides = ['data=oxe_mix', f'data.sources.0.path={bridge_debug_dir}',
                 f'data.sources.1.path={fractal[0]}', 'data.image_size=32',
                 'data.max_episodes=6', 'data.eval_split=null', f'output_dir={tmp_path / "runs"}',
                 'run_name=mix', 'checkpoint_every=2', *TINY]
    run_dir = tmp_path / 'runs' / 'mix'

    def train(*extra):
        return main(OmegaConf.to_object(compose('train_critic', overrides + list(extra))))

    train('steps=4')
    extra, adam_steps = last_state(run_dir)
    assert (extra['step'], extra['world_size'], adam_steps) == (4, 1, 4)
    assert [s['layout'] for s in extra['config']['data']['sources']] == ['bridge', 'fractal']
    before = load_file(run_dir / 'checkpoints' / 'last' / 'critic.safetensors')

    rank0, rank1 = run_critic_ranks(tmp_path, 2, overrides + ['steps=6', 'resume=true'])
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    extra, adam_steps = last_state(run_dir)
    assert (extra['step'], extra['world_size'], adam_steps) == (6, 2, 6)
    after = load_file(run_dir / 'checkpoints' / 'last' / 'critic.safetensors')
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for name in rank0:  # rank 0 wrote what both ranks hold
        assert torch.equal(after[name], rank0[name]), name

    result = train('steps=8', 'resume=true')
    assert result.step == 8
    extra, adam_steps = last_state(run_dir)
    assert (extra['step'], extra['world_size'], adam_steps) == (8, 1, 8)
    assert all(torch.isfinite(p).all() for p in result.algo.critic.parameters())


def test_config_rejects_an_unknown_layout(bridge_debug_dir, tmp_path):
    cfg = compose('train_critic', ['data=oxe_mix', f'data.sources.0.path={bridge_debug_dir}',
                                   f'data.sources.1.path={bridge_debug_dir}',
                                   'data.sources.1.layout=droid', f'output_dir={tmp_path}'])
    with pytest.raises(ValueError, match=r"data.sources\[1\]: layout 'droid' not in "
                                         r"\['bridge', 'fractal'\]"):
        OmegaConf.to_object(cfg).validate()
