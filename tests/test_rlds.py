"""Tests of robot_rl.data.rlds on real TFDS directories: the Bridge sample and generated ones."""

import json
from pathlib import Path
import shutil
import subprocess
import sys
import threading

import cv2
import numpy as np
import pytest

from robot_rl.data import rlds
from robot_rl.data.bridge_spec import import_tf
from robot_rl.types import Episode

PROJECT_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32
EPISODE_LENGTHS = {'train': (2, 5, 9, 13, 4), 'val': (6, 3)}
# JPEG (quality 95, 4:2:0 chroma) of the smooth, saturated test frames: mean and worst absolute
# error in grey levels (measured about 2.7 and 35).
JPEG_MEAN_TOLERANCE = 4.0
JPEG_MAX_TOLERANCE = 48
EPISODE_FIELDS = ('images', 'states', 'actions', 'rewards', 'discounts', 'is_first', 'is_last',
                  'is_terminal', 'mc_returns')


# ---------------------------------------------------------------------------------- helpers

def make_episode(rng: np.random.Generator, n: int, index: int, success: bool,
                 smooth: bool) -> Episode:
    """A valid synthetic episode; smooth frames (upsampled noise) keep JPEG error small."""
    if smooth:
        small = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
        images = np.stack([cv2.resize(f, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_LINEAR)
                           for f in small])
    else:
        images = rng.integers(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    step = np.arange(n)
    rewards = np.full(n, -1.0, np.float32)
    if success:
        rewards[-1] = 0.0
    return Episode(
        images=images,
        states=rng.normal(size=(n, 7)).astype(np.float32),
        actions=rng.normal(size=(n, 7)).astype(np.float32),
        rewards=rewards,
        discounts=np.ones(n, np.float32),
        is_first=step == 0,
        is_last=step == n - 1,
        is_terminal=(step == n - 1) & success,
        language_instruction=f'put the cube {index} in the bowl (ü)',
        mc_returns=np.cumsum(rewards[::-1])[::-1].astype(np.float32),
        metadata={'episode': index, 'success': success, 'noise': 0.1, 'extra': {'a': [1, 2]}})


def make_splits(seed: int, smooth: bool):
    """{'train': [Episode], 'val': [Episode]} with several lengths, successes and failures."""
    rng = np.random.default_rng(seed)
    splits, index = {}, 0
    for split, lengths in EPISODE_LENGTHS.items():
        splits[split] = []
        for n in lengths:
            splits[split].append(make_episode(rng, n, index, success=index % 2 == 0,
                                              smooth=smooth))
            index += 1
    return splits


def assert_same_episode(got: Episode, want: Episode, exact_images: bool = True) -> None:
    for field in EPISODE_FIELDS:
        if field == 'images' and not exact_images:
            continue
        value = getattr(got, field)
        np.testing.assert_array_equal(value, getattr(want, field), err_msg=field)
        assert value.dtype == getattr(want, field).dtype, field
        assert value.flags.writeable, field
    assert got.language_instruction == want.language_instruction
    assert got.metadata == want.metadata


def copy_dataset(directory: Path, tmp_path: Path) -> Path:
    target = tmp_path / 'copy' / '1.0.0'
    shutil.copytree(directory, target)
    return target


def assert_all_readers_fail(directory: Path, match: str) -> None:
    """Every reader raises ValueError matching `match`, and none yields anything first."""
    yielded = []
    with pytest.raises(ValueError, match=match):
        yielded.extend(rlds.iter_episodes(directory))
    with pytest.raises(ValueError, match=match):
        yielded.extend(rlds.iter_steps(directory, batch_size=4))
    with pytest.raises(ValueError, match=match):
        rlds.compute_action_stats(directory, cache=False)
    assert yielded == []


def raw_bridge_episodes(directory: Path, split: str):
    """The Bridge sample through plain tfds (its own decoders), as lists of numpy steps."""
    _, tfds = import_tf()
    builder = tfds.builder_from_directory(str(directory))
    # tfds.as_numpy turns each nested steps dataset into an iterable of numpy steps.
    return [list(episode['steps']) for episode in tfds.as_numpy(builder.as_dataset(split=split))]


# --------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope='module')
def generated(tmp_path_factory):
    """{'png': (directory, splits), 'jpeg': (directory, splits)} written once per module."""
    root = tmp_path_factory.mktemp('generated')
    out = {}
    # Shard limits that give one episode per PNG shard and several per JPEG shard.
    for image_format, smooth, shard_bytes in (('png', False, 12_000), ('jpeg', True, 20_000)):
        splits = make_splits(seed=len(out), smooth=smooth)
        directory = rlds.write_dataset(
            {split: iter(episodes) for split, episodes in splits.items()},  # streamed
            root / image_format, name=f'test_{image_format}', image_format=image_format,
            max_shard_bytes=shard_bytes)
        out[image_format] = (directory, splits)
    return out


# --------------------------------------------- Bridge sample (bridge_debug_dir: conftest.py)

@pytest.mark.parametrize('split', ['train', 'val'])
def test_bridge_sample_reads_back(bridge_debug_dir, split):
    episodes = list(rlds.iter_episodes(bridge_debug_dir, split))
    raw = raw_bridge_episodes(bridge_debug_dir, split)
    assert len(episodes) == len(raw) == 25
    for episode, raw_steps in zip(episodes, raw):
        n = len(episode)
        assert n == len(raw_steps) >= 2
        assert episode.images.shape == (n, 64, 64, 3) and episode.images.dtype == np.uint8
        assert episode.states.shape == (n, 7) and episode.states.dtype == np.float32
        assert episode.actions.shape == (n, 7) and episode.actions.dtype == np.float32
        assert episode.language_instruction.strip()
        assert episode.is_first[0] and not episode.is_first[1:].any()
        assert episode.is_last[-1] and not episode.is_last[:-1].any()
        # The sample's episodes are clipped (no step has is_last): the reader marks the end.
        assert not any(step['is_last'] for step in raw_steps)
        assert episode.metadata[rlds.IS_LAST_ADDED] is True
        assert isinstance(episode.metadata['episode_id'], int)
        assert episode.mc_returns is None
        np.testing.assert_array_equal(
            episode.images, np.stack([s['observation']['image_0'] for s in raw_steps]))
        np.testing.assert_array_equal(episode.actions, np.stack([s['action'] for s in raw_steps]))
        assert episode.language_instruction == raw_steps[0]['language_instruction'].decode()


def test_bridge_action_stats_match_raw_tfds(bridge_debug_dir):
    actions = np.concatenate([np.stack([s['action'] for s in steps]) for steps in
                              raw_bridge_episodes(bridge_debug_dir, 'train')]).astype(np.float64)
    stats = rlds.compute_action_stats(bridge_debug_dir, 'train', cache=False)
    assert stats.num_steps == len(actions) == 250
    expected = {'mean': actions.mean(0), 'std': actions.std(0), 'minimum': actions.min(0),
                'maximum': actions.max(0), 'p01': np.percentile(actions, 1, axis=0),
                'p99': np.percentile(actions, 99, axis=0)}
    for name, value in expected.items():
        np.testing.assert_allclose(getattr(stats, name), value, rtol=1e-12, atol=1e-15,
                                   err_msg=name)


def test_bridge_step_pipeline_resizes(bridge_debug_dir):
    batches = list(rlds.iter_steps(bridge_debug_dir, 'val', batch_size=64, image_size=(32, 48)))
    steps = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
    assert len(steps['action']) == 250
    assert steps['image_primary'].shape == (250, 32, 48, 3)
    assert steps['image_primary'].dtype == np.uint8 and steps['image_primary'].flags.writeable
    assert steps['is_first'].sum() == steps['is_last'].sum() == 25
    assert all(isinstance(s, str) and s for s in steps['language_instruction'])
    assert 'mc_return' not in steps


# -------------------------------------------------------------------------- generated data

def test_png_round_trip_is_exact(generated):
    directory, splits = generated['png']
    for split, episodes in splits.items():
        got = list(rlds.iter_episodes(directory, split))
        assert len(got) == len(episodes)
        for g, want in zip(got, episodes):
            assert_same_episode(g, want)


def test_jpeg_round_trip_within_tolerance(generated):
    directory, splits = generated['jpeg']
    got = list(rlds.iter_episodes(directory, 'train'))
    assert len(got) == len(splits['train'])
    for g, want in zip(got, splits['train']):
        assert_same_episode(g, want, exact_images=False)
        error = np.abs(g.images.astype(np.int16) - want.images.astype(np.int16))
        assert error.mean() <= JPEG_MEAN_TOLERANCE and error.max() <= JPEG_MAX_TOLERANCE


def test_iter_episodes_resizes(generated):
    directory, splits = generated['png']
    want = splits['val'][0]
    resized = next(rlds.iter_episodes(directory, 'val', image_size=(16, 24)))
    assert resized.images.shape == (len(want), 16, 24, 3) and resized.images.dtype == np.uint8
    same = next(rlds.iter_episodes(directory, 'val', image_size=(IMAGE_SIZE, IMAGE_SIZE)))
    np.testing.assert_array_equal(same.images, want.images)


def test_generated_dataset_is_sharded_tfds(generated):
    _, tfds = import_tf()
    directory, splits = generated['png']
    builder = tfds.builder_from_directory(str(directory))
    assert builder.info.name == 'test_png' and str(builder.info.version) == '1.0.0'
    assert builder.info.splits['train'].num_shards > 1
    assert len(list(directory.glob('test_png-train.tfrecord-*-of-*'))) == \
        builder.info.splits['train'].num_shards
    assert not list(directory.parent.glob('.*'))  # no temporary leftovers
    for split, episodes in splits.items():
        assert builder.info.splits[split].num_examples == len(episodes)
    first = next(iter(tfds.as_numpy(builder.as_dataset(split='train', shuffle_files=False))))
    steps = list(first['steps'])
    want = splits['train'][0]
    np.testing.assert_array_equal(np.stack([s['observation']['image_0'] for s in steps]),
                                  want.images)
    np.testing.assert_array_equal([s['mc_return'] for s in steps], want.mc_returns)
    assert steps[0]['language_instruction'].decode() == want.language_instruction
    assert json.loads(first['episode_metadata']['metadata_json']) == want.metadata


def test_step_pipeline_matches_episodes(generated):
    directory, splits = generated['png']
    episodes = splits['train']
    batches = list(rlds.iter_steps(directory, 'train', batch_size=7))
    steps = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
    np.testing.assert_array_equal(steps['image_primary'],
                                  np.concatenate([e.images for e in episodes]))
    np.testing.assert_array_equal(steps['mc_return'],
                                  np.concatenate([e.mc_returns for e in episodes]))
    np.testing.assert_array_equal(steps['is_terminal'],
                                  np.concatenate([e.is_terminal for e in episodes]))
    assert list(steps['language_instruction']) == \
        [e.language_instruction for e in episodes for _ in range(len(e))]
    shuffled = list(rlds.iter_steps(directory, 'train', batch_size=7, shuffle_buffer=64, seed=1))
    actions = np.concatenate([b['action'] for b in shuffled])
    assert not np.array_equal(actions, steps['action'])
    np.testing.assert_array_equal(np.sort(actions, axis=0), np.sort(steps['action'], axis=0))


def test_action_stats_cached_beside_data(generated, tmp_path):
    directory = copy_dataset(generated['png'][0], tmp_path)
    actions = np.concatenate([e.actions for e in generated['png'][1]['val']])
    stats = rlds.compute_action_stats(directory, 'val')
    np.testing.assert_allclose(stats.mean, actions.astype(np.float64).mean(0), rtol=1e-12)
    cache_file = directory / rlds.STATS_FILE
    cached = json.loads(cache_file.read_text())
    assert cached['val']['stats'] == stats.to_dict()
    # A cache entry that still matches the split's size is what later calls return.
    cached['val']['stats']['mean'] = [7.0] * 7
    cache_file.write_text(json.dumps(cached))
    assert rlds.compute_action_stats(directory, 'val').mean.tolist() == [7.0] * 7
    np.testing.assert_array_equal(rlds.compute_action_stats(directory, 'val', cache=False).mean,
                                  stats.mean)


def test_tensorflow_not_imported_by_module():
    code = 'import sys, robot_rl.data.rlds; assert "tensorflow" not in sys.modules'
    subprocess.run([sys.executable, '-c', code], check=True, cwd=PROJECT_ROOT)


# ----------------------------------------------------------------------------------- writes

def test_failed_write_leaves_nothing(tmp_path):
    episodes = make_splits(seed=3, smooth=False)['train']

    def failing():
        yield from episodes[:2]
        raise RuntimeError('episode source died')

    with pytest.raises(RuntimeError, match='source died'):
        rlds.write_dataset({'train': failing()}, tmp_path, name='broken')
    assert list((tmp_path / 'broken').iterdir()) == []


@pytest.mark.parametrize('mutate, match', [
    (lambda e: setattr(e, 'states', e.states[:, :6]), r'episode 1: .*states'),
    (lambda e: setattr(e, 'images', e.images[:, :16]), r'episode 1: .*image shape'),
    (lambda e: setattr(e, 'mc_returns', None), r'episode 1: .*mc_returns'),
])
def test_inconsistent_episode_is_rejected(tmp_path, mutate, match):
    episodes = make_splits(seed=4, smooth=False)['train'][:3]
    mutate(episodes[1])
    with pytest.raises(ValueError, match=match):
        rlds.write_dataset({'train': episodes}, tmp_path, name='bad')
    assert not (tmp_path / 'bad' / '1.0.0').exists()


def test_existing_dataset_needs_overwrite(tmp_path):
    splits = make_splits(seed=5, smooth=False)
    directory = rlds.write_dataset({'val': splits['val']}, tmp_path)
    with pytest.raises(FileExistsError):
        rlds.write_dataset({'val': splits['val']}, tmp_path)
    rlds.write_dataset({'val': splits['val'][:1]}, tmp_path, overwrite=True)
    assert len(list(rlds.iter_episodes(directory, 'val'))) == 1
    assert sorted(p.name for p in tmp_path.joinpath(rlds.DEFAULT_NAME).iterdir()) == ['1.0.0']


# -------------------------------------------------------------------------------- bad input

def write_with_tfds(tmp_path: Path, state_dim: int = 7, drop: str = '',
                    action_dtype=np.float32) -> Path:
    """A Bridge-like dataset written with TFDS's own tools, one feature changed or dropped."""
    tf, tfds = import_tf()
    feats = tfds.features
    steps = {
        'observation': {
            'image_0': feats.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format='png'),
            'state': feats.Tensor(shape=(state_dim,), dtype=np.float32),
        },
        'action': feats.Tensor(shape=(7,), dtype=action_dtype),
        'reward': feats.Scalar(dtype=np.float32),
        'discount': feats.Scalar(dtype=np.float32),
        'is_first': feats.Scalar(dtype=np.bool_),
        'is_last': feats.Scalar(dtype=np.bool_),
        'is_terminal': feats.Scalar(dtype=np.bool_),
        'language_instruction': feats.Text(),
    }
    steps.pop(drop, None)
    n = 3
    values = {
        'observation': {'image_0': np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8),
                        'state': np.zeros((n, state_dim), np.float32)},
        'action': np.zeros((n, 7), action_dtype), 'reward': np.zeros(n, np.float32),
        'discount': np.ones(n, np.float32), 'is_first': np.arange(n) == 0,
        'is_last': np.arange(n) == n - 1, 'is_terminal': np.zeros(n, bool),
        'language_instruction': ['go'] * n,
    }
    values = {key: value for key, value in values.items() if key in steps}
    features = feats.FeaturesDict({'steps': feats.Dataset(steps)})
    directory = tmp_path / 'bad_bridge' / '1.0.0'
    directory.mkdir(parents=True)
    record = features.serialize_example({'steps': values})
    with tf.io.TFRecordWriter(str(directory / 'bad_bridge-train.tfrecord-00000-of-00001')) as w:
        w.write(record)
    split = tfds.core.SplitInfo(name='train', shard_lengths=[1], num_bytes=len(record))
    tfds.folder_dataset.write_metadata(data_dir=directory, features=features, split_infos=[split],
                                       check_data=True)  # TFDS itself reads it back
    return directory


