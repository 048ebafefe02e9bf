"""The trainable chunk policies (gaussian, diffusion, autoregressive) behind one interface.

Every class is checked the same way: it can memorise a tiny dataset (loss falls, samples land
on the data's actions in environment units), samples have the promised shape, bounds and
seeding, an observation is encoded once per call, bad inputs fail loudly, and checkpoints round
trip. Models are tiny (ResNet-10 of width 8 on 32x32 images) so the file runs in seconds.
"""

import numpy as np
import pytest
import torch

import policies  # noqa: F401  (registers every policy class)
from policies.autoregressive import detokenize, tokenize
from policies.base import POLICIES, Policy, TrainablePolicy
from policies.common import load_policy, PolicyBatch, save_policy
from robot_rl.models.checkpoint import load_tensors_into, read_checkpoint
from robot_rl.types import IMAGE_KEY

NAMES = ['gaussian', 'diffusion', 'autoregressive']
HORIZON = 2
IMAGE = 32
ENCODER = dict(depth=10, width=8, image_size=IMAGE)
HEADS = {'gaussian': dict(hidden_dims=(64, 64)),
         'diffusion': dict(hidden=64, blocks=2),
         'autoregressive': dict(d_model=32, layers=1, heads=2)}
TRAIN_STEPS = {'gaussian': 200, 'diffusion': 300, 'autoregressive': 200}
BATCH_REPEATS = {'gaussian': 1, 'diffusion': 8, 'autoregressive': 1}
"""Copies of the dataset per batch: only the diffusion loss is noisy enough to need them."""
MAX_SAMPLE_ERROR = 0.15
"""Median |sample - data| as a fraction of each dimension's range after memorising. Trained
policies reach <= 0.09 (diffusion, the slowest); untrained ones sit at >= 0.28, and the test
checks they fail (UNTRAINED_MIN_ERROR) so the threshold means something."""
UNTRAINED_MIN_ERROR = 0.2


def tiny_policy(name, seed=0, horizon=HORIZON, **overrides):
    return POLICIES[name](horizon=horizon, encoder=ENCODER, seed=seed,
                          **{**HEADS[name], **overrides})


def observation(height=IMAGE, width=IMAGE, seed=0):
    rng = np.random.default_rng(seed)
    return {IMAGE_KEY: rng.integers(0, 256, (height, width, 3), dtype=np.uint8)}


pytestmark = pytest.mark.usefixtures('one_torch_thread')


@pytest.fixture(scope='module')
def dataset():
    """Three distinct images, two instructions, one fixed chunk (normalised) per example."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, IMAGE, IMAGE, 3), dtype=np.uint8)
    instructions = ['pick up the cup', 'open the drawer', 'pick up the cup']
    actions = rng.uniform(-0.8, 0.8, (3, HORIZON, 7)).astype(np.float32)
    actions[..., 6] = rng.choice([-1.0, 1.0], (3, HORIZON))  # the gripper: open or closed
    return images, instructions, actions


def sample_error(policy, dataset):
    """Median |sample - target| in environment units, as a fraction of each dimension's range."""
    images, instructions, actions = dataset
    space = policy.action_space
    errors = [np.abs(policy.sample_actions({IMAGE_KEY: image}, text, 16)
                     - space.unnormalise(target)) / (space.high - space.low)
              for image, text, target in zip(images, instructions, actions)]
    return float(np.median(errors))


def train_batch(policy, dataset, repeat=1):
    """The dataset, `repeat` times over, as one batch."""
    images, instructions, actions = dataset
    mask = torch.ones(len(images) * repeat, HORIZON)
    return PolicyBatch(torch.from_numpy(images).repeat(repeat, 1, 1, 1),
                       policy.embed(instructions).repeat(repeat, 1),
                       torch.from_numpy(actions).repeat(repeat, 1, 1), mask)


def test_import_registers_every_policy_class():
    for name in NAMES + ['hold', 'random_walk']:
        assert name in POLICIES
    for name in NAMES:
        assert POLICIES[name].name == name
        policy = tiny_policy(name)
        assert isinstance(policy, Policy) and isinstance(policy, TrainablePolicy)


