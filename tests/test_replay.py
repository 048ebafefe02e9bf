"""Replay buffer: transitions by index, done masks, disk round trips, eviction and mixing.

Every synthetic episode writes its id and step number into states[:, 0:2], so a sampled row can
be traced back to the exact original step it must equal.
"""

import logging

import numpy as np
import pytest

from robot_rl.data.replay import (EpisodeBuilder, MixedSampler, read_episode, ReplayBuffer,
                                  write_episode)
from robot_rl.data.returns import episode_mc_returns
from robot_rl.types import Episode

SIZE = 16
GAMMA = 0.99


def make_episode(eid, n, terminal, instruction='put the cup in the sink', size=SIZE):
    """n steps with random frames; sparse reward: 0 on the last transition of a success."""
    rng = np.random.default_rng(eid)
    states = rng.normal(size=(n, 7)).astype(np.float32)
    states[:, 0], states[:, 1] = eid, np.arange(n)
    rewards = np.full(n, -1.0, np.float32)
    rewards[n - 2] = 0.0 if terminal else -1.0
    rewards[-1] = 0.0  # padding
    last = np.arange(n) == n - 1
    return Episode(
        images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), states=states,
        actions=rng.uniform(-1, 1, (n, 7)).astype(np.float32), rewards=rewards,
        discounts=np.where(last & terminal, 0.0, 1.0).astype(np.float32),
        is_first=np.arange(n) == 0, is_last=last, is_terminal=last & terminal,
        language_instruction=instruction, metadata={'episode_id': eid, 'success': terminal})


def fill(buffer, specs, **kwargs):
    """Add make_episode(eid, n, terminal) for each spec; return {eid: episode}."""
    episodes = {eid: make_episode(eid, n, terminal, **kwargs) for eid, n, terminal in specs}
    for ep in episodes.values():
        buffer.add_episode(ep)
    return episodes


def row_ids(batch):
    """(episode id, step t) of every row."""
    return batch.states[:, 0].astype(int), batch.states[:, 1].astype(int)


def assert_rows_match(batch, originals):
    """Each row equals transition (t, t + 1) of its own episode, done mask and return included."""
    for i, (eid, t) in enumerate(zip(*row_ids(batch))):
        ep = originals[eid]
        assert t + 1 < len(ep), 'transition starts at the last step of its episode'
        np.testing.assert_array_equal(batch.images[i], ep.images[t])
        np.testing.assert_array_equal(batch.next_images[i], ep.images[t + 1])
        np.testing.assert_array_equal(batch.states[i], ep.states[t])
        np.testing.assert_array_equal(batch.next_states[i], ep.states[t + 1])
        np.testing.assert_array_equal(batch.actions[i], ep.actions[t])
        assert batch.rewards[i] == ep.rewards[t]
        assert batch.dones[i] == float(ep.is_terminal[t + 1])
        assert batch.mc_returns[i] == episode_mc_returns(ep, GAMMA)[t]
        assert batch.instructions[batch.instruction_ids[i]] == ep.language_instruction


def test_sampled_transitions_are_consecutive_steps_of_one_episode():
    buffer = ReplayBuffer(gamma=GAMMA)
    originals = fill(buffer, [(0, 5, True), (1, 2, False), (2, 9, False), (3, 4, True)])
    batch = buffer.sample(512, np.random.default_rng(0))
    assert batch.images.shape == (512, SIZE, SIZE, 3) and batch.images.dtype == np.uint8
    assert batch.states.shape == (512, 7) and batch.dones.dtype == np.float32
    assert batch.instruction_ids.dtype == np.int64
    assert_rows_match(batch, originals)


def test_no_transition_crosses_an_episode_boundary_and_all_are_reachable():
    buffer = ReplayBuffer()
    originals = fill(buffer, [(0, 3, True), (1, 6, False), (2, 2, True)])
    assert buffer.num_steps == 11 and buffer.num_transitions == 8 and len(buffer) == 3
    eids, steps = row_ids(buffer.sample(4000, np.random.default_rng(1)))
    seen = set(zip(eids.tolist(), steps.tolist()))
    expected = {(eid, t) for eid, ep in originals.items() for t in range(len(ep) - 1)}
    assert seen == expected