@pytest.mark.parametrize('options, match', [
    ({'drop': 'language_instruction'}, r'missing required feature steps/language_instruction'),
    ({'state_dim': 6}, r'feature steps/observation/state is Tensor shape=\(6,\)'),
    ({'action_dtype': np.float64}, r'feature steps/action is Tensor .*dtype=float64'),
])
def test_bad_feature_spec_fails_naming_feature(tmp_path, options, match):
    assert_all_readers_fail(write_with_tfds(tmp_path, **options), match)


def test_truncated_shard_fails_naming_file(generated, tmp_path):
    directory = copy_dataset(generated['png'][0], tmp_path)
    shard = sorted(directory.glob('*-train.tfrecord-*'))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
    assert_all_readers_fail(directory, f'shard file .*{shard.name} is truncated')


def test_shard_cut_at_record_boundary_fails_naming_file(generated, tmp_path):
    directory = copy_dataset(generated['jpeg'][0], tmp_path)
    shard = max(directory.glob('*-train.tfrecord-*'), key=lambda p: p.stat().st_size)
    records = rlds._count_records(str(shard))
    assert records > 1, 'the test needs a shard of several records'
    with open(shard, 'rb') as f:
        length = int.from_bytes(f.read(8), 'little')
    shard.write_bytes(shard.read_bytes()[:length + 16])  # keep the first record whole
    assert_all_readers_fail(directory, f'shard file .*{shard.name} holds 1 records; '
                                       f'dataset_info.json lists {records}')


