"""The Octo adapter (policies/octo.py): what can run without JAX and Octo.

Octo is not installable here, so the adapter's logic (history window, tasks, the call it makes,
statistics lookup, conversion of Octo's output) runs against `OctoModelStandIn`, written below:
an object with OctoModel's attributes and methods as octo/model/octo_model.py documents them,
computing in numpy what the JAX model would. The real model is exercised only where Octo is
installed (the README's Octo section gives the command).
"""

import importlib.util
import itertools
import subprocess
import sys

import numpy as np
import pytest

from policies.base import POLICIES, Policy
from policies.octo import INSTALL_HINT, OctoPolicy
from robot_rl.types import IMAGE_KEY

WINDOW, HORIZON, SIDE = 2, 4, 16
STATS = {
    'bridge_dataset': {'action': {
        'mean': [0.0002, 0.0001, -0.0001, 0.0, -0.0003, 0.0002, 0.58],
        'std': [0.009, 0.013, 0.012, 0.028, 0.031, 0.076, 0.49],
        'mask': [True] * 6 + [False]}},
    'fractal20220817_data': {'action': {
        'mean': [0.0] * 7, 'std': [1.0] * 7, 'mask': [True] * 7}},
}


class OctoModelStandIn:
    """Stands in for octo.model.octo_model.OctoModel, which cannot be installed here.

    Same attributes (config, example_batch, dataset_statistics) and the two methods the adapter
    calls, with Octo's documented semantics: create_tasks(texts=...) returns a task dict, and
    sample_actions(observations, tasks, unnormalization_statistics, rng, sample_shape) returns
    (*sample_shape, batch, action_horizon, action_dim) actions un-normalised as Octo does
    (where(mask, a * std + mean, a)). The normalised draws `a` come from the rng value, and every
    call is recorded, so tests can check what the adapter sent and what it made of the answer.
    """

    def __init__(self, horizon=HORIZON, window=WINDOW, side=SIDE):
        self.config = {'model': {'heads': {'action': {'kwargs': {'action_horizon': horizon}}}}}
        self.example_batch = {
            'observation': {'image_primary': np.zeros((1, window, side, side, 3), np.uint8),
                            'timestep_pad_mask': np.ones((1, window), bool)},
            'task': {'language_instruction': np.zeros((1, 16), np.int32)}}
        self.dataset_statistics = STATS
        self.calls, self.created = [], []

    def create_tasks(self, goals=None, texts=None):
        self.created.append(list(texts))
        return {'language_instruction': list(texts),
                'pad_mask_dict': {'language_instruction': np.ones(len(texts), bool)}}

    def sample_actions(self, observations, tasks, unnormalization_statistics=None,
                       rng=None, sample_shape=()):
        batch = len(tasks['language_instruction'])
        normalised = np.random.default_rng(rng).normal(
            size=(*sample_shape, batch, self.config['model']['heads']['action']['kwargs'][
                'action_horizon'], 7)).astype(np.float32)
        self.calls.append(dict(observations=observations, tasks=tasks, rng=rng,
                               stats=unnormalization_statistics, sample_shape=sample_shape,
                               normalised=normalised))
        s = unnormalization_statistics
        return np.where(s['mask'], normalised * s['std'] + s['mean'], normalised)


def make(**kwargs):
    model = kwargs.pop('model', None) or OctoModelStandIn()
    return OctoPolicy(model=model, keys=itertools.count().__next__, **kwargs), model


def frame(value, side=SIDE):
    return {IMAGE_KEY: np.full((side, side, 3), value, np.uint8)}


@pytest.mark.skipif(importlib.util.find_spec('octo') is not None, reason='Octo is installed')
def test_without_octo_building_the_policy_says_how_to_install_it():
    with pytest.raises(ImportError) as err:
        OctoPolicy('hf://rail-berkeley/octo-small-1.5')
    assert 'pip install' in str(err.value) and 'octo-models/octo' in str(err.value)
    assert str(err.value).startswith(INSTALL_HINT)