def test_dones_mark_true_terminals_only_not_truncations():
    buffer = ReplayBuffer(gamma=GAMMA)
    fill(buffer, [(0, 4, True), (1, 4, False)])
    batch = buffer.sample(1000, np.random.default_rng(2))
    eids, steps = row_ids(batch)
    np.testing.assert_array_equal(batch.dones, ((eids == 0) & (steps == 2)).astype(np.float32))
    # The failed, truncated episode gets the failure constant; the success discounts back.
    np.testing.assert_allclose(batch.mc_returns[eids == 1], -100.0, rtol=1e-6)
    np.testing.assert_allclose(batch.mc_returns[(eids == 0) & (steps == 0)], -1.99, rtol=1e-6)


def test_each_frame_is_stored_once():
    buffer = ReplayBuffer(chunk_steps=10)
    fill(buffer, [(i, 10, i % 2 == 0) for i in range(4)])
    frame = SIZE * SIZE * 3
    nbytes = buffer.nbytes
    assert buffer.num_steps == 40
    assert nbytes['images'] == buffer.num_steps * frame
    small = sum(nbytes.values()) - nbytes['images']
    assert small / buffer.num_steps < 100, 'per-step vectors should be a few dozen bytes'


def test_reopening_the_directory_restores_every_episode(tmp_path):
    first = ReplayBuffer(tmp_path, gamma=GAMMA)
    fill(first, [(0, 5, True), (1, 3, False)])
    fill(first, [(2, 4, True)], instruction='open the drawer')
    second = ReplayBuffer(tmp_path, gamma=GAMMA)
    assert second.dropped == [] and second.instructions == first.instructions
    for a, b in zip(first.episodes(), second.episodes(), strict=True):
        for name in ('images', 'states', 'actions', 'rewards', 'discounts', 'is_first',
                     'is_last', 'is_terminal', 'mc_returns'):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        assert (a.language_instruction, a.metadata) == (b.language_instruction, b.metadata)
    # Same contents in the same places: a seeded rng draws the same batch after a restart.
    batches = [buf.sample(64, np.random.default_rng(3)) for buf in (first, second)]
    for x, y in zip(*batches):
        np.testing.assert_array_equal(x, y)


