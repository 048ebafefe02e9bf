"""T0: the wire format (envelopes, step batches, weights, events) and the online learner."""

import numpy as np
import pytest

from policies.scripted import make_policy
from robot_rl.rl.online_learner import OnlineLearner, OnlineLearnerConfig
from robot_rl.transport import (ActorTracker, decode, decode_steps, decode_weights, encode,
                                encode_steps, encode_weights, EnvelopeError, EpisodeAssembler,
                                parse_event, state_dict_to_numpy, StepEvent, VersionGate)


def episode_records(n=4, size=32, seed=0):
    rng = np.random.default_rng(seed)
    tracker, records = ActorTracker(), []
    for t in range(n + 1):
        image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        event = StepEvent(episode=0, step=t, stamp_ns=t, state=np.full(7, t, np.float32),
                          reward=None if t == 0 else -1.0, terminated=t == n, truncated=False,
                          success=t == n, instruction='stack')
        records += tracker.observe(image, event)
        if not event.done:
            tracker.acted(image, event, np.full(7, 0.01 * t, np.float32), version=3)
    return records


def test_steps_round_trip_png_is_lossless():
    records = episode_records()
    assert [r.step for r in records] == [0, 1, 2, 3, 4] and records[-1].is_terminal
    batch = decode_steps(encode_steps(records, actor='a', episode=7, instruction='stack',
                                      seq=11, image_format='png'))
    assert (batch.actor, batch.episode, batch.seq, batch.instruction) == ('a', 7, 11, 'stack')
    for got, want in zip(batch.steps, records):
        np.testing.assert_array_equal(got.image, want.image)
        np.testing.assert_array_equal(got.action, want.action)
        assert (got.reward, got.is_first, got.is_last, got.policy_version) == \
            (want.reward, want.is_first, want.is_last, 3)


@pytest.mark.parametrize('mutate, reason', [
    (lambda b: b[:-1] + bytes([b[-1] ^ 1]), 'sha256'),
    (lambda b: b'XXXX' + b[4:], 'bad magic'),
    (lambda b: b[:10], 'exceeds'),
    (lambda b: b'', 'too short'),
])
def test_corrupted_envelopes_fail_verification(mutate, reason):
    data = encode_steps(episode_records(), actor='a', episode=0, instruction='x', seq=0)
    with pytest.raises(EnvelopeError, match=reason):
        decode_steps(mutate(data))


def test_schema_checks_reject_bad_content():
    with pytest.raises(EnvelopeError, match='instruction'):
        encode_steps(episode_records(), actor='a', episode=0, instruction='  ', seq=0)
    with pytest.raises(EnvelopeError, match='unknown schema'):
        encode('nope/1', 0, {})
    weights = {'w': np.array([1.0, np.nan], np.float32)}
    with pytest.raises(EnvelopeError, match='non-finite'):
        encode_weights(weights, 1, {'policy': 'tiny_mlp'})
    with pytest.raises(EnvelopeError, match='expected schema'):
        decode(encode_weights({'w': np.ones(2, np.float32)}, 1, {'policy': 'p'}),
               'robot_rl.steps/1')


def test_weights_round_trip_and_keep_latest_gate():
    policy = make_policy('tiny_mlp', {'hidden': 8})
    blob = encode_weights(state_dict_to_numpy(policy.module.state_dict()), 5,
                          {'policy': 'tiny_mlp', 'kwargs': policy.kwargs})
    update = decode_weights(blob)
    assert update.version == 5 and update.meta['kwargs'] == {'hidden': 8, 'layers': 2}
    other = make_policy('tiny_mlp', {'hidden': 8, 'seed': 1})
    other.load_weights(update.tensors, 'v5')
    for k, v in policy.module.state_dict().items():
        np.testing.assert_array_equal(other.module.state_dict()[k].numpy(), v.numpy())
    gate = VersionGate()
    assert [gate.accept(v) for v in (1, 3, 2, 3, 4)] == [True, True, False, False, True]


def test_assembler_closes_once_and_ignores_redelivery():
    records = episode_records()
    first = decode_steps(encode_steps(records[:3], actor='a', episode=0, instruction='s',
                                      seq=0))
    rest = decode_steps(encode_steps(records[3:], actor='a', episode=0, instruction='s',
                                     seq=1))
    asm = EpisodeAssembler()
    assert asm.add(rest) == []            # out of order: waits for steps 0..2
    closed = asm.add(first)
    assert len(closed) == 1 and [s.step for s in closed[0][2]] == [0, 1, 2, 3, 4]
    assert asm.add(first) == [] and asm.duplicates == 3


def test_event_parsing_rejects_bad_fields():
    ev = StepEvent(1, 2, 3, np.zeros(7, np.float32), None, False, True, False, 'x')
    assert parse_event(ev.to_json()).truncated
    for bad in ('nope', '{"type": "step"}', ev.to_json().replace('"step": 2', '"step": -1')):
        with pytest.raises(ValueError):
            parse_event(bad)


def test_online_learner_stores_updates_publishes_and_resumes(tmp_path):
    config = OnlineLearnerConfig(str(tmp_path / 'replay'), str(tmp_path / 'ckpt'),
                                 batch_size=4, publish_every=2)
    batch = decode_steps(encode_steps(episode_records(), actor='a', episode=0,
                                      instruction='s', seq=0))
    learner = OnlineLearner(make_policy('tiny_mlp', {'hidden': 8}), 'tiny_mlp', config)
    assert learner.ingest(batch) == 1 and learner.ready()
    learner.update()
    assert learner.maybe_publish() is None
    learner.update()
    assert decode_weights(learner.maybe_publish()).version == 1
    again = OnlineLearner(make_policy('tiny_mlp', {'hidden': 8, 'seed': 5}), 'tiny_mlp', config)
    assert again.version == 1 and again.ingest(batch) == 0 and len(again.replay) == 1


def test_weights_travel_as_float16_when_asked():
    import torch

    from robot_rl.transport import decode_weights, encode_weights, state_dict_to_numpy
    state = {'w': torch.linspace(-3, 3, 11), 'steps': torch.arange(3)}
    half = state_dict_to_numpy(state, 'float16')
    assert half['w'].dtype == np.float16 and half['steps'].dtype == np.int64
    update = decode_weights(encode_weights(half, 1, {'policy': 'p'}))
    module = torch.nn.Linear(1, 11)
    module.bias.data.copy_(torch.from_numpy(update.tensors['w']))  # float16 into float32
    np.testing.assert_allclose(module.bias.detach().numpy(), state['w'].numpy(), atol=2e-3)
    full = state_dict_to_numpy(state)
    assert full['w'].nbytes == 2 * half['w'].nbytes
    with pytest.raises(ValueError, match='float16 range'):
        state_dict_to_numpy({'big': torch.tensor([1e6])}, 'float16')