def test_missing_shard_and_split_fail_loudly(generated, tmp_path):
    directory = copy_dataset(generated['png'][0], tmp_path)
    with pytest.raises(ValueError, match=r"no split 'test'; it has \['train', 'val'\]"):
        rlds.iter_episodes(directory, 'test')
    shard = sorted(directory.glob('*-train.tfrecord-*'))[0]
    shard.unlink()
    assert_all_readers_fail(directory, f'shard file .*{shard.name} listed in dataset_info.json '
                                       'is missing')
    with pytest.raises(ValueError, match='not a TFDS dataset directory'):
        rlds.iter_episodes(tmp_path)


# ---------------------------------------------------------------------------------- appends

def test_append_adds_shards_without_rewriting_and_reads_back_in_order(tmp_path):
    episodes = make_splits(seed=6, smooth=False)['train'][:3]
    directory = rlds.append_episodes(episodes[:2], tmp_path, name='rec', image_format='png')
    first_shard = directory / 'rec-train.tfrecord-00000'
    written = first_shard.stat().st_mtime_ns, first_shard.read_bytes()
    assert rlds.append_episodes(episodes[2:], tmp_path, name='rec',
                                image_format='png') == directory
    assert (first_shard.stat().st_mtime_ns, first_shard.read_bytes()) == written
    assert rlds.check_dataset(directory).info.splits['train'].shard_lengths == [2, 1]
    for got, want in zip(rlds.iter_episodes(directory), episodes, strict=True):
        assert_same_episode(got, want)
    _, tfds = import_tf()
    assert tfds.builder_from_directory(str(directory)).info.splits['train'].num_examples == 3