def test_cut_short_corrupt_and_temp_files_are_dropped_and_reported(tmp_path, caplog):
    buffer = ReplayBuffer(tmp_path)
    originals = fill(buffer, [(i, 4, True) for i in range(4)])
    files = sorted(tmp_path.glob('episode_*.safetensors'))
    assert len(files) == 4
    data = files[1].read_bytes()
    files[1].write_bytes(data[:len(data) // 2])                  # a crash mid-write
    corrupt = bytearray(files[2].read_bytes())
    corrupt[-10] ^= 0xFF                                          # a flipped bit in the payload
    files[2].write_bytes(bytes(corrupt))
    stray = tmp_path / 'episode_000000004.safetensors.tmp'
    stray.write_bytes(b'partial')
    with caplog.at_level(logging.WARNING, logger='robot_rl.data.replay'):
        reopened = ReplayBuffer(tmp_path)
    reasons = dict(reopened.dropped)
    assert sorted(reasons) == sorted(str(p) for p in (files[1], files[2], stray))
    assert 'unreadable' in reasons[str(files[1])]
    assert 'checksum' in reasons[str(files[2])]
    assert 'interrupted' in reasons[str(stray)]
    assert len(caplog.records) == 3
    assert [ep.metadata['episode_id'] for ep in reopened.episodes()] == [0, 3]
    assert_rows_match(reopened.sample(64, np.random.default_rng(4)),
                      {k: originals[k] for k in (0, 3)})
    # New files never reuse a number already on disk, not even a stray temp file's.
    reopened.add_episode(make_episode(9, 3, False))
    assert (tmp_path / 'episode_000000005.safetensors').is_file()


def test_episode_file_round_trip(tmp_path):
    ep = make_episode(7, 5, True)
    write_episode(tmp_path / 'one.safetensors', ep)
    back = read_episode(tmp_path / 'one.safetensors')
    np.testing.assert_array_equal(back.images, ep.images)
    assert back.metadata == ep.metadata and back.mc_returns is None
    assert not list(tmp_path.glob('*.tmp'))


def test_fifo_eviction_drops_whole_oldest_episodes():
    buffer = ReplayBuffer(capacity=25)
    fill(buffer, [(0, 10, True), (1, 10, False)])
    fill(buffer, [(2, 10, True)])   # does not fit after episode 1: wraps and evicts episode 0
    assert [ep.metadata['episode_id'] for ep in buffer.episodes()] == [1, 2]
    fill(buffer, [(3, 10, True)])   # lands on episode 1
    assert [ep.metadata['episode_id'] for ep in buffer.episodes()] == [2, 3]
    assert buffer.num_steps == 20 and buffer.num_transitions == 18
    eids, _ = row_ids(buffer.sample(500, np.random.default_rng(5)))
    assert set(eids.tolist()) == {2, 3}


def test_eviction_keeps_a_consistent_fifo_suffix_under_random_lengths():
    capacity, rng = 30, np.random.default_rng(6)
    buffer = ReplayBuffer(capacity=capacity, gamma=GAMMA)
    originals = {}
    for eid in range(60):
        originals.update(fill(buffer, [(eid, int(rng.integers(2, 13)), bool(eid % 3))]))
        held = [ep.metadata['episode_id'] for ep in buffer.episodes()]
        assert held == list(range(held[0], eid + 1)), 'evictions must be oldest first'
        assert buffer.num_steps == sum(len(originals[k]) for k in held) <= capacity
        for ep in buffer.episodes():
            np.testing.assert_array_equal(ep.images, originals[ep.metadata['episode_id']].images)
    assert_rows_match(buffer.sample(256, rng), originals)


def test_reopening_with_a_capacity_keeps_the_newest(tmp_path):
    fill(ReplayBuffer(tmp_path), [(i, 10, True) for i in range(5)])
    small = ReplayBuffer(tmp_path, capacity=20)
    assert [ep.metadata['episode_id'] for ep in small.episodes()] == [3, 4]
    assert len(list(tmp_path.glob('*.safetensors'))) == 5, 'eviction never deletes files'


@pytest.mark.parametrize('weights, batch_size, expected', [
    ((0.5, 0.5), 256, [128, 128]),
    ((0.25, 0.75), 256, [64, 192]),
    ((0.5, 0.5), 255, [128, 127]),
    ((1, 1, 1), 10, [4, 3, 3]),
])
def test_mixing_counts_are_exact(weights, batch_size, expected):
    buffers = [ReplayBuffer() for _ in weights]
    for k, buffer in enumerate(buffers):
        fill(buffer, [(100 * k, 4, True)])
    sampler = MixedSampler(list(zip(buffers, weights)))
    assert sampler.counts(batch_size) == expected
    eids, _ = row_ids(sampler.sample(batch_size, np.random.default_rng(7)))
    assert np.bincount(eids // 100).tolist() == expected
    assert np.all(np.diff(eids) >= 0), 'rows come in source order'


def test_an_empty_source_gives_its_share_to_the_others():
    offline, online = ReplayBuffer(), ReplayBuffer()
    fill(offline, [(0, 5, True)])
    sampler = MixedSampler([(offline, 0.5), (online, 0.5)])
    assert sampler.counts(256) == [256, 0]
    assert sampler.sample(256, np.random.default_rng(8)).images.shape[0] == 256
    with pytest.raises(ValueError, match='empty'):
        MixedSampler([(online, 1.0)]).sample(8, np.random.default_rng(8))
    with pytest.raises(ValueError, match='positive'):
        MixedSampler([(offline, 0.0)])


def test_mixed_instruction_ids_share_one_vocabulary():
    offline, online = ReplayBuffer(gamma=GAMMA), ReplayBuffer(gamma=GAMMA)
    originals = fill(offline, [(0, 4, True)], instruction='open the drawer')
    originals.update(fill(offline, [(1, 4, True)], instruction='wipe the table'))
    originals.update(fill(online, [(100, 4, False)], instruction='wipe the table'))
    originals.update(fill(online, [(101, 4, True)], instruction='fold the cloth'))
    batch = MixedSampler([(offline, 1), (online, 1)]).sample(300, np.random.default_rng(9))
    assert sorted(batch.instructions) == ['fold the cloth', 'open the drawer', 'wipe the table']
    assert_rows_match(batch, originals)


def test_sampling_is_reproducible_from_a_seeded_rng():
    buffer = ReplayBuffer()
    fill(buffer, [(0, 6, True), (1, 7, False)])
    a, b, c = (buffer.sample(32, np.random.default_rng(seed)) for seed in (11, 11, 12))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.states, c.states)


def test_sampling_into_an_earlier_batch_reuses_its_arrays():
    buffer, other = ReplayBuffer(), ReplayBuffer()
    fill(buffer, [(0, 6, True), (1, 7, False)])
    fill(other, [(2, 5, True)], instruction='fold the cloth')
    mixed = MixedSampler([(buffer, 1), (other, 1)])
    for sampler in (buffer, mixed):
        fresh = sampler.sample(32, np.random.default_rng(13))
        target = sampler.sample(32, np.random.default_rng(14))
        reused = sampler.sample(32, np.random.default_rng(13), out=target)
        assert reused.images is target.images and reused.dones is target.dones
        for x, y in zip(fresh, reused):
            np.testing.assert_array_equal(x, y)
        with pytest.raises(ValueError, match=r'out\.images'):
            sampler.sample(16, np.random.default_rng(13), out=target)


def test_bad_episodes_are_rejected_naming_field_and_episode():
    buffer = ReplayBuffer(capacity=8)
    fill(buffer, [(0, 3, True)])
    with pytest.raises(ValueError, match=r'episode 1 .*images are \(8, 8, 3\)'):
        buffer.add_episode(make_episode(1, 3, True, size=8))
    nan_action = make_episode(2, 4, True)
    nan_action.actions[2, 3] = np.nan
    with pytest.raises(ValueError, match='episode 1 .*actions is not finite at step 2'):
        buffer.add_episode(nan_action)
    bad_states = make_episode(3, 4, True)
    bad_states.states = bad_states.states[:, :6].copy()
    with pytest.raises(ValueError, match='episode.states has shape'):
        buffer.add_episode(bad_states)
    with pytest.raises(ValueError, match='capacity'):
        buffer.add_episode(make_episode(4, 9, True))
    with pytest.raises(ValueError, match='no transitions'):
        ReplayBuffer().sample(4, np.random.default_rng(0))
    assert len(buffer) == 1


def test_episode_builder_streams_steps_into_an_episode():
    rng = np.random.default_rng(10)
    frames = rng.integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
    obs = [{'image_primary': f, 'state': np.full(7, i, np.float32)} for i, f in enumerate(frames)]
    for terminal in (True, False):
        builder = EpisodeBuilder('stack the blocks', {'seed': 3})
        for t in range(3):
            builder.add_step(obs[t], np.full(7, 0.1 * t), -1.0 if t < 2 else 0.0)
        ep = builder.finish(obs[3], terminal=terminal)
        assert len(ep) == 4 and len(builder) == 0
        np.testing.assert_array_equal(ep.images, frames)
        np.testing.assert_array_equal(ep.is_terminal, [False, False, False, terminal])
        np.testing.assert_array_equal(ep.is_last, [False, False, False, True])
        buffer = ReplayBuffer(gamma=GAMMA)
        np.testing.assert_allclose(buffer.add_episode(ep).mc_returns, [-1.99, -1, 0, 0],
                                   rtol=1e-6)
        batch = buffer.sample(64, rng)
        np.testing.assert_array_equal(batch.dones, (batch.states[:, 0] == 2) & terminal)
    with pytest.raises(ValueError, match='no steps'):
        EpisodeBuilder('x').finish(obs[0], terminal=True)


def test_episode_builder_copies_reused_observation_buffers():
    frame, state = np.zeros((SIZE, SIZE, 3), np.uint8), np.zeros(7, np.float32)
    builder = EpisodeBuilder('stack the blocks')
    for t in range(3):
        frame[:], state[:] = t, t  # an environment that renders into one buffer
        builder.add_step({'image_primary': frame, 'state': state}, np.zeros(7), -1.0)
    frame[:], state[:] = 3, 3
    ep = builder.finish({'image_primary': frame, 'state': state}, terminal=False)
    np.testing.assert_array_equal(ep.images[:, 0, 0, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(ep.states[:, 0], [0, 1, 2, 3])
    with pytest.raises(ValueError, match='step 1: image shape'):
        builder.add_step({'image_primary': frame, 'state': state}, np.zeros(7), -1.0)
        builder.add_step({'image_primary': frame[:8], 'state': state}, np.zeros(7), -1.0)