@pytest.mark.parametrize('name', NAMES)
def test_memorises_a_tiny_dataset(name, dataset):
    torch.manual_seed(0)
    policy = tiny_policy(name)
    before = sample_error(policy, dataset)
    batch = train_batch(policy, dataset, BATCH_REPEATS[name])
    optimiser = torch.optim.Adam(policy.parameters(), lr=1e-3)
    losses = []
    for _ in range(TRAIN_STEPS[name]):
        loss = policy.supervised_loss(batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    first, last = losses[0], float(np.mean(losses[-10:]))
    if name == 'gaussian':  # an NLL: it goes negative as the std shrinks
        assert last < first - 2.0, (first, last)
    else:
        assert last < 0.3 * first, (first, last)
    after = sample_error(policy, dataset)
    assert before > UNTRAINED_MIN_ERROR, before
    assert after < MAX_SAMPLE_ERROR, (before, after)


@pytest.mark.parametrize('name', NAMES)
def test_loss_ignores_steps_past_the_episode_end(name, dataset):
    policy = tiny_policy(name)
    batch = train_batch(policy, dataset)
    mask = torch.tensor([[1.0, 0.0]] * 3)

    def loss(actions, mask=mask):
        torch.manual_seed(1)  # the same diffusion timesteps and noise each time
        return policy.supervised_loss(batch._replace(actions=actions, mask=mask)).item()

    moved_masked, moved_real = batch.actions.clone(), batch.actions.clone()
    moved_masked[:, 1] = -moved_masked[:, 1]
    moved_real[:, 0] = -moved_real[:, 0]
    assert loss(moved_real) != pytest.approx(loss(batch.actions), rel=1e-3)
    assert loss(batch.actions, torch.ones(3, HORIZON)) != pytest.approx(loss(batch.actions))
    if name != 'diffusion':
        # The diffusion network sees the whole noisy chunk, padding included, so there the
        # padding moves the prediction for real steps; only its own error is left out.
        assert loss(moved_masked) == pytest.approx(loss(batch.actions), rel=1e-6)


@pytest.mark.parametrize('name', NAMES)
def test_samples_shape_units_and_seeding(name):
    policy = tiny_policy(name).eval()
    obs, text = observation(), 'pick up the cup'
    policy.generator.manual_seed(7)
    actions = policy.sample_actions(obs, text, 5)
    assert actions.shape == (5, HORIZON, 7) and actions.dtype == np.float32
    space = policy.action_space
    assert np.all(actions >= space.low - 1e-6) and np.all(actions <= space.high + 1e-6)
    assert not np.allclose(actions[0], actions[1])  # samples differ: it is a distribution
    policy.generator.manual_seed(7)
    normalised = policy.sample_normalised(obs, text, 5).numpy()
    np.testing.assert_array_equal(actions, space.unnormalise(normalised))


@pytest.mark.parametrize('name', NAMES)
def test_reset_with_a_seed_replays_an_episode_whatever_came_before(name):
    policy = tiny_policy(name).eval()
    obs, text = observation(), 'pick up the cup'
    policy.reset(seed=3)
    first = [policy.sample_actions(obs, text, 4) for _ in range(2)]
    policy.sample_actions(obs, text, 9)  # another episode draws from the stream
    policy.reset(seed=3)
    again = [policy.sample_actions(obs, text, 4) for _ in range(2)]
    np.testing.assert_array_equal(np.stack(first), np.stack(again))
    policy.reset(seed=4)
    assert not np.allclose(policy.sample_actions(obs, text, 4), first[0])
    policy.reset()  # no seed: the stream goes on
    assert not np.allclose(policy.sample_actions(obs, text, 4), first[0])


@pytest.mark.parametrize('name', NAMES)
def test_one_observation_encoding_per_call(name):
    policy = tiny_policy(name)
    calls = []
    policy.encoder.register_forward_hook(lambda *_: calls.append(1))
    actions = policy.sample_actions(observation(), 'pick up the cup', 50)
    assert actions.shape == (50, HORIZON, 7)
    assert len(calls) == 1


@pytest.mark.parametrize('name', NAMES)
def test_bad_inputs_fail_loudly(name):
    policy = tiny_policy(name)
    for text in ['', '   ']:
        with pytest.raises(ValueError, match='instruction'):
            policy.sample_actions(observation(), text, 2)
    with pytest.raises(ValueError, match=f'{IMAGE}x{IMAGE}.*{IMAGE}x{IMAGE + 16}'):
        policy.sample_actions(observation(IMAGE, IMAGE + 16), 'pick up the cup', 2)
    larger = policy.sample_actions(observation(2 * IMAGE, 2 * IMAGE), 'pick up the cup', 2)
    assert larger.shape == (2, HORIZON, 7)


@pytest.mark.parametrize('name', NAMES)
def test_checkpoint_round_trip(name, tmp_path):
    policy = tiny_policy(name, seed=3)
    with torch.no_grad():  # move every tensor off its initial value (FiLM starts at zero)
        for param in policy.parameters():
            param.add_(0.05 * torch.randn_like(param))
    path = tmp_path / 'policy.safetensors'
    save_policy(path, policy, extra={'step': 12})
    loaded = load_policy(path)
    assert type(loaded) is type(policy) and loaded.config_dict() == policy.config_dict()
    assert loaded.action_space == policy.action_space
    for key, value in policy.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    obs, text = observation(), 'open the drawer'
    policy.generator.manual_seed(5)
    loaded.generator.manual_seed(5)
    np.testing.assert_array_equal(policy.sample_actions(obs, text, 8),
                                  loaded.sample_actions(obs, text, 8))


@pytest.mark.parametrize('name', NAMES)
def test_checkpoint_into_another_config_names_the_tensor(name, tmp_path):
    path = tmp_path / 'policy.safetensors'
    save_policy(path, tiny_policy(name))
    tensors, _ = read_checkpoint(path)
    other = tiny_policy(name, horizon=HORIZON + 1)
    first_mismatch = next(key for key, value in other.state_dict().items()
                          if tensors[key].shape != value.shape)
    with pytest.raises(ValueError, match=f"tensor '{first_mismatch}' has shape"):
        load_tensors_into(other, tensors, source=str(path))


def test_autoregressive_temperature_zero_is_deterministic():
    policy = tiny_policy('autoregressive', temperature=0.0)
    obs, text = observation(), 'pick up the cup'
    first = policy.sample_actions(obs, text, 4)
    policy.generator.manual_seed(99)
    second = policy.sample_actions(obs, text, 4)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, np.broadcast_to(first[:1], first.shape))


def test_action_tokens_round_trip_within_half_a_bin():
    bins = 256
    actions = torch.linspace(-1.0, 1.0, 10_001)
    tokens = tokenize(actions, bins)
    assert tokens.min() == 0 and tokens.max() == bins - 1
    half_bin = 1.0 / bins
    assert (detokenize(tokens, bins) - actions).abs().max() <= half_bin + 1e-6
    centres = detokenize(torch.arange(bins), bins)
    torch.testing.assert_close(tokenize(centres, bins), torch.arange(bins))