def test_append_refuses_mismatched_episodes_and_keeps_the_dataset(tmp_path):
    episodes = make_splits(seed=7, smooth=False)['train'][:2]
    directory = rlds.append_episodes(episodes[:1], tmp_path, name='rec')
    before = sorted(p.name for p in directory.iterdir())
    episodes[1].images = episodes[1].images[:, :16, :16]
    with pytest.raises(ValueError, match='do not match the features'):
        rlds.append_episodes(episodes[1:], tmp_path, name='rec')
    assert sorted(p.name for p in directory.iterdir()) == before
    bad = make_splits(seed=7, smooth=False)['train'][1]
    bad.states = bad.states[:, :6]  # fails while writing: no shard is left behind
    with pytest.raises(ValueError, match='states'):
        rlds.append_episodes([bad], tmp_path, name='rec')
    assert sorted(p.name for p in directory.iterdir()) == before
    assert len(list(rlds.iter_episodes(directory))) == 1


def test_append_reuses_the_name_of_a_shard_orphaned_by_a_crash(tmp_path):
    episodes = make_splits(seed=8, smooth=False)['train'][:2]
    directory = rlds.append_episodes(episodes[:1], tmp_path, name='rec', image_format='png')
    # A crash after the shard rename, before dataset_info.json: a shard nobody lists.
    (directory / 'rec-train.tfrecord-00001').write_bytes(b'half a record')
    rlds.append_episodes(episodes[1:], tmp_path, name='rec', image_format='png')
    for got, want in zip(rlds.iter_episodes(directory), episodes, strict=True):
        assert_same_episode(got, want)


def test_concurrent_appends_take_turns_and_lose_nothing(tmp_path):
    # A recorder's flush timer and its shutdown flush can append at the same moment.
    episodes = make_splits(seed=10, smooth=False)['train'][:4]
    start = threading.Barrier(len(episodes))

    def append(episode):
        start.wait()
        rlds.append_episodes([episode], tmp_path, name='rec', image_format='png')

    for _ in range(3):
        threads = [threading.Thread(target=append, args=(e,)) for e in episodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    directory = tmp_path / 'rec' / rlds.DEFAULT_VERSION
    assert rlds.check_dataset(directory).info.splits['train'].shard_lengths == [1] * 12
    got = sorted(e.actions.tobytes() for e in rlds.iter_episodes(directory))
    assert got == sorted(e.actions.astype(np.float32).tobytes() for e in episodes * 3)


def test_append_refuses_a_dataset_with_counted_shard_names(tmp_path):
    episodes = make_splits(seed=9, smooth=False)['train'][:2]
    rlds.write_dataset({'train': episodes[:1]}, tmp_path, name='fixed')
    with pytest.raises(ValueError, match='not written by append_episodes'):
        rlds.append_episodes(episodes[1:], tmp_path, name='fixed')