def test_importing_policies_imports_neither_jax_nor_octo():
    code = ('import sys, policies; from policies.base import POLICIES; '
            "assert 'octo' in POLICIES and 'openvla' in POLICIES; "
            "loaded = [m for m in ('jax', 'octo', 'transformers', 'peft') if m in sys.modules]; "
            'assert not loaded, loaded')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


def test_samples_are_octos_unnormalised_actions_in_project_units():
    policy, model = make()
    assert POLICIES['octo'] is OctoPolicy and isinstance(policy, Policy)
    assert policy.action_horizon == HORIZON and policy.window == WINDOW
    chunks = policy.sample_actions(frame(10), 'put the carrot on the plate', 5)
    assert chunks.shape == (5, HORIZON, 7) and chunks.dtype == np.float32
    call, = model.calls
    assert call['sample_shape'] == (5,)
    stats = STATS['bridge_dataset']['action']
    np.testing.assert_allclose(call['stats']['mean'], stats['mean'], rtol=1e-6)
    expected = call['normalised'][:, 0] * np.array(stats['std']) + np.array(stats['mean'])
    expected[..., 6] = np.clip(call['normalised'][:, 0, :, 6], 0.0, 1.0)  # gripper: raw, clipped
    np.testing.assert_allclose(chunks, expected, rtol=1e-5, atol=1e-7)
    assert ((chunks[..., 6] >= 0) & (chunks[..., 6] <= 1)).all()


def test_the_history_window_slides_and_starts_over_on_reset():
    policy, model = make()
    for value in (1, 2, 3):
        policy.sample_actions(frame(value), 'open the drawer', 2)
    masks = [c['observations']['timestep_pad_mask'].tolist() for c in model.calls]
    firsts = [c['observations'][IMAGE_KEY][0, :, 0, 0, 0].tolist() for c in model.calls]
    assert masks == [[[False, True]], [[True, True]], [[True, True]]]
    assert firsts == [[1, 1], [1, 2], [2, 3]]  # padding copies the first frame
    assert model.calls[0]['observations'][IMAGE_KEY].shape == (1, WINDOW, SIDE, SIDE, 3)
    policy.reset()
    policy.sample_actions(frame(7), 'open the drawer', 2)
    assert model.calls[-1]['observations']['timestep_pad_mask'].tolist() == [[False, True]]
    assert model.calls[-1]['observations'][IMAGE_KEY][0, :, 0, 0, 0].tolist() == [7, 7]
    # One task per instruction; a fresh PRNG key per call.
    assert model.created == [['open the drawer']]
    assert len({c['rng'] for c in model.calls}) == len(model.calls)


def test_a_shorter_window_and_resized_frames():
    policy, model = make(window=1)
    policy.sample_actions(frame(4, side=2 * SIDE), 'open the drawer', 1)  # same aspect: resized
    assert model.calls[0]['observations'][IMAGE_KEY].shape == (1, 1, SIDE, SIDE, 3)
    assert model.calls[0]['observations']['timestep_pad_mask'].tolist() == [[True]]
    with pytest.raises(ValueError, match='window must be in 1..2'):
        make(window=3)
    with pytest.raises(ValueError, match='aspect ratio'):
        policy.sample_actions({IMAGE_KEY: np.zeros((SIDE, 2 * SIDE, 3), np.uint8)}, 'x', 1)


def test_a_dataset_key_without_statistics_is_an_error_naming_it():
    with pytest.raises(ValueError, match="dataset key 'bridge_orig'.*bridge_dataset"):
        make(dataset_key='bridge_orig')
    model = OctoModelStandIn()
    model.dataset_statistics = {'bridge_dataset': {'action': {'mean': [0.0] * 7}}}
    with pytest.raises(ValueError, match=r"dataset key 'bridge_dataset'.*\['std'\]"):
        make(model=model)


def test_octo_output_of_the_wrong_shape_is_an_error():
    class LostSampleAxis(OctoModelStandIn):
        def sample_actions(self, *args, **kwargs):
            return super().sample_actions(*args, **kwargs)[0]

    policy, _ = make(model=LostSampleAxis())
    with pytest.raises(ValueError, match='Octo returned actions of shape'):
        policy.sample_actions(frame(1), 'open the drawer', 3)
